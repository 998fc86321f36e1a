import json
import math
import os
from pathlib import Path

import pytest
import torch

from slmkit import checkpoint as ckpt_mod
from slmkit import train as train_mod
from slmkit import trainer as trainer_mod
from slmkit.checkpoint import load_run, read_checkpoint, write_checkpoint
from slmkit.errors import SlmError
from slmkit.model import GPT, ModelConfig
from slmkit.train import TrainConfig, Trainer, train

from conftest import TINY, train_killed_after


def test_run_writes_artifacts_and_learns(run_dir):
    for name in ["config.toml", "metrics.jsonl", "loss.png", "last/model.safetensors", "best/model.safetensors",
                 "tokenizer/tokenizer.json", "last/optimizer.safetensors", "last/manifest.json"]:
        assert (run_dir / name).exists(), name
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert len(vals) == 2 and vals[-1] < math.log(300)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _curve(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_continues_the_same_loss_curve(data_dir, tmp_path, monkeypatch, dtype):
    """Exact resume in float32 and under bf16 autocast on the CPU (bf16 runs everywhere: emulated,
    slower, on CPUs without native bf16); the checkpoint keeps float32 weights either way."""
    over = TINY + ["train.max_steps=16", "train.checkpoint_interval=4", "train.eval_interval=8",
                   "train.log_interval=1", "model.dropout=0.1", f"train.dtype={dtype}"]
    full = tmp_path / "full"
    train(data_dir, full, overrides=over, quiet=True)

    # Interrupt the second run after step 10 (last checkpoint at step 8), as a kill would.
    part = tmp_path / "part"
    train_killed_after(10, data_dir, part, over, monkeypatch)
    assert read_checkpoint(part / "last")["state"]["step"] == 8
    summary = train(data_dir, part, overrides=over, quiet=True)
    assert summary["steps"] == 16
    assert _curve(part) == _curve(full)  # bit for bit, including dropout's RNG and the data order
    a = read_checkpoint(full / "last")["weights"]
    b = read_checkpoint(part / "last")["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in a.values())
    curve = _curve(full)
    assert max(curve[-3:]) < curve[0] - 0.5  # and it learns (5.70 -> 4.7 in 16 steps)


def test_auto_says_which_precision_and_why(data_dir, tmp_path, monkeypatch, capsys):
    """slm train's first line names the precision train.dtype=auto chose and why: bf16 autocast
    on a CPU with native bf16, float32 on one without (the CPU's flags mocked both ways)."""
    from slmkit import runtime

    for unit, said in (("AVX512-BF16", "bfloat16 autocast, float32 weights (train.dtype=auto: this CPU has AVX512-BF16)"),
                       (None, "float32 (train.dtype=auto: no AVX512-BF16 or AMX-BF16 on this CPU)")):
        monkeypatch.setattr(runtime, "cpu_bf16", lambda: unit)
        run = tmp_path / str(unit)
        train(data_dir, run, overrides=[o for o in TINY if "dtype" not in o] + ["train.max_steps=1"], quiet=False)
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith("starting: ") and first.endswith(f"device cpu, {said}"), first
        assert read_checkpoint(run / "last")["weights"]["tok_emb.weight"].dtype == torch.float32


def test_sigint_writes_a_checkpoint_and_stops(data_dir, tmp_path, monkeypatch):
    real_step = Trainer.train_step

    def step_then_signal(self):
        loss = real_step(self)
        if self.state.step == 3:
            self.stop_signal = "SIGINT"
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    summary = train(data_dir, tmp_path / "r", overrides=TINY + ["train.max_steps=50"], quiet=True)
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == 3
    assert read_checkpoint(tmp_path / "r" / "last")["state"]["step"] == 3


def test_max_time_stops_the_run(data_dir, tmp_path):
    summary = train(data_dir, tmp_path / "r", overrides=TINY + ["train.max_steps=100000"], max_time="2s", quiet=True)
    assert 0 < summary["steps"] < 100000 and summary["time_s"] >= 2


def test_incompatible_run_dir_is_refused_and_kept(data_dir, run_dir, tmp_path):
    before = (run_dir / "last" / "model.safetensors").read_bytes()
    with pytest.raises(SlmError, match="different model config.*model.n_layer"):
        train(data_dir, run_dir, overrides=TINY + ["model.n_layer=3"], quiet=True)
    assert (run_dir / "last" / "model.safetensors").read_bytes() == before


def test_data_with_other_vocab_is_refused(run_dir, corpus_file, tmp_path):
    from slmkit.prepare import prepare

    other = tmp_path / "other"
    prepare([str(corpus_file)], other, vocab_size=280, val_fraction=0.1)
    with pytest.raises(SlmError, match="model.vocab_size"):
        train(other, run_dir, overrides=TINY, quiet=True)


def test_not_a_run_dir_is_refused(data_dir, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SlmError, match="not a slmkit run directory"):
        train(data_dir, tmp_path, overrides=TINY, quiet=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_one_run_file_serves_train_and_generate(data_dir, run_dir, tmp_path, capsys):
    """slm train reads [model]/[train] of a file whose [sample] is slm generate's; a misspelt section is
    still refused with a suggestion; and the config.toml a run writes is a --config that generate reads."""
    from slmkit.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nn_layer = 1\n\n[train]\nlr = 0.002\n\n[sample]\nmax_new_tokens = 3\ntemperature = 0.5\n")
    overrides = [o for o in TINY if not o.startswith(("model.n_layer=", "train.lr="))]
    sections = train_mod.resolve_config(data_dir, config_file=str(cfg), overrides=overrides)
    assert set(sections) == {"model", "train"}
    assert sections["model"]["n_layer"] == 1 and sections["train"]["lr"] == 0.002
    for typo, right in (("sampel", "sample"), ("modle", "model")):
        (tmp_path / "typo.toml").write_text(f"[{typo}]\nseed = 1\n")
        with pytest.raises(SlmError, match=rf"unknown config section \[{typo}\] in .*typo.toml: did you mean \[{right}\]\?"):
            train_mod.resolve_config(data_dir, config_file=str(tmp_path / "typo.toml"), overrides=TINY)
    (tmp_path / "typo.toml").write_text("sample = 3\n")
    with pytest.raises(SlmError, match=r"\[sample\] in .*typo.toml must be a table"):
        train_mod.resolve_config(data_dir, config_file=str(tmp_path / "typo.toml"), overrides=TINY)
    capsys.readouterr()
    for config in (cfg, run_dir / "config.toml"):
        assert main(["generate", str(run_dir), "--config", str(config), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
        assert capsys.readouterr().out.startswith("Once")


def test_a_run_killed_while_swapping_the_tokenizer_is_taken_up_again(data_dir, tmp_path):
    """What a kill during the tokenizer copy leaves (files.atomic_dir's temp and old folders, the
    lock) is the run's own: the next slm train accepts the folder and removes the leftovers."""
    run = tmp_path / "r"
    (run / ".tokenizer.tmp-0123abcd").mkdir(parents=True)
    (run / ".tokenizer.tmp-0123abcd" / "tokenizer.json").write_text("{half")
    (run / ".tokenizer.old-4567ef01").mkdir()
    (run / ".lock").write_text("")
    assert train(data_dir, run, overrides=TINY + ["train.max_steps=2"], quiet=True)["steps"] == 2
    assert not list(run.glob(".tokenizer.*"))
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()


def test_create_run_writes_what_the_trainer_resumes_from(data_dir, run_dir, tmp_path):
    """create_run's step-0 checkpoints hold the keys a training run's checkpoint holds (less the
    optimizer it does not have), and slm train resumes them at step 0 with the given weights."""
    from slmkit.rundir import create_run

    model, tok, _ = load_run(run_dir, which="last")
    new = create_run(tmp_path / "new", model, tok, TrainConfig(), imported_from="a test")
    for name in ("last", "best"):
        state = read_checkpoint(new / name)["state"]
        trained = read_checkpoint(run_dir / name)["state"]
        assert set(state) == set(trained) - {"optimizer", "data_dir"} | {"imported_from"}
        assert set(state["data"]) == set(trained["data"]) and set(state["schedule"]) == set(trained["schedule"])
        assert state["step"] == 0 and state["imported_from"] == "a test"
    with pytest.raises(SlmError, match="not empty"):
        create_run(new, model, tok, TrainConfig())
    summary = train(data_dir, new, overrides=TINY + ["train.max_steps=3", "train.log_interval=1"], quiet=True)
    assert summary["steps"] == 3
    first = _curve(new)[0]
    assert first < _curve(run_dir)[0] - 1.0  # it went on from the trained weights, not from scratch


def _tiny_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last"
    write_checkpoint(target, model=_tiny_model(0), state={"step": 1})
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, *a, **k):
        calls["n"] += 1
        real_save(tensors, path, *a, **k)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(target, model=_tiny_model(1), state={"step": 2})
    assert calls["n"] == 1
    assert read_checkpoint(target)["state"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # no temp dirs left behind


def test_kill_between_renames_falls_back_to_old(tmp_path, monkeypatch):
    target = tmp_path / "last"
    write_checkpoint(target, model=_tiny_model(0), state={"step": 1})
    real_replace = os.replace

    def replace_once_then_die(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(ckpt_mod.os, "replace", replace_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(target, model=_tiny_model(1), state={"step": 2})
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert not target.exists()
    assert read_checkpoint(target)["state"]["step"] == 1  # from last.old


def test_corrupt_checkpoint_is_detected(tmp_path):
    target = tmp_path / "best"
    write_checkpoint(target, model=_tiny_model(0), state={"step": 1})
    data = bytearray((target / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (target / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SlmError, match="corrupt"):
        read_checkpoint(target)


def test_load_run_gives_an_eval_model(run_dir):
    model, tok, info = load_run(run_dir)
    assert not model.training and info["step"] == 60 and tok.vocab_size == model.config.vocab_size


# --------------------------------------------------------------------------- time budget, plateau and fp16 across resumes


class FakeClock:
    """``slmkit.trainer``'s ``time`` module (the training loop's): every training step takes one second (the test advances
    ``now``), each reading of the clock 2**-20 s (the matmul peak must not divide by zero). Powers
    of two keep every sum exact, so a run's times do not depend on where the clock started."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 2.0**-20
        return self.now


def _records(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_max_time_is_summed_over_resumes(data_dir, tmp_path, monkeypatch):
    """A 10 s budget stopped after 4 s trains 6 s more on resume, not 10, and the time-driven
    schedule continues where it stopped: the lr curve is the uninterrupted run's."""
    clock = FakeClock()
    monkeypatch.setattr(trainer_mod, "time", clock)
    real_step, stop_at = Trainer.train_step, {"step": None}

    def one_second_step(self):
        clock.now += 1.0
        loss = real_step(self)
        if self.state.step == stop_at["step"]:
            self.stop_signal = "SIGTERM"  # as `kill` would: the loop ends and last/ is written
        return loss

    monkeypatch.setattr(Trainer, "train_step", one_second_step)
    over = TINY + ["train.max_steps=1000", "train.max_time=10s", "train.log_interval=1", "train.eval_interval=1000",
                   "train.checkpoint_interval=1000"]
    full = train(data_dir, tmp_path / "full", overrides=over, quiet=True)
    assert (full["steps"], full["time_s"]) == (10, 10.0)

    stop_at["step"] = 4
    first = train(data_dir, tmp_path / "part", overrides=over, quiet=True)
    assert (first["steps"], first["time_s"], first["stopped_by"]) == (4, 4.0, "SIGTERM")
    assert read_checkpoint(tmp_path / "part" / "last")["state"]["elapsed"] == pytest.approx(4.0)
    stop_at["step"] = None
    second = train(data_dir, tmp_path / "part", overrides=over, quiet=True)
    assert (second["steps"], second["time_s"], second["stopped_by"]) == (10, 10.0, None)

    assert _records(tmp_path / "part", "elapsed") == pytest.approx(list(range(1, 11)), abs=1e-3)
    lrs = _records(tmp_path / "part", "lr")
    assert lrs == _records(tmp_path / "full", "lr")
    # Time, not the 10 of 1000 steps, drove the decay: the last step's lr is near the minimum.
    assert lrs[-1] < 0.5 * max(lrs)


def test_plateau_schedule_survives_a_kill_and_resume(data_dir, tmp_path, monkeypatch):
    """ReduceLROnPlateau's scale, best loss and count of bad evaluations are all in the checkpoint:
    killed at step 10 (last/ at step 8, with one bad evaluation counted), the resumed run takes the
    same lr at every step as an uninterrupted one. Each lost field would change the sequence."""
    # Scripted validation losses (the real evaluation runs too): the plateau fires after steps 4, 7 and 9.
    script = {1: 5.0, 2: 4.0, 3: 4.5, 4: 4.6, 5: 3.9, 6: 4.0, 7: 4.1, 8: 4.2, 9: 4.3, 10: 3.95, 11: 3.89, 12: 4.0}
    real_evaluate = Trainer.evaluate

    def scripted(self):
        return {**real_evaluate(self), "val_loss": script[self.state.step]}

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    over = TINY + ["train.max_steps=12", "train.schedule=plateau", "train.plateau_patience=2", "train.plateau_factor=0.5",
                   "train.warmup_steps=0", "train.min_lr_ratio=0.01", "train.eval_interval=1",
                   "train.checkpoint_interval=4", "train.log_interval=1"]
    train(data_dir, tmp_path / "full", overrides=over, quiet=True)
    lrs = _records(tmp_path / "full", "lr")
    assert [lr / lrs[0] for lr in lrs] == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.125]

    part = tmp_path / "part"
    train_killed_after(10, data_dir, part, over, monkeypatch)
    saved = read_checkpoint(part / "last")["state"]
    assert saved["step"] == 8
    assert {k: saved["schedule"][k] for k in ("scale", "best", "bad_evals")} == {"scale": 0.25, "best": 3.9, "bad_evals": 1}
    train(data_dir, part, overrides=over, quiet=True)
    assert _records(part, "lr") == lrs
    assert _records(part, "val_loss") == list(script.values())


def _allow_cpu_float16(monkeypatch) -> None:
    """pick_dtype refuses float16 off CUDA (see the report of issue 14); the training step's
    scaler flow itself runs on CPU autocast, which torch supports, so let it through here.
    The MFU peak is measured on small matrices: a 1024**2 fp16 matmul takes 2.5 s on a CPU
    without native fp16, and the run measures 12 of them."""
    real_dtype, real_peak = train_mod.pick_dtype, trainer_mod.measure_matmul_peak
    monkeypatch.setattr(train_mod, "pick_dtype",
                        lambda name, device: torch.float16 if name == "float16" else real_dtype(name, device))
    monkeypatch.setattr(trainer_mod, "measure_matmul_peak", lambda device, dtype: real_peak(device, dtype, n=64))


class _Overflow(torch.autograd.Function):
    """Identity forward, inf/nan gradient backward: what an fp16 overflow in the backward looks like."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def _overflow_at(monkeypatch, steps: set[int]) -> None:
    """The training forward of these steps (1-based, grad_accum 1) gets an overflowing backward."""
    real, count = GPT.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if torch.is_grad_enabled() and out[1] is not None:
            count["n"] += 1
            if count["n"] in steps:
                return (out[0], _Overflow.apply(out[1]), *out[2:])
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def test_float16_trains_with_the_gradient_scaler(data_dir, tmp_path, monkeypatch):
    """CPU fp16 autocast with the gradient scaler: an overflowing step (steps 3 and 7) is skipped
    by the scaler, which halves its scale; that is not a NaN step (nan_policy=stop would end the
    run, and skipped stays 0). Every other step is applied and the model learns."""
    _allow_cpu_float16(monkeypatch)
    _overflow_at(monkeypatch, {3, 7})
    steps = []
    real_step = Trainer.train_step

    def watched(self):
        assert self.dtype == torch.float16 and self.scaler.is_enabled()
        weight, scale = self.model.tok_emb.weight.detach().clone(), self.scaler.get_scale()
        loss = real_step(self)
        steps.append({"step": self.state.step, "scale": scale, "after": self.scaler.get_scale(),
                      "applied": not torch.equal(weight, self.model.tok_emb.weight), "bad": self.bad_step})
        return loss

    monkeypatch.setattr(Trainer, "train_step", watched)
    over = TINY + ["train.dtype=float16", "train.max_steps=30", "train.log_interval=1"]
    summary = train(data_dir, tmp_path / "r", overrides=over, quiet=True)
    assert summary["steps"] == 30 and read_checkpoint(tmp_path / "r" / "last")["state"]["skipped"] == 0
    assert steps[0]["scale"] == 2.0**16 and all(s["bad"] is None for s in steps)
    assert [s["step"] for s in steps if not s["applied"]] == [3, 7]
    assert [s["after"] / s["scale"] for s in steps if s["after"] != s["scale"]] == [0.5, 0.5]
    assert steps[-1]["after"] == 2.0**14
    losses = _records(tmp_path / "r", "loss")
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0


def test_float16_resume_keeps_the_scaler_scale(data_dir, tmp_path, monkeypatch):
    _allow_cpu_float16(monkeypatch)
    _overflow_at(monkeypatch, {3})
    over = TINY + ["train.dtype=float16", "train.max_steps=8"]
    train(data_dir, tmp_path / "r", overrides=over, quiet=True)
    scale = {}
    real_run = Trainer.run

    def run_and_note(self, quiet=False):
        scale["resumed"] = self.scaler.get_scale()
        return real_run(self, quiet)

    monkeypatch.setattr(Trainer, "run", run_and_note)
    train(data_dir, tmp_path / "r", overrides=TINY + ["train.dtype=float16", "train.max_steps=9"], quiet=True)
    assert scale["resumed"] == 2.0**15  # halved once, at step 3


# --------------------------------------------------------------------------- the loop with other parts (fine-tuning's seam)


class FixedBatches:
    """A batch source that is not TokenBatches: one fixed batch whose first half of targets is
    masked (-1, as a prompt is in instruction tuning), with a counter as its position."""

    def __init__(self) -> None:
        self.served = 0
        x = torch.arange(16).view(2, 8) % 20
        self.x, self.y = x, torch.where(torch.arange(8) < 4, -1, (x + 1) % 20)

    def next_batch(self):
        self.served += 1
        return self.x.clone(), self.y.clone()

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]


def test_the_trainer_trains_the_parts_it_is_handed(tmp_path):
    """A model with frozen parameters, another batch source and another evaluator: the optimizer
    holds only what requires grad, the frozen weights stay, the masked loss falls, the evaluator's
    metrics decide best/, and the batch source's position resumes."""

    def part_frozen() -> GPT:
        model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
        model.blocks[0].attn.requires_grad_(False)  # as an adapter run freezes what it does not adapt
        return model

    torch.manual_seed(0)
    model = part_frozen()
    attn = model.blocks[0].attn
    frozen = {n: p.detach().clone() for n, p in attn.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scores = iter([2.0, 3.0])

    def evaluator():
        return {"val_loss": next(scores), "val_bpb": 0.0}

    cfg = TrainConfig(batch_size=2, max_steps=40, eval_interval=20, checkpoint_interval=20, log_interval=1,
                      warmup_steps=0, lr=3e-2, schedule="constant", device="cpu", plot=False)
    trainer = Trainer(model, FixedBatches(), evaluator, cfg, tmp_path, device="cpu", dtype=torch.float32)
    in_optimizer = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    trainable = sum(p.requires_grad for p in model.parameters())
    assert in_optimizer == trainable == len(list(model.parameters())) - len(frozen)
    summary = trainer.run(quiet=True)
    assert summary["steps"] == 40 and summary["val_loss"] == 3.0 and summary["tokens"] == 40 * 16
    assert all(torch.equal(p, frozen[n]) for n, p in attn.named_parameters())
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in before.items() if n.endswith("weight"))
    losses = _records(tmp_path, "loss")
    assert losses[-1] < losses[0] - 1.0
    assert read_checkpoint(tmp_path / "best")["state"]["step"] == 20  # val_loss 2.0 then 3.0: step 20 stays best
    last = read_checkpoint(tmp_path / "last")["state"]
    assert last["data"] == {"served": 40} and last["best_val"] == 2.0

    resumed = Trainer(part_frozen(), FixedBatches(), evaluator, cfg, tmp_path, device="cpu", dtype=torch.float32,
                      resume=True)
    assert resumed.state.step == 40 and resumed.batches.served == 40 and resumed.state.best_val == 2.0
    assert all(torch.equal(p, frozen[n]) for n, p in resumed.model.blocks[0].attn.named_parameters())
