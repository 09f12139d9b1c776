"""Run one fuzz target under atheris (libFuzzer):

    python -m fuzz TARGET [--corpus DIR] [libFuzzer options and files...]

``--corpus DIR`` seeds DIR (if empty) and lets libFuzzer grow it there. A file argument
replays that input, e.g. a crash-* file libFuzzer wrote. Options: -atheris_runs=N,
-max_len=N, -timeout=S, see https://llvm.org/docs/LibFuzzer.html#options.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from fuzz.seeds import SEEDS
    from fuzz.targets import TARGETS


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz {{{'|'.join(TARGETS)}}} [--corpus DIR] [options]")
    name, rest = argv[1], argv[2:]
    if "--corpus" in rest:
        i = rest.index("--corpus")
        corpus = Path(rest[i + 1])
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for n, seed in enumerate(SEEDS[name]):
                (corpus / f"seed-{n}").write_bytes(seed)
        rest[i : i + 2] = [str(corpus)]
    atheris.Setup([f"{argv[0]}:{name}", *rest], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
