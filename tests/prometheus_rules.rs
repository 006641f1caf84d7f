//! The shipped Prometheus rules and Grafana dashboard are valid: `promtool`
//! checks the rules and runs their unit tests (availability recording rules,
//! burn-rate, backend-down and queue alerts), and the dashboard parses.

use std::process::Command;

const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");

fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(RULES_DIR)
        .output()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    assert!(
        output.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_rules_are_valid() {
    promtool(&[
        "check",
        "rules",
        "../helm/s3-failover-proxy/files/rules.yml",
    ]);
}

#[test]
fn the_rules_pass_their_unit_tests() {
    promtool(&["test", "rules", "rules_test.yml"]);
}

#[test]
fn the_dashboard_queries_metrics_the_proxy_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/s3-failover-proxy.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    let exported = s3_failover_proxy::metrics::Metrics::new().names();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let uses_known =
                exported.iter().any(|name| expr.contains(name.as_str())) || expr.contains("s3fp:");
            assert!(
                uses_known,
                "panel {:?} queries an unknown metric: {expr}",
                panel["title"]
            );
        }
    }
}
