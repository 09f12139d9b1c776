"""The Grafana dashboard and the Prometheus rules name only what the proxy exports.

A real scrape after the scripted sessions of test_metrics decides what "exported" means;
every PromQL expression is also parsed by promtool (tests/test_metrics_promtool.py).
Outbound mode's metrics are all on the dashboard, and every label value a query or rule
selects for them is one the proxy exports (its series at 0 from `expose_outbound`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics

from .test_metrics import run_script

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "pipeconnect.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

# Grafana's variables, as the test substitutes them to get plain PromQL.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": "pipeconnect",
    "$instance": ".+",
}
# Series that Prometheus itself makes, not the proxy.
PROMETHEUS_SERIES = {"up"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


@pytest.fixture(scope="module")
def scrape_text() -> str:
    return trio.run(run_script).text


@pytest.fixture(scope="module")
def exported(scrape_text: str) -> set[str]:
    """Every series name the scrape exports, including those of labelled families that
    have no child yet (their HELP/TYPE lines are there, their samples not)."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "gauge": ("",),
        "info": ("_info",),
    }
    for family in text_string_to_metric_families(scrape_text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def substitute(expr: str) -> str:
    for var, repl in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, repl)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (not functions, labels or keywords)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors and subqueries
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", e)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job",x="y z"}[5m]))) '
        "/ on (instance) group_left (job) b:c:rate5m offset 1h > 1e-3 and bool d"
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate5m", "d"}


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation query."""
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            out.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return out


def rules_exprs() -> list[tuple[str, str]]:
    """(rule name, expr) from rules.yml: inline `expr: ...` or a `expr: |` block."""
    lines = RULES.read_text().splitlines()
    out: list[tuple[str, str]] = []
    name = ""
    for i, line in enumerate(lines):
        m = re.match(r"\s*-?\s*(record|alert):\s*(\S+)", line)
        if m:
            name = m.group(2)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2)
        if rest not in ("|", ">", "|-", ">-"):
            out.append((name, rest))
            continue
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        out.append((name, " ".join(block).strip()))
    return out


def recorded_names() -> set[str]:
    return {name for name, _ in rules_exprs() if ":" in name}


# ------------------------------------------------------------------ the dashboard

# Outbound mode's panels and their units.
OUTBOUND_PANELS = {
    "Outbound early ratio (time range)": "percentunit",
    "Outbound time saved (last hour)": "s",
    "Outbound round trips saved (last hour)": "short",
    "Outbound active sessions": "short",
    "Outbound sessions by path": "short",
    "Outbound sessions by outcome": "short",
    "Outbound early ratio": "percentunit",
    "Outbound cache lookups by result": "short",
    "Outbound cache invalidations by reason": "short",
    "Outbound deferrals, retries and cache errors": "short",
    "Outbound time saved per hour": "s",
    "Outbound round trips saved per hour": "short",
}


def test_dashboard_structure() -> None:
    d = load_dashboard()
    assert d["schemaVersion"] >= 39
    assert d.get("id") is None and d["uid"] == "pipeconnect-proxy"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    titles = {p["title"]: p for p in panels(d)}
    for wanted in (
        "Advertised vs used",
        "Advertised-vs-used ratio",
        "Client time saved per hour",
        "Sessions by outcome",
        "Upstream banner latency",
        "Active sessions",
        "TLS handshakes by version",
        "Sync errors (early input refused)",
        *OUTBOUND_PANELS,
    ):
        assert wanted in titles, wanted
    for title, unit in OUTBOUND_PANELS.items():
        assert titles[title]["fieldConfig"]["defaults"]["unit"] == unit, title
    # the outbound panels sit under their own row, below everything else
    row = titles["Outbound mode (the MTA's own deliveries)"]
    assert row["type"] == "row"
    for title in OUTBOUND_PANELS:
        assert titles[title]["gridPos"]["y"] > row["gridPos"]["y"], title
    assert titles["Upstream banner latency"]["type"] == "heatmap"
    assert titles["Upstream banner latency"]["targets"][0]["format"] == "heatmap"
    assert titles["Advertised-vs-used ratio"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert titles["Client time saved per hour"]["fieldConfig"]["defaults"]["unit"] == "s"


def test_dashboard_has_no_hard_coded_datasource() -> None:
    d = load_dashboard()
    found: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, val in node.items():
                if key == "datasource":
                    found.append((path, val))
                walk(val, f"{path}.{key}")
        elif isinstance(node, list):
            for i, val in enumerate(node):
                walk(val, f"{path}[{i}]")

    walk(d, "$")
    assert found
    for path, ds in found:
        if ds == {"type": "grafana", "uid": "-- Grafana --"}:  # built-in annotations
            continue
        assert ds == {"type": "prometheus", "uid": "${datasource}"}, path
    for panel in panels(d):
        if panel["type"] != "row":
            assert panel.get("datasource") and panel["targets"], panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_name_only_exported_metrics(exported: set[str]) -> None:
    d = load_dashboard()
    exprs = dashboard_exprs(d)
    assert len(exprs) >= 20
    used: set[str] = set()
    for where, expr in exprs:
        names = metric_names(substitute(expr))
        assert names, where
        missing = names - exported - PROMETHEUS_SERIES
        assert not missing, f"{where}: {sorted(missing)} not exported by the proxy"
        used |= names
    # the variables' label_values() queries too
    for variable in d["templating"]["list"]:
        if variable["type"] == "query":
            m = re.match(r"label_values\((\w+)", variable["query"]["query"])
            assert m and m.group(1) in exported, variable["name"]
    # and the essentials are on it
    for essential in (
        "pipeconnect_early_pipelining_advertised_total",
        "pipeconnect_early_pipelining_used_total",
        "pipeconnect_time_saved_seconds_total",
        "pipeconnect_sessions_total",
        "pipeconnect_upstream_banner_seconds_bucket",
        "pipeconnect_active_sessions",
        "pipeconnect_tls_handshakes_total",
        "pipeconnect_early_input_refused_total",
        "pipeconnect_outbound_sessions_total",
        "pipeconnect_outbound_cache_lookups_total",
        "pipeconnect_outbound_cache_invalidations_total",
        "pipeconnect_outbound_cache_errors_total",
        "pipeconnect_outbound_deferred_total",
        "pipeconnect_outbound_round_trips_saved_total",
        "pipeconnect_outbound_time_saved_seconds_total",
    ):
        assert essential in used, essential


def dashboard_metric_names() -> set[str]:
    used: set[str] = set()
    for _, expr in dashboard_exprs(load_dashboard()):
        used |= metric_names(substitute(expr))
    return used


def test_dashboard_shows_every_outbound_metric(exported: set[str]) -> None:
    outbound = {name for name in exported if name.startswith("pipeconnect_outbound_")}
    assert len(outbound) >= 10, sorted(outbound)  # the scrape has them (families at least)
    missing = outbound - dashboard_metric_names()
    assert not missing, f"outbound metrics on no panel: {sorted(missing)}"


def outbound_labels() -> dict[str, dict[str, set[str]]]:
    """{series: {label: values}} of every outbound series the proxy exports at 0 when an
    outbound listener is up (Metrics.expose_outbound, from proxy/outcomes.py)."""
    metrics = Metrics()
    metrics.expose_outbound()
    out: dict[str, dict[str, set[str]]] = {}
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("pipeconnect_outbound_"):
                labels = out.setdefault(sample.name, {})
                for key, value in sample.labels.items():
                    labels.setdefault(key, set()).add(value)
    return out


_SELECTOR = re.compile(r"(pipeconnect_outbound_\w+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def test_outbound_queries_select_exported_label_values() -> None:
    known = outbound_labels()
    assert known["pipeconnect_outbound_sessions_total"]["path"] == {
        "relay",
        "early",
        "retried",
        "in-step",
    }
    exprs = [(w, substitute(e)) for w, e in dashboard_exprs(load_dashboard())]
    exprs += [(f"rule {name}", expr) for name, expr in rules_exprs()]
    checked = 0
    for where, expr in exprs:
        for name, matchers in _SELECTOR.findall(expr):
            labels = known.get(name, {})
            for key, op, value in _MATCHER.findall(matchers):
                if key in ("job", "instance"):
                    continue
                assert key in labels, f"{where}: {name} has no label {key!r}"
                if op == "=":
                    assert value in labels[key], (
                        f"{where}: {name}{{{key}={value!r}}} never exported"
                    )
                elif op == "=~":
                    assert any(re.fullmatch(value, v) for v in labels[key]), (where, value)
                checked += 1
        # `by (...)` over outbound series groups by labels they have
        names = metric_names(expr)
        if names and all(n.startswith("pipeconnect_outbound_") for n in names):
            have = {"job", "instance"}.union(*(set(known.get(n, {})) for n in names))
            for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                for label in filter(None, (g.strip() for g in group.split(","))):
                    assert label in have, f"{where}: grouped by {label!r}, which {names} lack"
    assert checked >= 4  # path="early" on the dashboard and in the rule, reason="loop"


# ------------------------------------------------------------------ the rules


def test_rules_name_only_exported_metrics(exported: set[str]) -> None:
    rules = rules_exprs()
    assert len(rules) >= 10
    recorded = recorded_names()
    assert "pipeconnect:early_pipelining_use_ratio:rate5m" in recorded
    assert "pipeconnect:time_saved_seconds:increase1h" in recorded
    assert "pipeconnect:outbound_early_ratio:rate5m" in recorded
    alerts = {name for name, _ in rules if ":" not in name}
    assert {
        "PipeconnectOutboundDeferring",
        "PipeconnectOutboundCacheErrors",
        "PipeconnectOutboundLoop",
    } <= alerts
    for name, expr in rules:
        missing = metric_names(expr) - exported - recorded - PROMETHEUS_SERIES
        assert not missing, f"rule {name}: {sorted(missing)} not exported by the proxy"
