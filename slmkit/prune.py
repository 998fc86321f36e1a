"""Structured pruning: ``slm prune RUN --out RUN2 --heads/--mlp/--layers/--width N``, and the
distillation that helps the smaller model recover (``slm finetune RUN2 --distill RUN``).

Pruning removes whole pieces of a trained model and writes a smaller, ordinary RUN_DIR (a new
``[model]`` config, safetensors weights) that every command loads:

* ``--heads N``: query heads kept per layer, removed as whole KV groups (a key/value head with the
  query heads that read it), so grouped-query attention keeps its ratio; the head size stays, and
  with it the rotary tables (``model.head_size`` records it when the heads no longer fill the width);
* ``--mlp N``: hidden channels kept per layer (SwiGLU's gate and up rows go together);
* ``--layers N``: whole blocks kept;
* ``--width N``: residual channels kept (``n_embd``), the same channels in the embedding, the
  (tied or untied) head, every norm and every projection that reads or writes the residual stream.

What goes is ranked on calibration batches of the run's DATA_DIR (its train split, ``importance``),
by what each piece adds to the residual stream: a KV group, the mean norm of its share of the
attention output projection; an MLP channel, mean |activation| times the norm of its down
projection column; a layer, the mean norm of its update relative to its input (ShortGPT's block
influence, in norm form); a residual channel, the mean |output| of every norm at that channel
(Minitron's width score). Each layer keeps its own best heads and channels; sizes stay uniform
across layers, so the config is still one ``ModelConfig``.

A piece whose output is exactly zero scores zero and goes first, and removing it leaves the
logits unchanged (``tests/test_prune.py`` checks this for every model variant). Removing residual
channels also changes what a norm divides by: each norm's weight is rescaled by the calibration
data's root-mean-square of the channels kept over that of all channels, which is exact when the
channels removed are zero (up to the norm's epsilon; for LayerNorm the mean moves too, so there it
is an approximation).

Recovery is ordinary training of the new run: ``slm finetune RUN2 --data DATA_DIR --out RUN3``
(continued pretraining), optionally with ``--distill RUN``: each step then minimises the KL
divergence from the original model's next-token distribution (at ``--distill-temperature``),
mixed with the cross-entropy by ``--distill-weight``; ``Distillation`` is the trainer's
``objective``. Validation still reports the plain loss and bits per byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slmkit.config import add_section_arguments, from_dict, load_toml, section_from_args, to_dict
from slmkit.errors import SlmError
from slmkit.model import GPT, ModelConfig


def _positive(value: int | None, name: str) -> None:
    if value is not None and value <= 0:
        raise SlmError(f"{name} must be positive, got {value}")


@dataclass
class PruneConfig:
    """What ``slm prune`` keeps (None: all of it) and the calibration data it ranks on."""

    heads: int | None = field(default=None, metadata={
        "help": "query heads to keep per layer, removed as whole KV groups (a multiple of n_head/n_kv_head)",
        "metavar": "N"})
    mlp: int | None = field(default=None, metadata={"help": "MLP hidden channels to keep per layer", "metavar": "N"})
    layers: int | None = field(default=None, metadata={"help": "layers to keep", "metavar": "N"})
    width: int | None = field(default=None, metadata={"help": "residual width (n_embd) to keep", "metavar": "N"})
    calib_batches: int = field(default=8, metadata={
        "help": "batches of DATA_DIR's train split to rank on (default %(default)s)", "metavar": "N"})
    calib_batch_size: int = field(default=8, metadata={
        "help": "sequences per calibration batch (default %(default)s)", "metavar": "N"})
    seed: int = 0  # which windows of the train split are the calibration batches

    def validate(self) -> None:
        for name in ("heads", "mlp", "layers", "width", "calib_batches", "calib_batch_size"):
            _positive(getattr(self, name), f"--{name.replace('_', '-')}")

    def empty(self) -> bool:
        return all(getattr(self, k) is None for k in ("heads", "mlp", "layers", "width"))


@dataclass
class DistillConfig:
    """``slm finetune --distill TEACHER_RUN``: learn the teacher's next-token distribution."""

    teacher: str = field(default="", metadata={
        "help": "distil from this run (the unpruned original): minimise the KL divergence from its logits",
        "flag": "--distill", "metavar": "TEACHER_RUN"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature of both distributions in the KL term (default %(default)s)",
        "flag": "--distill-temperature", "metavar": "T"})
    weight: float = field(default=1.0, metadata={
        "help": "share of the KL term in the loss; the rest is cross-entropy on the data (default %(default)s)",
        "flag": "--distill-weight", "metavar": "W"})

    def validate(self) -> None:
        if not self.temperature > 0:
            raise SlmError(f"--distill-temperature must be positive, got {self.temperature}")
        if not 0 <= self.weight <= 1:
            raise SlmError(f"--distill-weight must be in [0, 1], got {self.weight}")


# --------------------------------------------------------------------------- sizes


def count_params(c: ModelConfig) -> int:
    """The parameter count of ``GPT(c)`` from its config alone (a tied head counted once)."""
    d, hd, hidden = c.n_embd, c.head_dim, c.hidden_dim
    q, kv = c.n_head * hd, c.kv_heads * hd
    norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
    up = (2 if c.activation == "swiglu" else 1) * hidden
    per_layer = 2 * norm + d * (q + 2 * kv) + q * d + d * up + hidden * d
    if c.bias:
        per_layer += (q + 2 * kv) + d + up + d
    n = c.n_layer * per_layer + norm + c.vocab_size * d * (1 if c.tie_embeddings else 2)
    return n + (c.block_size * d if c.positions == "learned" else 0)


def pruned_config(c: ModelConfig, cfg: PruneConfig) -> ModelConfig:
    """The config of ``c`` pruned to ``cfg``'s sizes; one clear line for a size it cannot take."""
    rep = c.n_head // c.kv_heads
    heads = c.n_head if cfg.heads is None else cfg.heads
    checks = [("--heads", cfg.heads, c.n_head), ("--mlp", cfg.mlp, c.hidden_dim),
              ("--layers", cfg.layers, c.n_layer), ("--width", cfg.width, c.n_embd)]
    for flag, value, have in checks:
        if value is not None and value > have:
            raise SlmError(f"{flag} {value} is more than the model has ({have}): pruning only removes")
    if heads % rep:
        raise SlmError(f"--heads {heads} must be a multiple of {rep}: heads go in whole KV groups "
                       f"(n_head={c.n_head}, n_kv_head={c.kv_heads})")
    width = c.n_embd if cfg.width is None else cfg.width
    hidden = c.hidden_dim if cfg.mlp is None else cfg.mlp
    new = dataclasses.replace(
        c, n_layer=c.n_layer if cfg.layers is None else cfg.layers, n_head=heads, n_embd=width,
        n_kv_head=None if c.n_kv_head is None else heads // rep, head_size=c.head_dim, mlp_hidden=hidden)
    # Leave the derived fields unset where the default gives the same sizes, so configs stay plain.
    if width % heads == 0 and width // heads == c.head_dim:
        new.head_size = None
    if c.mlp_hidden is None and dataclasses.replace(new, mlp_hidden=None).hidden_dim == hidden:
        new.mlp_hidden = None
    if new.positions == "rope" and new.head_dim % 2:  # cannot happen (the head size is kept), but say so
        raise SlmError(f"rotary positions need an even head size, got {new.head_dim}")
    new.validate()
    return new


# --------------------------------------------------------------------------- ranking


@dataclass
class Importance:
    """Calibration statistics: a score per prunable piece, and each norm's input energy per channel."""

    heads: torch.Tensor  # (n_layer, n_kv_head): mean norm of each KV group's share of the attention output
    mlp: torch.Tensor  # (n_layer, hidden): mean |activation| x norm of the down projection's column
    layers: torch.Tensor  # (n_layer,): mean |block(x) - x| / |x|
    width: torch.Tensor  # (n_embd,): mean |output| of every norm, summed over the norms
    energy: dict[str, torch.Tensor]  # norm module name -> mean x_c^2 of its input, (n_embd,)


@torch.no_grad()
def importance(model: GPT, batches: list[torch.Tensor]) -> Importance:
    """Score every head group, MLP channel, layer and residual channel of ``model`` on ``batches``
    (token ids, (B, T) each), in float32 with hooks on the model's own forward."""
    c = model.config
    L, KV, D, rep = c.n_layer, c.kv_heads, c.head_dim, c.n_head // c.kv_heads
    heads, mlp, layers = torch.zeros(L, KV), torch.zeros(L, c.hidden_dim), torch.zeros(L)
    width = torch.zeros(c.n_embd)
    energy: dict[str, torch.Tensor] = {}
    handles = []

    def on_proj(i: int):
        def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            y = args[0].float().reshape(-1, KV, rep * D)
            w = mod.weight.float().reshape(c.n_embd, KV, rep * D)
            heads[i] += torch.einsum("nkd,ckd->nkc", y, w).norm(dim=-1).mean(0)
        return hook

    def on_down(i: int):
        def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].float().reshape(-1, mod.in_features)
            mlp[i] += a.abs().mean(0) * mod.weight.float().norm(dim=0)
        return hook

    def on_block(i: int):
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            x = args[0].float()
            layers[i] += ((out.float() - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean()
        return hook

    def on_norm(name: str):
        def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = args[0].float().reshape(-1, c.n_embd)
            energy[name] = energy.get(name, 0) + x.pow(2).mean(0)
            width.add_(out.float().reshape(-1, c.n_embd).abs().mean(0))
        return hook

    for i, block in enumerate(model.blocks):
        handles += [block.attn.proj.register_forward_pre_hook(on_proj(i)),
                    block.mlp.down.register_forward_pre_hook(on_down(i)),
                    block.register_forward_hook(on_block(i))]
    for name, mod in model.named_modules():
        if name == "norm" or name.endswith(".norm1") or name.endswith(".norm2"):
            handles.append(mod.register_forward_hook(on_norm(name)))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = max(len(batches), 1)
    return Importance(heads / n, mlp / n, layers / n, width / n, {k: v / n for k, v in energy.items()})


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order (ties: the earlier first)."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return torch.sort(order).values


# --------------------------------------------------------------------------- slicing


def prune_model(model: GPT, cfg: PruneConfig, imp: Importance) -> GPT:
    """A new, smaller GPT: ``model`` with the lowest-scoring pieces removed down to ``cfg``'s sizes."""
    c = model.config
    new_c = pruned_config(c, cfg)
    rep, D, H = c.n_head // c.kv_heads, c.head_dim, c.hidden_dim
    keep_layers = top(imp.layers, new_c.n_layer)
    W = top(imp.width, new_c.n_embd)
    full = new_c.n_embd == c.n_embd
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def norm(old: str, new: str) -> None:
        scale = 1.0
        if not full:  # the norm divides by the root-mean-square of fewer channels: keep its output's scale
            e = imp.energy[old]
            scale = math.sqrt((e[W].sum() / len(W)) / (e.sum() / c.n_embd).clamp_min(1e-30))
        out[f"{new}.weight"] = sd[f"{old}.weight"][W] * scale
        if f"{old}.bias" in sd:
            out[f"{new}.bias"] = sd[f"{old}.bias"][W]

    out["tok_emb.weight"] = sd["tok_emb.weight"][:, W]
    if "pos_emb.weight" in sd:
        out["pos_emb.weight"] = sd["pos_emb.weight"][:, W]
    out["lm_head.weight"] = sd["lm_head.weight"][:, W]
    norm("norm", "norm")
    for new_i, i in enumerate(keep_layers.tolist()):
        old, new = f"blocks.{i}", f"blocks.{new_i}"
        groups = top(imp.heads[i], new_c.kv_heads)
        q_heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
        cols = lambda heads: (heads[:, None] * D + torch.arange(D)).flatten()  # noqa: E731
        qkv_rows = torch.cat([cols(q_heads), c.n_head * D + cols(groups), (c.n_head + c.kv_heads) * D + cols(groups)])
        chans = top(imp.mlp[i], new_c.hidden_dim)
        up_rows = torch.cat([chans, H + chans]) if c.activation == "swiglu" else chans
        norm(f"{old}.norm1", f"{new}.norm1")
        norm(f"{old}.norm2", f"{new}.norm2")
        out[f"{new}.attn.qkv.weight"] = sd[f"{old}.attn.qkv.weight"][qkv_rows][:, W]
        out[f"{new}.attn.proj.weight"] = sd[f"{old}.attn.proj.weight"][W][:, cols(q_heads)]
        out[f"{new}.mlp.up.weight"] = sd[f"{old}.mlp.up.weight"][up_rows][:, W]
        out[f"{new}.mlp.down.weight"] = sd[f"{old}.mlp.down.weight"][W][:, chans]
        if c.bias:
            out[f"{new}.attn.qkv.bias"] = sd[f"{old}.attn.qkv.bias"][qkv_rows]
            out[f"{new}.attn.proj.bias"] = sd[f"{old}.attn.proj.bias"][W]
            out[f"{new}.mlp.up.bias"] = sd[f"{old}.mlp.up.bias"][up_rows]
            out[f"{new}.mlp.down.bias"] = sd[f"{old}.mlp.down.bias"][W]
    pruned = GPT(new_c)
    pruned.load_state_dict({k: v.clone() for k, v in out.items()})
    if new_c.tie_embeddings:
        pruned.lm_head.weight = pruned.tok_emb.weight
    return pruned.train(model.training)


# --------------------------------------------------------------------------- the command


def calibration_batches(data_dir: Path, block_size: int, cfg: PruneConfig) -> list[torch.Tensor]:
    """``cfg.calib_batches`` batches of token ids from DATA_DIR's train split."""
    from slmkit.data import TokenBatches, open_split

    source = TokenBatches(open_split(data_dir, "train"), block_size, cfg.calib_batch_size, cfg.seed)
    return [source.next_batch()[0] for _ in range(cfg.calib_batches)]


def prune_run(run_dir: str | Path, out: str | Path, cfg: PruneConfig, data_dir: str | Path | None = None,
              which: str = "best") -> tuple[Path, dict[str, Any]]:
    """Prune RUN_DIR's ``best`` (or ``last``) checkpoint to ``cfg`` into the new RUN_DIR ``out``,
    ranked on DATA_DIR (default: the one the run was trained on); returns it and a summary."""
    from slmkit.checkpoint import load_run
    from slmkit.data import load_meta
    from slmkit.rundir import check_new_run_dir, create_run
    from slmkit.trainer import TrainConfig

    cfg.validate()
    run_dir, out = Path(run_dir), Path(out)
    check_new_run_dir(out)
    model, tokenizer, info = load_run(run_dir, which=which)
    if "quantized_from" in info:
        raise SlmError(f"{run_dir} is quantized (from {info['quantized_from']}): prune the original run")
    new_c = pruned_config(model.config, cfg)  # bad sizes are refused before the calibration pass
    if data_dir is None:
        if not info.get("data_dir"):
            raise SlmError(f"{run_dir} does not record its DATA_DIR: pass --data DATA_DIR (text prepared with its tokenizer)")
        data_dir = info["data_dir"]
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if meta.get("kind") == "chat" or meta.get("vocab_size") != model.config.vocab_size:
        raise SlmError(f"{data_dir} is not text prepared with the tokenizer of {run_dir}: pass --data DATA_DIR "
                       f"(slm prepare --input FILES --tokenizer-from {run_dir} --out DATA_DIR)")
    imp = importance(model, calibration_batches(data_dir, model.config.block_size, cfg))
    pruned = prune_model(model, cfg, imp)
    config_path = run_dir / "config.toml"
    train_section = load_toml(config_path).get("train", {}) if config_path.is_file() else {}
    summary = {"from": str(run_dir.resolve()), "checkpoint": info.get("checkpoint"), "step": info.get("step"),
               "data_dir": str(data_dir), "kept": {k: v for k, v in to_dict(cfg).items() if k in
                                                   ("heads", "mlp", "layers", "width")},
               "params_before": count_params(model.config), "params_after": count_params(new_c)}
    create_run(out, pruned, tokenizer, from_dict(TrainConfig, train_section, "train"), pruned_from=summary,
               data_dir=str(data_dir))
    return out, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slm prune``."""
    parser.add_argument("run_dir", metavar="RUN", help="the trained run to prune")
    parser.add_argument("--out", required=True, help="new RUN_DIR for the pruned model")
    parser.add_argument("--data", help="DATA_DIR to rank on (default: the one RUN was trained on)")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of RUN to prune")
    add_section_arguments(parser, PruneConfig)


def run_cli(args: argparse.Namespace) -> int:
    """``slm prune``."""
    cfg = section_from_args(PruneConfig, args, "prune")
    if cfg.empty():
        raise SlmError("nothing to prune: give --heads, --mlp, --layers or --width (the sizes to keep)")
    out, s = prune_run(args.run_dir, args.out, cfg, args.data, args.which)
    c = load_toml(out / "config.toml")["model"]
    shape = ", ".join(f"{k} {c[k]}" for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "head_size", "mlp_hidden")
                      if k in c)
    print(f"pruned {args.run_dir} into {out}: {s['params_before']:,} -> {s['params_after']:,} parameters "
          f"({s['params_after'] / s['params_before']:.0%}; {shape}); recover with: slm finetune {out} "
          f"--data {s['data_dir']} --out RUN3 [--distill {args.run_dir}]", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- distillation


class Distillation:
    """The trainer's objective for ``--distill``: weight x T^2 x KL(teacher || student) at
    temperature T, plus (1 - weight) x cross-entropy, each the mean over the scored targets."""

    def __init__(self, teacher: GPT, cfg: DistillConfig) -> None:
        cfg.validate()
        self.teacher, self.cfg = teacher.eval().requires_grad_(False), cfg

    @classmethod
    def from_run(cls, cfg: DistillConfig, vocab_size: int, token_bytes: list[int], device: str) -> Distillation:
        """The teacher run ``cfg.teacher``, checked to share the student's vocabulary, on ``device``."""
        from slmkit.checkpoint import load_run

        teacher, tok, _ = load_run(cfg.teacher, device=device)
        if teacher.config.vocab_size != vocab_size or tok.token_byte_lengths() != token_bytes:
            raise SlmError(f"--distill {cfg.teacher}: its vocabulary differs from the model's "
                           f"({teacher.config.vocab_size} against {vocab_size} tokens): distil from the run this one was "
                           "pruned from")
        return cls(teacher, cfg)

    def __call__(self, forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 segments: torch.Tensor | None) -> torch.Tensor:
        logits, _ = forward(x, segments=segments)
        with torch.no_grad():
            target, _ = self.teacher(x, segments=segments)
        return distill_loss(logits, target, y, self.cfg.temperature, self.cfg.weight)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 weight: float = 1.0) -> torch.Tensor:
    """weight x T^2 x KL(softmax(teacher/T) || softmax(student/T)) + (1 - weight) x cross-entropy,
    averaged over the positions whose target is not -1; logits (B, T, vocab), targets (B, T)."""
    scored = targets.reshape(-1) != -1
    s = student.reshape(-1, student.size(-1))[scored].float()
    t = teacher.reshape(-1, teacher.size(-1))[scored].float()
    if s.shape[0] == 0:
        return student.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature**2
    if weight >= 1:
        return kl
    return weight * kl + (1 - weight) * F.cross_entropy(s, targets.reshape(-1)[scored])
