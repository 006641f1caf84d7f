"""Offline validation of deploy/: the Helm chart and the plain manifests.

- `helm lint --strict` through Helm's own Go SDK (the helm-python-sdk wheel
  bundles it; the helm binary is not in the package registries CI can reach);
- `helm template` with the default values and with examples/values-s3gw.yaml,
  every document checked by `kubernetes-validate --strict`; the Prometheus
  Operator kinds (ServiceMonitor, PrometheusRule) have no upstream schema, so
  the PrometheusRule's groups go through `promtool check rules` instead;
- the admin port is kept off the client-facing Service, a NetworkPolicy
  admits it only from listed peers, and the config names the mounted token;
- manifests/s3-failover-proxy.yaml must equal a fresh render of the chart
  with MANIFEST_VALUES (`--write-manifests` regenerates it): the default values
  but a named admin-token Secret, since a chart-made one holds a random token
  that would differ on every render (and be the same for everyone who applies
  the file).
"""
import argparse
import pathlib
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "s3-failover-proxy"
MANIFESTS = DEPLOY / "manifests" / "s3-failover-proxy.yaml"
KUBE_VERSION = "1.33.0"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
MANIFEST_SECRET = "s3-failover-proxy-admin-token"
MANIFEST_VALUES = {"admin": {"token": {"existingSecret": MANIFEST_SECRET}}}


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="s3-failover-proxy", namespace="s3gw", is_install=True)
    documents = []
    for path in sorted(rendered):
        if not path.endswith(".yaml"):
            continue
        for document in yaml.safe_load_all(rendered[path]):
            if document:
                documents.append(document)
    return documents


def as_yaml(documents):
    header = "# Rendered from deploy/helm/s3-failover-proxy with its default values\n" \
             "# (release s3-failover-proxy, namespace s3gw). Regenerate: python3 deploy/validate.py --write-manifests\n" \
             f"# but admin.token.existingSecret={MANIFEST_SECRET}: create that Secret first, e.g.\n" \
             f"#   kubectl -n s3gw create secret generic {MANIFEST_SECRET} --from-literal=token=$(head -c 32 /dev/urandom | base64)\n"
    return header + "".join("---\n" + yaml.safe_dump(d, sort_keys=True) for d in documents)


def lint():
    report = helm.lint(str(CHART), strict=True, kube_version="v" + KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    for message in report["messages"]:
        print(f"lint: {message}")
    return [f"helm lint --strict: {p}" for p in problems]


def validate(documents, label):
    failures = []
    plain = [d for d in documents if d["kind"] not in OPERATOR_KINDS]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        file.write("".join("---\n" + yaml.safe_dump(d) for d in plain))
    result = subprocess.run(
        ["kubernetes-validate", "--strict", "--kubernetes-version", KUBE_VERSION, file.name],
        capture_output=True, text=True,
    )
    print(result.stdout + result.stderr)
    if result.returncode != 0:
        failures.append(f"kubernetes-validate --strict ({label}) failed")
    for document in documents:
        if document["kind"] == "PrometheusRule":
            with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as rules:
                yaml.safe_dump({"groups": document["spec"]["groups"]}, rules)
            checked = subprocess.run(["promtool", "check", "rules", rules.name], capture_output=True, text=True)
            print(checked.stdout + checked.stderr)
            if checked.returncode != 0:
                failures.append(f"promtool check rules on the rendered PrometheusRule ({label}) failed")
    return failures


def check_admin_exposure(documents, label):
    """The admin API is reachable only as documented (issue 13, item 3)."""
    failures = []
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    client = services.get("s3-failover-proxy")
    if client is None or any(port.get("targetPort") == "admin" for port in client["spec"]["ports"]):
        failures.append(f"the client-facing Service exposes the admin port ({label})")
    policies = [d for d in documents if d["kind"] == "NetworkPolicy"]
    admin_rules = [
        rule for policy in policies for rule in policy["spec"].get("ingress", [])
        if any(port.get("port") == "admin" for port in rule.get("ports", []))
    ]
    if not admin_rules or any(not rule.get("from") for rule in admin_rules):
        failures.append(f"no NetworkPolicy limits who reaches the admin port ({label})")
    configmap = next(d for d in documents if d["kind"] == "ConfigMap")
    if "token_file = " not in configmap["data"]["config.toml"]:
        failures.append(f"the rendered config sets no admin.token_file ({label})")
    return failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-manifests", action="store_true")
    parser.add_argument("--emit-configs", metavar="DIR", help="write each rendered config.toml into DIR")
    args = parser.parse_args()

    defaults = render(None)
    manifest_values = render(MANIFEST_VALUES)
    if args.write_manifests:
        MANIFESTS.parent.mkdir(exist_ok=True)
        MANIFESTS.write_text(as_yaml(manifest_values))
        print(f"wrote {MANIFESTS}")
        return 0

    example = yaml.safe_load((DEPLOY / "examples" / "values-s3gw.yaml").read_text())
    if args.emit_configs:
        for label, documents in (("default", defaults), ("values-s3gw", render(example))):
            configmap = next(d for d in documents if d["kind"] == "ConfigMap")
            path = pathlib.Path(args.emit_configs) / f"{label}.toml"
            path.write_text(configmap["data"]["config.toml"])
            print(f"wrote {path}")
    failures = lint()
    failures += validate(defaults, "default values")
    failures += validate(render(example), "examples/values-s3gw.yaml")
    manifests = list(d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d)
    failures += validate(manifests, "manifests/")
    for documents, label in ((defaults, "default values"), (render(example), "examples/values-s3gw.yaml"), (manifests, "manifests/")):
        failures += check_admin_exposure(documents, label)
    if MANIFESTS.read_text() != as_yaml(manifest_values):
        failures.append("deploy/manifests/s3-failover-proxy.yaml is stale: run python3 deploy/validate.py --write-manifests")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
