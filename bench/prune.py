"""Pruned and recovered against trained from scratch, at the same size and the same CPU time.

    python bench/prune.py                       # every job below, in order (about 19 minutes on 2 cores)
    python bench/prune.py --jobs base prune recover-50 recover-25 distill-50   # some (the rest later)
    python bench/prune.py --smoke               # seconds: the same jobs with tiny budgets, a tmp dir

A ``cpu-15min``-shaped base (4 layers, width 192, 4 heads, SwiGLU 512, vocab 4096: 2.56M
parameters) trains for ``--base`` minutes on the shared TinyStories sample. ``slm prune`` cuts it
to about half (width 128, MLP 256) and about a quarter (width 96, MLP 128, 2 heads) of its
parameters; each pruned run recovers for ``--recover`` minutes with ``slm finetune`` on the same
data (``recover-*``, continued pretraining; ``distill-50``: ``--distill`` from the base instead).
Against them: models of exactly the pruned configs trained from scratch with the ``cpu-15min``
recipe for ``--base`` + ``--recover`` minutes (``scratch-*``), the whole CPU time the pruned
model took, the base's included. Every run is eager (``train.compile=false``, compilation would
eat a large share of minutes-long budgets) in ``train.dtype=auto``; times are training-step time
(``--max-time``), validation excluded alike. Each is scored by ``slm eval`` on the whole val split
(``valid.txt``, 500 stories), last checkpoint.

Jobs skip what is already done in ``--work``, so the benchmark can run in several sittings; the
results (bench/results/prune.json, ``--results``) gather every finished job with its command, the
machine and the commit, and a Markdown table for ``bench/report.py``'s ``prune`` block.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import machine_info  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "tinystories"
SIZES = {"50": ["--width", "128", "--mlp", "256"], "25": ["--width", "96", "--mlp", "128", "--heads", "2"]}
JOBS = ["base", "prune", "recover-50", "recover-25", "distill-50", "scratch-50", "scratch-25"]
COMMON = ["train.compile=false", "train.eval_interval=100000", "train.checkpoint_interval=100000", "train.plot=false"]


def slm(*argv: str) -> None:
    from slmkit.cli import main

    print("$ slm " + shlex.join(argv), file=sys.stderr, flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"slm {argv[0]} failed with exit code {code}")


def minutes(m: float) -> str:
    return f"{m * 60:g}s"


def score(run: Path, data: Path) -> dict[str, Any]:
    from slmkit.checkpoint import load_run
    from slmkit.evaluate import evaluate_run

    model, _, state = load_run(run, which="last")
    ev = evaluate_run(run, data_dir=data, which="last")
    return {"params": sum(p.numel() for p in model.parameters()), "val_bpb": ev["bpb"], "val_loss": ev["loss"],
            "train_s": round(state.get("elapsed", 0.0), 1), "steps": state.get("step"), "tokens": state.get("tokens"),
            "model": {k: v for k, v in vars(model.config).items()
                      if k in ("n_layer", "n_head", "n_kv_head", "n_embd", "head_size", "mlp_hidden")}}


def run_job(job: str, work: Path, data: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    base, recover = args.base, args.recover
    size = job.split("-")[-1]
    if job == "base":
        slm("train", "--data", str(data), "--out", str(work / "base"), "--preset", "cpu-15min",
            "--max-time", minutes(base), *COMMON)
        return {"what": "base", "minutes": base, **score(work / "base", data)}
    if job == "prune":
        for s, flags in SIZES.items():
            t0 = time.perf_counter()
            if not (work / f"pruned-{s}").exists():
                slm("prune", str(work / "base"), "--out", str(work / f"pruned-{s}"), "--data", str(data), *flags)
            if f"pruned-{s}" not in args.results_rows:
                row = {"what": f"pruned to ~{s}%, not recovered", "prune_s": round(time.perf_counter() - t0, 1),
                       "flags": " ".join(flags), **score(work / f"pruned-{s}", data)}
                args.results_rows[f"pruned-{s}"] = row
        return None
    if job.startswith(("recover", "distill")):
        extra = ["--distill", str(work / "base")] if job.startswith("distill") else []
        slm("finetune", str(work / f"pruned-{size}"), "--data", str(data), "--out", str(work / job),
            "--max-time", minutes(recover), "train.lr=1e-3", "train.warmup_steps=20", "train.batch_size=16",
            *extra, *COMMON)
        how = "distilled from the base" if extra else "continued pretraining"
        return {"what": f"pruned to ~{size}% + {recover:g} min recovery ({how})",
                "minutes": base + recover, **score(work / job, data)}
    if job.startswith("scratch"):
        from slmkit.config import from_dict, load_preset, to_dict
        from slmkit.model import ModelConfig
        from slmkit.prune import PruneConfig, pruned_config

        # The pruned run's config, computed as slm prune does (so this job needs no pruned run).
        base_cfg = from_dict(ModelConfig, {**load_preset("cpu-15min")["model"], "vocab_size": 4096}, "model")
        flags = SIZES[size]
        keep = {flags[i][2:]: int(flags[i + 1]) for i in range(0, len(flags), 2)}
        model = to_dict(pruned_config(base_cfg, PruneConfig(**keep)))
        overrides = [f"model.{k}={v}" for k, v in model.items()
                     if k in ("n_layer", "n_head", "n_kv_head", "n_embd", "head_size", "mlp_hidden")]
        slm("train", "--data", str(data), "--out", str(work / job), "--preset", "cpu-15min",
            "--max-time", minutes(base + recover), *overrides, *COMMON)
        return {"what": f"~{size}% size from scratch, {base + recover:g} min", "minutes": base + recover,
                **score(work / job, data)}
    raise SystemExit(f"unknown job {job}: choose from {', '.join(JOBS)}")


def table(rows: dict[str, dict[str, Any]], base_params: int | None) -> list[str]:
    out = ["| model | parameters | CPU minutes in all | training steps | val bits per byte |", "|---|---|---|---|---|"]
    for name in ["base", "pruned-50", "recover-50", "distill-50", "scratch-50", "pruned-25", "recover-25", "scratch-25"]:
        r = rows.get(name)
        if r is None:
            continue
        share = f" ({r['params'] / base_params:.0%})" if base_params else ""
        mins = f"{r['minutes']:g}" if "minutes" in r else "(+{:.0f}s pruning)".format(r["prune_s"])
        out.append(f"| {r['what']} | {r['params']:,}{share} | {mins} | {r.get('steps') or '-'} | {r['val_bpb']:.4f} |")
    return out


def verdict(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for s in SIZES:
        scratch = rows.get(f"scratch-{s}")
        pruned = [rows[k] for k in (f"recover-{s}", f"distill-{s}") if k in rows]
        if scratch and pruned:
            best = min(pruned, key=lambda r: r["val_bpb"])
            winner = "pruning + recovery" if best["val_bpb"] < scratch["val_bpb"] else "training from scratch"
            lines.append(f"~{s}% size: {winner} wins ({best['val_bpb']:.4f} for the best pruned model against "
                         f"{scratch['val_bpb']:.4f} from scratch, same total CPU time).")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", nargs="+", default=JOBS, choices=JOBS)
    p.add_argument("--base", type=float, default=3.0, help="minutes of training for the base")
    p.add_argument("--recover", type=float, default=1.5, help="minutes of recovery after pruning")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "slm-bench-prune")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "prune.json")
    p.add_argument("--smoke", action="store_true", help="tiny budgets in a tmp dir: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.base, args.recover = 0.1, 0.05
        args.work = Path(tempfile.mkdtemp(prefix="slm-bench-prune-smoke-"))
        args.results = args.work / "prune.json"
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    if not (data / "meta.json").exists():
        from slmkit.prepare import prepare

        prepare([str(SHARED / "train.txt")], data, vocab_size=4096, val_inputs=[str(SHARED / "valid.txt")])
    previous = json.loads(args.results.read_text()) if args.results.exists() else {}
    same = previous.get("budget") == {"base": args.base, "recover": args.recover}
    rows: dict[str, dict[str, Any]] = previous.get("rows", {}) if same else {}
    args.results_rows = rows
    for job in args.jobs:
        name = job
        if name in rows or (job == "prune" and all(f"pruned-{s}" in rows for s in SIZES)):
            print(f"{job}: done already", file=sys.stderr)
            continue
        row = run_job(job, args.work, data, args)
        if row is not None:
            rows[name] = row
        base_params = rows.get("base", {}).get("params")
        result = {
            **machine_info(),
            "command": "python bench/prune.py" + ("" if (args.base, args.recover) == (3.0, 1.5)
                                                  else f" --base {args.base:g} --recover {args.recover:g}"),
            "budget": {"base": args.base, "recover": args.recover},
            "rows": rows,
            "table": table(rows, base_params),
            "verdict": verdict(rows),
        }
        if args.results.exists():  # another sitting may have added rows since this one started
            saved = json.loads(args.results.read_text())
            if saved.get("budget") == result["budget"]:
                rows.update({k: v for k, v in saved["rows"].items() if k not in rows})
                result.update(rows=rows, table=table(rows, rows.get("base", {}).get("params")), verdict=verdict(rows))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n".join(table(rows, rows.get("base", {}).get("params")) + verdict(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
