"""Run a benchmark module on this tree and on another commit, interleaved, in one run.

    python -m bench.compare REV [MODULE ...] [--rounds N]

REV is checked out into a temporary git worktree; each round runs every
module once in this tree and once in REV's (alternating which goes first),
each in a fresh process with that tree's ``src`` and ``bench`` on the path.
For every row both trees report, the table gives each tree's median ratio
(carnet / its baseline, measured in the same process) and their quotient:
above 1 means this tree's ratio is worse than REV's. Comparing ratios, not
raw times, keeps machine noise that hits carnet and its baseline alike out of
the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROBE = (
    "import json, sys, importlib\n"
    "rows = list(importlib.import_module('bench.bench_' + sys.argv[1]).run())\n"
    "print('@@ROWS@@' + json.dumps([[r['name'], r.get('ratio')] for r in rows]))\n"
)


def run_once(tree: Path, module: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(tree)])}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("@@ROWS@@"))
    return {name: ratio for name, ratio in json.loads(line[8:]) if ratio is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("rev", help="the commit to compare with (e.g. HEAD~1)")
    parser.add_argument("modules", nargs="*", default=["core"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", args.rev],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="carnet-compare-") as tmp:
        other = Path(tmp) / sha
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(other), sha],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            for module in args.modules:
                mine: dict[str, list[float]] = {}
                theirs: dict[str, list[float]] = {}
                for i in range(args.rounds):
                    order = [(ROOT, mine), (other, theirs)]
                    if i % 2:
                        order.reverse()
                    for tree, acc in order:
                        print(f"round {i + 1}: bench_{module} on {tree.name}", file=sys.stderr)
                        for name, ratio in run_once(tree, module).items():
                            acc.setdefault(name, []).append(ratio)
                print(
                    f"\n== bench_{module}: this tree vs {sha}, {args.rounds} interleaved rounds =="
                )
                print(f"{'row':<58} {sha:>8} {'this':>8} {'this/' + sha:>14}")
                for name in mine:
                    if name not in theirs:
                        continue
                    a, b = statistics.median(theirs[name]), statistics.median(mine[name])
                    if not a:
                        continue
                    print(f"{name[:58]:<58} {a:>7.2f}x {b:>7.2f}x {b / a:>13.3f}")
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)],
                cwd=ROOT,
                capture_output=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
