"""Checkpoints that survive a kill at any moment and never unpickle anything.

A checkpoint is a directory:

    model.safetensors      weights
    optimizer.safetensors  AdamW moments (``last/`` only), tensors named ``<param index>.<name>``
    rng.safetensors        RNG states, so dropout continues exactly after a resume
    state.json             step, data position, schedule state, optimizer hyper-parameters, ...
    model.json             the ModelConfig, so a checkpoint folder is self-describing
    manifest.json          sha256 of every file above, checked on load

It is written into a temporary sibling directory and renamed into place. If the previous checkpoint
is renamed away first and the process dies before the new one lands, ``<name>.old`` is still there
and ``read_checkpoint`` falls back to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmkit.config import from_dict, to_dict
from slmkit.errors import SlmError
from slmkit.model import GPT, ModelConfig

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse to open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with tied tensors stored once (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors (for safetensors) and JSON-able param groups."""
    sd = optimizer.state_dict()
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
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a complete checkpoint to ``directory`` atomically (temp dir, fsync, rename)."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        save_file(model_state(model), tmp / "model.safetensors")
        _write_json(tmp / "model.json", to_dict(model.config))
        state = dict(state)
        if optimizer is not None:
            tensors, meta = optimizer_tensors(optimizer)
            save_file(tensors, tmp / "optimizer.safetensors")
            state["optimizer"] = meta
        if rng:
            save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
        _write_json(tmp / "state.json", state)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"files": {name: sha256_file(tmp / name) for name in files}}
        _write_json(tmp / MANIFEST, manifest)
        for name in files + [MANIFEST]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = parent / f"{directory.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == 28:  # ENOSPC
            raise SlmError(f"disk full while writing checkpoint {directory}: free space and resume") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_checkpoint(directory: Path) -> None:
    """Check every file against the manifest; raise SlmError naming the first bad file."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SlmError(f"checkpoint {directory} has no readable {MANIFEST}: it is incomplete or corrupt") from None
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise SlmError(f"checkpoint {directory} is missing {name}")
        if sha256_file(path) != digest:
            raise SlmError(f"checkpoint file {path} is corrupt (checksum mismatch)")


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
            verify_checkpoint(path)
            return _read_verified(path, with_optimizer)
        except SlmError as e:
            errors.append(str(e))
    raise SlmError("; ".join(errors))


def _read_verified(path: Path, with_optimizer: bool) -> dict[str, Any]:
    try:
        model_cfg = json.loads((path / "model.json").read_text(encoding="utf-8"))
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(path / "model.safetensors")
        out: dict[str, Any] = {"path": path, "model_config": model_cfg, "weights": weights, "state": state}
        out["rng"] = load_file(path / "rng.safetensors") if (path / "rng.safetensors").exists() else {}
        if with_optimizer and (path / "optimizer.safetensors").exists():
            out["optimizer"] = optimizer_state_dict(load_file(path / "optimizer.safetensors"), state["optimizer"])
        return out
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise SlmError(f"checkpoint {path} cannot be read ({e})") from None


def build_model(model_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> GPT:
    """A GPT from a checkpoint's config and weights (strict: every weight must match)."""
    model = GPT(from_dict(ModelConfig, model_config, "model"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if model.config.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SlmError(f"checkpoint weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load_run(run_dir: str | Path, device: str = "cpu", which: str = "best") -> tuple[GPT, Any, dict[str, Any]]:
    """Load a trained model and its tokenizer from a RUN_DIR for inference.

    ``which`` is "best" (lowest validation loss; falls back to "last" when there is none) or "last".
    Returns ``(model in eval mode on device, tokenizer, info)`` where info holds the state.json.
    """
    from slmkit.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SlmError(f"run directory {run_dir} does not exist: pass the --out folder of slm train")
    if which not in ("best", "last"):
        raise SlmError(f"--which must be best or last, got {which!r}")
    order = [which, "last"] if which == "best" else ["last"]
    name = next((n for n in order if checkpoint_candidates(run_dir / n)), None)
    if name is None:
        raise SlmError(f"{run_dir} holds no checkpoint (no best/ or last/): train first with slm train")
    ckpt = read_checkpoint(run_dir / name)
    model = build_model(ckpt["model_config"], ckpt["weights"]).to(device).eval()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    info = dict(ckpt["state"], checkpoint=str(ckpt["path"]))
    info.pop("optimizer", None)
    return model, tokenizer, info
