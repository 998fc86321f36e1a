"""Each bench script runs end to end in its quickest mode (``--smoke``): a tiny model, seconds, its
results in a temporary folder, bench/results/ untouched."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LLAMA2C = Path(os.environ.get("SLMKIT_LLAMA2C", ROOT.parent / "shared" / "peers" / "llama2c"))
NANOGPT = os.environ.get("SLMKIT_NANOGPT")  # a clone of github.com/karpathy/nanoGPT, when there is one
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import cpu_flags  # noqa: E402

from slmkit.decode.native import best_isa  # noqa: E402


def results_state() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.iterdir()}


def smoke(script: str, tmp_path: Path, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run ``bench/<script> --smoke ARGS`` with temporary files under tmp_path; bench/results must not change."""
    before = results_state()
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in ok, done.stdout[-2000:] + done.stderr[-3000:]
    assert results_state() == before, "a smoke run wrote to bench/results"
    return done


def written_json(tmp_path: Path, name: str) -> dict:
    found = list(tmp_path.rglob(name))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_train_speed(tmp_path: Path) -> None:
    smoke("train_speed.py", tmp_path)
    d = written_json(tmp_path, "train_speed.json")
    assert d["machine"] and d["cpu"] and d["commit"]
    v = d["presets"][0]["variants"]
    assert set(v) == {"reference", "slmkit-eager", "nanogpt", "slmkit-gpt2-eager", "slmkit-eager-bf16"}
    assert v["slmkit-eager"]["baseline"] == "reference" and v["slmkit-gpt2-eager"]["baseline"] == "nanogpt"
    assert v["nanogpt"]["params"] == v["slmkit-gpt2-eager"]["params"] != v["reference"]["params"]
    bf16 = v["slmkit-eager-bf16"]  # the bf16 row: against the fp32 reference and its fp32 twin
    assert (bf16["dtype"], bf16["baseline"], bf16["float32_twin"]) == ("bfloat16", "reference", "slmkit-eager")
    assert bf16["speedup_vs_float32"] == pytest.approx(v["slmkit-eager"]["step_s_median"] / bf16["step_s_median"])
    p = d["presets"][0]
    assert p["peak_flops_max"] == max(p["peak_flops_all"]) and p["peak_flops_bf16_max"] == max(p["peak_flops_bf16_all"])
    for r in v.values():  # MFU is against the highest measured peak of the row's dtype
        peak = p["peak_flops_bf16_max"] if r["dtype"] == "bfloat16" else p["peak_flops_max"]
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tok_per_s"] / peak, rel=1e-9)


def test_decode(tmp_path: Path) -> None:
    smoke("decode.py", tmp_path)
    d = written_json(tmp_path, "decode.json")
    rows = {r["row"] for r in d["results"]}
    assert "uncached" in rows and "fast, batch 2" in rows and not any("onnx" in r for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in d["results"]) and d["machine"]
    assert all(r["new_tokens"] == 16 for r in d["results"])  # 16 + 16 fit in stories260k's context
    by_row = {r["row"]: r for r in d["results"]}  # slm quantize --bits 16's model, read as bf16
    assert by_row["fast, bf16 (--bits 16)"]["weight_bytes_per_token"] * 2 == by_row["uncached"]["weight_bytes_per_token"]


def test_export_int8(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the export extra (pip install 'slmkit[export]') is not installed")
    smoke("export_int8.py", tmp_path)
    d = written_json(tmp_path, "export_int8.json")
    rows = d["rows"]
    assert len(rows) == 7 and all(r["tok_per_s"] > 0 for r in rows.values())
    assert rows["onnxruntime int8 (model_kv.onnx)"]["bytes"] < rows["onnxruntime fp32 (model_kv.onnx)"]["bytes"]


def test_cpu_kernels(tmp_path: Path) -> None:
    from slmkit import cpu_kernels

    why = cpu_kernels.available()
    for dtype in ("float32", "bfloat16"):  # bfloat16: PyTorch's bf16 ops against the kernels, as under autocast
        out = tmp_path / dtype
        out.mkdir()
        done = smoke("cpu_kernels.py", out, "--dtype", dtype, ok=(0,) if why is None else (1,))
        if why is None:
            d = written_json(out, "cpu_kernels.json")
            assert d["dtype"] == dtype and d["shapes"][0]["slmkit_ms"]["forward"] > 0
            assert d["heads"][0]["slmkit_ms"] > 0 and d["heads"][0]["pytorch_ms"] > 0
        else:  # nothing to compare on this CPU: one line saying why
            assert done.stderr.strip().splitlines()[-1] == f"error: {why}"


@pytest.mark.skipif(not (LLAMA2C / "run.c").exists() or shutil.which("gcc") is None,
                    reason=f"needs llama2.c's run.c ({LLAMA2C}; set SLMKIT_LLAMA2C) and gcc")
def test_vs_llama2c(tmp_path: Path) -> None:
    smoke("vs_llama2c.py", tmp_path, "--llama2c", str(LLAMA2C))
    d = written_json(tmp_path, "vs_llama2c.json")
    assert d["greedy_tokens_agree"] == d["tokens_compared"] == 31
    assert d["headline"]["ratio"] > 0 and "runomp" in d["headline"]["what"]


def test_quality(tmp_path: Path) -> None:
    args = ["--recipes", "nanogpt-tuned"] + (["--nanogpt", NANOGPT] if NANOGPT else [])
    smoke("quality.py", tmp_path, *args)
    rows = [json.loads(line) for f in tmp_path.rglob("quality.jsonl") for line in f.read_text().splitlines()]
    assert [r["recipe"] for r in rows][:1] == ["nanogpt-tuned"]
    for r in rows:
        assert 0 < r["test_bpb"] < 10 and 0 < r["val_bpb"] < 10 and r["machine"]
        assert 0 < r["train_tail_bpb"] < 10 and 0 < r["valid_head_bpb"] < 10 and r["dtype"] in ("float32", "bfloat16")
        assert r["split"]["train_tail_stories"] == 40 and r["split"]["train_stories"] == 330
        assert r["split"]["val_stories"] == 30 and r["split"]["test_stories"] == 10
    if NANOGPT:
        check = rows[-1]["loss_check"]
        assert check["converted_loss"] == pytest.approx(check["nanogpt_module_loss"], abs=1e-3)


def test_quality_step_budget(tmp_path: Path) -> None:
    """--max-steps trains exactly that many steps with no time budget, and says so in the row."""
    smoke("quality.py", tmp_path, "--recipes", "--try", "wd: train.weight_decay=0.3", "--max-steps", "4")
    rows = [json.loads(line) for f in tmp_path.rglob("quality.jsonl") for line in f.read_text().splitlines()]
    assert [(r["recipe"], r["steps"], r["max_steps"], r["max_time"]) for r in rows] == [("wd", 4, 4, None)]
    assert "--max-time" not in rows[0]["command"] and "train.max_steps=4 train.weight_decay=0.3" in rows[0]["command"]


def test_repeat_low_overlap_weights_those_stories_up(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import quality
    from slmkit.data import load_meta

    train, valid = quality.smoke_corpus(tmp_path / "corpus")
    once = quality.prepare_data(tmp_path / "once", train, valid, 5, 320, valid_cut=30, val_range=(101, 131))
    thrice = quality.prepare_data(tmp_path / "thrice", train, valid, 5, 320, valid_cut=30, val_range=(101, 131),
                                  repeat=3, repeat_blocks=((0, 10), (100, 110)))
    # stories 0-9 twice more; 100 is before the val block, 101-109 are val and stay out
    assert thrice["repeated_stories"] == 11 and thrice["train_stories"] == once["train_stories"]
    docs = lambda d: load_meta(tmp_path / d)["train"]["documents"]  # noqa: E731
    assert docs("thrice") == docs("once") + 22
    assert quality.read_stories(tmp_path / "thrice" / "test.txt") == quality.read_stories(tmp_path / "once" / "test.txt")


def test_test_split_is_disjoint_from_training(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    train, valid = quality.smoke_corpus(tmp_path / "corpus")
    stories, valid_stories = quality.read_stories(train), quality.read_stories(valid)
    # a test story (valid.txt from story 30 on) and a val story (train.txt 101:131 now) at the start
    # of train.txt, and its first two stories again at its end, in the train-tail split
    quality.write_stories(train, [valid_stories[35], stories[110]] + stories + stories[:2])
    split = quality.prepare_data(tmp_path / "data", train, valid, 5, 320, valid_cut=30, val_range=(101, 131))
    assert quality.read_stories(tmp_path / "data" / "train_tail.txt") == stories[-3:] + stories[:2]
    assert quality.read_stories(tmp_path / "data" / "test.txt") == valid_stories[30:]
    assert quality.read_stories(tmp_path / "data" / "valid_head.txt") == valid_stories[:30]
    assert split["val_stories"] == 30 and split["test_stories"] == 10 and split["train_tail_stories"] == 5
    assert split["held_out_duplicates_removed_from_train"] == 4  # the first two, valid 35, story 110
    from slmkit.data import load_meta

    meta = load_meta(tmp_path / "data")
    assert meta["train"]["documents"] == split["train_stories"] == len(stories) + 4 - 5 - 30 - 4
    assert meta["val"]["documents"] == 30
    assert quality.prepare_data(tmp_path / "data", train, valid, 5, 320, valid_cut=30, val_range=(101, 131)) == split


def test_ngram_overlap_and_story_ranges(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    seen = quality.ngram_set(["One day, a cat saw a big red ball."])
    # 8 words and marks: one 8-gram, seen; 9: two 8-grams, the second seen ("then" never was)
    o = quality.overlap(["A cat saw a big red ball.", "Then a cat saw a big red ball."], seen)
    assert o["per_story"] == [1.0, 0.5] and o["ngram_overlap"] == round(2 / 3, 4)
    path = tmp_path / "stories.txt"
    quality.write_stories(path, [f"Story {i}." for i in range(10)])
    assert quality.select_stories(path, "7:") == ["Story 7.", "Story 8.", "Story 9."]
    assert quality.select_stories(path, "2:4") == ["Story 2.", "Story 3."]
    with pytest.raises(SystemExit, match="selects no stories"):
        quality.select_stories(path, "20:30")


def test_quantize(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    smoke("quantize.py", tmp_path)
    d = written_json(tmp_path, "quantize.json")
    rows = d["rows"]
    assert rows["fp32"]["size_vs_fp32"] == 1 and rows["int4, groups of 32 (q4_0)"]["size_vs_fp32"] < 0.35
    assert abs(rows["int8, groups of 32 (q8_0)"]["val_bpb_vs_fp32"]) < 0.005 and "int4, groups of 128" in d["refused"]
    assert all(r["tok_per_s"] > 0 for r in rows.values()) and d["machine"]


def test_serve(tmp_path: Path) -> None:
    smoke("serve.py", tmp_path)
    d = written_json(tmp_path, "serve.json")
    assert [s["clients"] for s in d["summary"]] == [1, 4] and d["machine"] and d["commit"]
    for s, load in zip(d["summary"], d["rounds"][0]["loads"]):
        assert s["tok_per_s"] > 0 and 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
        # A busy server merges the chunks that queued up while it wrote, and the smoke's random model
        # is fast: a request may arrive as one chunk, which has no inter-token gap (NaN, not 0).
        if load["chunks"] > load["requests"]:
            assert s["itl_p50_s"] <= s["itl_p99_s"]
        else:
            assert math.isnan(s["itl_p50_s"]) and math.isnan(s["itl_p99_s"])
    assert d["rounds"][0]["generate_batch1_tok_per_s"] > 0 and d["table"][0].startswith("| clients")
    # every request a new story opening; those still share first words, which the server's prefix cache holds
    assert d["prefix_cache_mb"] > 0 and 0 < d["prefix_hit_rate"] < 1
    baselines = next(line for line in d["table"] if line.startswith("Baselines"))
    assert d["weights"] == "bf16" and "--weights bf16" in baselines  # the server's default, recorded
    if Path("/proc/self/task").is_dir():  # where each load's CPU time went, per thread group
        for s in d["summary"]:
            cpu = s["cpu_us_per_token"]
            groups = ("slm-engine", "slm-decode", "event loop", "other", "clients")
            # slm-engine: the engine process's threads are counted with the server's
            assert cpu["clients"] > 0 and cpu["slm-engine"] > 0 and min(cpu[g] for g in groups) >= 0, cpu
            # the machine's idle time comes in 10 ms ticks: a smoke load spans a few (NaN for none)
            assert math.isnan(cpu["idle_share"]) or 0 <= cpu["idle_share"] <= 1, cpu


def test_serve_client_parser() -> None:
    """bench/serve.py's clients parse the chunked event stream however TCP cuts it: every event's
    data once, in order, timed when the bytes ending it arrived, and the request done at the last chunk."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from serve import Connection
    finally:
        sys.path.remove(str(ROOT / "bench"))

    # the second event spans two HTTP chunks
    events = [b'data: {"a": 1}\r\n\r\ndata: {"b":', b' "x\\r\\ny"}\r\n\r\ndata: [DONE]\r\n\r\n']
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    class Transport:
        closed = False

        def write(self, data: bytes) -> None:
            self.sent = data

        def close(self) -> None:
            self.closed = True

    async def run(cut: int) -> list:
        conn = Connection()
        conn.connection_made(Transport())
        request = asyncio.ensure_future(conn.post_stream("h", "/p", b"{}"))
        await asyncio.sleep(0)
        for part in (answer[:cut], answer[cut:]):
            assert not request.done()
            conn.data_received(part)
        return await request

    for cut in range(len(answer) + 1):
        got = asyncio.run(run(cut))
        assert [d for _, d in got] == [b'{"a": 1}', b'{"b": "x\\r\\ny"}', b"[DONE]"], cut
        assert all(a <= b for (a, _), (b, _) in zip(got, got[1:]))

    conn = Connection()  # an error status fails the request instead of hanging it
    conn.connection_made(Transport())

    async def refused() -> None:
        request = asyncio.ensure_future(conn.post_stream("h", "/p", b"{}"))
        await asyncio.sleep(0)
        conn.data_received(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}")
        await request

    with pytest.raises(RuntimeError, match="429"):
        asyncio.run(refused())
    assert conn.transport.closed


def test_serve_engine_only(tmp_path: Path) -> None:
    """--engine-only: the same loads stepped through the server's engine in-process, every request
    to its max_tokens (checked by the script), 4 clients faster together than one."""
    smoke("serve.py", tmp_path, "--engine-only")
    d = written_json(tmp_path, "serve_engine.json")
    assert d["engine_only"] and [s["clients"] for s in d["summary"]] == [1, 4] and d["machine"]
    load = d["rounds"][0][1]
    assert load["tokens"] == 4 * 32 and load["steps"] >= 32 and d["summary"][1]["vs_one_client"] > 1


def test_batch_bound(tmp_path: Path) -> None:
    """bench/batch_bound.py: each row count's step time and the ratio it allows, N t(1) / t(N)."""
    smoke("batch_bound.py", tmp_path)
    d = written_json(tmp_path, "batch_bound.json")
    one, four = d["summary"]
    assert (one["rows"], four["rows"]) == (1, 4) and one["bound_vs_one"] == 1 and d["machine"] and d["table"]
    # (how large it is depends on the machine's load: the smoke's steps take microseconds)
    assert four["bound_vs_one"] == pytest.approx(4 * one["step_ms"] / four["step_ms"]) and one["step_ms"] > 0
    assert f"| 4 | {four['step_ms']:.3f} ms |" in d["table"][3]
    # the products' share of the peak measured in the same run, held against the kernel of the
    # instruction set the step runs ("auto" resolved as the C++ step resolves it); a step cannot beat
    # the peak; 4 rows' share over 1 row's is the step-alone ratio (not that it is above 1: under
    # load a smoke's 4-row step can take more than 4 one-row steps)
    isa = os.environ.get("SLMKIT_DECODE_ISA", "auto")
    isa = best_isa() if isa == "auto" else isa
    fp32_kind = {"avx512": "fp32-avx512", "avx2": "fp32-avx2"}.get(isa, "fp32")
    assert d["peak_kind"] == ("bf16-dot" if d["weights"] == "bf16-dot" else fp32_kind) and d["peak_gflops"] > 0
    assert 0 < one["products_of_peak"] < 1 and 0 < four["products_of_peak"] < 1
    assert four["products_of_peak"] / one["products_of_peak"] == pytest.approx(four["bound_vs_one"])
    assert one["products_of_peak"] == pytest.approx(d["product_flops_per_row"] / (one["step_ms"] * 1e6)
                                                    / d["peak_gflops"])
    # stories260k: 5 layers of qkv (64 + 2 kv heads' 2 x 4 x 8) x 64, proj 64 x 64, SwiGLU up 2 x 172 x 64
    # and down 172 x 64, then the head 512 x 64 (tied to the embedding, still a product)
    assert d["product_flops_per_row"] == 2 * (5 * (128 * 64 + 64 * 64 + 2 * 172 * 64 + 172 * 64) + 512 * 64)


def test_cpu_peak(tmp_path: Path) -> None:
    """bench/cpu_peak.py: this CPU's peak per thread for each kind of product it runs, within what its
    vector units could do at all."""
    smoke("cpu_peak.py", tmp_path)
    d = written_json(tmp_path, "cpu_peak.json")
    (row,) = d["summary"]
    assert row["threads"] == 1 and row["fp32_gflops_per_thread"] > 0  # every CPU has the 4-lane kernel
    # Each between one multiply-add of all its lanes per cycle at 0.5 GHz and two per cycle at 6 GHz:
    # a loop the compiler dropped (or kept in memory), or a FLOP count several times too high, lands
    # outside on any core made today; a count 2x too low may not (the FLOP counts are per kind in
    # peak_flops_per_round, next to the kernels).
    lanes = {"fp32": 4, "fp32-avx2": 8, "fp32-avx512": 16, "bf16-dot": 32}
    for kind, n in lanes.items():
        if f"{kind}_gflops_per_thread" in row:
            assert 2 * n * 0.5 < row[f"{kind}_gflops_per_thread"] < 2 * 2 * n * 6, kind
    assert not list(tmp_path.rglob("slm-cpu-peak-*")), "the build's folder was left behind"
    has = set(cpu_flags())
    assert ("fp32-avx512_gflops_per_thread" in row) == ("avx512f" in has)
    assert ("bf16-dot_gflops_per_thread" in row) == ("avx512_bf16" in has)


def test_first_token(tmp_path: Path) -> None:
    """bench/first_token.py: a lone request's first token through the server's engine, by prompt length."""
    smoke("first_token.py", tmp_path)
    d = written_json(tmp_path, "first_token.json")
    assert [s["prompt_tokens"] for s in d["summary"]] == [8, 40] and d["machine"] and d["table"]
    for s in d["summary"]:
        times = d["rounds"][str(s["prompt_tokens"])]
        assert len(times) == 3 and s["first_token_ms"] == sorted(times)[1] and 0 < s["first_token_ms"] <= s["p90_ms"]


FAKE_BENCH = """
import json, os, sys
from pathlib import Path
here = Path.cwd()
assert Path(__file__).resolve().parents[1] == here  # this checkout's own script
speeds = [float(x) for x in (here / "speeds.txt").read_text().split()]  # this checkout's "code"
runs = here / "runs.txt"
k = len(runs.read_text().split()) if runs.exists() else 0
runs.write_text(runs.read_text() + "x " if runs.exists() else "x ")
with open(os.environ["AB_LOG"], "a") as f:
    f.write(here.name + "\\n")  # the order the runs went in
assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(here)  # its own code first
out = sys.argv[sys.argv.index("--out") + 1]
if os.environ.get("AB_NO_OUT"):
    sys.exit(0)
summary = [{"clients": 1, "tok_per_s": speeds[k], "label": "x", "ok": True},
           {"clients": 16, "tok_per_s": 4 * speeds[k], "ms": 10.0}]
if os.environ.get("AB_DICT"):
    summary = {"step_ms": speeds[k]}
if os.environ.get("AB_EXTRA") and here.name == "new":
    summary[1]["new_field"] = 1.0  # a number only the change reports
Path(out).write_text(json.dumps({"commit": here.name, "summary": summary}))
"""


def test_ab_runs_the_script_on_both_checkouts_in_turn_and_compares_their_summaries(tmp_path: Path) -> None:
    """bench/ab.py: each pair runs both checkouts (A B, then B A), each its own script and code,
    into its own results file; per summary row and number (text and flags are not numbers), the
    medians and each pair's B / A ratio, paired run by run (their median is not the ratio of the
    medians here); a number only one side reports is named, not compared; a summary that is one
    dict is one row. Bad input is one line: an absolute script path (it would run one checkout's
    copy twice), equal labels, a script that writes no results file, a number no summary has."""
    def checkout(name: str, speeds: list[int]) -> None:
        (tmp_path / name / "bench").mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "bench" / "fake.py").write_text(FAKE_BENCH + f"# {name}\n")
        (tmp_path / name / "speeds.txt").write_text(" ".join(map(str, speeds)))
        (tmp_path / name / "runs.txt").unlink(missing_ok=True)

    def ab(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "bench" / "ab.py"), str(tmp_path / "old"), str(tmp_path / "new"),
                               "--name", "t", "--dir", str(tmp_path / "out"), *args],
                              env=dict(os.environ, AB_LOG=str(tmp_path / "order.txt"), **env), capture_output=True,
                              text=True, timeout=120)

    checkout("old", [100, 200, 110])
    checkout("new", [150, 160, 400])
    done = ab("--labels", "before", "after", "--pairs", "3", "--", "bench/fake.py", "--rounds", "1", AB_EXTRA="1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "order.txt").read_text().split() == ["old", "new", "new", "old", "old", "new"]
    d = json.loads((tmp_path / "out" / "t.json").read_text())
    assert sorted(d["files"]) == sorted(f"t_{s}_{i}.json" for i in (1, 2, 3) for s in ("before", "after"))
    assert all((tmp_path / "out" / f).is_file() for f in d["files"])
    assert [(r["row"], r["metric"]) for r in d["rows"]] == [("clients 1", "tok_per_s"), ("clients 16", "tok_per_s"),
                                                            ("clients 16", "ms")]
    first = d["rows"][0]
    assert first["ratios"] == pytest.approx([1.5, 0.8, 400 / 110])  # run i of A against run i of B
    assert (first["before"], first["after"], first["ratio"]) == (110, 160, 1.5)  # not 160 / 110
    assert "| clients 16 | tok_per_s | 440 | 640 | 1.500 | 1.500, 0.800, 3.636 |" in d["table"]
    assert d["rows"][2]["ratio"] == 1.0 and d["left_out"] == ["clients 16 new_field (not in every run)"]
    for name, speeds in (("old", [100, 200, 110]), ("new", [150, 160, 400])):
        checkout(name, speeds)
    only = ab("--metric", "step_ms", "--pairs", "1", "--", "bench/fake.py", AB_DICT="1")
    assert only.returncode == 0, only.stderr
    assert [(r["row"], r["ratio"]) for r in json.loads((tmp_path / "out" / "t.json").read_text())["rows"]] == [("summary", 1.5)]
    for args, env, code in ((["--", str(tmp_path / "old" / "bench" / "fake.py")], {}, 2),
                            (["--labels", "x", "x", "--", "bench/fake.py"], {}, 2),
                            (["--labels", "a/b", "c", "--", "bench/fake.py"], {}, 2),
                            (["--", "bench/none.py"], {}, 2), ([], {}, 2),
                            (["--pairs", "1", "--", "bench/fake.py"], {"AB_NO_OUT": "1"}, 1),
                            (["--pairs", "1", "--metric", "tok_per_sec", "--", "bench/fake.py"], {}, 1)):
        for name, speeds in (("old", [1, 1]), ("new", [1, 1])):
            checkout(name, speeds)
        done = ab(*args, **env)
        assert done.returncode == code and len(done.stderr.strip().splitlines()) <= 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()[-1]) < 300, (args, done.stderr)


def test_finetune(tmp_path: Path) -> None:
    smoke("finetune.py", tmp_path)
    d = written_json(tmp_path, "finetune.json")
    rows = d["rows"]
    assert set(rows) == {"base", "full", "lora", "chance (another held-out story)"} and d["prompts"] == 8
    for name in ("base", "full", "lora"):
        r = rows[name]
        assert 0 <= r["words"] <= 1 and 0 < r["story_loss"] < 10 and 0 < r["heldout_eval_loss"] < 10
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] == rows["full"]["params"]
    assert rows["full"]["params"] > rows["base"]["params"]  # the chat tokens' rows were added
    assert d["sets"]["heldout_prompts"] >= 8 and len(d["table"]) > 5 and d["commit"]


def test_finetune_instructions_name_words_the_story_uses() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import random

    import finetune as bench

    story = 'Tom ran to the big trees. "Look!" said Mia, and they found a shiny ball.'
    task = bench.instruction_for(story, random.Random(0))
    assert task is not None and all(f'"{w}"' in task["instruction"] for w in task["words"].values())
    assert bench.score_text(story, task) == {"words": 1.0, "all_words": 1.0, "dialogue": 1.0}
    assert bench.uses(bench.words_of("The dogs were running."), "verb", "run")
    assert bench.uses(bench.words_of("Two mice."), "noun", "mouse")
    assert not bench.uses(bench.words_of("A runner."), "verb", "run")
    assert bench.score_text("Tom sat.", task)["words"] == 0.0
    assert bench.instruction_for("Tom sat.", random.Random(0)) is None  # no noun, verb and adjective of the lists
