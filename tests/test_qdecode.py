"""The C++ decoder on int8/int4 blocks (csrc/qdecode.cpp through decode/native.py).

The products: every kernel this CPU runs (AVX-512 VNNI, AVX-VNNI, AVX2, scalar) gives the same
bits, and those are the exact product of the dequantized weights with the activations rounded to
int8 blocks, for q8_0 / q4_0 and the larger groups. The step: against the float C++ step on the
same (dequantized) weights, on a ragged batch, the logits differ only by the activations' 8-bit
rounding, and a quantized run's greedy tokens are the float reference's; instruction set and
thread count change no bit. A quantized run from ``slm quantize`` decodes on its blocks by
default; blocks it cannot read fall back with a note."""

from __future__ import annotations

import pytest
import torch

from slmkit import cpu_kernels
from slmkit.checkpoint import load_run
from slmkit.decode import KVCache, NativeDecoder, native, pick
from slmkit.export.quantize import quantize_run
from slmkit.generate import SamplingConfig, generate_tokens
from slmkit.quant import QuantConfig, dequantize_blocks, packed_weight, quantize_blocks, quantize_model

from generation_models import GREEDY, noisy_model, one_thread, random_model  # noqa: F401 (one_thread: a fixture)

pytestmark = pytest.mark.skipif(cpu_kernels.built() is not None, reason=f"no C++ library: {cpu_kernels.built()}")

KERNELS = {1: "scalar", 2: "avx2", 3: "avx-vnni", 4: "avx512-vnni"}
ORDER = ["scalar", "avx2", "avx512"]
RUNNABLE = ORDER[: ORDER.index(native.best_isa()) + 1] if cpu_kernels.built() is None else []
FORMATS = [(8, 32), (8, 64), (8, 0), (4, 32), (4, 64), (4, 128)]


def qmatvec(packed: torch.Tensor, bits: int, group: int, x: torch.Tensor, kernel: int) -> torch.Tensor | None:
    """slm_qmatvec: (B, rows) products of packed rows with x (B, in); None where the CPU lacks the kernel."""
    rows, cols = packed.shape[0], x.shape[1]
    out = torch.empty(x.shape[0], rows)
    fmt = native.KINDS[bits] | (group or cols) << 8
    rc = cpu_kernels.library().slm_qmatvec(fmt, kernel, packed.data_ptr(), rows, cols, x.data_ptr(), x.shape[0],
                                           out.data_ptr())
    assert rc in (0, 2)
    return out if rc == 0 else None


@pytest.mark.parametrize("bits,group", FORMATS)
def test_every_kernel_gives_the_exact_block_products(bits, group):
    """43 rows (two panels of 16 rows and part of one) x 5 activation rows of 256 (AVX-512: a pass
    of 3 rows and one of 2): the scalar kernel is the float64 product of the dequantized weights
    with the activations as quantize_rows rounds them (d = max|x|/127, q = x/d to nearest even), to
    float32 rounding; every other kernel equals it bit for bit. An int8 weight of -128 (which
    slm quantize never writes, a GGUF file may) is exact too."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(43, 256, generator=g)
    w[3, 5] = 0.0
    w[7] = 0.0  # an all-zero row: scale 0
    x = torch.randn(5, 256, generator=g) * torch.linspace(0.1, 3, 256)
    x[1, :32] = 0.0  # an all-zero activation block
    packed = quantize_blocks(w, bits, group)
    if bits == 8:
        packed[2, 2 + 5] = 0x80  # row 2, value 5 of its first block: -128
    ref = qmatvec(packed, bits, group, x, 1)
    blocks = x.view(5, 8, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(blocks * torch.where(d > 0, 1 / d, 0.0)) * d
    expected = (dequantize_blocks(packed, bits, group, 256).double() @ xq.reshape(5, 256).double().T).T
    scale = (dequantize_blocks(packed, bits, group, 256).abs().double() @ x.abs().double().T).T
    assert ((ref.double() - expected).abs() <= 1e-6 * scale + 1e-6).all()
    assert not torch.allclose(ref, (w @ x.T).T, rtol=1e-6, atol=1e-6)  # the rounding is really there
    ran = []
    for k in (2, 3, 4):
        got = qmatvec(packed, bits, group, x, k)
        if got is not None:
            ran.append(KERNELS[k])
            assert torch.equal(got, ref), KERNELS[k]
    if native.best_isa() != "scalar":
        assert "avx2" in ran


def quantized_model(bits: int, group: int, embeddings: bool, seed: int = 2, **kw):
    """A random model (weights at their initial scale) quantized in place, as load_run gives a
    quantized run. (noisy_model's weights, scaled up 6x, amplify any rounding layer after layer.)"""
    model = random_model(seed, scale=1.0, **kw)
    quantize_model(model, QuantConfig(bits, group, embeddings))
    return model


def ragged(decoder: NativeDecoder, model, x: torch.Tensor, starts: list[int], steps: int) -> list[torch.Tensor]:
    cache = KVCache.empty(model.config, x.shape[0], start=torch.tensor(starts))
    n = x.shape[1] - steps
    out = [decoder.prefill(x[:, :n], cache)]
    out += [decoder.step(x[:, t], cache) for t in range(n, x.shape[1])]
    return out


ARCHS = {"llama-gqa": dict(n_embd=64, n_head=4, n_kv_head=2, vocab_size=96),
         # SwiGLU's up rows start at row 40 of its blocks: mid-panel (panels of 16 rows); down's rows of
         # 40 are not whole blocks (float)
         "hidden-40": dict(n_embd=64, n_head=4, mlp_hidden=40, vocab_size=96),
         "gpt2": dict(n_embd=64, n_head=4, positions="learned", norm="layernorm", activation="gelu", bias=True,
                      tie_embeddings=False, vocab_size=96)}


@pytest.mark.parametrize("arch,bits,group,embeddings",
                         [(a, *f) for a in ("llama-gqa", "gpt2") for f in [(8, 32, False), (4, 32, True), (4, 64, False),
                                                                          (8, 0, True)]]
                         + [("hidden-40", 8, 0, True)])  # int8 rows of 40: a group of 40 is no multiple of 32
def test_the_step_on_blocks_is_the_float_step_up_to_activation_rounding(arch, bits, group, embeddings):
    """A ragged batch of three (left padding 0, 5, 2), 8 steps: the step on the blocks against the
    float C++ step on the dequantized weights. Rounding activations to 8 bits (error up to 1/254 of
    each 32-value block's largest value, random in sign) moves these logits by 0.1-0.5% of each
    row's range (measured; a wrong block layout moves them by the whole range); the bound is 3%,
    and the two never agree exactly (the blocks are really read). The thread count changes no bit.
    Across instruction sets the logits agree to 1% of their range: the block products are exact
    integer sums on every one (test_every_kernel_gives_the_exact_block_products), but the
    forced-AVX2 library is its own build whose norms and sums run 8 lanes wide
    (test_decode_native), and a last-bit difference there can flip an activation's 8-bit rounding."""
    model = quantized_model(bits, group, embeddings, **ARCHS[arch])
    g = torch.Generator().manual_seed(5)
    starts = [0, 5, 2]
    x = torch.randint(0, 96, (3, 16), generator=g)
    with torch.inference_mode():
        fast = NativeDecoder(model)
        assert fast.packed and int(fast.formats.count_nonzero()) == (3 if arch == "hidden-40" else 4) * 2 + 2 * embeddings
        got = ragged(fast, model, x, starts, 8)
        ref = ragged(NativeDecoder(model, packed=False), model, x, starts, 8)
        for a, b in zip(got[1:], ref[1:]):
            spread = b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)
            assert ((a - b).abs() <= 0.03 * spread).all()
            assert not torch.equal(a, b)
        for threads in (1, 3):
            other = ragged(NativeDecoder(model, threads=threads), model, x, starts, 8)
            assert all(torch.equal(a, b) for a, b in zip(other, got)), threads
        for isa in RUNNABLE:
            other = ragged(NativeDecoder(model, isa=isa), model, x, starts, 8)
            for a, b in zip(other, got):
                spread = b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)
                assert ((a - b).abs() <= 0.01 * spread).all(), isa


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_run_decodes_on_its_blocks(bits, run_dir, tmp_path, capsys):
    """slm quantize's run (a small trained model), read by load_run: the default decoder reads the
    blocks (no float copy of them is passed to C++), and its greedy tokens on a ragged batch are
    those of the reference decoding the float32 values the blocks stand for. A changed weight makes
    its blocks stale (float path); blocks of a group it cannot read fall back with one note."""
    quantize_run(run_dir, tmp_path / "q", QuantConfig(bits, 32))
    model, tok, _ = load_run(tmp_path / "q")
    assert pick(model) is NativeDecoder
    prompts = [tok.encode(p) for p in ("Once upon a time", "The dog", "She")]
    cfg = SamplingConfig(max_new_tokens=16, **GREEDY)
    ours = generate_tokens(model, prompts, cfg, path="cpp")
    assert ours == generate_tokens(model, prompts, cfg, path="cached") and len({t for row in ours for t in row}) > 1
    dec = NativeDecoder(model)
    assert dec.packed and all(t.dtype == torch.uint8 for t, f in zip(dec.tensors, dec.formats) if f)
    blocks = packed_weight(model.blocks[0].attn.qkv).blocks
    panels = dec.tensors[8 + 2]  # decode.cpp's w: 8 global tensors, then layer 0's norm1 w, b, qkv
    assert panels.dtype == torch.uint8 and panels.numel() == blocks.numel()  # regrouped bytes, no float copy
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1.0)  # an in-place change: the blocks no longer vouch for it
    assert packed_weight(model.blocks[0].attn.qkv) is None
    assert int(NativeDecoder(model).formats.count_nonzero()) == 4 * model.config.n_layer - 1
    out = generate_tokens(model, [[1, 2]], SamplingConfig(max_new_tokens=4, **GREEDY), path="cpp")
    assert len(out[0]) == 4
    odd = noisy_model(1, n_embd=48, n_head=4, vocab_size=61)  # rows of 48: not whole blocks of 32
    quantize_model(odd, QuantConfig(8, 0))  # one block per row: only down's rows (128) are read as blocks
    capsys.readouterr()
    native._packed_notes.clear()
    assert [int(NativeDecoder(odd).formats.count_nonzero()) for _ in range(2)] == [2, 2]
    assert capsys.readouterr().err.count("note: the C++ decoder computes on int8/int4 blocks") == 1
