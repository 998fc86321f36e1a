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
import platform
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


# The /proc/cpuinfo flags of native bf16 matrix instructions, best first: Intel's AMX tiles, then
# the AVX-512 dot products (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on).
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them in /proc/cpuinfo (``avx512f``, ``avx512_bf16``,
    ``amx_bf16``, ...; ``Features`` on ARM). Without /proc/cpuinfo (macOS, Windows) only the bf16
    flags are known, from torch's cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
        return frozenset(line.partition(":")[2].split())
    except OSError:
        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        return frozenset(flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)())


def cpu_bf16() -> str | None:
    """The native bf16 matrix instructions of this x86 CPU (``"AMX-BF16"``, ``"AVX512-BF16"``), or None.

    ARM CPUs with the BF16 extension are left out on purpose: PyTorch's bf16 matrix multiplies are
    fast there only in some builds (oneDNN with ACL on Linux; not Apple's Accelerate on macOS), and
    slmkit has not measured one, so ``auto`` keeps float32 and ``train.dtype=bfloat16`` tries it."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    flags = cpu_flags()
    return next((name for flag, name in BF16_FLAGS.items() if flag in flags), None)


def choose_dtype(name: str, device: str) -> tuple[torch.dtype, str]:
    """Training precision for ``train.dtype`` = ``name`` on ``device``, and why (a phrase for the log).

    ``auto``: bf16 autocast on GPUs that support it, else fp16 (with a gradient scaler) on CUDA;
    bf16 autocast on a CPU with native bf16 matrix instructions (``cpu_bf16``), where its matrix
    multiplies ran 4x float32's peak (2 threads, AMD Zen 5); float32 elsewhere. Autocast computes in the low
    precision; weights, gradients and the optimizer state stay float32 (checkpoints too).
    """
    if name == "auto":
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "train.dtype=auto on a GPU with bf16"
            return torch.float16, "train.dtype=auto on a GPU without bf16"
        if device == "cpu":
            unit = cpu_bf16()
            if unit:
                return torch.bfloat16, f"train.dtype=auto: this CPU has {unit}"
            if platform.machine().lower() in ("arm64", "aarch64"):
                return torch.float32, "train.dtype=auto: bf16 is not measured on ARM CPUs; train.dtype=bfloat16 tries it"
            return torch.float32, "train.dtype=auto: no AVX512-BF16 or AMX-BF16 on this CPU"
        return torch.float32, f"train.dtype=auto on {device}"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device != "cuda":
        raise SlmError("train.dtype=float16 needs CUDA (it uses a gradient scaler): use bfloat16 or float32")
    return dtype, f"train.dtype={name}"


def pick_dtype(name: str, device: str) -> torch.dtype:
    """Training precision for ``train.dtype`` = ``name`` on ``device`` (``choose_dtype`` without the why)."""
    return choose_dtype(name, device)[0]


def describe_dtype(dtype: torch.dtype) -> str:
    """How a run computes: ``"float32"``, or ``"bfloat16 autocast, float32 weights"``."""
    name = str(dtype).replace("torch.", "")
    return name if dtype == torch.float32 else f"{name} autocast, float32 weights"


def autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (nothing for float32): matrix multiplies in ``dtype``,
    reductions such as softmax and norms in float32, parameters untouched."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def measure_matmul_peak(device: str, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the best of a few large square matmuls: the practical peak that MFU is measured against.
    The default size (1024 on a CPU, 8192 on a GPU) takes milliseconds and gets close to the peak. A
    CPU without native instructions for ``dtype`` (bf16 without AVX512-BF16 or AMX, any float16) may
    run PyTorch's own reduced-precision matmul instead: 1.7 s at 1024 (150x float32's time, measured
    on the EPYC with oneDNN turned off), so some 20 s for a run's two peaks. There the default is
    256, 13 ms a matmul."""
    if n is None:
        slow = dtype == torch.float16 or (dtype == torch.bfloat16 and cpu_bf16() is None)
        n = 8192 if device == "cuda" else 256 if device == "cpu" and slow else 1024
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
