"""The fuzz harnesses (fuzz/) run: each target under atheris for a few thousand inputs, and
every seed and saved reproducer through its target directly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.seeds import SEEDS
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = sorted((ROOT / "fuzz" / "regressions").iterdir())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_pass(name: str) -> None:
    for seed in SEEDS[name]:
        TARGETS[name](seed)


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_saved_reproducers_pass(path: Path) -> None:
    TARGETS[path.name.split("-", 1)[0]](path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_runs(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    runs = 3000
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            name,
            "--corpus",
            str(tmp_path / "corpus"),
            f"-atheris_runs={runs}",
            "-max_len=512",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} in " in result.stderr
    assert any((tmp_path / "corpus").iterdir())
    assert not list(tmp_path.glob("crash-*"))


def test_a_lost_byte_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: a reader that loses one byte of message data is reported."""
    import fuzz.targets as targets
    from proxy.smtp import CommandReader, DataChunk

    class Lossy(CommandReader):
        def next_event(self):  # type: ignore[no-untyped-def]
            ev = super().next_event()
            return DataChunk(ev.data[1:]) if isinstance(ev, DataChunk) else ev

    session = b"\x01\xff\xff\x00" + b"EHLO a\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"
    targets.commands(session)
    monkeypatch.setattr(targets, "CommandReader", Lossy)
    with pytest.raises(AssertionError):
        targets.commands(session)


def test_v1_cr_before_crlf_refused_in_any_read() -> None:
    """Found by the proxy_header target: "PROXY UNKNOWN \\r\\r\\n" was accepted whole but
    refused when the first 16 bytes came alone. A bare CR is now refused either way."""
    from proxy.proxyproto import ProxyProtocolError, parse_header

    data = b"PROXY UNKNOWN \r\r\nEHLO x\r\n"
    for cut in (16, len(data)):
        with pytest.raises(ProxyProtocolError, match="invalid character"):
            parse_header(data[:cut])
    assert parse_header(b"PROXY UNKNOWN \r") is None  # the CRLF may still be on its way
