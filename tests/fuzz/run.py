"""Coverage-guided fuzzing of one target with atheris (libFuzzer): `python -m tests.fuzz.run TARGET --seconds S`.

Only the target's parser modules are instrumented (their branches are the coverage libFuzzer reports
as `cov`), the corpus starts from the target's valid seeds and persists under `--corpus` so a later
run continues where this one stopped, and a crash (any exception but the parser's documented error)
stops the run and leaves its input under `--corpus`/crashes/: fix the parser, then copy the input to
`tests/fuzz/regressions/TARGET/` so the suite replays it. `scripts/fuzz.sh` runs every target.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

import atheris


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--corpus", type=Path, default=Path(".fuzz"), help="corpus, crashes and scratch files, per target")
    args = parser.parse_args()
    work = args.corpus / args.target / "work"
    shutil.rmtree(work, ignore_errors=True)  # the last run's scratch files (libFuzzer's exit leaves them)
    work.mkdir(parents=True)
    os.environ["EDGE_FUZZ_WORK"] = str(work)
    from tests.fuzz.targets import TARGETS

    if args.target not in TARGETS:
        parser.error(f"unknown target {args.target!r}; one of {', '.join(TARGETS)}")
    target = TARGETS[args.target]
    corpus, crashes = args.corpus / args.target / "corpus", args.corpus / args.target / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=list(target.modules)):
        seeds = target.seeds()  # builds the target's state, importing (and so instrumenting) its modules
        for module in target.modules:
            __import__(module)
    for seed in seeds:
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    max_len = max(4096, 2 * max(map(len, seeds)))
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={args.seconds}", f"-max_len={max_len}",
                   "-timeout=20", "-rss_limit_mb=4096", "-print_final_stats=1", f"-artifact_prefix={crashes}/"],
                  target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
