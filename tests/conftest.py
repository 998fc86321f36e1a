"""Shared fixtures: a small corpus, a prepared DATA_DIR and a tiny trained RUN_DIR."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def make_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Simple children's-story-like documents: a learnable language with a small vocabulary."""
    rng = random.Random(seed)
    names = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"]
    things = ["ball", "cat", "dog", "tree", "cake", "boat", "star"]
    feelings = ["happy", "sad", "tired", "excited"]
    docs = []
    for _ in range(n_docs):
        a, b = rng.sample(names, 2)
        t, f = rng.choice(things), rng.choice(feelings)
        docs.append(
            f"Once upon a time, {a} had a {t}. {a} liked the {t} very much. "
            f"One day {b} came to play. {b} was {f}. They played with the {t} all day.\n"
            f"The end."
        )
    return docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("".join(d + "\n<|endoftext|>\n" for d in make_corpus()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    from slmkit.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "d"
    prepare([str(corpus_file)], out, vocab_size=300, val_fraction=0.1)
    return out


# float32 pinned: train.dtype=auto picks bf16 autocast on CPUs with native bf16 (runtime.choose_dtype),
# and the tests that compare a run's numbers with another computation mean float32 on every CPU.
# The bf16 runs have tests of their own (test_train.py, test_cpu_kernels.py).
TINY = ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=5", "train.eval_batches=2",
        "train.plot=false", "train.dtype=float32"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A tiny model trained for 60 steps: enough to learn the corpus's frequent words."""
    from slmkit.train import train

    out = tmp_path_factory.mktemp("run") / "r"
    train(data_dir, out, overrides=TINY + ["train.max_steps=60", "train.eval_interval=30",
                                           "train.checkpoint_interval=30", "train.plot=true"], quiet=True)
    return out


def train_killed_after(step: int, data_dir: Path, run: Path, overrides: list[str], monkeypatch) -> None:
    """Train into ``run`` and kill the run (a KeyboardInterrupt out of the training loop, as a kill
    would leave it: no final checkpoint) right after step ``step``."""
    from slmkit.train import Trainer, train

    real_step = Trainer.train_step

    def step_then_die(self):
        loss = real_step(self)
        if self.state.step == step:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(data_dir, run, overrides=overrides, quiet=True)
    monkeypatch.setattr(Trainer, "train_step", real_step)


def check_bf16_decode_step(model, x: torch.Tensor, reference: torch.Tensor, prompt: int) -> None:
    """A bf16 ``model``'s PyTorch decode step (``StepDecoder``), token by token after ``prompt``
    tokens of ``x``, is within 2x (+0.05) of the module path's error (``ModuleDecoder``: the model's
    forward with the cache) against ``reference`` (the fp32 model's logits on x), and within 10% of
    the logits' scale."""
    from slmkit.decode import KVCache, ModuleDecoder, StepDecoder

    slow_err, fast_err = [], []
    with torch.inference_mode():
        a, b = (KVCache.empty(model.config, x.shape[0], device=x.device, dtype=torch.bfloat16) for _ in range(2))
        module, step = ModuleDecoder(model), StepDecoder(model)
        module.prefill(x[:, :prompt], a)
        step.prefill(x[:, :prompt], b)
        for t in range(prompt, x.shape[1]):
            slow, fast = module.step(x[:, t], a), step.step(x[:, t], b)
            assert fast.dtype == torch.bfloat16
            slow_err.append((slow.float() - reference[:, t]).abs().max().item())
            fast_err.append((fast.float() - reference[:, t]).abs().max().item())
    assert max(fast_err) <= 2 * max(slow_err) + 0.05, (fast_err, slow_err)
    assert max(fast_err) < 0.1 * reference.abs().max().item()


class CPUGraph:
    """What a CUDA graph does, on the CPU: ``replay()`` runs the recorded step again on the same
    cache and input buffers, into the same output tensor."""

    def __init__(self, decoder, cache, out: torch.Tensor) -> None:
        self.decoder, self.cache, self.out = decoder, cache, out

    def replay(self) -> None:
        self.out.copy_(self.decoder._fixed_step(self.cache))


def cpu_capture(decoder, idx: torch.Tensor, cache):
    """``GraphDecoder._capture`` on the CPU: the warm-up run with this step's inputs (as on a GPU),
    then a CPUGraph in place of the recording. Logs the slot each recording happens at."""
    decoder.recorded_at = getattr(decoder, "recorded_at", []) + [cache.length]
    decoder._set_inputs(idx, cache)
    out = decoder._fixed_step(cache)
    return CPUGraph(decoder, cache, out), out
