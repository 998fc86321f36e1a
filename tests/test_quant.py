"""slmkit.quant and ``slm quantize``: int8/int4 blocks bit for bit as the gguf package (llama.cpp's
own Python quantizer) encodes q8_0/q4_0, the other group sizes within half a step, quantized runs
that every reader loads, and bad quantization files refused in one line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from slmkit.checkpoint import load_run
from slmkit.errors import SlmError
from slmkit.files import sha256_file
from slmkit.quant import QuantConfig, block_bytes, dequantize_blocks, quantize_blocks, quantize_weights

from export_models import LLAMA, one_error_line, random_model, slm

gguf = pytest.importorskip("gguf")


def awkward_matrix() -> torch.Tensor:
    """Random rows of very different scales, plus the cases rounding rules differ on: a zero block,
    exact halves, a block whose largest magnitude appears with both signs, tiny values."""
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 4
    w[0, :32] = 0
    w[1, :32] = torch.tensor([0.5, -0.5, 1.5, -2.5] * 8) * (127 / 2.5)  # q8_0 steps of exactly 1 (halves)
    w[2, :32] = torch.linspace(-1, 1, 32)  # -1 and 1: the first largest magnitude decides q4_0's sign
    w[3] *= 1e-30
    return w


@pytest.mark.parametrize("bits,qtype", [(8, "Q8_0"), (4, "Q4_0")])
def test_group_32_blocks_are_ggufs_bytes(bits, qtype):
    w = awkward_matrix()
    t = getattr(gguf.GGMLQuantizationType, qtype)
    ours = quantize_blocks(w, bits, 32)
    theirs = gguf.quants.quantize(w.numpy(), t)
    assert ours.dtype == torch.uint8 and np.array_equal(ours.numpy(), theirs)
    assert np.array_equal(dequantize_blocks(ours, bits, 32, 256).numpy(), gguf.quants.dequantize(theirs, t))


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 128), (4, 64), (4, 128)])
def test_other_groups_round_to_the_nearest_step(bits, group):
    w = awkward_matrix()
    packed = quantize_blocks(w, bits, group)
    g = group or 256
    assert packed.shape == (48, 256 // g * block_bytes(bits, g))
    back = dequantize_blocks(packed, bits, group, 256).reshape(48, -1, g)
    blocks = w.reshape(48, -1, g)
    qmax = 127 if bits == 8 else 8
    step = blocks.abs().amax(-1, keepdim=True) / qmax
    err = (blocks - back).abs()
    # half a step, plus the float16 scale's rounding: relative 2^-11, or absolute 2^-25 (half the
    # smallest float16) times qmax where the scale is too small for float16 (the 1e-30 row). int4's
    # levels are -8..7 steps with -8 at the largest magnitude, so values of the other sign near it
    # clamp at 7 steps: up to a whole step off (q4_0's known asymmetry).
    half = (blocks * blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)) >= 0) | (bits == 8) | (err < step * 0.5)
    bound = torch.where(half, 0.5, 1.0)
    assert bool((err <= step * (bound + qmax * 2**-11) + qmax * 2**-25).all())
    assert float(err.max()) > 0


def test_a_quantized_run_is_smaller_loads_everywhere_and_exports_the_same_gguf_blocks(run_dir, corpus_file, tmp_path, capsys):
    from slmkit.export.gguf import export_gguf

    original, tok, _ = load_run(run_dir)
    for bits, name in ((8, "Q8_0"), (4, "Q4_0")):
        out = tmp_path / f"q{bits}"
        assert slm("quantize", run_dir, "--out", out, "--bits", bits, "--embeddings") == 0
        assert f"int{bits} (groups of 32, embeddings too)" in capsys.readouterr().out
        model, tok2, info = load_run(out)
        assert info["quantized_from"] == str(run_dir.resolve()) and tok2.vocab_size == tok.vocab_size
        size = (out / "best" / "model.safetensors").stat().st_size
        assert size < (0.36 if bits == 8 else 0.25) * (run_dir / "best" / "model.safetensors").stat().st_size
        w = original.blocks[1].mlp.down.weight.detach()
        want = dequantize_blocks(quantize_blocks(w, bits, 32), bits, 32, w.shape[1])
        assert torch.equal(model.blocks[1].mlp.down.weight.detach(), want)
        # The same blocks in GGUF: exporting the quantized run as q8_0/q4_0 re-encodes its values exactly.
        path = export_gguf(model, tok2, tmp_path / f"q{bits}.gguf", name.lower())
        stored = {t.name: np.asarray(t.data).reshape(-1) for t in gguf.GGUFReader(str(path)).tensors}
        packed = quantize_blocks(w, bits, 32).numpy().reshape(-1)
        assert np.array_equal(stored["blk.1.ffn_down.weight"], packed)
    # slm eval and slm generate run it like any run (the weights are float32 once read)
    assert slm("eval", tmp_path / "q8", "--input", corpus_file, "--json") == 0
    q8_bpb = json.loads(capsys.readouterr().out)["bpb"]
    assert slm("eval", run_dir, "--input", corpus_file, "--json") == 0
    assert abs(q8_bpb / json.loads(capsys.readouterr().out)["bpb"] - 1) < 0.01
    assert slm("generate", tmp_path / "q8", "--prompt", "Once", "--max-new-tokens", 5, "--seed", 1) == 0
    # Refusals: one line each
    one_error_line(capsys, slm("quantize", run_dir, "--out", tmp_path / "g", "--bits", 4, "--group", 0), "quantize.group=0")
    one_error_line(capsys, slm("quantize", run_dir, "--out", tmp_path / "g", "--group", 64), "in groups of 64")
    one_error_line(capsys, slm("quantize", tmp_path / "q8", "--out", tmp_path / "g"), "already quantized")
    assert not (tmp_path / "g").exists()


def rewrite(ckpt, name: str, text: str) -> None:
    """Replace a checkpoint file and its manifest entry (so only our own checks can catch it)."""
    (ckpt / name).write_text(text)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(ckpt / name)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_bad_quantization_json_is_one_line(run_dir, tmp_path):
    assert slm("quantize", run_dir, "--out", tmp_path / "q", "--bits", 8) == 0
    ckpt_dirs = [tmp_path / "q" / n for n in ("best", "last")]
    meta = json.loads((ckpt_dirs[0] / "quantization.json").read_text())
    name = "blocks.0.attn.qkv.weight"
    cases = [
        (dict(meta, format="other"), "not slmkit's"),
        (dict(meta, bits=3), "quantize.bits=3"),
        (dict(meta, tensors={**meta["tensors"], name: [96, 64]}), "not the blocks of a 96x64 matrix"),
        (dict(meta, tensors={**meta["tensors"], name: [96, 1 << 40]}), "not the blocks"),
        (dict(meta, tensors={**meta["tensors"], "nope.weight": [4, 32]}), "nope.weight is not a packed"),
        (dict(meta, tensors={**meta["tensors"], name: "x"}), "is not a packed"),
    ]
    for bad, pattern in cases:
        for ckpt in ckpt_dirs:
            rewrite(ckpt, "quantization.json", json.dumps(bad))
        with pytest.raises(SlmError, match=pattern) as e:
            load_run(tmp_path / "q")
        assert "\n" not in str(e.value)


def test_quantize_weights_packs_only_the_matrices():
    model = random_model(300, **LLAMA, tie_embeddings=False)
    sd, meta = quantize_weights(model, QuantConfig(bits=4, group=32))
    assert sorted(meta["tensors"]) == sorted(f"blocks.{i}.{m}.weight" for i in range(2)
                                             for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"))
    assert sd["tok_emb.weight"].dtype == sd["lm_head.weight"].dtype == sd["norm.weight"].dtype == torch.float32
    _, meta = quantize_weights(model, QuantConfig(bits=8, group=0, embeddings=True))
    assert {"tok_emb.weight", "lm_head.weight"} <= set(meta["tensors"]) and meta["group"] == 0


# ------------------------------------------------------------- activation-aware scales (--calibrate)

AWQ_VARIANTS = {
    "llama-mha-bias": dict(**LLAMA, bias=True, tie_embeddings=False),
    "llama-gqa": dict(**LLAMA, n_kv_head=2),
    "gpt2-layernorm-bias": dict(norm="layernorm", positions="learned", activation="gelu", bias=True),
}


def salient_model(**kw):
    """A random model (n_embd 64) whose norms make 4 of the 64 channels 8x larger than the rest: the
    outlier input channels activation-aware scaling is for (trained models grow them too)."""
    model = random_model(300, **{"n_embd": 64, **kw})
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[[3, 17, 40, 58]] *= 8
    return model


@pytest.mark.parametrize("variant", AWQ_VARIANTS)
def test_awq_folds_keep_the_float_model_and_cut_int4_error(variant):
    from slmkit.quant import apply_awq

    model = salient_model(**AWQ_VARIANTS[variant])
    calib = torch.randint(0, 300, (32, 32), generator=torch.Generator().manual_seed(1))
    held = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(4, 32, calibrate=32)
    clipped = copy.deepcopy(model)
    with torch.no_grad():
        want = model(held)[0]
        plain, _ = quantize_weights(model, cfg)
        chosen = apply_awq(model, calib, cfg, clip=False)
        # the folds are exact: the float model computes what it did (to float32 rounding)
        torch.testing.assert_close(model(held)[0], want, rtol=0, atol=1e-4)
        scaled, meta = quantize_weights(model, cfg)
        apply_awq(clipped, calib, cfg)  # scales, then each block's clipping: the float model moves
        scaled_clipped, _ = quantize_weights(clipped, cfg)
    assert meta["calibrate"] == 32
    assert max(chosen.values()) > 0  # some linear took scales: the test below measures them
    # GQA: attention's output has no per-channel fold (V channels feed several heads); GELU: no down fold
    assert ("blocks.0.attn.proj" in chosen) == (variant != "llama-gqa")
    assert ("blocks.0.mlp.down" in chosen) == variant.startswith("llama")

    def int4_error(weights):
        from slmkit.checkpoint import build_model
        from slmkit.config import to_dict
        from slmkit.quant import dequantize_weights

        m = build_model(to_dict(model.config), dequantize_weights(weights, meta, "test"))
        with torch.no_grad():
            return float(((m.eval()(held)[0] - want) ** 2).mean())

    errors = [int4_error(w) for w in (plain, scaled, scaled_clipped)]
    assert errors[1] < 0.8 * errors[0] and errors[2] < errors[0], errors


def test_quantize_calibrate_cli(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "q4a"
    assert slm("quantize", run_dir, "--out", out, "--bits", "4", "--calibrate", "16", "--data", data_dir) == 0
    assert "activation-aware scales from 16 sequences" in capsys.readouterr().out
    meta = json.loads((out / "last" / "quantization.json").read_text())
    assert meta["calibrate"] == 16 and meta["bits"] == 4
    model, _, _ = load_run(out)
    original, tok, _ = load_run(run_dir)
    assert model.config == original.config  # the same plain model shape: every reader loads it
    ids = torch.tensor([[tok.eot_id, *tok.encode("Once upon a time")]])
    with torch.no_grad():
        assert (model(ids)[0] - original(ids)[0]).abs().max() < 0.25 * original(ids)[0].abs().max()
    one_error_line(capsys, slm("quantize", run_dir, "--out", tmp_path / "x", "--bits", "4", "--calibrate", "16"),
                   "--calibrate needs --data DATA_DIR")
    one_error_line(capsys, slm("quantize", run_dir, "--out", tmp_path / "x", "--data", data_dir), "--data is read only for --calibrate")
    one_error_line(capsys, slm("quantize", run_dir, "--out", tmp_path / "x", "--calibrate", "-1", "--data", data_dir),
                   "quantize.calibrate=-1")
    assert not (tmp_path / "x").exists()


def test_a_bf16_run_is_half_the_size_and_decodes_on_bf16_by_default(run_dir, corpus_file, tmp_path, capsys):
    """``slm quantize --bits 16``: every matrix (embeddings and head too) stored as bf16, read back as
    float32 holding exactly the rounded values; the C++ decoder then reads them as bf16 by default
    (half the bytes) with the same logits as reading them as float32; eval and generate run it."""
    from slmkit.decode import NativeDecoder, make_decoder
    from slmkit.decode.native import library_why_not

    original, _, _ = load_run(run_dir)
    out = tmp_path / "b16"
    assert slm("quantize", run_dir, "--out", out, "--bits", 16) == 0
    assert "to bf16 (every matrix" in capsys.readouterr().out
    model, _, info = load_run(out)
    assert info["quantized_from"] == str(run_dir.resolve())
    # the position embedding and norms stay float32; the rest of model.safetensors halves
    size = (out / "best" / "model.safetensors").stat().st_size
    assert size < 0.56 * (run_dir / "best" / "model.safetensors").stat().st_size
    for name in ("tok_emb.weight", "blocks.1.mlp.down.weight"):
        w = original.get_parameter(name).detach()
        assert torch.equal(model.get_parameter(name).detach(), w.to(torch.bfloat16).float())
    assert torch.equal(model.blocks[0].norm1.weight, original.blocks[0].norm1.weight)
    if library_why_not() is None:
        decoder = make_decoder(model)  # bf16, with bf16 products (vdpbf16ps) where the CPU has them
        assert isinstance(decoder, NativeDecoder) and decoder.weights in ("bf16", "bf16-dot")
        fp32 = NativeDecoder(model, weights="fp32")
        assert decoder.weight_bytes() * 2 == fp32.weight_bytes()
        from slmkit.decode import KVCache

        x = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
        got = []
        for d in (NativeDecoder(model, weights="bf16"), fp32):
            cache = KVCache.empty(model.config, 2)
            with torch.inference_mode():
                d.prefill(x[:, :6], cache)
                got.append(torch.stack([d.step(x[:, t], cache) for t in range(6, 10)]))
        assert torch.equal(got[0], got[1])  # bf16 values read as bf16: nothing lost
    assert slm("eval", out, "--input", corpus_file, "--json") == 0
    b16_bpb = json.loads(capsys.readouterr().out)["bpb"]
    assert slm("eval", run_dir, "--input", corpus_file, "--json") == 0
    assert abs(b16_bpb / json.loads(capsys.readouterr().out)["bpb"] - 1) < 0.002
    assert slm("generate", out, "--prompt", "Once", "--max-new-tokens", 5, "--seed", 1) == 0
    one_error_line(capsys, slm("quantize", run_dir, "--out", tmp_path / "g", "--bits", 16, "--calibrate", 8),
                   "not to bf16")
    assert not (tmp_path / "g").exists()
