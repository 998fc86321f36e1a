"""Hugging Face models both ways: ``slm export --format hf`` and ``slm import-hf``.

Our variants map onto two standard architectures: learned positions + LayerNorm + GELU is GPT-2
(``GPT2LMHeadModel``), rotary + RMSNorm + SwiGLU (with or without GQA) is Llama
(``LlamaForCausalLM``); other mixes are refused, as no standard class computes them. One weight-name
table per architecture (``HF_NAMES``) is read forwards by export and backwards by import, so a new
weight is named once. Neither direction needs transformers; safetensors and tokenizers suffice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from slmkit.errors import SlmError
from slmkit.export.common import EOT, META_FILE, export_meta, output_dir, write_json
from slmkit.model import GPT, ModelConfig

# ------------------------------------------------------------------------------- export


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
        if c.head_dim * c.n_head != c.n_embd:
            raise SlmError(f"GPT-2 needs heads n_embd/n_head wide, but model.head_size={c.head_size} (a pruned model): "
                           "export it as onnx or torchscript")
        return "gpt2"
    if c.positions == "rope" and c.norm == "rmsnorm" and c.activation == "swiglu":
        return "llama"
    mix = f"positions={c.positions}, norm={c.norm}, activation={c.activation}"
    raise SlmError(
        f"no standard Hugging Face architecture computes this model ({mix}): the hf format supports "
        "learned+layernorm+gelu (GPT-2) and rope+rmsnorm+swiglu (Llama); use --format onnx or torchscript"
    )


def hf_config(config: ModelConfig, eot_id: int | None, eos_ids: list[int] | None = None) -> dict[str, Any]:
    """The ``config.json`` of the HF model that ``hf_state_dict`` fills. ``eos_ids``: the ids that
    end generation when there are several (a chat model's ``[<|endoftext|>, <|end|>]``)."""
    c = config
    arch = hf_architecture(c)
    tokens = {"bos_token_id": eot_id, "eos_token_id": eos_ids or eot_id, "pad_token_id": eot_id}
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


def _chat_ends(tokenizer: Any) -> tuple[dict | None, list[int] | None]:
    """A chat tokenizer's template and the ids that end a generation (``<|endoftext|>``, then the
    template's end of turn); (None, None) for a tokenizer without a template."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None, None
    from slmkit.chat import special_ids

    return template, [tokenizer.eot_id, special_ids(tokenizer, template)[template["end"]]]


def _hf_tokenizer_files(tokenizer: Any, block_size: int) -> dict[str, Any]:
    """``tokenizer_config.json`` and ``special_tokens_map.json``. A chat tokenizer's also carry its
    template as HF Jinja (``chat_template``, rendering what ``chat.render_prompt`` does), its end of
    turn as ``eos_token`` (what a chat reply ends with) and the template's tokens as special tokens."""
    template, _ = _chat_ends(tokenizer)
    specials: dict[str, Any] = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    if template is not None:
        from slmkit.chat import chat_template_jinja, template_tokens

        specials["eos_token"] = template["end"]
        specials["additional_special_tokens"] = [t for t in template_tokens(template) if t != EOT]
    added = {
        str(i): {"content": tokenizer.decode_bytes([i]).decode("utf-8"), "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False, "special": True}
        for i in tokenizer.special_ids
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "added_tokens_decoder": added,
        "model_max_length": block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # byte-level BPE: decode must give back the text exactly
    }
    if template is not None:
        config["chat_template"] = chat_template_jinja(template)
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def export_hf(model: GPT, tokenizer: Any, out: str | Path) -> Path:
    """Write ``out`` as a Hugging Face model folder (safetensors weights + fast tokenizer).

    A run with a chat template (fine-tuned on chat records) exports it too: ``apply_chat_template``
    gives the ids ``chat.render_prompt`` gives, and ``generate`` stops at ``<|end|>`` as
    ``slm chat`` does (``generation_config.json``'s ``eos_token_id`` lists it after ``<|endoftext|>``).
    """
    from safetensors.torch import save_file

    c = model.config
    template, eos_ids = _chat_ends(tokenizer)
    config = hf_config(c, tokenizer.eot_id, eos_ids)  # refuses unsupported mixes before anything is written
    meta_extra = {"chat_template": template} if template is not None else {}
    with output_dir(Path(out)) as tmp:
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", {
            "bos_token_id": tokenizer.eot_id, "eos_token_id": eos_ids or tokenizer.eot_id, "pad_token_id": tokenizer.eot_id,
        })
        save_file(hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(tokenizer.to_hf_tokenizer_json(), encoding="utf-8")
        for name, data in _hf_tokenizer_files(tokenizer, c.block_size).items():
            write_json(tmp / name, data)
        write_json(tmp / META_FILE, export_meta(model, tokenizer, "hf", architecture=config["architectures"][0],
                                                **meta_extra))
    return Path(out)


# ------------------------------------------------------------------------------- import


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
    meta_path = src / META_FILE  # an slmkit export: its chat template (the JSON dict) comes back too
    if meta_path.is_file():
        template = json.loads(meta_path.read_text(encoding="utf-8")).get("chat_template")
        if template is not None:
            from slmkit.chat import special_ids

            if not isinstance(template, dict):
                raise SlmError(f"{meta_path}: chat_template must be a JSON object: export the run again")
            special_ids(tokenizer, template)  # its tokens must be there
            tokenizer.chat_template = template
    if tokenizer.vocab_size > config.vocab_size:
        raise SlmError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} embeddings")
    return model, tokenizer


def import_hf(src: str | Path, run_dir: str | Path) -> Path:
    """Write an HF GPT-2/Llama folder as a new slmkit RUN_DIR (config.toml, tokenizer/, last/, best/).

    The checkpoints are weights only at step 0 (fresh optimizer, default train settings), so
    ``slm train --data DATA --out RUN_DIR`` continues training the imported weights, on data
    prepared with the same tokenizer (the vocab sizes must match).
    """
    from slmkit.rundir import check_new_run_dir, create_run
    from slmkit.trainer import TrainConfig

    run_dir = Path(run_dir)
    check_new_run_dir(run_dir)  # before the conversion, which can take a while
    model, tokenizer = hf_to_slmkit(src)
    return create_run(run_dir, model, tokenizer, TrainConfig(), imported_from=str(Path(src).resolve()))

