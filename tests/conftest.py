"""Shared fixtures: real Postfix and Exim instances on loopback (see tests/mta.py).

Every test under tests/integration/ is marked `integration`. Such tests (and any test
using one of the MTA fixtures) are skipped when the MTAs are not installed (run
`bash .ci/install` as root) -- except with CI=true, where a missing MTA is an error, so
that CI can never pass by silently skipping them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.mta import EximClient, EximServer, Postfix, free_port, missing_software
from tests.needs import skip_or_fail
from tests.proxyproc import ProxyProcess

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"

# Everything the fixtures started, stopped again at session end should a finalizer
# have been skipped (stop() is idempotent).
_STARTED: list[Postfix | EximServer] = []


def require_mtas() -> None:
    """Skip the current test if the real MTAs are unavailable (fail if CI=true)."""
    missing = missing_software()
    if not missing:
        return
    skip_or_fail(
        f"real MTAs unavailable (missing: {', '.join(missing)}); "
        "run `bash .ci/install` as root to install Postfix, Exim and swaks"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("integration") is not None:
        require_mtas()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _STARTED:
        _STARTED.pop().stop()


def _stop_all(instances: Sequence[Postfix | EximServer]) -> None:
    """Stop every instance, newest first, even if some stop() fails; re-raise the first."""
    errors: list[BaseException] = []
    for mta in reversed(instances):
        try:
            mta.stop()
        except BaseException as e:
            errors.append(e)
        if mta in _STARTED:
            _STARTED.remove(mta)
    if errors:
        raise errors[0]


PostfixFactory = Callable[..., Postfix]
EximClientFactory = Callable[..., EximClient]
EximServerFactory = Callable[..., EximServer]


@pytest.fixture
def postfix_factory(tmp_path: Path) -> Iterator[PostfixFactory]:
    """`make(*, port=None, start=True, **Postfix kwargs) -> Postfix`: a private Postfix
    on 127.0.0.1 (a free port unless given), started unless start=False. All are stopped
    when the test ends."""
    made: list[Postfix] = []
    n = itertools.count()

    def make(*, port: int | None = None, start: bool = True, **kwargs: Any) -> Postfix:
        require_mtas()
        pf = Postfix(tmp_path / f"postfix{next(n)}", port or free_port(), **kwargs)
        made.append(pf)
        _STARTED.append(pf)
        if start:
            pf.start()
        return pf

    yield make
    _stop_all(made)


@pytest.fixture
def postfix(postfix_factory: PostfixFactory) -> Postfix:
    """A started Postfix expecting a PROXY header (v1 or v2) on every connection, with
    smtpd_forbid_unauth_pipelining = yes; `*@dest.test` lands in its Maildir."""
    return postfix_factory(proxy_protocol=True, forbid_unauth_pipelining=True)


@pytest.fixture
def exim_client_factory(tmp_path: Path) -> EximClientFactory:
    """`make(target_port, **EximClient kwargs) -> EximClient`: a sending Exim routing
    everything to 127.0.0.1:target_port from 127.0.0.2, early pipelining enabled. Its
    hints database lives as long as the object (the test)."""
    n = itertools.count()

    def make(target_port: int, **kwargs: Any) -> EximClient:
        require_mtas()
        return EximClient(tmp_path / f"exim-client{next(n)}", target_port, **kwargs)

    return make


@pytest.fixture
def exim_server_factory(tmp_path: Path) -> Iterator[EximServerFactory]:
    """`make(*, port=None, start=True, **EximServer kwargs) -> EximServer`: an Exim daemon
    on 127.0.0.1 that accepts and discards everything (advertising PIPECONNECT by
    default). All are stopped when the test ends."""
    made: list[EximServer] = []
    n = itertools.count()

    def make(*, port: int | None = None, start: bool = True, **kwargs: Any) -> EximServer:
        require_mtas()
        srv = EximServer(tmp_path / f"exim-server{next(n)}", port or free_port(), **kwargs)
        made.append(srv)
        _STARTED.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    _stop_all(made)


ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start proxies (`python -m proxy serve`) in front of an upstream port; all are stopped
    after the test."""
    made: list[ProxyProcess] = []

    def make(upstream_port: int, **sections: dict[str, Any]) -> ProxyProcess:
        proc = ProxyProcess(tmp_path, upstream_port, **sections)
        made.append(proc)
        return proc.start()

    yield make
    for proc in made:
        proc.stop()


# ---------------------------------------------------------------- TLS for the proxy's listeners


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """A certificate for mx.test and 127.0.0.1 (the proxy's ``[tls]``), and its CA."""
    cert = ca.issue_cert("mx.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return {"certificate": str(cert_path), "key": str(key_path), "ca": str(ca_path)}
