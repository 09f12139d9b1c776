"""A real Prometheus server on loopback for tests, and its rate() arithmetic.

The `prometheus` binary comes out of Debian's package (`bash .ci/install` puts it in
/usr/local/bin, without installing the package or starting its daemon). `Prometheus` runs a
private one: its own config, TSDB directory and port, queried over the HTTP API with urllib.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.needs import require_binary

T = TypeVar("T")

# A sample as the HTTP API gives it: (unix time in seconds, value).
Point = tuple[float, float]


def require_prometheus() -> str:
    """The path of `prometheus`; skip the test without it (fail under CI=true)."""
    how = "run `bash .ci/install` as root to install the binary from Debian's prometheus package"
    return require_binary("prometheus", how)


class Prometheus:
    """`prometheus` on 127.0.0.1:`port`, scraping `targets` (job name -> ["host:port"]) and
    evaluating `rule_files`, both every `interval`. JSON is YAML: the config is written as
    JSON."""

    def __init__(
        self,
        directory: Path,
        port: int,
        targets: dict[str, list[str]],
        rule_files: Sequence[Path],
        *,
        interval: str = "1s",
    ) -> None:
        self.dir = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = directory / "prometheus.json"
        self.log_path = directory / "prometheus.log"
        self.config: dict[str, Any] = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addrs}]}
                for job, addrs in targets.items()
            ],
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> Prometheus:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=1))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    require_prometheus(),
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; idempotent."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/`path`; its `data`, or RuntimeError with Prometheus's error."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result: [{"metric": labels, "value": [t, "v"]}] for a vector,
        [{"metric": labels, "values": [[t, "v"], ...]}] for a range selector."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        result: list[dict[str, Any]] = data["result"]
        return result


def value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def points(series: dict[str, Any]) -> list[Point]:
    return [(float(t), float(v)) for t, v in series["values"]]


def poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Call `check` until it returns something other than None (bounded by `timeout`).

    `check` may raise AssertionError while the answer is not there yet; the last one is
    re-raised at the deadline, so the failure says what was last seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        else:
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def extrapolated_rate(pts: Sequence[Point], at: float, range_s: float, *, is_rate: bool) -> float:
    """What `rate(x[range])` (is_rate) or `increase(x[range])` gives at time `at` over the
    float samples `pts` of one counter: Prometheus 2.x's extrapolatedRate (promql/functions.go),
    in milliseconds as there. The increase (counter resets added back) is extrapolated to the
    range's ends by at most 1.1 average sample intervals (else half of one), and never to
    before the counter would have been zero."""
    if len(pts) < 2:
        raise ValueError("rate() needs at least two samples")
    ms = [(round(t * 1000), v) for t, v in pts]
    range_end = round(at * 1000)
    range_start = range_end - round(range_s * 1000)
    first_t, first_v = ms[0]
    last_t, last_v = ms[-1]
    result = last_v - first_v
    prev = first_v
    for _, v in ms[1:]:
        if v < prev:
            result += prev
        prev = v
    to_start = (first_t - range_start) / 1000
    to_end = (range_end - last_t) / 1000
    sampled = (last_t - first_t) / 1000
    average = sampled / (len(ms) - 1)
    if result > 0 and first_v >= 0:
        to_start = min(to_start, sampled * (first_v / result))
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    factor = interval / sampled
    if is_rate:
        factor /= range_s
    return result * factor
