"""promtool on what we ship: a real scrape, the rules file (and its unit tests), and every
PromQL expression of the dashboard.

promtool comes from Debian's `prometheus` package (`bash .ci/install` installs the binary).
Without it these tests are skipped with a reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.needs import require_binary

from .test_metrics_dashboard import (
    RULES,
    dashboard_exprs,
    load_dashboard,
    scrape_text,  # noqa: F401  (module-scoped fixture: one scripted run for this file)
    substitute,
)

RULES_TEST = RULES.parent / "rules_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    how = "run `bash .ci/install` as root to install it from Debian's prometheus package"
    return require_binary("promtool", how)


def run(promtool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_scrape_passes_promtool_check_metrics(promtool: str, scrape_text: str) -> None:  # noqa: F811
    assert "pipeconnect_early_pipelining_used_total 1.0" in scrape_text
    result = run(promtool, "check", "metrics", stdin=scrape_text)
    # promtool prints lint problems (naming, units, _total) and exits non-zero on any
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_rules_pass_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests(promtool: str) -> None:
    """deploy/prometheus/rules_test.yml: the ratio and seconds-saved values the recording
    rules yield for known input, and when each alert fires (and does not)."""
    result = run(promtool, "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_outbound_rules_have_unit_tests() -> None:
    """Each outbound rule in rules.yml is exercised by rules_test.yml: the recording rule by
    an expected value, each alert both firing and staying quiet."""
    shipped = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    exprs = [t["expr"] for c in cases for t in c.get("promql_expr_test", [])]
    alert_tests = [t for c in cases for t in c.get("alert_rule_test", [])]
    outbound = [r for r in shipped if "outbound" in r.get("record", r.get("alert", "")).lower()]
    assert len(outbound) >= 4, outbound
    for r in outbound:
        if "record" in r:
            assert any(r["record"] in e for e in exprs), r["record"]
        else:
            outcomes = [bool(t["exp_alerts"]) for t in alert_tests if t["alertname"] == r["alert"]]
            assert True in outcomes and False in outcomes, r["alert"]


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_exprs(load_dashboard())
    # JSON is YAML: one recording rule per expression, so promtool parses each of them
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": substitute(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules, indent=1))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promtool_rejects_a_bad_expression(promtool: str, tmp_path: Path) -> None:
    """The check above would catch a broken query."""
    path = tmp_path / "bad.yml"
    path.write_text(
        json.dumps(
            {"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum(rate(x[5m])"}]}]}
        )
    )
    assert run(promtool, "check", "rules", str(path)).returncode != 0
