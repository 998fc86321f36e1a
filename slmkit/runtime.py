"""Device and dtype: which accelerator a command runs on, in what precision, and how fast it can go.

Every stage (train, generate, evaluate, export) resolves ``auto``/``cpu``/``cuda``/``mps`` here, so
they agree on what ``auto`` picks and say the same thing when a device is missing. Training's
precision (``pick_dtype``, ``autocast``), whether torch.compile can run (``can_compile``) and the
matmul peak that MFU is measured against live here too. This module sits below every stage and
imports none of them.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time

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


def pick_dtype(name: str, device: str) -> torch.dtype:
    """Training precision: bf16 autocast on GPUs that support it, else fp16 on CUDA; fp32 elsewhere."""
    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device != "cuda":
        raise SlmError("train.dtype=float16 needs CUDA (it uses a gradient scaler): use bfloat16 or float32")
    return dtype


def autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def measure_matmul_peak(device: str, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the best of a few large square matmuls: the practical peak that MFU is measured against.
    The default size (1024 on a CPU, 8192 on a GPU) takes milliseconds and gets close to the peak."""
    n = n or (8192 if device == "cuda" else 1024)
    # A private generator: measuring must not move the global RNG that exact resume restores.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = math.inf
    for _ in range(reps + 1):  # the first one warms up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def can_compile(device: str) -> str | None:
    """Why torch.compile cannot run here (None when it can): on CPU, inductor needs a C++ compiler."""
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return "no C++ compiler (g++ or clang++) found, which torch.compile needs on CPU"
    return None
