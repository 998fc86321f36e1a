"""Checkpoints that survive a kill at any moment and never unpickle anything.

A checkpoint is a directory:

    model.safetensors      weights
    optimizer.safetensors  AdamW moments (``last/`` only), tensors named ``<param index>.<name>``
    rng.safetensors        RNG states, so dropout continues exactly after a resume
    state.json             step, data position, schedule state, optimizer hyper-parameters, ...
    model.json             the ModelConfig, so a checkpoint folder is self-describing
    quantization.json      only in a quantized run (``slm quantize``): how model.safetensors's
                           packed int8/int4 blocks unpack, or which tensors are bf16
                           (``slmkit.quant``); reading gives float32
    manifest.json          sha256 of every file above, checked on load

It is written into a temporary sibling directory and renamed into place; the checkpoint it replaces
is kept as ``<name>.old``. ``read_checkpoint`` falls back to ``<name>.old`` when ``<name>`` is
missing (killed between the two renames) or fails its checksums (bit rot, a truncated copy), so one
bad checkpoint costs at most one checkpoint interval of work.

A LoRA fine-tune's checkpoints hold only what trained (``lora.AdapterWeights``); their state.json
names the base checkpoint and its sha256 (``"base"``) and the ``"lora"`` settings.
``model_from_checkpoint`` (and so ``load_run``, which every command uses) loads the base, checks it
is the one trained on, applies the adapter and merges it, giving a plain GPT.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmkit.config import from_dict, to_dict
from slmkit.errors import SlmError
from slmkit.files import atomic_dir, sha256_file, swap_leftovers
from slmkit.model import GPT, ModelConfig
from slmkit.quant import BLOCKS_FORMAT, attach_packed, dequantize_weights

MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "model.json", "state.json")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights (``weights`` if given, else its state_dict) with tied tensors stored once
    (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in (model.state_dict() if weights is None else weights).items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors (for safetensors) and JSON-able param groups."""
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value).detach().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_tensors``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def write_checkpoint(
    directory: Path,
    *,
    model: GPT,
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    quantization: dict[str, Any] | None = None,
) -> None:
    """Write a complete checkpoint to ``directory`` atomically (temp dir, fsync, rename).

    ``optimizer_state`` is ``optimizer.state_dict()`` (parameters numbered by index). ``weights``
    replaces ``model.state_dict()`` when the model's own are sharded (FSDP): the gathered whole ones,
    or the packed ones of a quantized run, which ``quantization`` (quantization.json) describes.
    """
    directory = Path(directory)
    # The checkpoint being replaced becomes <name>.old, the fallback if the new one is ever bad.
    backup = directory.with_name(f"{directory.name}.old")
    try:
        with atomic_dir(directory, backup=backup, durable=True) as tmp:
            save_file(model_state(model, weights), tmp / "model.safetensors")
            _slow_down()
            _write_json(tmp / "model.json", to_dict(model.config))
            if quantization is not None:
                _write_json(tmp / "quantization.json", quantization)
            state = dict(state)
            if optimizer_state is not None:
                tensors, meta = optimizer_tensors(optimizer_state)
                save_file(tensors, tmp / "optimizer.safetensors")
                state["optimizer"] = meta
            if rng:
                save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
            _write_json(tmp / "state.json", state)
            files = sorted(p.name for p in tmp.iterdir())
            _write_json(tmp / MANIFEST, {"files": {name: sha256_file(tmp / name) for name in files}})
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SlmError(f"disk full while writing checkpoint {directory}: free space and resume") from None
        raise


def _slow_down() -> None:
    """Test hook, not a setting: SLM_TEST_SLOW_CHECKPOINT=seconds stretches a write so a test can kill it."""
    delay = float(os.environ.get("SLM_TEST_SLOW_CHECKPOINT") or 0)
    if delay:
        import time

        time.sleep(delay)


def remove_stale_temps(parent: Path) -> None:
    """Delete the folders of swaps that were killed (call only while holding the run lock):
    ``files.atomic_dir``'s ``.<name>.tmp-*`` (a checkpoint or the tokenizer half written, or the
    old tokenizer after the swap) and ``.<name>.old-*`` (where the system renames twice)."""
    for tmp in swap_leftovers(parent):
        shutil.rmtree(tmp, ignore_errors=True)


def verify_checkpoint(directory: Path) -> set[str]:
    """Check every file against the manifest; raise SlmError naming the first bad file.

    Returns the names the manifest vouches for: nothing else in the folder is ever read.
    """
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SlmError(f"checkpoint {directory} has no readable {MANIFEST}: it is incomplete or corrupt") from None
    for name in REQUIRED:
        if name not in files:
            raise SlmError(f"checkpoint {directory} is incomplete: {MANIFEST} does not list {name}")
    for name, digest in files.items():
        # Plain names only: a crafted manifest must not make us hash ../../dev/zero.
        if Path(name).name != name or name.startswith("."):
            raise SlmError(f"checkpoint {directory} has a bad {MANIFEST} (file name {name!r})")
        path = directory / name
        if not path.is_file():
            raise SlmError(f"checkpoint {directory} is missing {name}")
        if sha256_file(path) != digest:
            raise SlmError(f"checkpoint file {path} is corrupt (checksum mismatch)")
    return set(files)


def checkpoint_candidates(directory: Path) -> list[Path]:
    """The checkpoint and its ``.old`` fallback, in the order to try them."""
    directory = Path(directory)
    return [p for p in (directory, directory.parent / f"{directory.name}.old") if p.is_dir()]


def read_checkpoint(directory: Path, *, with_optimizer: bool = False) -> dict[str, Any]:
    """Load a verified checkpoint: ``{"path", "model_config", "weights", "state", "optimizer", "rng"}``.

    A corrupt or half-written checkpoint falls back to ``<name>.old`` when that one is good.
    """
    candidates = checkpoint_candidates(directory)
    if not candidates:
        raise SlmError(f"no checkpoint at {directory}: train first (slm train)")
    errors = []
    for path in candidates:
        try:
            out = _read_verified(path, verify_checkpoint(path), with_optimizer)
        except SlmError as e:
            errors.append(str(e))
            continue
        if errors:  # say so: the fallback is older than the checkpoint the user expects
            print(f"warning: {errors[0]}; using {path} (step {out['state'].get('step')}) instead", file=sys.stderr)
        return out
    raise SlmError("; ".join(errors))


def _read_verified(path: Path, files: set[str], with_optimizer: bool) -> dict[str, Any]:
    # Only JSON and safetensors are parsed, so a crafted checkpoint can hold data but never code.
    try:
        model_cfg = json.loads((path / "model.json").read_text(encoding="utf-8"))
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(model_cfg, dict) or not isinstance(state, dict):
            raise ValueError("model.json and state.json must hold JSON objects")
        weights = load_file(path / "model.safetensors")
        packed = None
        if "quantization.json" in files:  # packed int8/int4 blocks: unpacked to the float32 they stand for
            meta = json.loads((path / "quantization.json").read_text(encoding="utf-8"))
            unpacked = dequantize_weights(weights, meta, str(path))
            if meta["format"] == BLOCKS_FORMAT:  # bf16 needs nothing beside its float32 values
                packed = (meta, {name: weights[name] for name in meta["tensors"]})  # kept for the C++ decoder
            weights = unpacked
        out: dict[str, Any] = {"path": path, "model_config": model_cfg, "weights": weights, "state": state}
        if packed is not None:
            out["packed"] = packed
        out["rng"] = load_file(path / "rng.safetensors") if "rng.safetensors" in files else {}
        if with_optimizer and "optimizer.safetensors" in files:
            out["optimizer"] = optimizer_state_dict(load_file(path / "optimizer.safetensors"), state["optimizer"])
        return out
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise SlmError(f"checkpoint {path} cannot be read ({e})") from None


def build_model(model_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> GPT:
    """A GPT from a checkpoint's config and weights (strict: every weight must match)."""
    model = GPT(from_dict(ModelConfig, model_config, "model"))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise SlmError(f"checkpoint weights do not match the model config: {str(e).splitlines()[-1].strip()}") from None
    if model.config.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SlmError(f"checkpoint weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def model_from_checkpoint(ckpt: dict[str, Any]) -> GPT:
    """The GPT of a checkpoint that ``read_checkpoint`` returned. A LoRA run's (its state has
    ``"lora"``) is its base checkpoint, which must still hold the weights it was trained on (same
    sha256), grown to the run's vocabulary, with the adapter (and new token rows) merged in."""
    if "lora" not in ckpt["state"]:
        model = build_model(ckpt["model_config"], ckpt["weights"])
        if "packed" in ckpt:  # the blocks themselves too, for the decoder that computes on them
            attach_packed(model, ckpt["packed"][1], ckpt["packed"][0])
        return model
    from slmkit.lora import merge_lora

    return merge_lora(lora_model_from_checkpoint(ckpt))


def lora_model_from_checkpoint(ckpt: dict[str, Any]) -> GPT:
    """A LoRA run's checkpoint as its base (checked by sha256, grown to the run's vocabulary, the
    new token rows as trained) with the adapters applied and NOT merged: what PEFT's export needs."""
    state = ckpt["state"]
    if "lora" not in state:
        raise SlmError(f"{ckpt['path']} is not a LoRA run's checkpoint: it has no adapter to export")
    from slmkit.chat import grow_embeddings
    from slmkit.lora import AdapterWeights, LoRAConfig, apply_lora

    base = state.get("base")
    if not isinstance(base, dict) or not {"checkpoint", "sha256", "vocab_size"} <= base.keys():
        raise SlmError(f"{ckpt['path']} is a LoRA checkpoint without a valid base entry in state.json: fine-tune again")
    where = Path(base["checkpoint"])
    if not (where / "model.safetensors").is_file():
        raise SlmError(f"{ckpt['path']} is a LoRA adapter on the base {where}, which is gone: "
                       "put the base run back where it was, or fine-tune again")
    if sha256_file(where / "model.safetensors") != base["sha256"]:
        raise SlmError(f"{ckpt['path']} is a LoRA adapter on the base {where}, whose weights have changed since "
                       f"(sha256 {base['sha256'][:12]} expected): restore that base, or fine-tune again")
    model = model_from_checkpoint(read_checkpoint(where))  # the base may itself be a LoRA run
    grow_embeddings(model, int(ckpt["model_config"].get("vocab_size", 0)))
    apply_lora(model, from_dict(LoRAConfig, state["lora"], "lora"))
    if to_dict(model.config) != ckpt["model_config"]:
        raise SlmError(f"{ckpt['path']}: its model config does not match its base {where}: fine-tune again")
    weights = AdapterWeights(model, first_new=int(base["vocab_size"])).unpack(ckpt["weights"], source=ckpt["path"])
    model.load_state_dict(weights)
    return model


def load_run(run_dir: str | Path, device: str = "cpu", which: str = "best") -> tuple[GPT, Any, dict[str, Any]]:
    """Load a trained model and its tokenizer from a RUN_DIR for inference.

    ``which`` is "best" (lowest validation loss; falls back to "last" when there is none) or "last".
    Returns ``(model in eval mode on device, tokenizer, info)`` where info holds the state.json.
    """
    from slmkit.tokenizer import load_tokenizer

    ckpt = read_run_checkpoint(run_dir, which)
    model = model_from_checkpoint(ckpt).to(device).eval()
    run_dir = Path(run_dir)
    if not (run_dir / "tokenizer").is_dir():
        raise SlmError(f"{run_dir} has no tokenizer/ folder: it is not a complete run directory")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    info = dict(ckpt["state"], checkpoint=str(ckpt["path"]))
    info.pop("optimizer", None)
    return model, tokenizer, info


def read_run_checkpoint(run_dir: str | Path, which: str = "best") -> dict[str, Any]:
    """``read_checkpoint`` of RUN_DIR's ``which`` ("best", falling back to "last", or "last")."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SlmError(f"run directory {run_dir} does not exist: pass the --out folder of slm train")
    if which not in ("best", "last"):
        raise SlmError(f"--which must be best or last, got {which!r}")
    order = [which, "last"] if which == "best" else ["last"]
    names = [n for n in order if checkpoint_candidates(run_dir / n)]
    if not names:
        raise SlmError(f"{run_dir} holds no checkpoint (no best/ or last/): train first with slm train")
    errors = []
    for name in names:  # a corrupt best/ (and best.old/) falls back to last/
        try:
            ckpt = read_checkpoint(run_dir / name)
            break
        except SlmError as e:
            errors.append(str(e))
    else:
        raise SlmError("; ".join(errors))
    if errors:
        print(f"warning: {errors[0]}; using {ckpt['path']} instead", file=sys.stderr)
    return ckpt
