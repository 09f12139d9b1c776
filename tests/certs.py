"""Test certificates made by trustme at test time (no key is committed)."""

from __future__ import annotations

import os
from pathlib import Path

import trustme


def write_tls_files(directory: Path, *identities: str, prefix: str = "") -> dict[str, str]:
    """A fresh CA and a leaf for ``identities``: ``certificate`` (chain, leaf first), ``key``
    and ``ca`` PEM files in ``directory``, world-readable (Exim reads them as Debian-exim,
    Postfix's tlsmgr as postfix; test keys only)."""
    ca = trustme.CA()
    cert = ca.issue_cert(*identities)
    paths = {name: directory / f"{prefix}{name}.pem" for name in ("certificate", "key", "ca")}
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["certificate"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for path in paths.values():
        os.chmod(path, 0o644)
    return {name: str(path) for name, path in paths.items()}
