"""The decode step in C++: one call per step runs every layer and the head (``csrc/decode.cpp``).

``CPUDecoder`` spends about half of a token on Python calls (about 200 of 1-4 us) and its
matrix-vector products run at the speed of the CPU vendor's BLAS through PyTorch (44-51 GB/s with
MKL on an AMD EPYC, issue 19). ``NativeDecoder`` makes one ctypes call per step: embeddings, norms,
rotary or learned positions, attention over the ``KVCache`` (grouped query heads, each row from its
own first real slot: left padding), GELU or SwiGLU, biases and the tied or untied head, for every
row of the batch (the cache's keys and values float32, or bf16: ``KV_TYPES``, half the bytes
attention reads, ``slm serve --kv-cache``). The products are AVX-512 or AVX2 code picked from the CPU at run time (scalar
elsewhere, ARM included), threaded over ``torch.get_num_threads()`` cores by a pool whose idle
threads sleep after a short spin. Their weight matrices are packed here, once, into the layout
the kernels read (``pack``): float32, or bf16 (half the bytes per token); a step reads each weight
once for all rows of its batch. Neither the thread count, the batch a row runs in nor the
instruction set changes any result. A model whose weight matrices all hold bf16 values (a
``slm quantize --bits 16`` run: ``storage_format``) is read as bf16 by default, which loses
nothing (the arithmetic is float32 either way, so its logits are model.forward's, bit for bit);
``weights="bf16"`` (the ``cpp-bf16`` backend) rounds any model's matrices to bf16 first.

``weights="bf16-dot"`` multiplies bf16 matrices by AVX512-BF16's ``vdpbf16ps`` (two products per
float lane), on inputs rounded to bf16 once per product: its logits are those of ``bf16_inputs``
of the rounded model (tests/test_decode_native.py). Measured on the AMD EPYC (Zen 5), 2 threads,
the stories15m shape: 16-20% more tokens/s than "bf16" at batch 1, 8 and 32, for +3e-6 bits per
byte on a trained model (docs/export.md). So a model of bf16 values decodes as "bf16-dot" by
default where the CPU has it (``bf16_arithmetic``); elsewhere (AVX2, ARM, ``SLMKIT_DECODE_ISA``
below avx512) as "bf16", after one note when asked for explicitly or by default.

A quantized run (``slm quantize``) decodes here on its int8 / int4 blocks themselves
(``quant.PackedWeight``, GGUF's q8_0 / q4_0 layout), not on the float32 values its checkpoint also
unpacks for ``model.forward`` (every other backend): each tensor has a format
(``formats``: 0 for the model's float format, else qdecode.h's ``kind | group << 8``), the blocks
of the products are repacked once (``qpack``: the same bytes of values and scales, regrouped into
panels of 16 rows, no float copy), the embedding's read as stored, and ``csrc/qdecode.cpp`` quantizes each
activation row to int8 blocks of 32 once per product and computes the products as integer dots
(AVX-512 VNNI, AVX-VNNI, AVX2 or scalar, all giving the same bits). ``packed_format`` says which
blocks it reads: groups that are multiples of 32 (every ``slm quantize`` setting at sizes that are
multiples of 32); others decode on the float32 values, with one note. The logits then differ from
the float path's by the activations' rounding to 8 bits (tests/test_qdecode.py). Blocks are read
in the fp32 format (``weights="bf16"`` rounds the float32 values the blocks stand for, as for any
model); ``packed=False`` decodes a quantized run on its float32 values (for comparisons).

The library is the one ``cpu_kernels`` builds once per machine (same cache, same compiler). Where
it cannot be built, ``why_not`` says so, the registry takes the next backend (the NumPy one), and
one note says why. ``SLMKIT_DECODE_ISA`` (``avx512``, ``avx2``, ``scalar``) forces an instruction
set, e.g. to test the AVX2 code on an AVX-512 machine.

The prefill runs through the same step: a prompt's tokens before its last go in as extra tokens
of the step that feeds its last one (``PREFILL_TOKENS`` at most a step), each a row of its own on
its sequence's cache row, so a prompt's keys, values and logits are the bits of feeding its tokens
one a step, and its products run at the step's speed (slm serve's engine, stories15m shape, 2
cores: a lone 100-token prompt's first token after 2.7-2.8 ms, 14.8-15.9 with PyTorch's float32
forward as the prefill; bench/first_token.py, docs/serving.md).
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref

import torch

from slmkit import cpu_kernels
from slmkit.decode.base import ANY, SIZES, Decoder
from slmkit.decode.cache import KVCache
from slmkit.model import GPT
from slmkit.quant import PackedWeight, packed_weight, quantized_names

ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
# The formats the weight matrices can be stored in (csrc/decode.cpp's Format), and the dtype their
# values are rounded to: a decoder in a format computes what the model with its weight matrices
# (embeddings, every linear layer, the head) rounded to that dtype computes in float32.
# "bf16-dot": bf16 matrices multiplied by AVX512-BF16's vdpbf16ps, the inputs of every product
# rounded to bf16 too (so its logits are those of ``bf16_inputs(rounded(model, "bf16"))``); on a
# CPU without it, "bf16" runs instead (one note).
FORMATS = {"fp32": 0, "bf16": 1, "bf16-dot": 2}
# The element types of the KV cache the step reads and writes (csrc/decode.cpp's KVType): a bf16
# cache (``KVCache.empty(..., dtype=torch.bfloat16)``) holds each key and value rounded to bf16 as
# it is stored (by the step, or by ``KVCache.store`` in the prefill) and is widened when read.
KV_TYPES = {torch.float32: 0, torch.bfloat16: 1}
ROUNDING = {"fp32": None, "bf16": torch.bfloat16, "bf16-dot": torch.bfloat16}
KINDS = {8: 1, 4: 2}  # bits -> qdecode.h's kind
_noted = False
_packed_notes: set[str] = set()


def _note_once(key: str, text: str) -> None:
    """Print ``text`` as a note the first time ``key`` comes up in this process."""
    if key not in _packed_notes:
        _packed_notes.add(key)
        print(f"note: {text}", file=sys.stderr)


def packed_format(p: PackedWeight | None) -> int:
    """qdecode.h's format code of packed blocks (kind | group << 8), or 0: decode the float32 values.
    Blocks of ``p.group`` values are read when the group is a multiple of 32 dividing the row."""
    if p is None:
        return 0
    if p.bits not in KINDS or p.group % 32 or p.shape[1] % p.group:
        why = f"int{p.bits} blocks of {p.group} values (rows of {p.shape[1]})"
        _note_once(why, f"the C++ decoder computes on int8/int4 blocks of multiples of 32 values, not {why}: "
                   "this run decodes on their float32 values")
        return 0
    return KINDS[p.bits] | p.group << 8


def library_why_not() -> str | None:
    """None when the C++ decoder can run here, else why not (one line, printed once as a note)."""
    global _noted
    why = cpu_kernels.built()
    if why is not None and not _noted:
        _noted = True
        print(f"note: slmkit's C++ decoder is off ({why}); decoding uses the NumPy path", file=sys.stderr)
    return why


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The packing functions' signatures (slm_decode_step's are set where the library loads)."""
    lib.slm_decode_packed_bytes.argtypes = [ctypes.c_int64] * 3
    lib.slm_decode_packed_bytes.restype = ctypes.c_int64
    lib.slm_decode_pack.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.slm_decode_pack.restype = ctypes.c_int
    lib.slm_decode_has_bf16_dot.restype = ctypes.c_int
    return lib


def pack(lib: ctypes.CDLL, weight: torch.Tensor, weights: str, parts: int = 1) -> torch.Tensor:
    """A (rows, in) weight matrix packed for the products (bytes, C++'s layout for ``weights``);
    ``parts`` > 1 packs that many equal blocks of rows one after the other (SwiGLU's gate, up)."""
    w = weight.detach().float().contiguous()
    rows, n = w.shape[0] // parts, w.shape[1]
    size = lib.slm_decode_packed_bytes(FORMATS[weights], rows, n)
    out = torch.empty(parts * size, dtype=torch.uint8)
    for i in range(parts):
        part = w[i * rows:(i + 1) * rows].contiguous()
        if lib.slm_decode_pack(part.data_ptr(), rows, n, FORMATS[weights], out.data_ptr() + i * size) != 0:
            raise ValueError(f"the C++ decoder cannot pack weights as {weights}")
    return out


def qpack(lib: ctypes.CDLL, p: PackedWeight) -> torch.Tensor:
    """A quantized weight's blocks repacked into the panels the products read (qdecode.cpp:
    16 rows interleaved; the same values and scales, bytes)."""
    fmt, (rows, n) = packed_format(p), p.shape
    out = torch.empty(lib.slm_qpacked_bytes(fmt, rows, n), dtype=torch.uint8)
    if lib.slm_qpack(fmt, p.blocks.data_ptr(), rows, n, out.data_ptr()) != 0:
        raise ValueError(f"the C++ decoder cannot read int{p.bits} blocks of {p.group} values")
    return out


def matrices(model: GPT) -> list[torch.Tensor]:
    """The weight matrices a format stores: the token embedding, the head and every block's linear
    layers (``quant.quantized_names`` with the embeddings: the tensors ``slm quantize`` rounds)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return [params[name] for name in quantized_names(model, True) if name in params]


_exact: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (signature, bool)


def storage_format(model: GPT) -> str:
    """The format the step reads a model's matrices in by default: "bf16" when every one of them
    (``matrices``) holds bf16 values exactly, as a ``slm quantize --bits 16`` run's do once read
    into float32 (nothing is lost: the products widen them back), else "fp32". Checked once per
    model while its weights stay the same."""
    key = _signature(model)
    hit = _exact.get(model)
    if hit is None or hit[0] != key:
        exact = all(p.dtype == torch.float32 and not bool((p.detach().contiguous().view(torch.int32) & 0xFFFF).any())
                    for p in matrices(model))
        hit = _exact[model] = (key, exact)
    return "bf16" if hit[1] else "fp32"


def rounded(model: GPT, weights: str) -> GPT:
    """``model`` with its weight matrices (``matrices``) rounded as ``weights`` stores them (a copy;
    the model itself for fp32 or where they already hold such values): what a ``NativeDecoder`` in
    that format runs."""
    dtype = ROUNDING[weights]
    if dtype is None or storage_format(model) == "bf16":
        return model
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in matrices(out):
            p.copy_(p.to(dtype).float())
    return out


# model -> {(weights, packed): (what its tensors were, the model the decoder runs, the step's tensors,
# their formats)}
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: GPT) -> tuple:
    """Where each parameter and buffer lives and its in-place version: changes when the weights do;
    and the int8/int4 blocks attached to its modules (``quant.attach_packed``)."""
    return (tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers())),
            tuple(id(p) for m in model.modules() if (p := packed_weight(m)) is not None))


def prepared(model: GPT, weights: str, packed: bool = True) -> tuple[GPT, list[torch.Tensor | None], torch.Tensor]:
    """The model a decoder in format ``weights`` runs (``rounded``), the tensors its step reads, in
    C++'s order (slm_decode_step's ``w``): float32 vectors and embeddings, packed matrices, or a
    quantized run's int8/int4 blocks (``packed``, fp32 only; ``qpack``'s panels for the products), and each tensor's format
    (slm_decode_step's ``fmt``: 0, or ``packed_format``). Kept per model while its weights stay the
    same, so a generation does not pack them again."""
    key = _signature(model)
    hit = _prepared.get(model, {}).get((weights, packed))
    if hit is not None and hit[0] == key:
        return hit[1] or model, hit[2], hit[3]
    lib = _declare(cpu_kernels.library())
    runs = rounded(model, weights)
    if weights == "bf16-dot":  # the model its steps compute rounds the products' inputs too
        runs = bf16_inputs(runs)
    swiglu = runs.config.activation == "swiglu"
    use_blocks = packed and runs is model  # bf16 rounds the float values the blocks stand for

    def norm(m: torch.nn.Module) -> list[torch.Tensor | PackedWeight | None]:
        return [m.weight, getattr(m, "bias", None)]

    def blocks(m: torch.nn.Module) -> PackedWeight | None:
        """The module's int8/int4 blocks where the step reads them, else None."""
        p = packed_weight(m) if use_blocks else None
        return p if packed_format(p) else None

    def linear(m: torch.nn.Linear, parts: int = 1, tied: torch.nn.Module | None = None) -> list:
        p = blocks(tied if tied is not None else m)
        return [p if p is not None else pack(lib, m.weight, weights, parts), m.bias]

    head_tied = runs.lm_head.weight is runs.tok_emb.weight  # tied: the embedding's blocks, if any
    tensors = [blocks(runs.tok_emb) or runs.tok_emb.weight, None if runs.pos_emb is None else runs.pos_emb.weight,
               runs.rope_cos, runs.rope_sin, *norm(runs.norm),
               *linear(runs.lm_head, tied=runs.tok_emb if head_tied else None)]
    for b in runs.blocks:
        tensors += [*norm(b.norm1), *linear(b.attn.qkv), *linear(b.attn.proj), *norm(b.norm2),
                    *linear(b.mlp.up, 2 if swiglu else 1), *linear(b.mlp.down)]
    formats = torch.tensor([packed_format(t) if isinstance(t, PackedWeight) else 0 for t in tensors], dtype=torch.int64)
    # Contiguous float32 views of the parameters (copies only where a tensor is not dense), the
    # packed matrices and the blocks, kept alive by the decoders: the C++ side holds their addresses.
    # The products' blocks are repacked into panels (qpack); the embedding's are read row by row as
    # they are (a tied head gets its own panels).
    tensors = [None if t is None else (t.blocks if i == 0 else qpack(lib, t)) if isinstance(t, PackedWeight)
               else t if t.dtype == torch.uint8 else t.detach().float().contiguous() for i, t in enumerate(tensors)]
    # (not the model itself as a value: that would keep the key, the model, alive for ever)
    _prepared.setdefault(model, {})[(weights, packed)] = (key, None if runs is model else runs, tensors, formats)
    return runs, tensors, formats


def has_bf16_dot() -> bool:
    """Whether this CPU runs the "bf16-dot" products (AVX512-BF16's vdpbf16ps, with AVX-512)."""
    lib = cpu_kernels.library()
    return lib is not None and bool(_declare(lib).slm_decode_has_bf16_dot())


def bf16_inputs(model: GPT) -> GPT:
    """A copy of ``model`` whose linear layers round their inputs to bf16 (a forward pre-hook on
    each): with ``rounded``, the reference the "bf16-dot" products are tested against."""
    import copy

    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16).float(), *args[1:]))
    return out


def bf16_arithmetic(isa: str | None = None) -> str:
    """The format a model of bf16 values (``storage_format``) decodes in by default: "bf16-dot"
    where this CPU has AVX512-BF16 and ``isa`` (default: SLMKIT_DECODE_ISA) allows AVX-512, else "bf16"."""
    isa = isa or os.environ.get("SLMKIT_DECODE_ISA", "auto")
    return "bf16-dot" if isa in ("auto", "avx512") and has_bf16_dot() else "bf16"


def half_weights(model: GPT) -> str | None:
    """The format ``slm serve --weights bf16`` decodes ``model`` in: ``bf16_arithmetic()`` ("bf16-dot"
    where the CPU has it, else "bf16") for float32 matrices; None, ``NativeDecoder``'s default, for a
    run whose matrices hold bf16 values already (``storage_format``) or whose step reads int8/int4
    blocks (``slm quantize``): those decode as they always do."""
    if storage_format(model) == "bf16" or any(packed_weight(m) is not None for m in model.modules()):
        return None
    return bf16_arithmetic()


def best_isa() -> str:
    """The instruction set the products use on this CPU by default: avx512, avx2 or scalar."""
    lib = cpu_kernels.library()
    return "scalar" if lib is None else {v: k for k, v in ISAS.items()}[lib.slm_decode_isa()]


# The most tokens of a row one step of NativeDecoder.prefill takes (extra tokens included): a step's
# buffers hold every token's activations (about 10 floats a model width each), so a long prompt
# goes in chunks.
PREFILL_TOKENS = 256


class NativeDecoder(Decoder):
    """The decode step for float32 on the CPU, in C++ (see the module docstring). ``isa`` forces
    an instruction set (default: ``SLMKIT_DECODE_ISA`` or the best one), ``threads`` a thread
    count (default: ``torch.get_num_threads()`` at each step). ``weights`` is the format the
    weight matrices are stored in for the products: "fp32", or "bf16" (half the bytes to read per
    token; the arithmetic stays float32, so the logits are those of ``rounded(model, "bf16")``,
    which the decoder keeps for its prefill), or "bf16-dot" (bf16 products, ``vdpbf16ps``; "bf16"
    on a CPU without AVX512-BF16, after one note). Default: "fp32", or for a model whose matrices
    hold bf16 values (``storage_format``) "bf16-dot" (``reproduces``). The matrices are packed (a copy beside the model's)
    once per model and format while its weights stay the same (``prepared``). A quantized run's
    int8/int4 blocks are read as blocks (fp32 format; ``packed=False``: its float32 values
    instead, for comparisons). Inference only."""

    name = "cpp"
    devices = {"cpu"}
    dtypes = {torch.float32}
    kv_dtypes = tuple(KV_TYPES)
    skips_logits = True
    skips_rows = True
    feeds_many = True
    strided_kv = True
    handles = {**SIZES, "norm": {"layernorm", "rmsnorm"}, "positions": {"learned", "rope"},
               "activation": {"gelu", "swiglu"}, "n_kv_head": ANY, "bias": {False, True},
               "tie_embeddings": {False, True}}

    @classmethod
    def why_not(cls, model: GPT, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
        why = super().why_not(model, device, dtype)
        return why if why is not None else library_why_not()

    @classmethod
    def reproduces(cls, model: GPT) -> GPT:
        """The model itself; for a model of bf16 values on a CPU with AVX512-BF16, the model with
        the inputs of its products rounded to bf16 too (``bf16_inputs``), as "bf16-dot" computes."""
        if storage_format(model) == "bf16" and bf16_arithmetic() == "bf16-dot":
            return bf16_inputs(model)
        return model

    def __init__(self, model: GPT, isa: str | None = None, threads: int | None = None, weights: str | None = None,
                 packed: bool = True) -> None:
        self.check(model)
        if weights is None:
            weights = storage_format(model)
            weights = "bf16-dot" if weights == "bf16" else weights  # the faster arithmetic, where the CPU has it
        if weights not in FORMATS:
            raise ValueError(f"unknown weight format {weights!r}: choose one of {', '.join(FORMATS)}")
        isa = isa or os.environ.get("SLMKIT_DECODE_ISA", "auto")
        if weights == "bf16-dot" and bf16_arithmetic(isa) != "bf16-dot":
            _note_once("bf16-dot", "this CPU (or SLMKIT_DECODE_ISA) has no AVX512-BF16 products: "
                       "bf16 weights decode with float32 arithmetic")
            weights = "bf16"
        # self.model: the model the steps compute (rounded weights: ``reproduces``)
        model, self.tensors, self.formats = prepared(model, weights, packed)
        self.packed = bool(self.formats.any())
        super().__init__(model)
        if isa not in ISAS:
            raise ValueError(f"unknown instruction set {isa!r}: choose one of {', '.join(ISAS)}")
        # Forced to AVX2, the library built for AVX2 (cpu_kernels.ISA_FLAGS): none of its code uses
        # AVX-512, as on an AVX2 laptop (a -march=native build's AVX2 functions may).
        lib = (cpu_kernels.library("avx2") if isa == "avx2" else None) or cpu_kernels.library()
        self.lib, self.isa_name, self.isa, self.threads = lib, isa, ISAS[isa], threads
        self.weights = weights
        c = model.config
        hidden = model.blocks[0].mlp.down.in_features
        self.cfg = torch.tensor([c.vocab_size, c.n_layer, c.n_head, c.kv_heads, c.head_dim, c.n_embd, hidden,
                                 c.norm == "layernorm", c.positions == "rope", c.activation == "swiglu",
                                 FORMATS[weights], 0], dtype=torch.int64)
        self.kv_dtype = torch.float32  # the cache element type cfg[-1] says
        self.pointers = (ctypes.c_void_p * len(self.tensors))(*(0 if t is None else t.data_ptr() for t in self.tensors))
        self.eps, self.vocab = c.norm_eps, c.vocab_size
        # The pool's threads sleep right after each step instead of spinning for the next one: for
        # a caller whose work between steps is long and shares the cores (slm serve's engine)
        self.rest = False
        self.cfg_ptr, self.formats_ptr = self.cfg.data_ptr(), self.formats.data_ptr()

    def weight_bytes(self) -> int:
        """Bytes of the packed weight matrices and int8/int4 blocks of the products and the head
        (not the embedding: a row per token): what a step reads of them from memory, once, for
        all rows of its batch."""
        return sum(t.numel() for t in self.tensors[1:] if t is not None and t.dtype == torch.uint8)

    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """T tokens per row (B, T) after the cached ones -> the last position's logits (B, vocab),
        through the C++ step: each row's tokens before its last as ``extra`` tokens of one step (of
        ``PREFILL_TOKENS`` at most: a step's buffers grow with its tokens), so a prompt's keys,
        values and logits are the bits its tokens fed one a step give, at the speed of the step's
        products. Left padding (a row's slots before its ``start``) runs as a step runs it, with no
        extra tokens there."""
        B, T = ids.shape
        S, max_len = cache.length, cache.k.size(3)
        if T < 1:
            raise ValueError("prefill takes at least one token per row")
        if S + T > max_len:
            raise ValueError(f"KV cache full: {S} + {T} tokens > {max_len} slots")
        first = cache.start.tolist()
        rows = ids.tolist()
        for c0 in range(0, T, PREFILL_TOKENS):
            c1 = min(T, c0 + PREFILL_TOKENS)
            cache.length = S + c1 - 1  # the chunk's last token is the step's own, in slot S + c1 - 1
            extra = {}
            for b, row in enumerate(rows):
                lo = max(c0, first[b] - S)  # from the row's first real slot on
                if lo < c1 - 1:
                    extra[b] = row[lo : c1 - 1]
            logits = self._step(ids[:, c1 - 1], cache, None, None, extra)
        return logits

    def step(self, idx: torch.Tensor, cache: KVCache, need: torch.Tensor | None = None,
             holes: torch.Tensor | None = None, extra: dict[int, list[int]] | None = None) -> torch.Tensor:
        """One new token per row, ids (B,) -> next-token logits (B, vocab), as ``StepDecoder``
        (the cache's keys and values float32 or bf16: ``KV_TYPES``). ``need`` (bool (B,)): only
        those rows get logits (the others zeros: no final norm or head product for them), the same
        bits as without it. ``holes`` (bool (B,)): rows not run at all (a continuous batch's rows
        whose sequence has left): their logits are zeros and their new slot is not written; the
        other rows' logits and keys and values are the same bits as without it. ``extra`` ({row:
        token ids}): tokens those rows feed before their token of ``idx``, into the slots just before
        the new one (which the row's ``start`` must leave free: a prompt's row lined up to end
        ``len(extra[row])`` slots early), as if fed one a step before it: the same keys, values and
        logits, bit for bit, in one step (a joining prompt's tokens, ``ContinuousBatch``)."""
        return self._step(idx, cache, need, holes, extra)

    def _step(self, idx: torch.Tensor, cache: KVCache, need: torch.Tensor | None, holes: torch.Tensor | None,
              extra: dict[int, list[int]] | None) -> torch.Tensor:
        """``step`` (and each of ``prefill``'s steps)."""
        # (a step of the stories15m shape in int4 takes ~80 us: the checks and conversions here
        # skip what is already so; together they were ~5 us)
        B, S, max_len = idx.size(0), cache.length, cache.k.size(3)
        if S >= max_len:
            raise ValueError(f"KV cache full: {S} + 1 tokens > {max_len} slots")
        kv_rows = cache.buffer_rows()  # the first rows of buffers with room for more (ContinuousBatch)
        if kv_rows is None:
            cache.k, cache.v = cache.k.contiguous(), cache.v.contiguous()
            kv_rows = B
        if cache.k.dtype is not self.kv_dtype or cache.v.dtype is not self.kv_dtype:
            if cache.k.dtype not in KV_TYPES or cache.v.dtype is not cache.k.dtype:
                raise ValueError(f"the C++ decoder reads float32 or bfloat16 KV caches, not {cache.k.dtype}/{cache.v.dtype}")
            self.kv_dtype = cache.k.dtype
            self.cfg[-1] = KV_TYPES[cache.k.dtype]
        ids = idx if idx.dtype == torch.int64 and idx.is_contiguous() else idx.to(torch.int64).contiguous()
        start = cache.start.contiguous()
        need, holes = _row_bytes(need, B), _row_bytes(holes, B)
        counts = extra_ids = None
        if extra:
            if not all(0 <= row < B for row in extra):
                raise ValueError(f"extra tokens for rows {sorted(extra)} of a batch of {B}")
            counts = torch.zeros(B, dtype=torch.int64)
            for row, tokens in extra.items():
                counts[row] = len(tokens)
            extra_ids = torch.tensor([t for row in sorted(extra) for t in extra[row]], dtype=torch.int64)
        logits = torch.empty(B, self.vocab)
        threads = self.threads or torch.get_num_threads()
        rc = self.lib.slm_decode_step(self.cfg_ptr, self.pointers, self.eps, ids.data_ptr(), start.data_ptr(),
                                      B, S, max_len, kv_rows, cache.k.data_ptr(), cache.v.data_ptr(),
                                      logits.data_ptr(), threads, self.isa, self.formats_ptr,
                                      None if need is None else need.data_ptr(), self.rest,
                                      None if holes is None else holes.data_ptr(),
                                      None if counts is None else counts.data_ptr(),
                                      None if extra_ids is None else extra_ids.data_ptr())
        if rc == 1:
            raise IndexError(f"token ids must be in [0, {self.model.config.vocab_size}), got {ids.tolist()}"
                             + (f" and {extra_ids.tolist()}" if extra_ids is not None else ""))
        if rc == 3:
            raise ValueError(f"extra tokens {extra} do not fit before slot {S} after their rows' first slots "
                             f"{start.tolist()}")
        if rc == 2:
            raise ValueError(f"this CPU cannot run the {self.isa_name} code (best: {best_isa()})")
        cache.length = S + 1
        return logits


def _row_bytes(mask: torch.Tensor | None, B: int) -> torch.Tensor | None:
    """A per-row flag as C++ reads it: one byte per row, 0 or 1 (None stays None)."""
    if mask is None or mask.dtype is torch.bool and mask.shape == (B,) and mask.is_contiguous():
        return mask
    return mask.to(torch.bool).contiguous().view(B)


class NativeBF16Decoder(NativeDecoder):
    """``NativeDecoder`` with its weight matrices stored in bf16 (``weights="bf16"``): half the
    bytes per token, the logits of the model with those matrices rounded to bf16 (``reproduces``).
    Registered after the reference, so the registry never picks it: asked for by name
    (``make_decoder(model, "cpp-bf16")``, ``generate_tokens(..., path="cpp-bf16")``)."""

    name = "cpp-bf16"

    def __init__(self, model: GPT, isa: str | None = None, threads: int | None = None) -> None:
        super().__init__(model, isa, threads, weights="bf16")

    @classmethod
    def reproduces(cls, model: GPT) -> GPT:
        return rounded(model, "bf16")
