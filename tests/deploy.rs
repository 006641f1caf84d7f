//! deploy/ is valid offline: the Helm chart lints strictly and renders into
//! manifests that pass `kubernetes-validate --strict`, the committed plain
//! manifests match the chart, the rendered PrometheusRule passes promtool, and
//! the config the chart renders is one the proxy accepts.

use std::process::Command;

const VALIDATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/validate.py");
const BINARY: &str = env!("CARGO_BIN_EXE_s3-failover-proxy");
/// Where the chart mounts the admin token Secret.
const MOUNTED_TOKEN: &str = "/var/run/s3-failover-proxy/admin/token";

#[test]
fn the_chart_and_manifests_validate_and_render_configs_the_proxy_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new("python3")
        .arg(VALIDATE)
        .arg("--emit-configs")
        .arg(dir.path())
        .output()
        .expect("python3 with helm-python-sdk and kubernetes-validate (.ci/run installs them)");
    assert!(
        output.status.success(),
        "deploy/validate.py:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The rendered configs name the token the chart mounts; --check reads it.
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    for name in ["default.toml", "values-s3gw.toml"] {
        let config = dir.path().join(name);
        let rendered = std::fs::read_to_string(&config).unwrap();
        assert!(
            rendered.contains(MOUNTED_TOKEN),
            "{name} names the mounted token"
        );
        let local = rendered.replace(MOUNTED_TOKEN, &token.display().to_string());
        std::fs::write(&config, local).unwrap();
        let checked = Command::new(BINARY)
            .arg("--config")
            .arg(&config)
            .arg("--check")
            .output()
            .unwrap();
        assert!(
            checked.status.success(),
            "the chart renders a config the proxy refuses ({name}): {}",
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}
