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
per row of the runs' ``summary`` (a list: each entry named by its first field, e.g. ``clients 16``
or ``rows 1``; a dict: one row) and per number in it (``--metric`` picks some), the median of each
side and the median of the pairs' B / A ratios (run i of A against run i of B), with every pair's
ratio beside it: the spread of those is the noise to judge the difference by. A number that not
every run reports (a change that adds or renames one) is named, not compared. The table and the
runs' files go to ``DIR/NAME.json``.

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


RESERVED = {"row", "metric", "ratio", "ratios"}  # the keys of a compared row beside the two labels


def rows_of(result: dict) -> dict[str, dict[str, float]]:
    """A results file's summary as {row name: {metric: number}}: a list of entries, each named by
    its first field (``clients 16``, ``rows 1``), or one dict (the row ``summary``)."""
    summary = result["summary"]
    entries = [("summary", summary)] if isinstance(summary, dict) else [(None, e) for e in summary]
    out = {}
    for name, entry in entries:
        items = list(entry.items())
        if name is None:
            (key, value), items = items[0], items[1:]
            name = f"{key} {value}"
        out[name] = {k: v for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"


def compare(runs: list[tuple[dict, dict]], labels: tuple[str, str], metrics: list[str] | None
            ) -> tuple[list[str], list[dict], list[str]]:
    """The table (markdown lines), its rows and what could not be compared (a row or number missing
    from some run, or 0 on A's side), for pairs of results (A, B)."""
    parsed = [(rows_of(a), rows_of(b)) for a, b in runs]
    table = [f"| row | metric | {labels[0]} | {labels[1]} | {labels[1]} / {labels[0]} | per pair |", "|---|---|---|---|---|---|"]
    out, left = [], []
    keys = {(row, metric): None for run in parsed for side in run for row, numbers in side.items() for metric in numbers}
    for row, metric in keys:  # every run's rows and numbers, in the order they first come
        if metrics and metric not in metrics:
            continue
        try:
            pairs = [(a[row][metric], b[row][metric]) for a, b in parsed]
        except KeyError:
            left.append(f"{row} {metric} (not in every run)")
            continue
        if not all(a for a, _ in pairs):
            left.append(f"{row} {metric} (0 on {labels[0]}'s side)")
            continue
        ratios = [b / a for a, b in pairs]
        s = {"row": row, "metric": metric, labels[0]: statistics.median(a for a, _ in pairs),
             labels[1]: statistics.median(b for _, b in pairs), "ratio": statistics.median(ratios), "ratios": ratios}
        out.append(s)
        table.append(f"| {row} | {metric} | {number(s[labels[0]])} | {number(s[labels[1]])} | {s['ratio']:.3f} | "
                     + ", ".join(f"{r:.3f}" for r in ratios) + " |")
    return table, out, left


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
    if Path(script[0]).is_absolute():  # it would run one checkout's copy on both sides
        parser.error(f"give the script as a path inside the checkouts (bench/SCRIPT.py), not {script[0]}")
    for tree in trees:
        if not (tree / script[0]).is_file():
            parser.error(f"{tree / script[0]} does not exist: A and B are checkouts of slmkit, the script a path in them")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    for label in args.labels:
        if not label.replace("_", "").replace("-", "").isalnum() or label in RESERVED:
            parser.error(f"--labels: {label!r} must be letters, digits, - or _ (a file name), and not one of {sorted(RESERVED)}")
    if args.labels[0] == args.labels[1]:
        parser.error("--labels must differ: they name each side's files")
    out_dir = Path(args.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(1, args.pairs + 1):
        pair: dict[int, dict] = {}
        for side in (0, 1) if i % 2 else (1, 0):
            tree, out = trees[side], out_dir / f"{args.name}_{args.labels[side]}_{i}.json"
            out.unlink(missing_ok=True)  # never read an earlier run's file as this one's
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
            done = subprocess.run([sys.executable, *script, "--out", str(out)], cwd=tree, env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                sys.exit(f"{args.labels[side]} ({tree}) failed in pair {i} (exit {done.returncode}): {last}")
            if not out.is_file():
                sys.exit(f"{script[0]} wrote no {out}: ab.py needs a bench script that takes --out")
            pair[side] = json.loads(out.read_text())
            if "summary" not in pair[side]:
                sys.exit(f"{out} has no summary to compare: ab.py compares bench scripts' summaries")
            print(f"pair {i} {args.labels[side]}: {out}", flush=True)
        runs.append((pair[0], pair[1]))
    table, rows, left = compare(runs, tuple(args.labels), args.metric)
    if args.metric and not rows:
        sys.exit(f"--metric {' '.join(args.metric)}: no such number in the summaries "
                 f"(they have: {', '.join(sorted({m for r in rows_of(runs[0][0]).values() for m in r}))})")
    commits = [runs[0][side].get("commit", "?") for side in (0, 1)]
    table += ["", f"{args.labels[0]} = {trees[0]} ({commits[0]}), {args.labels[1]} = {trees[1]} ({commits[1]}); "
                  f"{args.pairs} pairs of `python {' '.join(script)}`, in turn (A B, B A, ...); medians. A time "
                  "below 1x is faster, a rate above 1x."]
    if left:
        table.append("Not compared: " + "; ".join(left) + ".")
    print("\n".join(table))
    save(out_dir / f"{args.name}.json", {"a": str(trees[0]), "b": str(trees[1]), "labels": args.labels,
                                         "script": script, "pairs": args.pairs, "rows": rows, "left_out": left,
                                         "table": table, "files": [f"{args.name}_{args.labels[s]}_{i}.json"
                                                                   for i in range(1, args.pairs + 1) for s in (0, 1)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
