"""Device and dtype: which accelerator a command runs on.

Every stage (train, generate, evaluate, export) resolves ``auto``/``cpu``/``cuda``/``mps`` here, so
they agree on what ``auto`` picks and say the same thing when a device is missing. This module sits
below every stage and imports none of them.
"""

from __future__ import annotations

import torch

from slmkit.errors import SlmError

DEVICES = ("cpu", "cuda", "mps")


def _has_mps() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available() and mps.is_built()


def resolve_device(name: str = "auto", *, setting: str = "--device {}") -> str:
    """``auto`` is cuda if present, else Apple's mps when it really works, else cpu.

    Asking for a device that is missing (or unknown) is an SlmError; ``setting`` spells the option
    the user set in that message (``"train.device={}"`` in a config, ``"--device {}"`` on the CLI).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _has_mps() else "cpu"
    asked, cpu = setting.format(name), setting.format("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlmError(f"{asked} but no CUDA GPU is visible: use {cpu} or auto")
    if name == "mps" and not _has_mps():
        raise SlmError(f"{asked} but MPS is not available: use {cpu} or auto")
    if name not in DEVICES:
        raise SlmError(f"{asked} is not available on this machine: use {cpu} or auto")
    return name
