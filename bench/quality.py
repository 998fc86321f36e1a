"""Quality per minute: train recipes for a fixed wall-clock budget, report bits per byte on val and test.

    python bench/quality.py --max-time 15m                                  # the default recipes
    python bench/quality.py --max-time 15m --nanogpt PATH/TO/nanoGPT      # + nanoGPT's own train.py
    python bench/quality.py --max-time 3m --try "lr5e-3: train.lr=5e-3"   # explore on top of cpu-15min
    python bench/quality.py --max-steps 5713 --try "wd0.3: train.weight_decay=0.3"   # a step budget
    python bench/quality.py --smoke                                         # seconds, a tmp dir, a toy corpus

**Splits.** Issue 20 found that the official TinyStories validation stories after the first 500
share far fewer word 8-grams with the training stories than the first 500 (the shared ``valid.txt``)
do, and score much worse. The shared files show the same within themselves (``--overlap``;
docs/recipes.md has the profile): ``valid.txt`` from story 438 on shares about 3% of its 8-grams
with the training text, its first 438 stories about 11%, and ``train.txt`` holds blocks of both
kinds. So:

* test (DATA/test.txt, the figure to quote): ``valid.txt`` from story ``VALID_CUT`` (438) on, 62
  stories, the low-overlap kind, which no search looks at;
* val (DATA's val split, what recipes are chosen on): stories ``VAL_RANGE`` (1500 to 1749) of
  ``train.txt``, a block of the low-overlap kind (3.4% against the rest), taken out of training;
* valid-head (DATA/valid_head.txt): ``valid.txt``'s first 438 stories, the high-overlap kind (the
  val split of earlier sessions), and train-tail (DATA/train_tail.txt): ``train.txt``'s last 500
  stories (``TEST_STORIES``, the test split of earlier sessions), both out of training, reported
  as measures of how well a model fits text like its training stories;
* train: the rest of ``train.txt``, from which the tokenizer (byte-level BPE, vocab 4096) is learned.

Every row reports bits per byte on all four, last checkpoint, every token of each file, by ``slm
eval``. ``--test-file PATH --test-range A:B`` scores stories A..B-1 of another file too (e.g. the
official ``TinyStories-valid.txt``, stories 500:1000, which this machine cannot download), with its
8-gram overlap.

**Recipes** (``RECIPES``) train with ``slm train --max-time`` one after another with all the cores:

* ``cpu-15min``: the preset;
* ``nanogpt-tuned``: nanoGPT's architecture (learned positions, LayerNorm, GELU, no biases, tied
  embeddings: nanoGPT's defaults) trained with cpu-15min's tuned settings (4 x 192, context 256,
  batch 16, lr 3e-3 warmup-stable-decay, compiled): the same recipe, nanoGPT's model;
* ``nanogpt-cpu``: nanoGPT's README advice for CPUs (``config/train_shakespeare_char.py`` with 4
  layers, 4 heads, width 128, context 64, batch 12, dropout 0, eval_iters 20, eager) in slmkit's
  trainer, its cosine stretched over the budget;
* ``nanogpt-shakespeare``: nanoGPT's GPU shakespeare config (6 x 384, dropout 0.2, batch 16, eager),
  the baseline of earlier sessions, kept to re-run old rows.

**The real nanoGPT** (``--nanogpt PATH``, a clone of github.com/karpathy/nanoGPT): its ``train.py``
runs the README's CPU command on the same prepared ``train.bin``/``val.bin`` (slmkit writes uint16
tokens, nanoGPT's format; a ``meta.pkl`` gives it the vocab size). First as written (2000 iterations),
which also times an iteration; then with ``max_iters`` and ``lr_decay_iters`` scaled to fill the
budget (a multiple of its eval_interval 250, where it saves its checkpoint). Its ``ckpt.pt`` (a torch
pickle this script just had it write, loaded with ``weights_only=True``) is converted to slmkit's GPT
(same architecture: learned positions, LayerNorm, GELU, nanoGPT's bias setting) and scored like the
other rows. slmkit's GELU is the tanh form and nanoGPT's the exact erf form, so the conversion is
checked: the loss of nanoGPT's own module and of the converted model on the same windows are both
recorded (``loss_check``).

**Step budgets** (``--max-steps N``): every recipe trains exactly N steps (``train.max_steps=N``, put
before a try's own overrides, so a try may set its own) with no time budget, so the schedule runs
on steps and the result does not depend on how busy the machine is: screening runs can share the
CPU or run at low priority. N is chosen as the steps a quiet run of that recipe reaches in the
wall-clock budget it stands for. Such rows have ``max_time`` null and ``max_steps`` N.

Results are appended as JSON lines to bench/results/quality_unseen_split.jsonl (``--results``; the old split's rows are in quality_test_split.jsonl), each
with its command, the machine, the commit and the load average before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import shlex
import shutil
import subprocess
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
TEST_STORIES = 500  # the last stories of train.txt that become the train-tail split
VALID_CUT = 438  # valid.txt's stories from this one on are the test split (where its 8-gram overlap drops)
VAL_RANGE = (1500, 1750)  # the stories of train.txt that are the val split (a low-overlap block)
# The blocks of train.txt of the low-overlap kind (the val block in the middle of the last one is
# held out anyway): docs/recipes.md's overlap table. --repeat-low-overlap K trains on them K times.
LOW_OVERLAP_BLOCKS = ((0, 750), (1000, 1250), (1500, 2250))
HELD_OUT_FILES = ("test", "valid_head", "train_tail")  # DATA/NAME.txt, scored besides the val split
NGRAM = 8  # overlap with the training text is counted in word 8-grams
EOT_LINE = "<|endoftext|>"

# nanoGPT's model: learned positions, LayerNorm, GELU MLP 4x, tied embeddings, bias=False (its default).
NANOGPT_ARCH = ["model.positions=learned", "model.norm=layernorm", "model.activation=gelu", "model.bias=false",
                "model.tie_embeddings=true"]
# nanoGPT's config/train_shakespeare_char.py, which both of its CPU recipes start from.
SHAKESPEARE = ["train.lr=1e-3", "train.min_lr_ratio=0.1", "train.warmup_steps=100", "train.schedule=cosine",
               "train.beta2=0.99", "train.weight_decay=0.1", "train.grad_accum=1", "train.max_steps=1000000",
               "train.eval_interval=250", "train.checkpoint_interval=250", "train.compile=false"]
# The README's CPU advice on top of it (its eval_iters=20 is train.eval_batches=20, slmkit's default).
NANOGPT_CPU_ADVICE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                      "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                      "--lr_decay_iters=2000", "--dropout=0.0"]
RECIPES: dict[str, tuple[str | None, list[str]]] = {
    "cpu-15min": ("cpu-15min", []),
    "nanogpt-tuned": ("cpu-15min", NANOGPT_ARCH),
    "nanogpt-cpu": (None, NANOGPT_ARCH + SHAKESPEARE + [
        "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "model.dropout=0.0",
        "train.batch_size=12", "train.eval_batches=20"]),
    "nanogpt-shakespeare": (None, NANOGPT_ARCH + SHAKESPEARE + [
        "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256", "model.dropout=0.2",
        "train.batch_size=16"]),
}
DEFAULT_RECIPES = ["cpu-15min", "nanogpt-tuned", "nanogpt-cpu"]


def load_average() -> float:
    return os.getloadavg()[0]


def parse_seconds(text: str) -> float:
    """'15m' -> 900.0, '90s' -> 90.0, '1h' -> 3600.0, '20' -> 20.0."""
    m = re.fullmatch(r"([0-9.]+)([smh]?)", text.strip())
    if not m:
        raise SystemExit(f"error: --max-time {text!r} is not a duration like 15m, 90s or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --------------------------------------------------------------------------- data and the test split


def read_stories(path: Path) -> list[str]:
    from slmkit.prepare import read_documents

    return list(read_documents([str(path)]))


def write_stories(path: Path, stories: list[str]) -> None:
    path.write_text("".join(f"{s}\n{EOT_LINE}\n" for s in stories), encoding="utf-8")


def words(story: str) -> list[str]:
    """Lower-cased words and punctuation marks: what the overlap measure counts n-grams of."""
    return re.findall(r"\w+|[^\w\s]", story.lower())


def ngrams(story: str, n: int = NGRAM) -> list[tuple[str, ...]]:
    w = words(story)
    return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def ngram_set(stories: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {g for s in stories for g in ngrams(s, n)}


def overlap(stories: list[str], seen: set[tuple[str, ...]], n: int = NGRAM) -> dict[str, Any]:
    """How much of ``stories`` the training text already holds: the fraction of their word n-grams
    that occur in it (``ngram_overlap``), and the same per story (``per_story``)."""
    per, hits, total = [], 0, 0
    for s in stories:
        g = ngrams(s, n)
        h = sum(x in seen for x in g)
        hits, total = hits + h, total + len(g)
        per.append(round(h / len(g), 4) if g else 0.0)
    return {"stories": len(stories), "n": n, "ngram_overlap": round(hits / max(total, 1), 4), "per_story": per}


def prepare_data(data: Path, train_txt: Path, valid_txt: Path, test_stories: int, vocab_size: int,
                 valid_cut: int | None = None, val_range: tuple[int, int] | None = None,
                 repeat: int = 1, repeat_blocks: tuple[tuple[int, int], ...] = LOW_OVERLAP_BLOCKS) -> dict:
    """Tokenize ``train_txt`` into ``data`` without its stories ``val_range`` (DATA's val split) and
    its last ``test_stories`` (DATA/train_tail.txt); write ``valid_txt``'s stories from ``valid_cut``
    on to DATA/test.txt and those before to DATA/valid_head.txt. Kept when DATA was made from the
    same files already. A story of any held-out split that also occurs verbatim among the training
    stories is dropped from training. ``repeat`` > 1 puts the training stories of ``repeat_blocks``
    (story ranges of ``train_txt``) into the training text that many times in all (the copies after
    the rest), which weights that kind of story up; the tokenizer is learned from that text."""
    from slmkit.prepare import prepare

    stories, valid = read_stories(train_txt), read_stories(valid_txt)
    if valid_cut is None:  # VALID_CUT for the shared files; the same share of a smaller corpus (smoke runs)
        valid_cut = VALID_CUT if len(valid) >= 500 else max(1, len(valid) * VALID_CUT // 500)
    if val_range is None:  # VAL_RANGE, or a block of 1/34 of a smaller corpus at the same place
        n = len(stories) - test_stories
        val_range = VAL_RANGE if n >= VAL_RANGE[1] else (n * 6 // 34, n * 7 // 34)
    source = {"train": str(train_txt), "train_sha256": hashlib.sha256(train_txt.read_bytes()).hexdigest(),
              "valid": str(valid_txt), "valid_sha256": hashlib.sha256(valid_txt.read_bytes()).hexdigest(),
              "test_stories": test_stories, "valid_cut": valid_cut, "val_range": list(val_range),
              "vocab_size": vocab_size}
    if repeat > 1:
        source.update(repeat=repeat, repeat_blocks=[list(r) for r in repeat_blocks])
    split_file = data / "split.json"
    files = ("meta.json", "test.txt", "train_tail.txt", "valid_head.txt")
    if split_file.exists() and all((data / f).exists() for f in files):
        if json.loads(split_file.read_text())["source"] == source:
            return json.loads(split_file.read_text())
    a, b = val_range
    if not 0 < valid_cut < len(valid) or not 0 <= a < b <= len(stories) - test_stories:
        raise SystemExit(f"error: {valid_txt} ({len(valid)} stories) and {train_txt} ({len(stories)} stories) are "
                         f"too short for the cut at {valid_cut} and the val stories {a}:{b}")
    tail, val, test, head = stories[-test_stories:], stories[a:b], valid[valid_cut:], valid[:valid_cut]
    held_out = set(tail) | set(val) | set(test) | set(head)
    train = [s for s in stories[:a] + stories[b:-test_stories] if s not in held_out]
    body = len(stories) - test_stories
    again = [s for i, s in enumerate(stories[:body]) if any(x <= i < y for x, y in repeat_blocks)
             and not a <= i < b and s not in held_out] * (repeat - 1)
    with tempfile.TemporaryDirectory(prefix="slm-quality-split-") as tmp:
        train_part, val_part = Path(tmp) / "train_part.txt", Path(tmp) / "val_part.txt"
        write_stories(train_part, train + again)
        write_stories(val_part, val)
        prepare([str(train_part)], data, vocab_size=vocab_size, val_inputs=[str(val_part)])
    write_stories(data / "test.txt", test)
    write_stories(data / "train_tail.txt", tail)
    write_stories(data / "valid_head.txt", head)
    seen = ngram_set(train)
    split = {"source": source, "train_stories": len(train), "val_stories": len(val), "test_stories": len(test),
             "train_tail_stories": len(tail), "valid_head_stories": len(head),
             "held_out_duplicates_removed_from_train": len(stories) - test_stories - (b - a) - len(train),
             "repeated_stories": len(again) // max(repeat - 1, 1), "repeat": repeat,
             "test_sha256": hashlib.sha256((data / "test.txt").read_bytes()).hexdigest(),
             "ngram_overlap": {k: overlap(v, seen)["ngram_overlap"] for k, v in
                               (("val", val), ("test", test), ("valid_head", head), ("train_tail", tail))}}
    split_file.write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
    return split


def select_stories(path: Path, span: str | None) -> list[str]:
    """Stories ``A:B`` (Python slice bounds, either may be empty) of the file at ``path``."""
    if not path.is_file():
        raise SystemExit(f"error: --test-file {path} not found: pass a TinyStories-style text file")
    stories = read_stories(path)
    m = re.fullmatch(r"(\d*):(\d*)", span or ":")
    if m is None:
        raise SystemExit(f"error: --test-range {span!r} is not A:B (story numbers, e.g. 500:1000)")
    picked = stories[int(m.group(1) or 0):int(m.group(2)) if m.group(2) else None]
    if not picked:
        raise SystemExit(f"error: --test-range {span} selects no stories of {path} ({len(stories)} stories)")
    return picked


def overlap_report(train_txt: Path, valid_txt: Path, test_stories: int, block: int = 25,
                   train_block: int = 250) -> dict[str, Any]:
    """The 8-gram overlap of each split with the training text, of valid.txt in blocks of ``block``
    stories (where the test cut comes from) and of train.txt in blocks of ``train_block`` stories,
    each against the rest of train.txt (where the val stories come from)."""
    stories, valid = read_stories(train_txt), read_stories(valid_txt)
    a, b = VAL_RANGE
    body = stories[:-test_stories]
    seen = ngram_set(body[:a] + body[b:])
    per = overlap(valid, seen)["per_story"]
    blocks = [{"from": i, "to": min(i + block, len(per)), "mean": round(sum(per[i:i + block]) / len(per[i:i + block]), 4)}
              for i in range(0, len(per), block)]
    counts: dict[tuple[str, ...], int] = {}
    grams = [set(ngrams(s)) for s in body]
    for g in grams:
        for x in g:
            counts[x] = counts.get(x, 0) + 1
    own = [sum(counts[x] > 1 for x in g) / max(len(g), 1) for g in grams]  # n-grams some other story has too
    train_blocks = [{"from": i, "to": min(i + train_block, len(own)),
                     "mean": round(sum(own[i:i + train_block]) / len(own[i:i + train_block]), 4)}
                    for i in range(0, len(own), train_block)]
    splits = {f"test (valid.txt {VALID_CUT}:{len(valid)})": valid[VALID_CUT:],
              f"val (train.txt {a}:{b})": stories[a:b],
              f"valid-head (valid.txt 0:{VALID_CUT})": valid[:VALID_CUT],
              f"train-tail (train.txt, last {test_stories})": stories[-test_stories:]}
    rows = {}
    for name, ss in splits.items():
        p = sorted(overlap(ss, seen)["per_story"])
        rows[name] = {"stories": len(ss), "ngram_overlap": overlap(ss, seen)["ngram_overlap"],
                      "median_story": p[len(p) // 2], "stories_below_5pct": round(sum(x < 0.05 for x in p) / len(p), 3)}
    return {"n": NGRAM, "train": f"{train_txt.name} without the val and train-tail stories", "splits": rows,
            "valid_blocks": blocks, "train_blocks": train_blocks, "valid_per_story": per}


def smoke_corpus(directory: Path) -> tuple[Path, Path]:
    """A toy corpus for --smoke: short deterministic stories from a small word list."""
    import random

    rng = random.Random(0)
    names, things = ["Tom", "Lily", "Sam", "Mia", "Ben"], ["ball", "cat", "tree", "box", "cake", "dog"]
    verbs = ["saw", "liked", "found", "took", "lost", "shared"]

    def story() -> str:
        n = rng.choice(names)
        return " ".join(f"{n} {rng.choice(verbs)} a {rng.choice(things)}." for _ in range(rng.randint(4, 9)))

    directory.mkdir(parents=True, exist_ok=True)
    write_stories(directory / "train.txt", [story() for _ in range(400)])
    write_stories(directory / "valid.txt", [story() for _ in range(40)])
    return directory / "train.txt", directory / "valid.txt"


# --------------------------------------------------------------------------- scoring


def score(run: Path, data: Path, extra: Path | None = None) -> dict[str, float]:
    """Bits per byte and loss of RUN's last checkpoint on the val split, DATA/test.txt,
    DATA/valid_head.txt and DATA/train_tail.txt (and on ``extra``, a --test-file selection, as ``file_*``)."""
    from slmkit.evaluate import evaluate_run

    val = evaluate_run(run, data_dir=data, which="last")
    out = {"val_bpb": val["bpb"], "val_loss": val["loss"], "val_tokens": val["tokens"]}
    files = {f: data / f"{f}.txt" for f in HELD_OUT_FILES}
    if extra is not None:
        files["file"] = extra
    for name, path in files.items():
        r = evaluate_run(run, input_path=str(path), which="last")
        out.update({f"{name}_bpb": r["bpb"], f"{name}_loss": r["loss"], f"{name}_tokens": r["tokens"]})
    return out


def eval_command(run: Path, data: Path, extra: Path | None = None) -> str:
    return " && ".join([f"slm eval {run} --data {data} --which last"] + [
        f"slm eval {run} --input {f} --which last"
        for f in (*(data / f"{f}.txt" for f in HELD_OUT_FILES), *([extra] if extra else []))])


def eval_history(run: Path, window: int = 50) -> list[dict[str, float]]:
    """The run's in-training evaluations from metrics.jsonl: step, tokens, val loss and the mean
    training loss of the last ``window`` logged steps before it (their gap shows overfitting)."""
    from slmkit.rundir import iter_records

    out, train, tokens = [], [], 0
    for r in iter_records(run):
        if "loss" in r:
            train.append(r["loss"])
            tokens = r.get("tokens", tokens)
        elif "val_loss" in r and train:
            out.append({"step": r["step"], "tokens": tokens, "val_loss": round(r["val_loss"], 4),
                        "train_loss": round(sum(train[-window:]) / len(train[-window:]), 4)})
    return out


def train_dtype(overrides: list[str]) -> str:
    """The precision a recipe trains in on this machine (train.dtype, auto resolved), for the results."""
    from slmkit.runtime import choose_dtype

    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.dtype=")), "auto")
    return str(choose_dtype(name, "cpu")[0]).removeprefix("torch.")


def run_recipe(name: str, preset: str | None, overrides: list[str], data: Path, out: Path, max_time: str | None,
               quiet: bool = True, extra: Path | None = None, max_steps: int | None = None) -> dict:
    """Train one recipe for ``max_time`` (wall clock), or for ``max_steps`` steps with no time budget
    when that is given, then score its last checkpoint on every split."""
    from slmkit.train import train

    if max_steps is not None:
        max_time, overrides = None, [f"train.max_steps={max_steps}", *overrides]
    load_before, t0 = load_average(), time.time()
    summary = train(data, out / name, preset=preset, overrides=overrides, max_time=max_time, fresh=True, quiet=quiet)
    wall = time.time() - t0
    cmd = (f"slm train --data {data} --out {out / name} --fresh" + (f" --max-time {max_time}" if max_time else "")
           + (f" --preset {preset}" if preset else "") + "".join(" " + shlex.quote(o) for o in overrides)
           + " && " + eval_command(out / name, data, extra))
    from slmkit.checkpoint import load_run

    model, _, _ = load_run(out / name, which="last")
    return {
        "recipe": name, "max_time": max_time, "max_steps": max_steps, **score(out / name, data, extra), "steps": summary["steps"],
        "tokens": summary["tokens"], "tok_per_s": summary["tok_per_s"], "mfu": summary["mfu"],
        "params": model.num_params(non_embedding=False), "wall_s": round(wall, 1), "load_before": load_before,
        "load_after": load_average(), "threads": __import__("torch").get_num_threads(),
        "dtype": train_dtype(overrides), "evals": eval_history(out / name), "command": cmd,
    }


# --------------------------------------------------------------------------- the real nanoGPT


def nanogpt_workdir(clone: Path, data: Path, work: Path) -> Path:
    """A folder to run nanoGPT's train.py in: its scripts linked from the clone (it reads
    configurator.py and data/<dataset>/ relative to the working directory) and data/slmkit/ holding
    slmkit's train.bin and val.bin with a meta.pkl for the vocab size."""
    from slmkit.data import load_meta

    for f in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"):
        if not (clone / f).is_file():
            raise SystemExit(f"error: {clone / f} not found: --nanogpt takes a clone of github.com/karpathy/nanoGPT")
    meta = load_meta(data)
    if meta["dtype"] != "uint16":
        raise SystemExit(f"error: {data} stores {meta['dtype']} tokens; nanoGPT reads uint16 (vocab <= 65,535)")
    shutil.rmtree(work, ignore_errors=True)
    (work / "data" / "slmkit").mkdir(parents=True)
    for f in ("train.py", "model.py", "configurator.py", "config"):
        (work / f).symlink_to((clone / f).resolve())
    for split in ("train.bin", "val.bin"):
        (work / "data" / "slmkit" / split).symlink_to((data / split).resolve())
    with open(work / "data" / "slmkit" / "meta.pkl", "wb") as f:  # nanoGPT's own format for the vocab size
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)
    return work


def run_nanogpt_train(work: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run nanoGPT's train.py in ``work``; returns its wall time, last iteration and log path.
    A run past ``timeout_s`` is stopped (its last saved checkpoint still counts, and says so)."""
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *args]
    log = work / f"train_{len(list(work.glob('train_*.log')))}.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=work, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout_s)
            stopped = False
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
            stopped = True
    wall = time.time() - t0
    text = log.read_text()
    if proc.returncode not in (0, None) and not stopped:
        raise RuntimeError(f"nanoGPT's train.py failed (exit {proc.returncode}); end of {log}:\n{text[-2000:]}")
    iters = [int(i) for i in re.findall(r"^iter (\d+):", text, re.M)]
    return {"wall_s": wall, "last_iter": iters[-1] if iters else -1, "log": str(log), "stopped_by_timeout": stopped,
            "command": f"cd {work} && python train.py config/train_shakespeare_char.py " + " ".join(args)}


def nanogpt_to_slmkit(state: dict[str, Any], model_args: dict[str, Any]):
    """nanoGPT's GPT weights as slmkit's GPT with the same architecture (names mapped one to one)."""
    from slmkit.config import from_dict
    from slmkit.model import GPT, ModelConfig

    mc = from_dict(ModelConfig, {
        "n_layer": model_args["n_layer"], "n_head": model_args["n_head"], "n_embd": model_args["n_embd"],
        "block_size": model_args["block_size"], "vocab_size": model_args["vocab_size"], "bias": model_args["bias"],
        "positions": "learned", "norm": "layernorm", "activation": "gelu", "tie_embeddings": True, "dropout": 0.0,
    }, "model")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    names = {"transformer.wte.": "tok_emb.", "transformer.wpe.": "pos_emb.", "transformer.ln_f.": "norm.",
             "lm_head.": "lm_head."}
    parts = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
    weights = {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", key)
        if m and m.group(2) in parts:
            weights[f"blocks.{m.group(1)}.{parts[m.group(2)]}.{m.group(3)}"] = value
        elif m is None and re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", key):
            continue  # the causal mask buffer of nanoGPT's non-flash path
        else:
            prefix = next((p for p in names if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"unexpected nanoGPT weight {key}")
            weights[names[prefix] + key[len(prefix):]] = value
    model = GPT(mc)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to tok_emb
    if missing or unexpected:
        raise ValueError(f"nanoGPT weights do not map onto slmkit's GPT: missing {missing}, unexpected {unexpected}")
    return model.eval()


def loss_check(clone: Path, ckpt: dict[str, Any], converted, data: Path, windows: int = 16) -> dict[str, float]:
    """Mean loss of nanoGPT's own module (its model.py) and of the converted model on the same
    val windows: the conversion is right when they agree to the GELU forms' difference."""
    import numpy as np
    import torch

    sys.path.insert(0, str(clone))
    try:
        import model as nanogpt_model  # nanoGPT's model.py
    finally:
        sys.path.remove(str(clone))
    theirs = nanogpt_model.GPT(nanogpt_model.GPTConfig(**{**ckpt["model_args"], "dropout": 0.0}))
    theirs.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    theirs.eval()
    T = converted.config.block_size
    from slmkit.data import open_split

    val = np.asarray(open_split(data, "val")[: windows * T + 1], dtype=np.int64)
    x = torch.from_numpy(val[:-1].reshape(windows, T))
    y = torch.from_numpy(val[1:].reshape(windows, T))
    with torch.no_grad():
        ours = converted(x, y)[1].item()
        logits, _ = theirs(x, y)
        nano = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    return {"nanogpt_module_loss": nano, "converted_loss": ours, "windows": windows, "context": T}


def write_run(model, data: Path, run: Path, step: int) -> None:
    """``model`` as a slmkit RUN_DIR (tokenizer from DATA, weights as last/), so ``slm eval`` scores it."""
    from slmkit.checkpoint import write_checkpoint

    shutil.rmtree(run, ignore_errors=True)
    (run / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "encoder.json", "vocab.bpe", "tokenizer_meta.json"):
        if (data / name).exists():
            shutil.copy2(data / name, run / "tokenizer" / name)
    write_checkpoint(run / "last", model=model, state={"step": step, "converted_from": "nanoGPT ckpt.pt"})


def run_nanogpt(clone: Path, data: Path, out: Path, max_time: str, smoke: bool,
                extra: Path | None = None) -> list[dict]:
    """nanoGPT's train.py with the README's CPU advice: as written, then stretched to the budget."""
    import torch

    work = nanogpt_workdir(clone, data, out / "nanogpt-train.py")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True)
    budget = parse_seconds(max_time)
    advice = [a for a in NANOGPT_CPU_ADVICE if not a.startswith(("--max_iters", "--lr_decay_iters"))]
    common = ["--dataset=slmkit", "--out_dir=out"]
    # (name, iterations, time limit): the as-written run also measures the time an iteration takes
    plans = [("nanogpt-train.py-as-written", 20 if smoke else 2000, 3600.0)]
    rows = []
    per_iter = None
    while plans:
        name, iters, limit = plans.pop(0)
        shutil.rmtree(work / "out", ignore_errors=True)
        extra = ["--eval_interval=10"] if smoke else []
        load_before = load_average()
        res = run_nanogpt_train(work, advice + common + extra + [f"--max_iters={iters}", f"--lr_decay_iters={iters}"],
                                timeout_s=limit)
        if per_iter is None:
            per_iter = res["wall_s"] / max(iters, 1)
            if not smoke:  # as many iterations as fit, rounded down to where it evaluates and saves
                fit = int(budget / per_iter) // 250 * 250
                plans.append((f"nanogpt-train.py-{max_time}", max(fit, 250), budget * 1.1))
        ckpt_path = work / "out" / "ckpt.pt"
        if not ckpt_path.exists():
            raise RuntimeError(f"nanoGPT wrote no checkpoint; see {res['log']}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        converted = nanogpt_to_slmkit(ckpt["model"], ckpt["model_args"])
        run = out / name
        write_run(converted, data, run, ckpt["iter_num"])
        check = loss_check(clone, ckpt, converted, data, windows=4 if smoke else 16)
        tokens_per_iter = ckpt["config"]["batch_size"] * ckpt["config"]["block_size"]
        rows.append({
            "recipe": name, "max_time": max_time if "as-written" not in name else f"{iters} iterations",
            **score(run, data, extra), "steps": ckpt["iter_num"], "tokens": ckpt["iter_num"] * tokens_per_iter,
            "iterations_run": res["last_iter"] + 1, "tok_per_s": (res["last_iter"] + 1) * tokens_per_iter / res["wall_s"],
            "params": converted.num_params(non_embedding=False), "wall_s": round(res["wall_s"], 1),
            "stopped_by_timeout": res["stopped_by_timeout"], "load_before": load_before, "load_after": load_average(),
            "loss_check": check, "nanogpt_commit": commit.stdout.strip(),
            "command": res["command"] + " && " + eval_command(run, data, extra) + "  # ckpt.pt converted by bench/quality.py",
        })
    return rows


# --------------------------------------------------------------------------- main


def print_table(rows: list[dict]) -> None:
    base = rows[0]["test_bpb"]
    print("\n| recipe | budget | test bpb | val bpb | test vs first | steps | tokens | tok/s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['max_time'] or str(r['max_steps']) + ' steps'} | {r['test_bpb']:.3f} | {r['val_bpb']:.3f} | "
              f"{r['test_bpb'] / base:.2f}x | {r['steps']} | {r['tokens']:,} | {r['tok_per_s']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="15m")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="a step budget instead of "
                        "--max-time: every recipe trains N steps (train.max_steps=N; a try may set its own) with "
                        "no time budget, so the run may share the CPU")
    parser.add_argument("--recipes", nargs="*", default=None, help=f"of {', '.join(RECIPES)} "
                        f"(default: {' '.join(DEFAULT_RECIPES)})")
    parser.add_argument("--try", dest="tries", action="append", default=[], metavar="'NAME: overrides'",
                        help="an extra recipe: cpu-15min with these overrides")
    parser.add_argument("--nanogpt", type=Path, default=None, help="a clone of github.com/karpathy/nanoGPT: "
                        "also run its train.py (the README's CPU advice) on the same data")
    parser.add_argument("--tinystories", type=Path, default=SHARED, help="the folder with TinyStories' train.txt "
                        "and valid.txt (default: ../shared/data/tinystories beside the repository)")
    parser.add_argument("--data", default="/tmp/slm_quality_ts", help="prepared data with the test split "
                        "(made from the shared files if missing)")
    parser.add_argument("--out", default="/tmp/slm_quality", help="where the runs go")
    parser.add_argument("--test-file", type=Path, default=None, help="also score every run on stories of this "
                        "file (TinyStories layout), e.g. the official TinyStories-valid.txt: reported as file_bpb")
    parser.add_argument("--test-range", default=None, metavar="A:B", help="which stories of --test-file (0-based, "
                        "B excluded; default all), e.g. 500:1000 for the official validation stories after valid.txt's")
    parser.add_argument("--repeat-low-overlap", type=int, default=1, metavar="K", help="train on the stories of "
                        "train.txt's low-overlap blocks (LOW_OVERLAP_BLOCKS, the kind val and test are) K times; "
                        "use its own --data folder")
    parser.add_argument("--overlap", action="store_true", help="only measure the word 8-gram overlap of each split "
                        "with the training text (and of valid.txt in blocks of 25 stories); no training")
    parser.add_argument("--results", default=None, help="JSON lines to append to (default: "
                        "bench/results/quality_unseen_split.jsonl; with --overlap: bench/results/ngram_overlap.json, rewritten)")
    parser.add_argument("--smoke", action="store_true", help="a toy corpus, the tiny preset, seconds; "
                        "everything in a temporary folder (not bench/results)")
    args = parser.parse_args()

    train_txt, valid_txt = args.tinystories / "train.txt", args.tinystories / "valid.txt"
    test_stories, valid_cut, val_range, vocab = TEST_STORIES, VALID_CUT, VAL_RANGE, 4096
    if args.overlap:
        report = {**machine_info(), **overlap_report(train_txt, valid_txt, test_stories)}
        if args.test_file is not None:
            body = read_stories(train_txt)[:-test_stories]
            seen = ngram_set(body[:VAL_RANGE[0]] + body[VAL_RANGE[1]:])
            o = overlap(select_stories(args.test_file, args.test_range), seen)
            report["splits"][f"{args.test_file.name} {args.test_range or ':'}"] = {
                k: o[k] for k in ("stories", "ngram_overlap")}
        out_file = Path(args.results or ROOT / "bench" / "results" / "ngram_overlap.json")
        out_file.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        for name, r in report["splits"].items():
            print(f"{name:40s} {r['stories']:5d} stories  8-gram overlap {r['ngram_overlap']:.3f}")
        return
    args.results = args.results or str(ROOT / "bench" / "results" / "quality_unseen_split.jsonl")
    recipes = args.recipes if args.recipes is not None else DEFAULT_RECIPES
    todo = [(n, *RECIPES[n]) for n in recipes]
    for t in args.tries:
        name, _, over = t.partition(":")
        todo.append((name.strip(), "cpu-15min", over.split()))
    tmp = None
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="slm-quality-smoke-"))
        train_txt, valid_txt = smoke_corpus(tmp / "corpus")
        test_stories, valid_cut, val_range, vocab, args.max_time = 40, 30, (100, 130), 320, "4s"
        args.data, args.out, args.results = str(tmp / "data"), str(tmp / "runs"), str(tmp / "quality.jsonl")
        tiny = ["model.block_size=32", "train.batch_size=4", "train.max_steps=6", "train.eval_interval=3",
                "train.checkpoint_interval=3", "train.eval_batches=2", "train.warmup_steps=2", "train.compile=false"]
        if args.max_steps is not None:  # the step budget under test, not the toy one
            tiny = [o for o in tiny if not o.startswith("train.max_steps=")]
        todo = [(n, "tiny", [o for o in ov if not o.startswith(("model.block_size", "model.n_", "train.batch_size"))]
                 + tiny) for n, _, ov in todo]
    elif not train_txt.exists():
        raise SystemExit(f"error: {train_txt} not found: the benchmark trains on the shared TinyStories files")
    data, out = Path(args.data), Path(args.out)
    if args.repeat_low_overlap < 1:
        raise SystemExit(f"error: --repeat-low-overlap {args.repeat_low_overlap}: give 1 (no repeats) or more")
    blocks = LOW_OVERLAP_BLOCKS if not args.smoke else ((0, 60),)
    split = prepare_data(data, train_txt, valid_txt, test_stories, vocab, valid_cut, val_range,
                         repeat=args.repeat_low_overlap, repeat_blocks=blocks)
    extra = None
    if args.test_file is not None:
        out.mkdir(parents=True, exist_ok=True)
        extra = out / "test_file.txt"
        picked = select_stories(args.test_file, args.test_range)
        write_stories(extra, picked)
        body = read_stories(train_txt)[:-test_stories]
        seen = ngram_set(body[:val_range[0]] + body[val_range[1]:])
        split["file"] = {"path": str(args.test_file), "range": args.test_range or ":", "stories": len(picked),
                         "ngram_overlap": overlap(picked, seen)["ngram_overlap"]}
    from slmkit.data import load_meta

    info = {**machine_info(), "split": {k: v for k, v in split.items() if k != "source"}, "data": str(data),
            "train_tokens": load_meta(data)["train"]["tokens"]}
    rows = []

    def keep(row: dict) -> None:
        row = {**info, "bench_command": info["command"], **row}
        rows.append(row)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['recipe']:24s} test bpb {row['test_bpb']:.4f}  val {row['val_bpb']:.4f}  valid-head "
              f"{row['valid_head_bpb']:.4f}  train-tail {row['train_tail_bpb']:.4f}" + (f"  file bpb {row['file_bpb']:.4f}" if "file_bpb" in row else "") + "  steps "
              f"{row['steps']:6d}  {row['tok_per_s']:7,.0f} tok/s  load {row['load_before']:.1f}->{row['load_after']:.1f}",
              flush=True)

    for name, preset, overrides in todo:
        keep(run_recipe(name, preset, overrides, data, out, args.max_time, extra=extra, max_steps=args.max_steps))
    if args.nanogpt is not None and args.max_steps is None:
        for row in run_nanogpt(args.nanogpt.expanduser(), data, out, args.max_time, args.smoke, extra):
            keep(row)
    if rows and not math.isnan(rows[0]["test_bpb"]):
        print_table(rows)
    if tmp is not None:
        print(f"smoke results: {args.results}")


if __name__ == "__main__":
    main()
