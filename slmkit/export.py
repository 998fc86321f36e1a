"""Export a trained model out of slmkit, and import Hugging Face checkpoints back in.

``slm export RUN_DIR --format hf|onnx|torchscript --out DIR [--quantize int8]`` writes a folder:

    hf           config.json, generation_config.json, model.safetensors, tokenizer.json,
                 tokenizer_config.json, special_tokens_map.json: loads with transformers'
                 ``AutoModelForCausalLM`` / ``AutoTokenizer``, no slmkit needed. Our variants map
                 onto two standard architectures: learned positions + LayerNorm + GELU is GPT-2
                 (``GPT2LMHeadModel``), rotary + RMSNorm + SwiGLU (with or without GQA) is Llama
                 (``LlamaForCausalLM``). Other mixes are refused: no standard class computes them.
    onnx         model.onnx (input_ids -> logits, dynamic batch and sequence) and model_kv.onnx
                 (input_ids, past_key, past_value -> logits, present_key, present_value) for fast
                 decoding with onnxruntime (``OnnxGenerator``), plus tokenizer.json.
    torchscript  model.pt, a traced module (``torch.jit.load``): input_ids -> logits.

Every folder also holds ``slmkit_export.json`` (format, shapes, eot id) so that ``OnnxGenerator``
and a second export into the same folder know what is there.

``--quantize int8`` applies dynamic int8 quantization to the linear layers (weights int8,
activations quantized on the fly): onnxruntime's for onnx, PyTorch's for torchscript. It is a
CPU inference format; ``hf`` exports stay float32.

``slm import-hf PATH --out RUN_DIR`` reads a GPT-2- or Llama-shaped HF folder (config.json,
safetensors, a byte-level BPE tokenizer.json with ``<|endoftext|>``) into a RUN_DIR that
``slm generate``, ``slm eval`` and ``slm train`` (which continues from it) accept.

The optional packages (onnx, onnxruntime, transformers) are imported only inside the functions
that need them: ``pip install 'slmkit[export]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.errors import SlmError
from slmkit.files import atomic_dir
from slmkit.model import GPT, ModelConfig

FORMATS = ("hf", "onnx", "torchscript")
META_FILE = "slmkit_export.json"
EXTRA_HINT = "pip install 'slmkit[export]'"
EOT = "<|endoftext|>"


def _require(module: str, what: str) -> Any:
    """Import an optional dependency or raise a one-line SlmError with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SlmError(f"{what} needs the '{module.split('.')[0]}' package: {EXTRA_HINT}") from None


def _version() -> str:
    from slmkit import __version__

    return __version__


# =============================================================================== output folders


@contextlib.contextmanager
def _output_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success it replaces ``out``.

    ``out`` may be missing, empty, or an earlier export (it holds ``slmkit_export.json``); anything
    else is refused, so an export never deletes a user's unrelated files.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise SlmError(f"--out {out} is a file: give a folder path (it is created)")
        if any(out.iterdir()) and not (out / META_FILE).is_file():
            raise SlmError(f"--out {out} exists and is not an earlier slmkit export: choose a new or empty folder")
    with atomic_dir(out) as tmp:
        yield tmp


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _meta(model: GPT, tokenizer: Any, fmt: str, **extra: Any) -> dict[str, Any]:
    c = model.config
    from slmkit.config import to_dict

    return {
        "format": fmt,
        "slmkit_version": _version(),
        "model": to_dict(c),
        "vocab_size": c.vocab_size,
        "block_size": c.block_size,
        "n_layer": c.n_layer,
        "n_kv_head": c.kv_heads,
        "head_dim": c.head_dim,
        "eot_id": getattr(tokenizer, "eot_id", None),
        **extra,
    }


def file_sizes(directory: str | Path) -> dict[str, int]:
    """Bytes on disk of each file in an export folder."""
    return {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.is_file()}


# =============================================================================== Hugging Face


def hf_architecture(config: ModelConfig) -> str:
    """``"gpt2"`` or ``"llama"``: the standard HF architecture that computes exactly this model.

    Raises SlmError naming what to change when no standard architecture fits.
    """
    c = config
    if c.positions == "learned" and c.norm == "layernorm" and c.activation == "gelu":
        if c.kv_heads != c.n_head:
            raise SlmError(
                f"GPT-2 (learned positions + LayerNorm + GELU) has no grouped-query attention, but "
                f"model.n_kv_head={c.n_kv_head} < n_head={c.n_head}: export needs n_kv_head = n_head for this mix"
            )
        return "gpt2"
    if c.positions == "rope" and c.norm == "rmsnorm" and c.activation == "swiglu":
        return "llama"
    mix = f"positions={c.positions}, norm={c.norm}, activation={c.activation}"
    raise SlmError(
        f"no standard Hugging Face architecture computes this model ({mix}): the hf format supports "
        "learned+layernorm+gelu (GPT-2) and rope+rmsnorm+swiglu (Llama); use --format onnx or torchscript"
    )


def hf_config(config: ModelConfig, eot_id: int | None) -> dict[str, Any]:
    """The ``config.json`` of the HF model that ``hf_state_dict`` fills."""
    c = config
    arch = hf_architecture(c)
    tokens = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "use_cache": True,
              "torch_dtype": "float32", "initializer_range": 0.02, **tokens}
    if arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": c.block_size,
            "n_ctx": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.hidden_dim,
            "activation_function": "gelu_new",  # the tanh approximation, as ours
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.n_embd,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        # transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters: write both.
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias,
        "attention_dropout": 0.0,
        "mlp_bias": c.bias,
        "pretraining_tp": 1,
        **common,
    }


# One name table per architecture, read both ways by export (hf_state_dict) and import-hf
# (_hf_to_ours): our module, the HF modules it is (several are stacked along dim 0 in ours: Llama's
# q/k/v in our qkv, gate/up in our mlp.up) and flags: "b" has a bias slot, "t" HF stores the weight
# transposed (GPT-2's Conv1D is (in, out), nn.Linear (out, in)). HF names lack the model prefix.
HF_NAMES: dict[str, tuple[str, list[tuple[str, tuple[str, ...], str]]]] = {
    "gpt2": ("transformer.", [
        ("tok_emb", ("wte",), ""),
        ("pos_emb", ("wpe",), ""),
        ("blocks.{i}.norm1", ("h.{i}.ln_1",), "b"),
        ("blocks.{i}.attn.qkv", ("h.{i}.attn.c_attn",), "bt"),  # [q; k; v] as ours
        ("blocks.{i}.attn.proj", ("h.{i}.attn.c_proj",), "bt"),
        ("blocks.{i}.norm2", ("h.{i}.ln_2",), "b"),
        ("blocks.{i}.mlp.up", ("h.{i}.mlp.c_fc",), "bt"),
        ("blocks.{i}.mlp.down", ("h.{i}.mlp.c_proj",), "bt"),
        ("norm", ("ln_f",), "b"),
    ]),
    "llama": ("model.", [
        ("tok_emb", ("embed_tokens",), ""),
        ("blocks.{i}.norm1", ("layers.{i}.input_layernorm",), ""),
        ("blocks.{i}.norm2", ("layers.{i}.post_attention_layernorm",), ""),
        ("blocks.{i}.attn.qkv", tuple(f"layers.{{i}}.self_attn.{x}_proj" for x in "qkv"), "b"),
        ("blocks.{i}.attn.proj", ("layers.{i}.self_attn.o_proj",), "b"),
        ("blocks.{i}.mlp.up", ("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"), "b"),  # ours packs [gate; up]
        ("blocks.{i}.mlp.down", ("layers.{i}.mlp.down_proj",), "b"),
        ("norm", ("norm",), ""),
    ]),
}


def _hf_links(arch: str, n_layer: int) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """The rows of ``HF_NAMES[arch]``: the whole-model ones, then the per-layer ones for each layer."""
    rows = HF_NAMES[arch][1]
    yield from (row for row in rows if "{i}" not in row[0])
    for i in range(n_layer):
        for ours, theirs, flags in (row for row in rows if "{i}" in row[0]):
            yield ours.format(i=i), tuple(t.format(i=i) for t in theirs), flags


def _split_parts(c: ModelConfig, ours: str, value: torch.Tensor, n: int) -> Sequence[torch.Tensor]:
    """Our stacked tensor cut into the ``n`` HF tensors it holds (see HF_NAMES)."""
    if n == 1:
        return [value]
    if ours.endswith("attn.qkv"):
        q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
        return value.split([q, kv, kv], dim=0)
    return value.chunk(n, dim=0)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF names (GPT-2 or Llama), float32, contiguous, tied weights stored once."""
    c = model.config
    arch = hf_architecture(c)
    prefix = HF_NAMES[arch][0]
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, flags in _hf_links(arch, c.n_layer):
        for suffix in ("weight", "bias") if "b" in flags else ("weight",):
            value = sd.get(f"{ours}.{suffix}")
            if value is None:
                if arch == "llama":
                    continue  # bias=false: Llama simply has no bias tensors
                value = torch.zeros(sd[f"{ours}.weight"].shape[0])  # GPT-2 always has biases: ours may have none
            if "t" in flags and suffix == "weight":
                value = value.t()
            for name, part in zip(theirs, _split_parts(c, ours, value, len(theirs))):
                out[f"{prefix}{name}.{suffix}"] = part
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _hf_tokenizer_files(tokenizer: Any, block_size: int) -> dict[str, Any]:
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # byte-level BPE: decode must give back the text exactly
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def export_hf(model: GPT, tokenizer: Any, out: str | Path) -> Path:
    """Write ``out`` as a Hugging Face model folder (safetensors weights + fast tokenizer)."""
    from safetensors.torch import save_file

    c = model.config
    config = hf_config(c, tokenizer.eot_id)  # refuses unsupported mixes before anything is written
    with _output_dir(Path(out)) as tmp:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.eot_id,
        })
        save_file(hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(tokenizer.to_hf_tokenizer_json(), encoding="utf-8")
        for name, data in _hf_tokenizer_files(tokenizer, c.block_size).items():
            _write_json(tmp / name, data)
        _write_json(tmp / META_FILE, _meta(model, tokenizer, "hf", architecture=config["architectures"][0]))
    return Path(out)


# =============================================================================== import from HF


def _load_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(src / shard))
        return weights
    if (bin_path := src / "pytorch_model.bin").is_file():
        import pickle

        # weights_only refuses anything but tensors and containers: code planted in the pickle is
        # refused, not run, and so is a file that is not a PyTorch pickle at all.
        try:
            weights = torch.load(bin_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            weights = e
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            why = type(weights).__name__
            raise SlmError(f"{bin_path} cannot be read as a plain dict of tensors ({why}), and slmkit loads nothing else "
                           "from a pickle: convert it to model.safetensors (save_pretrained(safe_serialization=True))")
        return weights
    raise SlmError(f"{src} has no model.safetensors (or sharded index, or pytorch_model.bin): not an HF model folder")


def _hf_to_ours(arch: str, w: dict[str, torch.Tensor], n_layer: int, bias: bool) -> dict[str, torch.Tensor]:
    """HF weights (model prefix stripped) under our names: HF_NAMES read backwards."""
    out = {}
    for ours, theirs, flags in _hf_links(arch, n_layer):
        for suffix in ("weight", "bias") if bias and "b" in flags else ("weight",):
            parts = [w[f"{name}.{suffix}"] for name in theirs]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            out[f"{ours}.{suffix}"] = value.t() if "t" in flags and suffix == "weight" else value
    return out


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop a leading ``prefix`` from the names that have it (checkpoints saved from the base model lack it)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in weights.items()}


def _gpt2_to_ours(cfg: dict[str, Any], w: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise SlmError(f"GPT-2 checkpoint uses activation_function={act!r}: slmkit's GELU is the tanh approximation (gelu_new)")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn") or cfg.get("scale_attn_weights") is False:
        raise SlmError("GPT-2 checkpoint uses a non-standard attention scaling that slmkit does not implement")
    w = _strip(w, HF_NAMES["gpt2"][0])
    n_layer, d = cfg["n_layer"], cfg["n_embd"]
    hidden = cfg.get("n_inner") or 4 * d
    # Biases all zero (as slmkit writes for bias=false) import as bias=false. ``h.N.attn.bias`` and
    # ``attn.masked_bias`` in old checkpoints are the causal-mask buffers, not biases.
    bias_names = [k for k in w if k.endswith(".bias") and k.split(".")[-2] != "attn"]
    has_bias = any(bool(w[k].any()) for k in bias_names)
    # As transformers does: a tied config uses the embedding as the head, whatever lm_head.weight holds.
    tied = bool(cfg.get("tie_word_embeddings", True)) or "lm_head.weight" not in w
    config = ModelConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg.get("n_positions", cfg.get("n_ctx", 1024)), n_layer=n_layer,
        n_head=cfg["n_head"], n_embd=d, mlp_hidden=None if hidden == 4 * d else hidden, bias=has_bias,
        norm="layernorm", positions="learned", activation="gelu", tie_embeddings=tied,
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
    )
    out = _hf_to_ours("gpt2", w, n_layer, has_bias)
    if not tied:
        out["lm_head.weight"] = w["lm_head.weight"]
    return config, out


def _llama_to_ours(cfg: dict[str, Any], w: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if cfg.get("hidden_act", "silu") != "silu":
        raise SlmError(f"Llama checkpoint uses hidden_act={cfg.get('hidden_act')!r}: slmkit's SwiGLU uses silu")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise SlmError(f"Llama checkpoint uses rope scaling {rope.get('rope_type', rope.get('type'))!r}: slmkit has plain rotary positions only")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise SlmError("Llama checkpoint has attention_bias != mlp_bias: slmkit has one bias switch for both")
    d, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, d // n_head):
        raise SlmError(f"Llama checkpoint has head_dim={cfg['head_dim']} != hidden_size/num_attention_heads: not supported")
    w = _strip(w, HF_NAMES["llama"][0])
    n_kv = cfg.get("num_key_value_heads") or n_head
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in w
    config = ModelConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg.get("max_position_embeddings", 2048), n_layer=cfg["num_hidden_layers"],
        n_head=n_head, n_kv_head=None if n_kv == n_head else n_kv, n_embd=d, bias=attn_bias,
        norm="rmsnorm", positions="rope", activation="swiglu", tie_embeddings=tied,
        rope_theta=float(theta), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )
    if cfg["intermediate_size"] != config.hidden_dim:
        config.mlp_hidden = cfg["intermediate_size"]
    out = _hf_to_ours("llama", w, config.n_layer, attn_bias)
    if not tied:
        out["lm_head.weight"] = w["lm_head.weight"]
    return config, out


def hf_to_slmkit(src: str | Path) -> tuple[GPT, Any]:
    """Read an HF GPT-2/Llama folder into ``(our GPT in float32, our Tokenizer)``. No transformers needed."""
    from slmkit.tokenizer import Tokenizer

    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise SlmError(f"{src} has no config.json: pass a Hugging Face model folder (e.g. one written by slm export --format hf)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    kind = cfg.get("model_type")
    if kind not in ("gpt2", "llama"):
        raise SlmError(f"{src} is a {kind!r} model: slm import-hf reads GPT-2 and Llama checkpoints only")
    weights = {k: v.float() for k, v in _load_hf_weights(src).items()}
    try:
        config, ours = (_gpt2_to_ours if kind == "gpt2" else _llama_to_ours)(cfg, weights)
    except KeyError as e:
        raise SlmError(f"{src}: the {kind} checkpoint lacks {e.args[0]!r}: it does not have the standard {kind} layout") from None
    from slmkit.checkpoint import build_model
    from slmkit.config import to_dict

    config.validate()
    model = build_model(to_dict(config), ours).eval()

    tok_path = src / "tokenizer.json"
    if not tok_path.is_file():
        raise SlmError(f"{src} has no tokenizer.json: slm import-hf needs a fast (tokenizer.json) byte-level BPE tokenizer")
    from tokenizers import Tokenizer as HFTokenizer

    hf_tok = HFTokenizer.from_file(str(tok_path))
    decoder = json.loads(tok_path.read_text(encoding="utf-8")).get("decoder") or {}
    if decoder.get("type") != "ByteLevel" or hf_tok.token_to_id(EOT) is None:
        raise SlmError(
            f"{tok_path} is not a byte-level BPE with {EOT}: slmkit's tokenizer is byte-level (GPT-2 style); "
            "models with other tokenizers (e.g. SentencePiece) cannot be imported"
        )
    tokenizer = Tokenizer("bpe", hf=hf_tok)
    if tokenizer.vocab_size > config.vocab_size:
        raise SlmError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} embeddings")
    return model, tokenizer


def import_hf(src: str | Path, run_dir: str | Path) -> Path:
    """Write an HF GPT-2/Llama folder as a new slmkit RUN_DIR (config.toml, tokenizer/, last/, best/).

    The checkpoints are weights only at step 0 (fresh optimizer, default train settings), so
    ``slm train --data DATA --out RUN_DIR`` continues training the imported weights, on data
    prepared with the same tokenizer (the vocab sizes must match).
    """
    from slmkit.checkpoint import write_checkpoint
    from slmkit.config import dump_toml, to_dict
    from slmkit.train import LRSchedule, TrainConfig

    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise SlmError(f"--out {run_dir} already exists and is not empty: choose a new RUN_DIR")
    model, tokenizer = hf_to_slmkit(src)
    train_cfg = TrainConfig()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        sections = {"model": to_dict(model.config), "train": to_dict(train_cfg)}
        (run_dir / "config.toml").write_text(dump_toml(sections), encoding="utf-8")
        tokenizer.save(run_dir / "tokenizer")
        # Everything Trainer._resume reads: a step-0 state, the start of the data and the schedule.
        state = {
            "step": 0, "tokens": 0, "elapsed": 0.0, "best_val": None,
            "data": {"epoch": 0, "cursor": 0, "seed": train_cfg.seed},
            "schedule": LRSchedule(train_cfg).state_dict(),
            "imported_from": str(Path(src).resolve()),
        }
        for name in ("last", "best"):
            write_checkpoint(run_dir / name, model=model, state=state)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


# =============================================================================== ONNX


class ExportGPT(nn.Module):
    """Our GPT's forward written with plain ops that every exporter handles (no SDPA, no RMSNorm
    op), reusing the model's weights. ``cached=False``: ``input_ids -> logits``.
    ``cached=True``: ``(input_ids, past_key, past_value) -> (logits, present_key, present_value)``
    where the caches are stacked over layers, ``(n_layer, B, n_kv_head, past_len, head_dim)``,
    and the new tokens take positions ``past_len .. past_len + T - 1``. An empty past (length 0)
    makes it the prefill; then one token per call. ``shared_head=False`` writes a tied head as a
    plain ``h @ W^T`` (a transposed copy of the embedding that int8 quantization can compress)."""

    def __init__(self, model: GPT, cached: bool, shared_head: bool = True) -> None:
        super().__init__()
        self.model, self.cached = model, cached
        self.shared_head = shared_head and model.config.tie_embeddings
        c = model.config
        self.n_head, self.n_kv, self.head_dim = c.n_head, c.kv_heads, c.head_dim

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(norm, nn.LayerNorm):
            return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, input_ids: torch.Tensor, past_key: torch.Tensor | None = None,
                past_value: torch.Tensor | None = None):
        m = self.model
        B, T = input_ids.shape
        past = past_key.shape[3] if self.cached else 0
        pos = torch.arange(T, device=input_ids.device) + past  # (T,)
        x = m.tok_emb(input_ids)
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos)
        cos = sin = None
        if m.rope_cos is not None:
            cos, sin = m.rope_cos[pos], m.rope_sin[pos]  # (T, head_dim/2)
        keys = torch.arange(T + past, device=input_ids.device)
        allowed = keys[None, :] <= pos[:, None]  # (T, S): causal over past + new tokens
        bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, float("-inf"))
        hd, scale = self.head_dim, 1.0 / math.sqrt(self.head_dim)
        presents_k, presents_v = [], []
        for i, block in enumerate(m.blocks):
            a = block.attn
            h = self._norm(block.norm1, x)
            q, k, v = a.qkv(h).split([self.n_head * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
            q = q.reshape(B, T, self.n_head, hd).transpose(1, 2)
            k = k.reshape(B, T, self.n_kv, hd).transpose(1, 2)
            v = v.reshape(B, T, self.n_kv, hd).transpose(1, 2)
            if cos is not None:
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            if self.cached:
                k = torch.cat([past_key[i], k], dim=2)
                v = torch.cat([past_value[i], v], dim=2)
                presents_k.append(k)
                presents_v.append(v)
            if self.n_kv != self.n_head:  # GQA: each kv head serves n_head/n_kv query heads
                rep = self.n_head // self.n_kv
                k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, self.n_head, -1, hd)
                v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, self.n_head, -1, hd)
            att = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, self.n_head * hd)
            x = x + a.proj(y)
            x = x + block.mlp(self._norm(block.norm2, x))
        h = self._norm(m.norm, x)
        if self.shared_head:
            # (W @ h^T)^T reads the head's weight as stored, so a tied head shares the embedding's
            # initializer instead of the exporter adding a transposed copy of the whole table.
            logits = (m.lm_head.weight @ h.reshape(-1, h.shape[-1]).t()).t().reshape(B, T, -1)
        else:  # h @ W^T: the form int8 quantizers recognise (weight as MatMul's second input)
            logits = m.lm_head(h)
        if not self.cached:
            return logits
        return logits, torch.stack(presents_k), torch.stack(presents_v)


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic_axes: dict[str, dict[int, str]]) -> None:
    _require("onnx", "ONNX export")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter deprecation warnings
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=17, do_constant_folding=True,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        )


def quantize_onnx(src: str | Path, dst: str | Path) -> None:
    """onnxruntime's dynamic int8 quantization of the MatMul/Gemm weights (per output channel)."""
    quant = _require("onnxruntime.quantization", "int8 quantization of ONNX models")
    import logging

    logging.disable(logging.WARNING)  # "consider pre-processing": advice that does not apply here
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            quant.quantize_dynamic(str(src), str(dst), weight_type=quant.QuantType.QInt8, per_channel=True,
                                   op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.disable(logging.NOTSET)


def export_onnx(model: GPT, tokenizer: Any | None, out: str | Path, quantize: str | None = None) -> Path:
    """Write ``model.onnx`` (full sequence) and ``model_kv.onnx`` (with KV cache) into ``out``,
    plus the tokenizer's ``tokenizer.json`` (``tokenizer=None``, e.g. in benchmarks: none)."""
    c = model.config
    model = model.eval()
    with _output_dir(Path(out)) as tmp:
        work = Path(tempfile.mkdtemp(dir=tmp)) if quantize else tmp
        ids = torch.randint(0, c.vocab_size, (1, 4))
        shared = not quantize
        _onnx_export(ExportGPT(model, cached=False, shared_head=shared), (ids,), work / "model.onnx", ["input_ids"], ["logits"],
                     {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}})
        past = torch.zeros(c.n_layer, 1, c.kv_heads, 3, c.head_dim)
        cache_axes = {0: "batch", 1: "sequence"}
        _onnx_export(
            ExportGPT(model, cached=True, shared_head=shared), (ids, past, past.clone()), work / "model_kv.onnx",
            ["input_ids", "past_key", "past_value"], ["logits", "present_key", "present_value"],
            {"input_ids": cache_axes, "logits": cache_axes,
             "past_key": {1: "batch", 3: "past_sequence"}, "past_value": {1: "batch", 3: "past_sequence"},
             "present_key": {1: "batch", 3: "total_sequence"}, "present_value": {1: "batch", 3: "total_sequence"}},
        )
        if quantize:
            for name in ("model.onnx", "model_kv.onnx"):
                quantize_onnx(work / name, tmp / name)
            shutil.rmtree(work)
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_hf_tokenizer_json(), encoding="utf-8")
        _write_json(tmp / META_FILE, _meta(model, tokenizer, "onnx", quantize=quantize,
                                           files={"full": "model.onnx", "kv": "model_kv.onnx"}))
    return Path(out)


class OnnxGenerator:
    """Greedy decoding with onnxruntime on an ``slm export --format onnx`` folder; needs only
    onnxruntime, numpy and tokenizers.

    >>> gen = OnnxGenerator("exported/")
    >>> gen.generate_text("Once upon a time", max_new_tokens=50)
    """

    def __init__(self, directory: str | Path, *, threads: int | None = None) -> None:
        ort = _require("onnxruntime", "running ONNX models")
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise SlmError(f"{self.directory} is not an slm export --format onnx folder (no {META_FILE})")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != "onnx":
            raise SlmError(f"{self.directory} holds a {self.meta.get('format')!r} export, not onnx")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self._kv = ort.InferenceSession(str(self.directory / "model_kv.onnx"), opts, providers=providers)
        self._opts, self._providers, self._full = opts, providers, None
        self.block_size, self.eot_id = self.meta["block_size"], self.meta["eot_id"]
        self._tok = None

    def empty_past(self, batch: int) -> np.ndarray:
        """A cache of length 0 for ``batch`` rows: pass it as both past_key and past_value to prefill."""
        m = self.meta
        return np.zeros((m["n_layer"], batch, m["n_kv_head"], 0, m["head_dim"]), dtype=np.float32)

    def logits(self, ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (B, T, vocab) of the full-sequence graph ``model.onnx``."""
        if self._full is None:
            import onnxruntime as ort

            self._full = ort.InferenceSession(str(self.directory / "model.onnx"), self._opts, providers=self._providers)
        return self._full.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0]

    def step(self, ids: np.ndarray, past_key: np.ndarray, past_value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One call of ``model_kv.onnx``: logits (B, T, vocab) and the grown caches."""
        return tuple(self._kv.run(None, {"input_ids": ids, "past_key": past_key, "past_value": past_value}))

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_at_eot: bool = True) -> list[int]:
        """Greedy continuation of one prompt: the new token ids (ending with ``<|endoftext|>``
        when it stops there). The prompt is run as one call, then one token per call. The context
        rule is slmkit's own (``slmkit.generate``): a prompt longer than the context is cut from
        the left, and when the cache is full the last ``block_size // 2`` tokens are prefilled
        into a fresh cache, so every path gives the same tokens."""
        from slmkit.generate import fit_context, slide_window

        context = fit_context([int(t) for t in prompt_ids], self.block_size, self.eot_id or 0)
        new: list[int] = []
        past_k = past_v = self.empty_past(1)
        pending = context
        for _ in range(max_new_tokens):
            logits, past_k, past_v = self.step(np.asarray([pending], dtype=np.int64), past_k, past_v)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if stop_at_eot and token == self.eot_id:
                break
            context.append(token)
            if len(context) > self.block_size:  # the cache is full: slide the window
                context = slide_window(context, self.block_size)
                pending, past_k, past_v = context, self.empty_past(1), self.empty_past(1)
            else:
                pending = [token]
        return new

    @property
    def tokenizer(self) -> Any:
        """The export's tokenizer.json as a ``tokenizers.Tokenizer``."""
        if self._tok is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_file(str(self.directory / "tokenizer.json"))
            self._tok.encode_special_tokens = True  # as slmkit: "<|endoftext|>" in text is just text
        return self._tok

    def generate_text(self, prompt: str, max_new_tokens: int = 100) -> str:
        """Greedy continuation of ``prompt`` as text (stops at ``<|endoftext|>``)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        new = self.generate(ids, max_new_tokens)
        if new and new[-1] == self.eot_id:
            new = new[:-1]
        return self.tokenizer.decode(new, skip_special_tokens=False)


# =============================================================================== TorchScript


def quantize_int8(model: GPT) -> nn.Module:
    """PyTorch dynamic int8 quantization of every nn.Linear (a copy; CPU inference only)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notice
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def export_torchscript(model: GPT, tokenizer: Any | None, out: str | Path, quantize: str | None = None) -> Path:
    """Write ``model.pt``, a traced ``input_ids (B, T) -> logits (B, T, vocab)`` module; batch and
    sequence length stay free (up to the context length)."""
    c = model.config
    module = quantize_int8(model) if quantize else model.cpu().eval()
    meta = _meta(model, tokenizer, "torchscript", quantize=quantize, files={"model": "model.pt"})
    with _output_dir(Path(out)) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning for the context-length check
        example = torch.randint(0, c.vocab_size, (1, min(4, c.block_size)))
        traced = torch.jit.trace(_LogitsOnly(module), (example,), check_trace=False)
        torch.jit.save(traced, str(tmp / "model.pt"), _extra_files={META_FILE: json.dumps(meta)})
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_hf_tokenizer_json(), encoding="utf-8")
        _write_json(tmp / META_FILE, meta)
    return Path(out)


# =============================================================================== the stage


def export_model(model: GPT, tokenizer: Any, fmt: str, out: str | Path, quantize: str | None = None) -> Path:
    """Export an in-memory model and tokenizer; see the module docstring for the formats."""
    if fmt not in FORMATS:
        raise SlmError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise SlmError(f"--quantize {quantize!r} is not supported: the only choice is int8")
    model = model.float().cpu().eval()
    if fmt == "hf":
        if quantize:
            raise SlmError("--quantize int8 applies to --format onnx and torchscript; hf exports stay float32")
        return export_hf(model, tokenizer, out)
    if fmt == "onnx":
        return export_onnx(model, tokenizer, out, quantize)
    return export_torchscript(model, tokenizer, out, quantize)


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, quantize: str | None = None,
               which: str = "best") -> Path:
    """Export RUN_DIR's ``best`` (or ``last``) checkpoint to ``out``."""
    from slmkit.checkpoint import load_run

    if fmt == "hf" and quantize:
        raise SlmError("--quantize int8 applies to --format onnx and torchscript; hf exports stay float32")
    model, tokenizer, _ = load_run(run_dir, device="cpu", which=which)
    return export_model(model, tokenizer, fmt, out, quantize)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    parser.add_argument("--format", required=True, choices=FORMATS, help="hf (transformers), onnx (onnxruntime) or torchscript")
    parser.add_argument("--out", required=True, help="folder to write (created; an earlier export there is replaced)")
    parser.add_argument("--quantize", choices=["int8"], help="dynamic int8 linear layers, for CPU inference (onnx, torchscript)")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to export")


def run_cli(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.format, args.out, quantize=args.quantize, which=args.which)
    sizes = file_sizes(out)
    print(f"exported {args.run_dir} as {args.format}{' int8' if args.quantize else ''} to {out}")
    for name, size in sizes.items():
        print(f"  {name:28s} {size / 1e6:10.2f} MB")
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a Hugging Face GPT-2/Llama model folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, help="new RUN_DIR to create")


def run_import(args: argparse.Namespace) -> int:
    run_dir = import_hf(args.path, args.out)
    from slmkit.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir, which="last")
    print(f"imported {args.path} into {run_dir}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocab {tokenizer.vocab_size}; continue with: slm train --data DATA_DIR --out {run_dir}")
    return 0


__all__ = [
    "ExportGPT", "OnnxGenerator", "export_hf", "export_model", "export_onnx", "export_run", "export_torchscript",
    "file_sizes", "hf_architecture", "hf_config", "hf_state_dict", "hf_to_slmkit", "import_hf", "quantize_int8",
    "quantize_onnx",
]
