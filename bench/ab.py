"""One bench script on two checkouts in alternating pairs of runs: whether a change moved a speed.

On these machines the same code measured twice minutes apart can differ by more than most changes
do (10-25% within an hour, docs/serving.md), so a change is judged by pairs run in turn.

    git worktree add --detach ../slm-before HEAD~1      # the code before the change
    python bench/ab.py ../slm-before . --name feed --labels before after --pairs 3 -- \\
        bench/serve.py --run RUN --rounds 3 --clients 1 16

runs the script after ``--`` (a path in each checkout, with its arguments) with each checkout's own
code (``PYTHONPATH`` and the working folder), ``pairs`` times: A then B in odd pairs, B then A in
even ones, so that a drift over the session weighs on both sides alike. Each run writes
``DIR/NAME_LABEL_I.json`` (``--out`` is added; DIR defaults to bench/results/serve_ab/ here). Then,
per row of the runs' ``summary`` (its first field, e.g. ``clients`` or ``rows``) and per number in
it (``--metric`` picks some), the median of each side and the median of the pairs' B / A ratios,
with every pair's ratio beside it: the spread of those is the noise to judge the difference by.
The table and the runs' files go to ``DIR/NAME.json``.

    python bench/ab.py ../slm-before . --name bb --pairs 3 --metric step_ms -- bench/batch_bound.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, save  # noqa: E402


def rows_of(result: dict) -> dict[str, dict[str, float]]:
    """A results file's summary as {row name: {metric: number}}: each entry named by its first field."""
    out = {}
    for entry in result["summary"]:
        (key, value), *rest = entry.items()
        out[f"{key} {value}"] = {k: v for k, v in rest if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def compare(runs: list[tuple[dict, dict]], labels: tuple[str, str], metrics: list[str] | None) -> tuple[list[str], list[dict]]:
    """The table (markdown lines) and its rows for pairs of results (A, B)."""
    a0 = rows_of(runs[0][0])
    table = [f"| row | metric | {labels[0]} | {labels[1]} | {labels[1]} / {labels[0]} | per pair |", "|---|---|---|---|---|---|"]
    out = []
    for row, numbers in a0.items():
        for metric in numbers:
            if metrics and metric not in metrics:
                continue
            pairs = [(rows_of(a)[row][metric], rows_of(b)[row][metric]) for a, b in runs]
            ratios = [b / a for a, b in pairs if a]
            if not ratios:
                continue
            s = {"row": row, "metric": metric, labels[0]: statistics.median(a for a, _ in pairs),
                 labels[1]: statistics.median(b for _, b in pairs), "ratio": statistics.median(ratios), "ratios": ratios}
            out.append(s)
            table.append(f"| {row} | {metric} | {s[labels[0]]:,.4g} | {s[labels[1]]:,.4g} | {s['ratio']:.3f} | "
                         + ", ".join(f"{r:.3f}" for r in ratios) + " |")
    return table, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s A B --name NAME [options] -- bench/SCRIPT.py [its arguments]")
    parser.add_argument("a", help="checkout A (the baseline), e.g. a git worktree of the commit before")
    parser.add_argument("b", help="checkout B (the change)")
    parser.add_argument("--name", required=True, help="the runs' files: DIR/NAME_LABEL_I.json, the table DIR/NAME.json")
    parser.add_argument("--labels", nargs=2, default=["a", "b"], metavar=("A", "B"))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--metric", nargs="+", default=None, help="the summary's numbers to compare (default: all)")
    parser.add_argument("--dir", default=str(ROOT / "bench" / "results" / "serve_ab"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, script = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    trees = [Path(args.a).resolve(), Path(args.b).resolve()]
    if not script:
        parser.error("give the bench script after --, e.g. -- bench/serve.py --run RUN")
    for tree in trees:
        if not (tree / script[0]).is_file():
            parser.error(f"{tree / script[0]} does not exist: A and B are checkouts of slmkit, the script a path in them")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    out_dir = Path(args.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(1, args.pairs + 1):
        pair: dict[int, dict] = {}
        for side in (0, 1) if i % 2 else (1, 0):
            tree, out = trees[side], out_dir / f"{args.name}_{args.labels[side]}_{i}.json"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
            done = subprocess.run([sys.executable, *script, "--out", str(out)], cwd=tree, env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{args.labels[side]} ({tree}) failed in pair {i}: {done.stderr.strip()[-1500:]}")
            pair[side] = json.loads(out.read_text())
            print(f"pair {i} {args.labels[side]}: {out}", flush=True)
        runs.append((pair[0], pair[1]))
    table, rows = compare(runs, tuple(args.labels), args.metric)
    commits = [runs[0][side].get("commit", "?") for side in (0, 1)]
    table += ["", f"{args.labels[0]} = {trees[0]} ({commits[0]}), {args.labels[1]} = {trees[1]} ({commits[1]}); "
                  f"{args.pairs} pairs of `python {' '.join(script)}`, in turn (A B, B A, ...); medians."]
    print("\n".join(table))
    save(out_dir / f"{args.name}.json", {"a": str(trees[0]), "b": str(trees[1]), "labels": args.labels,
                                         "script": script, "pairs": args.pairs, "rows": rows, "table": table,
                                         "files": [f"{args.name}_{args.labels[s]}_{i}.json"
                                                   for i in range(1, args.pairs + 1) for s in (0, 1)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
