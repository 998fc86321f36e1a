"""slmkit's CPU kernels for training: causal attention and the head's cross-entropy.

Two small C++ files (``csrc/attention.cpp``, ``csrc/cross_entropy.cpp``) do what PyTorch's CPU
kernels do slowly at small-model shapes:

* causal attention at head sizes up to 16 and 32, 48, 64 (8 at stories260k, 48 at stories15m):
  PyTorch's CPU flash-attention spends its time on call overhead at small heads, and its matrix
  multiplies of 64-row tiles with a head-sized inner dimension run far from the machine's peak;
* the softmax and loss of each chunk of logits in the fused head (``ChunkedCrossEntropy``), which
  inductor compiles into two loops that each compute exp.

The same library holds the C++ decode step (``csrc/decode.cpp``, used by ``decode/native.py``,
which picks its own AVX-512 / AVX2 / scalar code at run time and so runs on every CPU) and its
products on int8/int4 weight blocks (``csrc/qdecode.cpp``: VNNI, AVX2 or scalar, also at run time).

They are compiled with the C++ compiler torch.compile already needs, once per machine and
instruction-set level (``ISA_FLAGS``): ``avx512`` (``-march=native`` on a CPU with AVX-512: 16-float
vectors), ``avx2`` (``-march=x86-64-v3``: AVX2 and FMA, nothing newer, 8-float vectors) and
``native`` elsewhere (ARM: ``-march=native``, 8-float vectors, NEON). The same source gives each
(csrc/vec.h picks the vector width from the flags). ``SLMKIT_KERNEL_ISA`` (``auto``, ``avx512``,
``avx2``, ``native``) picks the build; ``auto`` takes the best level this CPU runs, read at run time
from its feature flags, so ``SLMKIT_KERNEL_ISA=avx2`` runs on an AVX-512 machine exactly the code an
AVX2 laptop runs. Builds are cached under ``~/.cache/slmkit`` (``SLMKIT_CACHE`` moves it), loaded with
ctypes, and registered as custom ops (``slmkit::causal_attention`` with its backward,
``slmkit::head_loss``), so autograd and torch.compile see opaque ops. Where they cannot be built (no
compiler, no OpenMP) or are not measured faster than PyTorch (``FAST_ISAS``: ARM is not measured),
``available()`` says why and the model uses PyTorch's ops: the kernels are a speed-up, never a
requirement; choosing a level by name uses it. ``SLMKIT_CPU_KERNELS=0`` turns them off.
``built()`` says whether the library loads at all, so the tests check its results on every CPU,
including those where the model leaves it unused.

The kernels compute in float32. Under bf16 autocast they are still used (measured faster than
PyTorch's bf16 ops at these shapes, docs/training_speed.md): attention on float32 copies of the
bf16 q, k and v, its output rounded back to bf16; the fused head with its matrix multiplies in bf16
and the softmax and loss of each chunk in float32, in the C++ loop.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from slmkit.runtime import cpu_flags

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "attention.cpp", _CSRC / "cross_entropy.cpp", _CSRC / "decode.cpp", _CSRC / "qdecode.cpp",
            _CSRC / "sample.cpp"]
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# The flags of each instruction-set level: what the compiler may use there, and no more. x86-64-v3
# is AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE: every AVX2 laptop since Haswell and Zen 1.
ISA_FLAGS = {"avx512": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mtune=native"],
             "native": ["-march=native"]}
# Levels whose kernels beat PyTorch's ops in training (docs/training_speed.md: with AVX2 forced on an
# AVX-512 machine, PyTorch's ops too, a compiled stories260k step is 2.1x faster with them, stories15m
# 1.1x); elsewhere (ARM: not measured) they are built and tested but the model uses PyTorch's ops
# unless SLMKIT_KERNEL_ISA names the level.
FAST_ISAS = frozenset({"avx512", "avx2"})
_lib: ctypes.CDLL | None = None  # the build the training kernels use (kernel_isa())
_libs: dict[str, ctypes.CDLL | str] = {}  # each level's build, or why it failed
_why_not: str | None = None
_loaded = False


def _cpu_identity() -> str:
    """What -march=native depends on, so a cache shared between machines never runs the wrong code."""
    return platform.machine() + platform.processor() + " ".join(sorted(cpu_flags()))


def isa_levels() -> list[str]:
    """The instruction-set levels this CPU runs, best first: ``avx512`` and/or ``avx2`` on x86
    (from its feature flags), else ``native``."""
    flags = cpu_flags()
    levels = [name for name, need in (("avx512", {"avx512f"}), ("avx2", {"avx2", "fma"})) if need <= flags]
    return levels or ["native"]


def kernel_isa() -> str:
    """The level the training kernels and the decoder's library are built for: ``SLMKIT_KERNEL_ISA``
    (``auto``: the best one this CPU runs)."""
    isa = os.environ.get("SLMKIT_KERNEL_ISA", "auto")
    return isa_levels()[0] if isa == "auto" else isa


def compiler() -> str | None:
    """The C++ compiler kernels are built with: ``CXX``, else g++, clang++ or c++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")


def _build(isa: str) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or clang++) found")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    code = [f.read_text(encoding="utf-8") for f in [*_SOURCES, _CSRC / "vec.h"]]
    flags = [*_FLAGS, *ISA_FLAGS[isa]]
    key = hashlib.sha256("\0".join([*code, cxx, version, " ".join(flags), _cpu_identity()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SLMKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slmkit")
    lib = cache / f"kernels-{isa}-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: concurrent processes (DDP ranks) never load a
        # half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *flags, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{cxx} failed: {done.stderr.strip().splitlines()[-1:]}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    # The library asks for libgomp.so.1, the soname of the OpenMP runtime torch has already loaded,
    # so both share one thread pool instead of two pools spinning against each other.
    handle = ctypes.CDLL(str(lib))
    args = [ctypes.c_void_p] * 5 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    handle.slm_attention_forward.argtypes = args
    handle.slm_attention_backward.argtypes = [ctypes.c_void_p] * 9 + args[5:]
    handle.slm_cross_entropy.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64,
                                                                  ctypes.c_float, ctypes.c_int]
    for f in (handle.slm_attention_forward, handle.slm_attention_backward, handle.slm_cross_entropy):
        f.restype = None
    # decode.cpp, the C++ decode step (slmkit/decode/native.py)
    handle.slm_decode_step.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_float] + [ctypes.c_void_p] * 2 + \
        [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                                      ctypes.c_int, ctypes.c_void_p,
                                                                      ctypes.c_void_p, ctypes.c_void_p]
    handle.slm_decode_step.restype = ctypes.c_int
    handle.slm_decode_isa.argtypes = []
    handle.slm_decode_isa.restype = ctypes.c_int
    handle.slm_kernel_lanes.argtypes = []
    handle.slm_kernel_lanes.restype = ctypes.c_int
    # qdecode.cpp, its products on int8/int4 blocks (tests and benchmarks call them directly)
    handle.slm_qmatvec.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    handle.slm_qmatvec.restype = ctypes.c_int
    handle.slm_qpacked_bytes.argtypes = [ctypes.c_int64] * 3
    handle.slm_qpacked_bytes.restype = ctypes.c_int64
    handle.slm_qpack.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    handle.slm_qpack.restype = ctypes.c_int
    handle.slm_qmatvec_kernel.argtypes = [ctypes.c_int]
    handle.slm_qmatvec_kernel.restype = ctypes.c_int
    # sample.cpp, nucleus sampling for a batch (generate/sampling.py's native_top_p). Called holding
    # the GIL (PyDLL): a few microseconds a row, and a call that let go of it would hand it to a
    # server's event loop for that loop's whole turn in the middle of a decode step.
    handle.slm_sample_rows = ctypes.PyDLL(str(lib)).slm_sample_rows
    handle.slm_sample_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    handle.slm_sample_rows.restype = None
    return handle


def _library_for(isa: str) -> ctypes.CDLL | str:
    """The build for one level (made on first call), or why there is none (one line)."""
    if isa not in _libs:
        if isa not in ISA_FLAGS:
            _libs[isa] = f"unknown SLMKIT_KERNEL_ISA={isa!r}: choose auto or one of {', '.join(ISA_FLAGS)}"
        elif isa not in isa_levels():
            _libs[isa] = f"this CPU cannot run the {isa} build (it runs: {', '.join(isa_levels())})"
        else:
            try:
                _libs[isa] = _build(isa)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _libs[isa] = f"could not build slmkit's CPU kernels: {e}"
    return _libs[isa]


def built() -> str | None:
    """None when the library of ``kernel_isa()`` is built and loaded (fast on this CPU or not), else
    why not (one line). Builds on first call. The tests use this to check the kernels' results on
    every CPU."""
    global _lib, _why_not, _loaded
    if not _loaded:
        _loaded = True
        if os.environ.get("SLMKIT_CPU_KERNELS", "1") == "0":
            _why_not = "turned off by SLMKIT_CPU_KERNELS=0"
        elif sys.platform == "win32":
            _why_not = "not built on Windows"
        else:
            got = _library_for(kernel_isa())
            _lib, _why_not = (got, None) if isinstance(got, ctypes.CDLL) else (None, got)
    return _why_not


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The loaded library (building it on first call), or None where ``built()`` says why not.
    ``isa`` asks for one level's build (``ISA_FLAGS``; None where this CPU cannot run it). The C++
    decoder (``decode/native.py``) calls into it directly; forced to AVX2 it takes the ``avx2``
    build, so none of its code uses AVX-512 (the AVX2 functions of a -march=native build may)."""
    if built() is not None:
        return None
    if isa is None:
        return _lib
    got = _library_for(isa)
    return got if isinstance(got, ctypes.CDLL) else None


@functools.cache
def available() -> str | None:
    """None when the model should use the kernels (built, and faster than PyTorch on this CPU, or
    their level chosen by ``SLMKIT_KERNEL_ISA``), else why not. Asked once per attention call in
    training, so the answer is kept."""
    why = built()
    isa = kernel_isa()
    if why is None and isa not in FAST_ISAS and os.environ.get("SLMKIT_KERNEL_ISA", "auto") == "auto":
        return (f"their {isa} build is not measured faster than PyTorch's ops here "
                f"(SLMKIT_KERNEL_ISA={isa} uses it anyway)")
    return why


# Past MAX_CONTEXT the small-head backward's per-thread scratch (T^2 / 2 floats) grows large, and
# PyTorch's SDPA takes over.
MAX_CONTEXT = 4096


def attention_pays(head_dim: int) -> bool:
    """Head sizes where the kernel beats PyTorch's CPU flash attention (measured: docs/training_speed.md):
    up to 16 (vector lanes over 16 rows or keys), and 32, 48, 64 (tiles like a matrix multiply)."""
    return head_dim <= 16 or head_dim in (32, 48, 64)


@torch.compiler.assume_constant_result
def _use_kernels() -> bool:
    return available() is None


def attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``causal_attention`` should take these: float32 or bfloat16 CPU tensors with a head
    size where it pays, the kernels built, and no TorchScript/ONNX trace running (they cannot record
    a ctypes call)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and attention_pays(q.shape[-1]) and q.shape[-2] <= MAX_CONTEXT
            and not torch.jit.is_tracing() and _use_kernels())


def _dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[ctypes.Array, ctypes.Array]:
    B, H, T, D = q.shape
    dims = (ctypes.c_int64 * 5)(B, H, k.shape[1], T, D)
    strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    return dims, strides


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("slmkit::causal_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    B, H, T, D = q.shape
    out = q.new_empty(B, T, H, D)
    lse = q.new_empty(B, H, T)
    dims, strides = _dims(q, k, v)
    _lib.slm_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                               dims, strides, D ** -0.5, torch.get_num_threads())
    return out, lse


@_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D), q.new_empty(B, H, T)


@torch.library.custom_op("slmkit::causal_attention_backward", mutates_args=())
def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    B, H, T, D = q.shape
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    dims, strides = _dims(q, k, v)
    _lib.slm_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(),
                                lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                dims, strides, D ** -0.5, torch.get_num_threads())
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, out, lse):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs, *output)


def _grad(ctx, dout: torch.Tensor, dlse: torch.Tensor | None):  # noqa: ANN001, ANN202
    q, k, v, out, lse = ctx.saved_tensors
    return _backward(dout, q, k, v, out, lse)


_forward.register_autograd(_grad, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), causal) v for q (B, H, T, D) and k, v (B, KV, T, D) with KV
    dividing H (grouped-query attention without repeating k and v). Returns (B, T, H * D): the
    heads side by side, ready for the output projection. Check ``attention_usable`` first.
    bfloat16 inputs are computed in float32 (copies) and the output rounded to bfloat16: at 2
    threads, forward and backward, 1.3-8.4x faster than PyTorch's bf16 SDPA at the shapes of
    ``bench/cpu_kernels.py --dtype bfloat16`` (8.4x at stories260k's, 2.2x at stories15m's)."""
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    out, _ = _forward(q, k, v)
    B, T, H, D = out.shape
    return out.view(B, T, H * D).to(dtype)


# --------------------------------------------------------------------------- the fused head's loss


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """For contiguous float32 logits (N, V) and targets (N,) (-1: ignored): returns the per-row
    losses lse(x) - x[target] (0 for ignored rows; NaN for a target outside the vocabulary) and
    overwrites the logits with d(scale * sum of losses)/d logits = (softmax - onehot) * scale
    (0 for ignored rows)."""
    loss = logits.new_empty(logits.shape[0])
    _lib.slm_cross_entropy(logits.data_ptr(), targets.contiguous().data_ptr(), logits.data_ptr(), loss.data_ptr(),
                           logits.shape[0], logits.shape[1], scale, torch.get_num_threads())
    return loss


def head_loss_usable(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``head_loss`` should take these: float32 or bfloat16 CPU tensors, outside autocast
    or under bf16 autocast, kernels built."""
    autocast_ok = not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == torch.bfloat16
    return (h.device.type == "cpu" and h.dtype == weight.dtype and h.dtype in (torch.float32, torch.bfloat16)
            and autocast_ok and not torch.jit.is_tracing() and _use_kernels())


@torch.library.custom_op("slmkit::head_loss", mutates_args=())
def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-1 ignored), and its gradients
    for h and weight, ``chunk`` rows at a time (see ``model.ChunkedCrossEntropy``). One opaque op,
    run eagerly even inside a compiled model: the logits live in one reused buffer, each chunk's
    gradient is written straight into its rows of grad_h, and grad_w accumulates in place; traced
    by the compiler, the same loop costs a fresh buffer and a full copy of grad_w per chunk.

    h and weight both bfloat16 (``ChunkedCrossEntropy`` under bf16 autocast): the matrix multiplies
    run in bf16, each chunk's logits are rounded up to float32 for the softmax and loss (as autocast
    would), and its gradient back to bf16 for the multiplies; the loss and grad_w are float32."""
    h, weight, targets = h.contiguous(), weight.contiguous(), targets.contiguous()
    low = h.dtype != torch.float32
    count = max(int((targets != -1).sum()), 1)
    grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight, dtype=torch.float32)
    logits = h.new_empty(min(chunk, h.shape[0]), weight.shape[0], dtype=torch.float32)
    total = 0.0
    with torch.autocast("cpu", enabled=False):  # the dtypes are the caller's choice, as said above
        for s in range(0, h.shape[0], chunk):
            hs = h[s : s + chunk]
            x = logits[: hs.shape[0]]
            if low:
                x.copy_(torch.mm(hs, weight.t()))
            else:
                torch.mm(hs, weight.t(), out=x)
            total += cross_entropy_(x, targets[s : s + chunk], 1.0 / count).sum().item()
            g = x.to(h.dtype) if low else x
            torch.mm(g, weight, out=grad_h[s : s + chunk])
            if low:
                grad_w += torch.mm(g.t(), hs)
            else:
                grad_w.addmm_(g.t(), hs)
    return h.new_tensor(total / count, dtype=torch.float32), grad_h, grad_w


@head_loss.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight, dtype=torch.float32)
