"""A slmkit LoRA adapter in PEFT's format, for the Hugging Face export of its base model.

``export_peft(lora_model, out)`` writes ``adapter_config.json`` + ``adapter_model.safetensors``
so that ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_EXPORT), out)``
computes what slmkit's unmerged LoRA model computes. The names come from ``hf.HF_NAMES``, the
table the HF export itself uses. Where our one linear is several HF ones (Llama's q/k/v in our
``qkv``, gate/up in our ``mlp.up``), the one adapter ``scale * B A`` is exactly one adapter per
part sharing A: ``lora_A`` is copied and ``lora_B`` split by rows as the weight is. GPT-2's
Conv1D layers store the weight transposed but PEFT keeps A and B in Linear layout there too
(``fan_in_fan_out`` only matters when PEFT merges). Writing needs safetensors only, not peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slmkit.config import to_dict
from slmkit.errors import SlmError
from slmkit.export.common import META_FILE, output_dir, version, write_json
from slmkit.export.hf import HF_NAMES, _split_parts, hf_architecture
from slmkit.lora import TARGETS, LoRAConfig, adapter_state, lora_modules, target_paths
from slmkit.model import GPT, ModelConfig

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _hf_modules(arch: str, ours: str) -> tuple[str, ...]:
    """The HF module names (with the model prefix) that our module ``ours`` is."""
    if ours == "lm_head":
        return ("lm_head",)
    prefix, rows = HF_NAMES[arch]
    i, rest = ours.removeprefix("blocks.").split(".", 1)
    for row_ours, theirs, _ in rows:
        if row_ours == "blocks.{i}." + rest:
            return tuple(prefix + t.format(i=i) for t in theirs)
    raise KeyError(ours)  # every LoRA target has a row in HF_NAMES


def peft_adapter(tensors: dict[str, torch.Tensor], cfg: LoRAConfig, config: ModelConfig,
                 base_model: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """slmkit adapter tensors (``lora.adapter_state``) -> PEFT's ``(adapter_config, tensors)``."""
    cfg.validate()
    arch = hf_architecture(config)  # refuses models with no HF class, naming what to change
    out: dict[str, torch.Tensor] = {}
    suffixes: list[str] = []
    paths = target_paths(config.n_layer, cfg.targets)
    missing = [f"{p}.lora_{x}" for p in paths for x in "AB" if f"{p}.lora_{x}" not in tensors]
    if missing:
        raise SlmError(f"the adapter lacks {missing[0]} for its targets {cfg.targets}: pass the tensors of "
                       "lora.adapter_state (or read_adapter) with the config they were made with")
    for ours in paths:
        a, b = tensors[f"{ours}.lora_A"], tensors[f"{ours}.lora_B"]
        names = _hf_modules(arch, ours)
        for name, part in zip(names, _split_parts(config, ours, b, len(names))):
            out[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().cpu().contiguous().clone()
            out[f"base_model.model.{name}.lora_B.weight"] = part.detach().float().cpu().contiguous().clone()
            # PEFT matches a target by suffix: the last two parts tell GPT-2's attn.c_proj from mlp.c_proj.
            suffix = name if name == "lm_head" else ".".join(name.split(".")[-2:])
            if suffix not in suffixes:
                suffixes.append(suffix)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": suffixes,
        "fan_in_fan_out": arch == "gpt2",  # GPT-2's Conv1D (PEFT turns it off again for the Linear head)
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
    }
    return adapter_config, out


def write_peft(out: str | Path, tensors: dict[str, torch.Tensor], cfg: LoRAConfig, config: ModelConfig,
               base_model: str | None = None) -> Path:
    """Write the PEFT folder ``out`` (atomically) from adapter tensors, their config and the base's."""
    from safetensors.torch import save_file

    adapter_config, peft_tensors = peft_adapter(tensors, cfg, config, base_model)
    with output_dir(Path(out)) as tmp:
        write_json(tmp / PEFT_CONFIG, adapter_config)
        save_file(peft_tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / META_FILE, {"format": "peft", "slmkit_version": version(), "model": to_dict(config),
                                     "lora": to_dict(cfg), "architecture": hf_architecture(config)})
    return Path(out)


def export_peft(model: GPT, out: str | Path, cfg: LoRAConfig | None = None, base_model: str | None = None) -> Path:
    """Write the adapters of an (unmerged) LoRA ``model`` as a PEFT adapter folder ``out``.

    ``cfg``: the LoRAConfig it was made with (recorded as is); without it, one with the same
    rank, scale and targets is read off the adapters. ``base_model``: recorded as
    ``base_model_name_or_path`` (say, the HF export's folder)."""
    mods = list(lora_modules(model))
    if not mods:
        raise SlmError("this model has no LoRA adapters to export (merged already, or never adapted)")
    if len({(m.rank, m.scale) for _, m in mods}) > 1:
        raise SlmError("the model's adapters have different ranks or scales: PEFT's config holds one of each")
    first = mods[0][1]
    if cfg is None:
        kinds = {path.rsplit(".", 1)[-1] for path, _ in mods}
        targets = [t for t, kind in zip(TARGETS, ("qkv", "proj", "up", "down", "lm_head")) if kind in kinds]
        cfg = LoRAConfig(rank=first.rank, alpha=first.scale * first.rank, targets=targets,
                         dropout=getattr(first.dropout, "p", 0.0))
    elif (cfg.rank, cfg.scale) != (first.rank, first.scale):
        raise ValueError(f"cfg (rank {cfg.rank}, scale {cfg.scale}) does not describe the model's adapters "
                         f"(rank {first.rank}, scale {first.scale})")
    return write_peft(out, adapter_state(model), cfg, model.config, base_model)


def export_peft_run(run_dir: str | Path, out: str | Path, which: str = "best") -> Path:
    """``slm export LORA_RUN --format peft``: ``out/base`` is the HF export of the base the adapters
    were trained on and ``out/adapter`` the PEFT adapter, so that ``PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(out/"base"), out/"adapter")`` is the run. When the run added
    chat tokens, the base holds their embedding rows as the run trained them (a LoRA run trains those
    rows too: left at the mean, the end-of-turn token could never win) and the run's tokenizer, with
    its chat template."""
    from slmkit.checkpoint import lora_model_from_checkpoint, read_run_checkpoint
    from slmkit.config import from_dict
    from slmkit.export.common import export_meta
    from slmkit.export.hf import export_hf
    from slmkit.lora import strip_lora
    from slmkit.tokenizer import load_tokenizer

    ckpt = read_run_checkpoint(run_dir, which)
    model = lora_model_from_checkpoint(ckpt).float().cpu().eval()
    cfg = from_dict(LoRAConfig, ckpt["state"]["lora"], "lora")
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer")
    out = Path(out)
    with output_dir(out) as tmp:
        export_peft(model, tmp / "adapter", cfg, base_model=str((out / "base").resolve()))
        base = strip_lora(model)
        export_hf(base, tokenizer, tmp / "base")
        write_json(tmp / META_FILE, export_meta(base, tokenizer, "peft", base="base", adapter="adapter",
                                                lora=to_dict(cfg), run=str(run_dir)))
    return out
