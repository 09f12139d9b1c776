"""What a test needs from the machine: skip without it, except under CI=true, where a
missing tool is a failure (CI must never pass by silently skipping)."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true, so not skipping: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str, how: str) -> str:
    """The path of command ``name``; ``how`` says how to get it."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} unavailable; {how}")
        raise AssertionError("unreachable")  # pragma: no cover
    return path
