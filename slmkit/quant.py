"""Weight-only quantization: int8 and int4 blocks in GGUF's q8_0 / q4_0 layout, packed on disk.

Each row of a matrix is cut into groups of ``group`` consecutive values, and each group is stored
as one block: its float16 scale ``d``, then its values, exactly as ggml encodes them:

    int8 (q8_0)  d = max|x| / 127, q = round(x / d) (halves away from zero), x ~ d * q; one byte each.
    int4 (q4_0)  m = the value of largest magnitude, d = m / -8, q = trunc(x / d + 8.5) clamped to
                 0..15, x ~ d * (q - 8); two per byte, the group's first half in the low nibbles
                 and its second half in the high nibbles.

(``x / d`` is ``x * (1 / d)`` in float32 with the unrounded scale, as ggml does.) With groups of 32
the bytes are GGUF's q8_0 / q4_0 blocks, bit for bit (tests/test_quant.py checks them against the
``gguf`` package's own quantizer), so a quantized run and its ``--outtype q8_0`` / ``q4_0`` GGUF hold
the same weights. int8 also takes ``group = 0``: one block per row (one scale per output channel);
int4 groups of 64 or 128 shrink the file a little more (fewer scales) at some accuracy. A group
never spans rows: a row shorter than the group is one block; a longer one must hold whole groups.

What is quantized: the weights of every block's linear layers (attention QKV and output, MLP up
and down); with ``embeddings`` also the token embedding (the head too when it is tied to it) and an
untied head, which hold half the weights of a model as small as ``stories260k``. Norms, biases and
learned positions stay float32. ``quantize_weights`` packs a model's weights; ``dequantize_weights``
turns the packed ones back into float32 tensors (checkpoint.py does this when it reads a quantized
checkpoint: the model then runs, on every backend, with exactly the quantized values).
``attach_packed`` also hands the blocks themselves to the model's modules (``PackedWeight``), so
that the C++ decode step (``decode.NativeDecoder``, ``csrc/qdecode.cpp``) computes on them
directly, reading a quarter (int8) or an eighth (int4) of the bytes per token.

``bits = 16`` is bf16 instead of blocks: every weight matrix (the token embedding and the head
always included: ``group`` and ``embeddings`` do not apply) rounded to bf16, to nearest even, and
stored as bf16 tensors (format ``slmkit-bf16-v1``): half the bytes of float32, float32's range.
Read back, they are float32 tensors holding bf16 values exactly, which the C++ decode step
recognises and reads as bf16 (``decode.native.storage_format``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from slmkit.errors import SlmError

BITS = (8, 4, 16)
GROUPS = {8: (0, 32, 64, 128), 4: (32, 64, 128)}
BLOCKS_FORMAT, BF16_FORMAT = "slmkit-blocks-v1", "slmkit-bf16-v1"  # quantization.json's "format"


@dataclass
class QuantConfig:
    """How ``slm quantize`` packs a run's weights (the ``[quantize]`` settings)."""

    bits: int = field(default=8, metadata={
        "help": "8 (int8, q8_0 blocks), 4 (int4, q4_0 blocks) or 16 (bf16: every matrix, embeddings and head "
                "included, half the bytes of float32) (default %(default)s)"})
    group: int = field(default=32, metadata={
        "help": "values per block, one float16 scale each: 32 (GGUF's layout), 64 or 128; int8 also 0 "
                "(one scale per output channel) (default %(default)s)"})
    embeddings: bool = field(default=False, metadata={
        "help": "also quantize the token embedding and the head (half the weights of a small model)"})
    calibrate: int = field(default=0, metadata={
        "help": "activation-aware scales (AWQ-style) searched on this many sequences of --data's train "
                "split, folded into the norms and the layers before; 0 = off (default %(default)s)"})

    def validate(self) -> None:
        """One line naming the setting when it is not one of the supported ones."""
        if not isinstance(self.calibrate, int) or self.calibrate < 0:
            raise SlmError(f"quantize.calibrate={self.calibrate} is not a number of sequences: give 0 (off) or e.g. 256")
        if self.bits not in BITS:
            raise SlmError(f"quantize.bits={self.bits} is not supported: choose 8 (int8), 4 (int4) or 16 (bf16)")
        if self.bits == 16:
            if self.calibrate:
                raise SlmError("quantize.calibrate applies to int8/int4 blocks, not to bf16 (--bits 16): leave it at 0")
            return
        if self.group not in GROUPS[self.bits]:
            raise SlmError(f"quantize.group={self.group} is not supported for int{self.bits}: choose one of "
                           f"{', '.join(map(str, GROUPS[self.bits]))}" + (" (0 = per output channel)" if self.bits == 8 else ""))


def block_bytes(bits: int, group: int) -> int:
    """Bytes of one block: the float16 scale and ``group`` values of ``bits`` bits."""
    return 2 + group * bits // 8


def group_for(cols: int, group: int) -> int:
    """The group a matrix with rows of ``cols`` values is packed in: ``group``, or the whole row
    when the row is shorter (or ``group`` is 0)."""
    return group if 0 < group < cols else cols


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ggml's rounding in q8_0): halves away from zero, unlike torch.round; written as
    floor(a) + floor(2 * frac(a)) so that no addition rounds (0.49999997 + 0.5 is 1.0 in float32)."""
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + torch.floor(2 * (a - whole)))


def quantize_blocks(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """A float matrix (rows, cols) as uint8 blocks (rows, cols / group * block_bytes); group 0 is a
    whole row. ``cols`` must be a multiple of the group."""
    rows, cols = w.shape
    group = group_for(cols, group)
    if cols % group:
        raise SlmError(f"rows of {cols} values are not whole groups of {group}")
    g = w.detach().float().reshape(rows, cols // group, group)
    if bits == 8:
        d = g.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = _round_half_away(g * inv).to(torch.int8).view(torch.uint8)
    elif bits == 4:
        m = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        d = m / -8
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = torch.trunc(g * inv + 8.5).clamp(0, 15).to(torch.uint8)
        q = q[..., : group // 2] | (q[..., group // 2:] << 4)
    else:
        raise SlmError(f"{bits}-bit blocks are not supported: choose 8 or 4")
    scale = d.to(torch.float16).view(torch.uint8)  # (rows, blocks, 2): the scale's bytes, little-endian
    return torch.cat((scale, q), -1).reshape(rows, -1).contiguous()


def dequantize_blocks(packed: torch.Tensor, bits: int, group: int, cols: int) -> torch.Tensor:
    """The float32 matrix (rows, cols) that ``quantize_blocks`` packed."""
    group = group_for(cols, group)
    rows = packed.shape[0]
    blocks = packed.reshape(rows, cols // group, block_bytes(bits, group))
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # (rows, blocks, 1)
    if bits == 8:
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
    else:
        nib = blocks[..., 2:]
        q = torch.cat((nib & 0x0F, nib >> 4), -1).float() - 8
    return (q * d).reshape(rows, cols)


def quantized_names(model: Any, embeddings: bool) -> list[str]:
    """The weights ``quantize_weights`` packs (state_dict names), see the module docstring (bf16
    asks for them with ``embeddings`` always on)."""
    names = [f"blocks.{i}.{m}.weight" for i in range(model.config.n_layer)
             for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")]
    if embeddings:
        names.append("tok_emb.weight")
        if not model.config.tie_embeddings:
            names.append("lm_head.weight")
    return names


def quantize_weights(model: Any, cfg: QuantConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``model``'s weights with the chosen ones packed (uint8 blocks) and the ``quantization.json``
    that says how: bits, group and each packed tensor's float shape."""
    cfg.validate()
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    shapes = {}
    if cfg.bits == 16:
        for name in quantized_names(model, True):
            shapes[name] = list(sd[name].shape)
            sd[name] = sd[name].to(torch.bfloat16)
        return sd, {"bits": 16, "embeddings": True, "format": BF16_FORMAT, "tensors": shapes}
    for name in quantized_names(model, cfg.embeddings):
        cols = sd[name].shape[1]
        if cols % group_for(cols, cfg.group):
            raise SlmError(f"cannot quantize {name} in groups of {cfg.group}: its rows hold {cols} values "
                           f"(use --group 0 for int8, or a model whose sizes are multiples of {cfg.group})")
        shapes[name] = list(sd[name].shape)
        sd[name] = quantize_blocks(sd[name], cfg.bits, cfg.group)
    return sd, {**asdict(cfg), "format": BLOCKS_FORMAT, "tensors": shapes}


def dequantize_weights(weights: dict[str, torch.Tensor], meta: Any, where: str) -> dict[str, torch.Tensor]:
    """Float32 weights from a quantized checkpoint's (``where`` names it in errors): every packed
    tensor is checked against its recorded shape before it is unpacked (bf16 ones widened)."""
    if (not isinstance(meta, dict) or meta.get("format") not in (BLOCKS_FORMAT, BF16_FORMAT)
            or not isinstance(meta.get("tensors"), dict)):
        raise SlmError(f"{where}: quantization.json is not slmkit's (format {BLOCKS_FORMAT} or {BF16_FORMAT}): "
                       "quantize the run again")
    if meta["format"] == BF16_FORMAT:
        out = dict(weights)
        for name, shape in meta["tensors"].items():
            t = weights.get(name)
            if t is None or t.dtype != torch.bfloat16 or not isinstance(shape, list) or list(t.shape) != shape:
                raise SlmError(f"{where}: {name} is not a bf16 {shape} matrix as quantization.json says")
            out[name] = t.float()
        return out
    try:
        cfg = QuantConfig(bits=meta["bits"], group=meta["group"], embeddings=bool(meta.get("embeddings")))
    except (KeyError, TypeError):
        raise SlmError(f"{where}: quantization.json lacks bits or group: quantize the run again") from None
    if not isinstance(cfg.bits, int) or not isinstance(cfg.group, int):
        raise SlmError(f"{where}: quantization.json's bits and group must be integers")
    cfg.validate()
    out = dict(weights)
    for name, shape in meta["tensors"].items():
        packed = weights.get(name)
        ok_shape = isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)
        if not ok_shape or packed is None or packed.dtype != torch.uint8 or packed.dim() != 2:
            raise SlmError(f"{where}: {name} is not a packed {shape} matrix as quantization.json says")
        rows, cols = shape
        group = group_for(cols, cfg.group)
        if cols % group or tuple(packed.shape) != (rows, cols // group * block_bytes(cfg.bits, group)):
            raise SlmError(f"{where}: {name} holds {tuple(packed.shape)} bytes, not the blocks of a "
                           f"{rows}x{cols} matrix in int{cfg.bits} groups of {group}")
        out[name] = dequantize_blocks(packed, cfg.bits, cfg.group, cols)
    return out


# ------------------------------------------------- activation-aware scales (AWQ-style), before packing
#
# A weight's input channels are not equally important: a channel whose activations are large
# carries more of the output, so its rounding error costs more. AWQ (Lin et al. 2023) scales such
# columns up before quantizing (W s, then x / s at run time): their values then get finer steps
# relative to the group's scale. x / s is folded into the operation before the linear, so the
# stored model is a plain model with the same structure and exactly the same float function; only
# which values get rounded how changes. Here: s = mean|x| ** alpha per input channel (normalised
# to a geometric mean of 1), alpha from a grid of 20 in [0, 1) picked per linear by the error of
# its quantized output on calibration activations (alpha = 0 is plain quantization, so the pick
# never does worse on that sample). Folded into: the norm before QKV and before the MLP's up (its
# weight, and its bias for LayerNorm); for the MLP's down, SwiGLU's up rows (not the gate's: the
# hidden is silu(gate) * up); for attention's output, V's rows, only when every query head has its
# own V head (with GQA one V channel feeds several heads' columns, which would need equal scales).
# GELU's down is left alone (gelu(x / s) is not gelu(x) / s).

AWQ_GRID = 20
AWQ_SAMPLE = 4096  # activation rows kept per linear for the error of each candidate


@torch.no_grad()
def _activation_stats(model: Any, tokens: torch.Tensor, batch: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each block linear (state_dict path without ``.weight``): its input's mean |x| per channel
    over every calibration token, and a fixed random sample of ``AWQ_SAMPLE`` input rows."""
    names = {f"blocks.{i}.{m}" for i in range(model.config.n_layer) for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    count = [0]
    per_batch = -(-AWQ_SAMPLE // -(-len(tokens) // batch))
    gen = torch.Generator().manual_seed(0)

    def hook(name: str):
        def grab(_module: Any, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            rows[name].append(x[torch.randperm(len(x), generator=gen)[:per_batch]])
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n in names]
    try:
        for i in range(0, len(tokens), batch):
            x = tokens[i:i + batch]
            count[0] += x.numel()
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / count[0], torch.cat(rows[n])[:AWQ_SAMPLE]) for n in names}


def _quantized(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``w`` as its int blocks stand for it (quantize, then dequantize)."""
    return dequantize_blocks(quantize_blocks(w, bits, group), bits, group, w.shape[1])


def awq_search(w: torch.Tensor, x: torch.Tensor, act_mean: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, float]:
    """The per-input-channel scales ``s`` (and their alpha) that minimise the squared error of
    ``x @ (Q(w s) / s).T`` against ``x @ w.T`` over alpha in the grid, ``s = act_mean ** alpha``."""
    want = x @ w.T
    best = (float("inf"), torch.ones_like(act_mean), 0.0)
    base = act_mean.clamp(min=1e-5)
    for k in range(AWQ_GRID):
        alpha = k / AWQ_GRID
        s = base ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = float(((x @ (_quantized(w * s, bits, group) / s).T - want) ** 2).mean())
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def awq_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, tokens: int = 512) -> torch.Tensor:
    """``w`` with each block's values clipped to the fraction (1, 0.95, ..., 0.55) of its largest
    magnitude that minimises that block's share of the quantized output error on ``x`` (AWQ's
    clipping): a block's step shrinks with it, and an outlier weight costs less than rounding the rest."""
    rows, cols = w.shape
    g = group_for(cols, group)
    xg = x[:tokens].reshape(-1, cols // g, g)
    wg = w.reshape(rows, cols // g, g)
    top = wg.abs().amax(-1, keepdim=True)
    best, best_err = wg, None
    for k in range(AWQ_GRID // 2):
        c = top * (1 - k / AWQ_GRID)
        clipped = torch.maximum(torch.minimum(wg, c), -c)
        q = _quantized(clipped.reshape(rows, cols), bits, group).reshape(rows, cols // g, g)
        err = torch.einsum("ngk,rgk->nrg", xg, wg - q).pow(2).mean(0)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
    return best.reshape(rows, cols)


@torch.no_grad()
def apply_awq(model: Any, tokens: torch.Tensor, cfg: QuantConfig, clip: bool = True) -> dict[str, float]:
    """Fold activation-aware scales into ``model`` in place (see above), searched on the calibration
    ``tokens`` (sequences, (n, T) int64); the float model computes what it computed before.
    Returns each linear's chosen alpha (0 where plain quantization was best or no fold exists)."""
    cfg.validate()
    c = model.config
    stats = _activation_stats(model.eval(), tokens)
    swiglu = c.activation == "swiglu"
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    chosen: dict[str, float] = {}
    for i, block in enumerate(model.blocks):
        def fold(name: str, linear: Any, before: list[tuple[Any, slice]]) -> None:
            """Search ``linear``'s scales; divide the rows ``before`` (param, rows) feeding it by them."""
            w = linear.weight.detach().float()
            if w.shape[1] % group_for(w.shape[1], cfg.group):
                return  # quantize_weights refuses it with its one line
            act_mean, x = stats[f"blocks.{i}.{name}"]
            s, alpha = awq_search(w, x, act_mean, cfg.bits, cfg.group)
            chosen[f"blocks.{i}.{name}"] = alpha
            if alpha != 0.0:
                linear.weight.mul_(s.to(linear.weight.dtype))
            if clip:
                linear.weight.copy_(awq_clip(linear.weight.detach().float(), x / s, cfg.bits, cfg.group))
            if alpha == 0.0:
                return
            for param, rows in before:
                if param is not None:
                    view = param.data[rows]
                    param.data[rows] = view / (s if view.dim() == 1 else s[:, None]).to(view.dtype)

        norm1, norm2 = block.norm1, block.norm2
        every = slice(None)
        fold("attn.qkv", block.attn.qkv, [(norm1.weight, every), (getattr(norm1, "bias", None), every)])
        if kv == q:
            v = slice(q + kv, q + 2 * kv)
            fold("attn.proj", block.attn.proj, [(block.attn.qkv.weight, v), (block.attn.qkv.bias, v)])
        fold("mlp.up", block.mlp.up, [(norm2.weight, every), (getattr(norm2, "bias", None), every)])
        if swiglu:
            up = slice(c.hidden_dim, 2 * c.hidden_dim)
            fold("mlp.down", block.mlp.down, [(block.mlp.up.weight, up), (block.mlp.up.bias, up)])
    return chosen


@dataclass(frozen=True)
class PackedWeight:
    """A module's weight as ``slm quantize`` stored it: ``blocks`` (rows, bytes) uint8 in ``bits``
    blocks of ``group`` values (the group actually used, ``group_for``), standing for the float
    ``shape``. It holds while the module's float weight is the one unpacked from it (``matches``)."""

    blocks: torch.Tensor
    bits: int
    group: int
    shape: tuple[int, int]
    weight_ptr: int
    weight_version: int

    def matches(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is still the float32 tensor unpacked from these blocks: same storage,
        no in-place change since (a fine-tune or ``load_state_dict`` makes the blocks stale)."""
        return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.data_ptr() == self.weight_ptr
                and weight._version == self.weight_version)


PACKED = "packed_weight"  # the module attribute attach_packed sets


def attach_packed(model: Any, packed: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Give each module whose weight a quantized checkpoint packed (``packed``: name -> blocks, as
    ``dequantize_weights`` checked them) its ``PackedWeight``, as the attribute ``PACKED``. Call it
    after the model's float weights are loaded."""
    for name, blocks in packed.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        rows, cols = meta["tensors"][name]
        w = module.weight
        setattr(module, PACKED, PackedWeight(blocks.contiguous(), int(meta["bits"]), group_for(cols, int(meta["group"])),
                                             (rows, cols), w.data_ptr(), w._version))


def quantize_model(model: Any, cfg: QuantConfig) -> None:
    """Quantize ``model`` in place into what ``load_run`` gives for its ``slm quantize`` run: the
    chosen weights replaced by the float32 values their blocks stand for, the blocks attached."""
    weights, meta = quantize_weights(model, cfg)
    packed = {name: weights[name] for name in meta["tensors"]}
    if cfg.bits == 16:  # no blocks: the bf16 values themselves, which the C++ step recognises
        with torch.no_grad():
            for name, t in packed.items():
                model.get_parameter(name).copy_(t.float())
        return
    with torch.no_grad():
        for name, (_, cols) in meta["tensors"].items():
            model.get_parameter(name).copy_(dequantize_blocks(packed[name], cfg.bits, cfg.group, cols))
    attach_packed(model, packed, meta)


def packed_weight(module: Any) -> PackedWeight | None:
    """The module's ``PackedWeight`` when it still matches its float weight, else None."""
    p = getattr(module, PACKED, None)
    return p if p is not None and p.matches(module.weight) else None


__all__ = ["AWQ_GRID", "BF16_FORMAT", "BLOCKS_FORMAT", "PACKED", "PackedWeight", "QuantConfig", "apply_awq",
           "attach_packed", "awq_search", "block_bytes", "dequantize_blocks", "dequantize_weights",
           "group_for", "packed_weight", "quantize_blocks", "quantize_model", "quantize_weights",
           "quantized_names"]
