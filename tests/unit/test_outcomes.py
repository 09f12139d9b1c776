"""Session outcomes: one definition, the names README promises, exported from the start."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.outcomes import ENDED, Outcome

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_exactly_the_outcomes() -> None:
    text = README.read_text()
    start = text.index("`outcome` is one of:")
    paragraph = text[start : text.index("\n\n", start)]
    named = {
        word
        for word in re.findall(r"`([a-z0-9-]+)`", paragraph)
        if word not in ("outcome",) and not word.startswith(("timeouts", "pipeconnect"))
    }
    assert named == {str(o) for o in ENDED}


def test_outcome_values_are_the_logged_names() -> None:
    assert f"outcome={Outcome.SYNC_VIOLATION}" == "outcome=sync-violation"
    assert Outcome.OPEN not in ENDED and len(ENDED) == len(Outcome) - 1
