"""How the package's modules depend on each other: no module takes another's private
names, and the metrics do not depend on the session (issue 12, "Untangle the modules")."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest

from proxy.tcpinfo import tcp_rtt

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"
MODULES = sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from .module import name`` in ``path`` (relative only:
    the package's own modules), TYPE_CHECKING blocks included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            out += [(node.module or "", alias.name) for alias in node.names]
    return out


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_no_module_imports_private_names(path: Path) -> None:
    private = [f"{mod}.{name}" for mod, name in imports(path) if name.startswith("_")]
    assert private == [], f"{path.name} imports private names: {private}"


def test_metrics_does_not_import_the_session() -> None:
    mods = {mod for mod, _ in imports(PACKAGE / "metrics.py")}
    assert not mods & {"session", "upstream", "machine"}, mods


def test_tcp_rtt_of_a_connected_socket() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        rtt = tcp_rtt(client)
        if hasattr(socket, "TCP_INFO"):  # Linux
            assert rtt is not None and 0 <= rtt < 1
        else:
            assert rtt is None


def test_tcp_rtt_of_anything_else_is_none() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert tcp_rtt(udp) is None
    assert tcp_rtt(object()) is None
