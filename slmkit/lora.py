"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021), saved alone and mergeable.

A target linear ``y = W x + b`` becomes ``y = W x + b + scale * B (A dropout(x))`` with ``A``
(rank x in) drawn as PEFT does (Kaiming-uniform, a = sqrt(5)) and ``B`` (out x rank) zero, so a
fresh adapter leaves every output exactly as it was. ``scale`` is ``alpha / rank``, or
``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski 2023), which keeps large ranks learning.
The targets are the projections of every block: ``qkv`` (our ONE fused query/key/value linear:
one adapter on the fused weight, which is exactly three adapters sharing A), ``proj``, ``up``
(SwiGLU's fused gate+up), ``down``, and optionally ``head``. A head adapter on tied embeddings
changes the logits only: the token embedding stays as it is (and ``merge_lora`` unties them).

Usage (what ``slm finetune --lora`` will do)::

    from slmkit.lora import LoRAConfig, apply_lora, describe, merge_lora, save_adapter, read_adapter, load_adapter

    cfg = LoRAConfig(rank=8, alpha=16, targets=["qkv", "proj", "up", "down"])
    model = apply_lora(base_model, cfg)       # in place: adapters in, everything else frozen
    print(describe(model))                    # "LoRA rank 8 ... 36,864 trainable parameters (2.1% of ...)"
    ... train: only the adapters require grad (Trainer's optimizer takes those) ...
    save_adapter(out / "adapter", model, cfg, base=base_run / "best")   # small: adapters only
    adapter = read_adapter(out / "adapter")   # config, tensors, base path + sha256
    check_base(adapter, base_run / "best")    # the base is the one it was trained on
    model = load_adapter(fresh_base_model, adapter.tensors, adapter.config, source=adapter.weights_file)
    model = merge_lora(model)                 # plain nn.Linear again: the fast decoders apply

Files: ``adapter.safetensors`` (``<module>.lora_A`` / ``<module>.lora_B``) and ``adapter.json``
(the ``[lora]`` config, the base model's config, the base checkpoint's path and sha256), written
atomically; nothing is ever unpickled. ``slmkit.export.peft`` writes the same adapter in PEFT's
format for the HF export of the base.

Note: the fused training loss (``GPT.forward(..., return_logits=False)``) reads
``lm_head.weight``; for a head adapter that is the effective weight ``W + scale B A``, so the head
adapter trains there too, but without its input dropout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.config import from_dict, to_dict
from slmkit.errors import SlmError
from slmkit.files import atomic_dir, sha256_file
from slmkit.model import GPT

TARGETS = ("qkv", "proj", "up", "down", "head")
Target = Literal["qkv", "proj", "up", "down", "head"]
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FORMAT = "slmkit-lora"
FORMAT_VERSION = 1


@dataclass
class LoRAConfig:
    """The ``[lora]`` section: which linears get an adapter, its rank and scaling."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r (default %(default)s)", "flag": "--lora-rank"})
    alpha: float = field(default=16.0, metadata={
        "help": "LoRA alpha: the update is scaled by alpha / r (default %(default)s)", "flag": "--lora-alpha"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the adapters' input (default %(default)s)", "flag": "--lora-dropout"})
    targets: list[Target] = field(default_factory=lambda: ["qkv", "proj", "up", "down"], metadata={
        "help": "linears to adapt: qkv proj up down head (default: the four projections)",
        "flag": "--lora-targets"})
    rslora: bool = field(default=False, metadata={
        "help": "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r", "flag": "--rslora"})

    def validate(self) -> None:
        """Raise SlmError naming the bad ``lora.*`` value and what is allowed."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SlmError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise SlmError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SlmError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise SlmError(f"lora.targets is empty: choose some of {', '.join(TARGETS)}")
        for t in self.targets:
            if t not in TARGETS:
                raise SlmError(f"lora.targets: unknown target {t!r}: choose among {', '.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise SlmError(f"lora.targets lists a target twice: {self.targets}")

    @property
    def scale(self) -> float:
        """The factor on ``B A x``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (kept as ``base``, frozen) plus a rank-r update ``scale * B A``."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, scale
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W + scale B A`` (differentiable in A and B), for code that reads
        a linear's weight directly, like the fused loss on ``lm_head.weight``."""
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def merged(self) -> torch.Tensor:
        """``W + scale B A`` computed in float64 and rounded once to the weight's dtype."""
        w = self.base.weight
        delta = (self.lora_B.double() @ self.lora_A.double()) * self.scale
        return (w.double() + delta).to(w.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def target_paths(n_layer: int, targets: list[str]) -> list[str]:
    """The module paths of ``targets`` in a GPT of ``n_layer`` blocks, block by block, then the head."""
    where = {"qkv": "attn.qkv", "proj": "attn.proj", "up": "mlp.up", "down": "mlp.down"}
    paths = [f"blocks.{i}.{where[t]}" for i in range(n_layer) for t in TARGETS[:4] if t in targets]
    return paths + (["lm_head"] if "head" in targets else [])


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *up, name = path.split(".")
    return model.get_submodule(".".join(up)) if up else model, name


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(path, LoRALinear)`` for every adapter in the model."""
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def apply_lora(model: GPT, cfg: LoRAConfig) -> GPT:
    """Put an adapter on each target linear of ``model`` (in place) and freeze every other
    parameter; returns the model. ``trainable_parameters`` / ``describe`` give the count."""
    cfg.validate()
    if any(True for _ in lora_modules(model)):
        raise SlmError("this model already has LoRA adapters: merge them (merge_lora) before adding new ones")
    model.requires_grad_(False)
    for path in target_paths(model.config.n_layer, cfg.targets):
        parent, name = _parent(model, path)
        lora = LoRALinear(getattr(parent, name), cfg.rank, cfg.scale, cfg.dropout)
        setattr(parent, name, lora.train(model.training))  # a new module would be in training mode
    return model


def trainable_parameters(model: nn.Module) -> int:
    """How many parameter values require grad (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: GPT) -> str:
    """One line for the log: the adapters and how many parameters train."""
    mods = list(lora_modules(model))
    total = sum(p.numel() for p in model.parameters())
    n = trainable_parameters(model)
    if not mods:
        return f"no LoRA adapters: {n:,} trainable parameters of {total:,}"
    names = sorted({p.rsplit(".", 1)[-1] for p, _ in mods}, key=lambda s: ["qkv", "proj", "up", "down", "lm_head"].index(s))
    _, first = mods[0]
    return (f"LoRA rank {first.rank} (scale {first.scale:g}) on {', '.join(names)} ({len(mods)} linears): "
            f"{n:,} trainable parameters ({100 * n / total:.2f}% of {total:,})")


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back (in place;
    returns the model). Every parameter requires grad again, as in a freshly built GPT.

    A head adapter on tied embeddings gives the head its own weight (``config.tie_embeddings``
    becomes False): folding it into the shared tensor would change the token embedding.
    """
    for path, lora in list(lora_modules(model)):
        base = lora.base
        w = lora.merged()
        if path == "lm_head" and base.weight is model.tok_emb.weight:
            base.weight = nn.Parameter(w)
            model.config.tie_embeddings = False
        else:
            base.weight.copy_(w)
        parent, name = _parent(model, path)
        setattr(parent, name, base)
    return model.requires_grad_(True)


def strip_lora(model: GPT) -> GPT:
    """Put every adapted linear's frozen base back, dropping the adapters unmerged (in place;
    returns the model): the base the adapters were trained on, for exports that ship them apart."""
    for path, lora in list(lora_modules(model)):
        parent, name = _parent(model, path)
        setattr(parent, name, lora.base)
    return model


def adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters alone: ``{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)}``, detached copies."""
    out = {}
    for path, m in lora_modules(model):
        out[f"{path}.lora_A"] = m.lora_A.detach().contiguous().clone()
        out[f"{path}.lora_B"] = m.lora_B.detach().contiguous().clone()
    return out


@torch.no_grad()
def load_adapter(model: GPT, tensors: dict[str, torch.Tensor], cfg: LoRAConfig, *,
                 source: str | Path = "the adapter") -> GPT:
    """Set ``model``'s adapters from ``tensors`` (adding them with ``apply_lora`` first if it has
    none); returns the model. ``source`` names the file in errors: missing or unexpected tensors
    and shapes that do not fit this model are one SlmError line each."""
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, cfg)
    mods = dict(lora_modules(model))
    expected = {f"{p}.lora_{x}": (p, x) for p in mods for x in "AB"}
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SlmError(f"{source} lacks the tensor {missing[0]}{more}: it does not hold adapters for "
                       f"targets {cfg.targets} of this model")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise SlmError(f"{source} holds tensors this config does not target ({', '.join(unexpected[:3])}): "
                       f"its targets are {cfg.targets}")
    for key, (path, x) in expected.items():
        param = getattr(mods[path], f"lora_{x}")
        value = tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise SlmError(f"{source}: {key} has shape {tuple(value.shape)} but this model needs {tuple(param.shape)}: "
                           "the adapter was trained on a different base model or rank")
        if not value.is_floating_point():
            raise SlmError(f"{source}: {key} holds {value.dtype}, not floating-point numbers")
        param.copy_(value)
    return model


# ------------------------------------------------------------------------------- files


@dataclass
class Adapter:
    """What ``read_adapter`` found: the config, the tensors, the base it was trained on."""

    path: Path
    config: LoRAConfig
    tensors: dict[str, torch.Tensor]
    model: dict[str, Any]  # the base model's [model] config
    base: dict[str, str] | None  # {"path", "sha256"} of the base checkpoint's weights file

    @property
    def weights_file(self) -> Path:
        return self.path / ADAPTER_WEIGHTS


def _weights_file(base: str | Path) -> Path:
    """The weights file of a base checkpoint folder (``model.safetensors``), or ``base`` itself."""
    base = Path(base)
    path = base / "model.safetensors" if base.is_dir() else base
    if not path.is_file():
        raise SlmError(f"base checkpoint {base} has no model.safetensors: pass the checkpoint folder "
                       "(RUN_DIR/best or RUN_DIR/last) the adapter was trained on")
    return path


def save_adapter(directory: str | Path, model: GPT, cfg: LoRAConfig, *, base: str | Path | None = None) -> Path:
    """Write ``model``'s adapters to ``directory`` (replaced atomically): ``adapter.safetensors``
    and ``adapter.json`` with ``cfg``, the model config and, if ``base`` (the base checkpoint
    folder) is given, its path and the sha256 of its weights file."""
    from safetensors.torch import save_file

    tensors = adapter_state(model)
    wanted = {f"{p}.lora_{x}" for p in target_paths(model.config.n_layer, cfg.targets) for x in "AB"}
    if set(tensors) != wanted:  # a caller's bug: the config does not describe this model's adapters
        raise ValueError(f"cfg.targets {cfg.targets} do not match the model's adapters ({len(tensors) // 2} linears)")
    meta: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "lora": to_dict(cfg),
                            "model": to_dict(model.config), "base": None}
    if base is not None:
        weights = _weights_file(base)
        meta["base"] = {"path": str(Path(base).resolve()), "sha256": sha256_file(weights)}
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def read_adapter(directory: str | Path) -> Adapter:
    """Read a folder written by ``save_adapter``; a missing, corrupt or foreign file is one
    SlmError line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, weights_path = directory / ADAPTER_META, directory / ADAPTER_WEIGHTS
    if not meta_path.is_file():
        raise SlmError(f"{directory} holds no {ADAPTER_META}: pass the adapter folder a LoRA fine-tune wrote")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlmError(f"{meta_path} cannot be read as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SlmError(f"{meta_path} is not a slmkit LoRA adapter (format {FORMAT!r} expected)")
    if meta.get("version") != FORMAT_VERSION:
        raise SlmError(f"{meta_path} has adapter format version {meta.get('version')!r}; this slmkit reads {FORMAT_VERSION}")
    try:
        cfg = from_dict(LoRAConfig, meta.get("lora"), "lora")
    except SlmError as e:
        raise SlmError(f"{meta_path}: {e}") from None
    model_cfg, base = meta.get("model"), meta.get("base")
    if not isinstance(model_cfg, dict) or not (base is None or (isinstance(base, dict) and {"path", "sha256"} <= base.keys())):
        raise SlmError(f"{meta_path} lacks a valid 'model' or 'base' entry: it was not written by save_adapter")
    if not weights_path.is_file():
        raise SlmError(f"{directory} holds no {ADAPTER_WEIGHTS}: the adapter folder is incomplete")
    try:
        tensors = load_file(weights_path)
    except (OSError, SafetensorError) as e:
        raise SlmError(f"{weights_path} cannot be read as safetensors ({e})") from None
    return Adapter(directory, cfg, tensors, model_cfg, base)


def check_base(adapter: Adapter, base: str | Path) -> None:
    """Raise SlmError unless ``base`` (a checkpoint folder) holds the weights the adapter was
    trained on (same sha256). An adapter saved without a base passes."""
    if adapter.base is None:
        return
    digest = sha256_file(_weights_file(base))
    if digest != adapter.base["sha256"]:
        raise SlmError(f"{adapter.path} was trained on the base {adapter.base['path']} (sha256 {adapter.base['sha256'][:12]}), "
                       f"but {base} holds other weights (sha256 {digest[:12]}): pass the base it was trained on")


# ------------------------------------------------------------------------------- LoRA runs


def _head_weight(model: GPT) -> nn.Parameter:
    head = model.lm_head
    return head.base.weight if isinstance(head, LoRALinear) else head.weight


def _keep_old_rows(first: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first] = 0
        return grad

    return hook


def train_new_tokens(model: GPT, first: int) -> None:
    """Let the embedding rows of the tokens numbered ``first`` and up (the chat tokens added to
    the base vocabulary) train along with the adapters, in the untied head too; every older row
    keeps a zero gradient, so it stays exactly the base's (with zero weight decay: the caller's
    check). Needed with tied embeddings: a new row left at the mean of the old ones scores the
    mean of their logits, so greedy decoding could never pick the end-of-turn token."""
    for weight in {id(w): w for w in (model.tok_emb.weight, _head_weight(model))}.values():
        weight.requires_grad_(True)
        weight.register_hook(_keep_old_rows(first))


class AdapterWeights:
    """What the checkpoints of a LoRA run hold (``trainer.CheckpointWeights``): the adapters and,
    when the run added tokens (``first_new`` = the base vocabulary size), the new embedding rows
    (``tok_emb.new_rows``, and ``lm_head.new_rows`` for an untied head). The frozen base stays in
    its own run; ``unpack`` takes it from the live model."""

    def __init__(self, model: GPT, first_new: int | None = None) -> None:
        self.model, self.first_new = model, first_new
        self.rows: dict[str, str] = {}  # name in the checkpoint -> the full weight's state-dict name
        if first_new is not None and first_new < model.config.vocab_size:
            self.rows["tok_emb.new_rows"] = "tok_emb.weight"
            if not model.config.tie_embeddings:
                head = "lm_head.base.weight" if isinstance(model.lm_head, LoRALinear) else "lm_head.weight"
                self.rows["lm_head.new_rows"] = head

    def pack(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapters' tensors and the new rows, from the model's whole state dict."""
        out = {f"{p}.lora_{x}": weights[f"{p}.lora_{x}"] for p, _ in lora_modules(self.model) for x in "AB"}
        for name, full in self.rows.items():
            out[name] = weights[full][self.first_new:]
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], source: str | Path = "the checkpoint") -> dict[str, torch.Tensor]:
        """The model's whole state dict: its own (base) weights with the adapters and new rows of
        ``tensors`` in place; a missing, unexpected or misshapen tensor is one SlmError line."""
        full = dict(self.model.state_dict())
        expected = set(self.pack(full))
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)
            raise SlmError(f"{source} does not hold this LoRA run's tensors (e.g. {odd[0]}): "
                           "the [lora] settings or the base changed since it was written")
        for name in expected:
            full_name = self.rows.get(name, name)
            value = tensors[name]
            if name in self.rows:
                value = torch.cat([full[full_name][: self.first_new], value.to(full[full_name].dtype)])
            if value.shape != full[full_name].shape:
                raise SlmError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, which does not fit "
                               "this model: the [lora] settings or the base changed since it was written")
            full[full_name] = value
        return full
