"""The CUDA paths: training in bf16 (eager and compiled), resume, and generation on a GPU.

Skipped without a CUDA GPU (CI has none). On a machine with one: ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slmkit.checkpoint import load_run, read_checkpoint
from slmkit.cli import main
from slmkit.decode import BACKENDS, GraphDecoder, KVCache, StepDecoder, pick
from slmkit.generate import SamplingConfig, generate_tokens
from slmkit.model import GPT, ModelConfig
from slmkit.train import train

from conftest import TINY, check_bf16_decode_step, train_killed_after

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0, stop_at_eot=False)


def _losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """Comparisons against the CPU need true fp32 matmuls, not TF32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_cuda_run_trains_in_bf16_resumes_generates_and_loads_on_the_cpu(data_dir, tmp_path, monkeypatch, capsys):
    over = TINY + ["train.device=cuda", "train.max_steps=40", "train.checkpoint_interval=10",
                   "train.eval_interval=20", "train.log_interval=1"]
    full = tmp_path / "full"
    summary = train(data_dir, full, overrides=over, quiet=True)
    losses = _losses(full)
    assert summary["steps"] == 40 and math.isfinite(summary["val_loss"])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it learns in bf16 autocast

    part = tmp_path / "part"
    train_killed_after(25, data_dir, part, over, monkeypatch)
    assert read_checkpoint(part / "last")["state"]["step"] == 20
    assert train(data_dir, part, overrides=over, quiet=True)["steps"] == 40
    # GPU kernels (atomics in the embedding backward) are not bit-reproducible: close, not equal.
    assert _losses(part) == pytest.approx(losses, rel=2e-2, abs=2e-2)

    # slm generate on the GPU (the CUDA-graph decoder), a batch of samples streamed as text.
    assert main(["generate", str(full), "--prompt", "Once upon", "--num-samples", "2", "--max-new-tokens", "30",
                 "--seed", "1", "--device", "cuda"]) == 0
    samples = capsys.readouterr().out.split("\n---\n")
    assert len(samples) == 2 and all(s.startswith("Once upon") and len(s) > len("Once upon ") for s in samples)

    # A run trained on a GPU loads on a CPU and gives the same logits as on the GPU.
    cpu_model, _, _ = load_run(full, device="cpu")
    gpu_model, _, _ = load_run(full, device="cuda")
    idx = torch.randint(0, cpu_model.config.vocab_size, (2, 16))
    with torch.no_grad():
        a = cpu_model(idx)[0]
        b = gpu_model(idx.cuda())[0].cpu()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_cuda_compiled_training_learns(data_dir, tmp_path):
    over = TINY + ["train.device=cuda", "train.compile=true", "train.max_steps=30", "train.eval_interval=30",
                   "train.log_interval=1"]
    summary = train(data_dir, tmp_path / "c", overrides=over, quiet=True)
    losses = _losses(tmp_path / "c")
    assert summary["steps"] == 30 and 0 < summary["mfu"] < 1
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that greedy text depends on the context
        for p in model.parameters():
            p.mul_(4.0)
    return model.cuda()


@pytest.fixture
def graph_decoders(monkeypatch):
    """The GraphDecoders that generation makes, to check that they replayed graphs."""
    made = []

    class Spy(GraphDecoder):
        def __init__(self, model) -> None:
            super().__init__(model)
            made.append(self)

    monkeypatch.setitem(BACKENDS, "cuda-graph", Spy)
    return made


@pytest.mark.parametrize("kw", [dict(), dict(positions="rope", norm="rmsnorm", activation="swiglu", n_kv_head=2)])
def test_cuda_every_path_gives_the_uncached_tokens(kw, graph_decoders):
    model = _model(**kw)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9] * 12]  # different lengths in one batch
    want = generate_tokens(model, prompts, GREEDY, path="uncached")
    for path in ("cached", "step", "fast"):
        assert generate_tokens(model, prompts, GREEDY, path=path) == want, path
    one_by_one = [generate_tokens(model, [p], GREEDY, path="fast")[0] for p in prompts]
    assert one_by_one == want
    long = SamplingConfig(max_new_tokens=100, temperature=0.0, stop_at_eot=False)  # the window slides
    assert generate_tokens(model, [[5, 6]], long, path="fast") == generate_tokens(model, [[5, 6]], long, path="uncached")
    assert len(graph_decoders) == 5 and all(d.graphs and d.replays > 10 for d in graph_decoders)


def test_cuda_graph_replays_give_decode_steps_logits():
    model = _model(positions="rope", norm="rmsnorm", activation="swiglu", n_kv_head=2)
    assert pick(model) is GraphDecoder  # the registry's choice on a GPU
    x = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(9)).cuda()
    with torch.inference_mode():
        a, b = (KVCache.empty(model.config, 2, start=torch.tensor([3, 0]), device="cuda") for _ in range(2))
        step, decoder = StepDecoder(model), GraphDecoder(model)
        step.prefill(x[:, :8], a)
        decoder.prefill(x[:, :8], b)
        for t in range(8, 30):
            if t == 20:  # rows swap, as beam search does: a new cache, so a new graph
                a.reorder(torch.tensor([1, 0], device="cuda"))
                b.reorder(torch.tensor([1, 0], device="cuda"))
            torch.testing.assert_close(decoder.step(x[:, t], b), step.step(x[:, t], a), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.k, a.k)
    assert decoder.graphs and decoder.replays == 22 - 2  # the first step on each of the two caches: eager


def test_cuda_bf16_decode_step_and_seeded_sampling():
    """bf16 on a GPU (how it generates by default there): the PyTorch step rounds no worse than the
    module path against the fp32 model, and a seed makes sampling reproducible."""
    fp32 = _model(positions="rope", norm="rmsnorm", activation="swiglu", n_kv_head=2)
    model = _model(positions="rope", norm="rmsnorm", activation="swiglu", n_kv_head=2).to(torch.bfloat16)
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(6)).cuda()
    check_bf16_decode_step(model, x, fp32(x)[0].detach(), prompt=12)

    sampled = SamplingConfig(max_new_tokens=32, temperature=0.8, top_k=20, top_p=0.9, seed=3, stop_at_eot=False)
    tokens = generate_tokens(model, [[1, 2, 3], [4]], sampled)
    assert tokens == generate_tokens(model, [[1, 2, 3], [4]], sampled)
    assert all(len(row) == 32 and all(0 <= t < 97 for t in row) for row in tokens)
    assert tokens != generate_tokens(model, [[1, 2, 3], [4]], SamplingConfig(**{**sampled.__dict__, "seed": 4}))
