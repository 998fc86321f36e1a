"""Decoding: running a model over a KV cache, the prompt in one pass and then one token per row.

Every backend is a ``Decoder`` (``prefill(ids, cache)``, ``step(ids, cache)``, both returning the
next-token logits) and declares what it supports: devices, dtypes and the model features it
implements (``base.py`` has the rule: a config field a backend does not list runs there only at
its default). ``BACKENDS`` lists them fastest first and ``make_decoder`` takes the first whose
``supports(model, device, dtype)`` holds:

* ``cuda-graph`` (``GraphDecoder``): the step recorded once as a CUDA graph and replayed; CUDA.
* ``cpp`` (``NativeDecoder``): the whole step in one C++ call (AVX-512/AVX2 products, a thread
  pool); float32 on the CPU, where slmkit's C++ library builds.
* ``numpy`` (``CPUDecoder``): the step with its small operations in NumPy; float32 on the CPU.
* ``step`` (``StepDecoder``): the step in PyTorch, written straight through over the weights.
* ``cached`` (``ModuleDecoder``): ``model.forward`` with the cache, the reference; runs anything.
* ``cpp-bf16`` (``NativeBF16Decoder``): the C++ step with bf16 weight matrices; after the reference,
  so only by name. Its logits are those of ``reproduces(model)``, the model with its weight
  matrices rounded to bf16.

All of them run the prefill through ``model.forward``, and one parity test
(``tests/test_decode.py``) runs every backend against it. A new backend subclasses ``Decoder``,
declares what it handles and goes into ``BACKENDS`` at its place in the speed order.
"""

from __future__ import annotations

from slmkit.decode.base import ANY, SIZES, Decoder, placement, reads_float_weights
from slmkit.decode.cache import KVCache
from slmkit.decode.cpu import CPUDecoder
from slmkit.decode.cuda_graph import GraphDecoder
from slmkit.decode.native import NativeBF16Decoder, NativeDecoder
from slmkit.decode.reference import ModuleDecoder
from slmkit.decode.step import DecodeWeights, StepDecoder, decode_weights, rope_matrix
from slmkit.model import GPT

BACKENDS: dict[str, type[Decoder]] = {cls.name: cls for cls in (
    GraphDecoder, NativeDecoder, CPUDecoder, StepDecoder, ModuleDecoder, NativeBF16Decoder)}


def pick(model: GPT) -> type[Decoder]:
    """The fastest backend in ``BACKENDS`` that runs ``model`` where it is (``cached`` always does)."""
    device, dtype = placement(model)
    return next(cls for cls in BACKENDS.values() if cls.supports(model, device, dtype))


def make_decoder(model: GPT, backend: str | None = None) -> Decoder:
    """A decoder for one generation: ``backend`` by name, or the fastest that runs the model.
    A named backend that cannot run the model raises ValueError saying why."""
    if backend is None:
        return pick(model)(model)
    if backend not in BACKENDS:
        raise ValueError(f"unknown decoder {backend!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](model)


__all__ = [
    "ANY", "BACKENDS", "SIZES", "CPUDecoder", "DecodeWeights", "Decoder", "GraphDecoder", "KVCache", "ModuleDecoder",
    "NativeBF16Decoder", "NativeDecoder", "StepDecoder", "decode_weights", "make_decoder", "pick", "placement", "reads_float_weights", "rope_matrix",
]
