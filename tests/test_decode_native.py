"""The C++ decoder (decode/native.py, csrc/decode.cpp) beyond the shared parity test in
test_decode.py: every instruction set this CPU runs (AVX2 forced on an AVX-512 machine, the scalar
fallback) against model.forward on a ragged batch with widths that leave vector tails; the thread
count, the instruction set and the batch a row is stepped in change no bit; bf16 weight matrices
give the logits of the model rounded to bf16 in half the bytes; a bf16 KV cache, at head sizes of
each attention path, gives those of the model over a bf16 cache; greedy generation past the context
equals the uncached loop; bad ids, unknown instruction sets or weight formats and a missing library
(one note, the NumPy path) are handled."""

from __future__ import annotations

import pytest
import torch

from slmkit import cpu_kernels
from slmkit.decode import CPUDecoder, KVCache, NativeBF16Decoder, NativeDecoder, pick
from slmkit.decode import native
from slmkit.generate import SamplingConfig, generate_tokens

from generation_models import GREEDY, noisy_model, one_thread, random_model  # noqa: F401 (one_thread: a fixture)

pytestmark = pytest.mark.skipif(cpu_kernels.built() is not None, reason=f"no C++ library: {cpu_kernels.built()}")

ORDER = ["scalar", "avx2", "avx512"]
RUNNABLE = ORDER[: ORDER.index(native.best_isa()) + 1] if cpu_kernels.built() is None else []
# Width 36 (not a multiple of 8 or 16: the products' masked tails), head size 6, two kv heads.
ODD = [dict(n_embd=36, n_head=6, n_kv_head=2), dict(n_embd=36, n_head=6, positions="learned", norm="layernorm",
                                                     activation="gelu", bias=True, tie_embeddings=False)]


def ragged_steps(decoder: NativeDecoder, model, x: torch.Tensor, starts: list[int], steps: int,
                 dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], KVCache]:
    """Prefill a left-padded batch (row b starts at slot starts[b]) and step ``steps`` tokens."""
    cache = KVCache.empty(model.config, x.shape[0], start=torch.tensor(starts), dtype=dtype)
    n = x.shape[1] - steps
    out = [decoder.prefill(x[:, :n], cache)]
    for t in range(n, x.shape[1]):
        out.append(decoder.step(x[:, t], cache))
    return out, cache


def ragged_batch() -> tuple[list[torch.Tensor], list[int], torch.Tensor]:
    """Three rows of 16, 11 and 14 tokens, left-padded by 0, 5 and 2 slots into one (3, 16) batch."""
    g = torch.Generator().manual_seed(5)
    lengths, starts = [16, 11, 14], [0, 5, 2]
    rows = [torch.randint(0, 61, (n,), generator=g) for n in lengths]
    x = torch.stack([torch.cat([torch.zeros(s, dtype=torch.long), r]) for s, r in zip(starts, rows)])
    return rows, starts, x


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("kw", ODD, ids=["llama-gqa", "gpt2"])
def test_every_instruction_set_gives_the_logits_of_model_forward(kw, isa):
    """Three rows, left-padded by 0, 5 and 2 slots, 8 steps each: every row's logits are those of
    the model run on that row alone, whatever the instruction set of the products."""
    model = noisy_model(2, **kw)
    rows, starts, x = ragged_batch()
    with torch.inference_mode():
        got, _ = ragged_steps(NativeDecoder(model, isa=isa), model, x, starts, 8)
        for b, row in enumerate(rows):
            full = model(row[None])[0][0]
            expected = full[-9:]  # the prefill's last position, then the 8 steps
            torch.testing.assert_close(torch.stack([g[b] for g in got]), expected, rtol=1e-4, atol=1e-4)


def test_rows_batch_change_no_bit_and_instruction_sets_agree():
    """Every output is one chain of multiply-adds over the input, whatever the tile: a row stepped
    alone, or as row 7 of a batch of 9 (past a whole register tile of rows: 6 with AVX-512, 3 with
    AVX2), gets the same bits on every instruction set (fp32 and bf16 weights). Across instruction
    sets the logits agree to rounding, not to the bit: the forced-AVX2 library is a separate build
    (cpu_kernels.ISA_FLAGS) whose norms and sums run 8 lanes wide instead of 16."""
    model = noisy_model(8, n_embd=64, n_head=4, n_kv_head=2, vocab_size=200)
    x = torch.randint(0, 200, (9, 12), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        for weights in ("fp32", "bf16"):
            first = None
            for isa in RUNNABLE:
                batch = ragged_steps(NativeDecoder(model, isa=isa, weights=weights), model, x, [0] * 9, 4)[0]
                alone = ragged_steps(NativeDecoder(model, isa=isa, weights=weights), model, x[6:7], [0], 4)[0]
                assert all(torch.equal(a[0], b[6]) for a, b in zip(alone[1:], batch[1:]))
                first = first or batch
                for a, b in zip(batch, first):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("kw", ODD, ids=["llama-gqa", "gpt2"])
def test_bf16_weights_give_the_logits_of_the_rounded_model_in_half_the_bytes(kw):
    """weights="bf16": the logits of model.forward with the weight matrices rounded to bf16
    (prefill and steps, every instruction set), not those of the float32 model; the packed
    matrices take half the bytes of the float32 ones."""
    model = noisy_model(2, **kw)
    rounded = NativeBF16Decoder.reproduces(model)
    x = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want, exact = rounded(x)[0][:, -7:], model(x)[0][:, -7:]
        for isa in RUNNABLE:
            got = torch.stack(ragged_steps(NativeDecoder(model, isa=isa, weights="bf16"), model, x, [0, 0], 6)[0], 1)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - exact).abs().max() > 1e-3  # the rounding shows
    assert 2 * NativeBF16Decoder(model).weight_bytes() == NativeDecoder(model).weight_bytes()
    assert generate_tokens(model, [[3, 4, 5]], SamplingConfig(max_new_tokens=8, **GREEDY), path="cpp-bf16") == \
        generate_tokens(rounded, [[3, 4, 5]], SamplingConfig(max_new_tokens=8, **GREEDY), path="cached")


def test_packed_weights_are_kept_per_model_until_they_change():
    """Decoders of one model share its packed matrices (a generation does not pack them again);
    after an in-place change of a weight a new decoder packs the new values; a dropped model
    takes its packs with it."""
    import gc
    import weakref

    model = random_model(9)
    a, b = NativeDecoder(model), NativeDecoder(model)
    assert a.tensors is b.tensors and NativeDecoder(model, weights="bf16").tensors is not a.tensors
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    c = NativeDecoder(model)
    assert c.tensors is not a.tensors
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        cache = KVCache.empty(model.config, 1)
        c.prefill(x[:, :3], cache)
        torch.testing.assert_close(c.step(x[:, 3], cache), model(x)[0][:, -1], rtol=1e-4, atol=1e-4)
    gone = weakref.ref(model)
    del model, a, b, c
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("weights", ["fp32", "bf16", "bf16-dot", "int8"])
def test_rows_that_need_no_logits_skip_the_head_and_the_others_keep_their_bits(weights):
    """``need``: the rows marked get the logits of the step without it, bit for bit (float or bf16
    panels, vdpbf16ps, int8 blocks whose activations are quantized per row), at 1 and 2 threads; the
    unmarked rows get zeros; every row's keys and values are stored alike (the next steps agree)."""
    model = noisy_model(3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=200)
    if weights == "int8":
        from slmkit.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(8, 32, True))  # the head too (tied: the embedding's blocks)
    fmt = "fp32" if weights == "int8" else weights
    if weights == "bf16-dot" and not native.has_bf16_dot():
        pytest.skip("no AVX512-BF16 on this CPU")
    x = torch.randint(0, 200, (9, 12), generator=torch.Generator().manual_seed(3))
    starts = [0, 2, 0, 5, 1, 0, 0, 3, 0]
    g = torch.Generator().manual_seed(4)
    needs = [torch.rand(9, generator=g) < 0.5 for _ in range(5)] + [torch.zeros(9, dtype=torch.bool)]
    with torch.inference_mode():
        for threads in (1, 2):
            decoder = NativeDecoder(model, threads=threads, weights=fmt)
            assert decoder.packed == (weights == "int8")
            plain, skipping = (KVCache.empty(model.config, 9, start=torch.tensor(starts)) for _ in range(2))
            decoder.prefill(x[:, :6], plain)
            decoder.prefill(x[:, :6], skipping)
            for t, need in zip(range(6, 12), needs):
                want, got = decoder.step(x[:, t], plain), decoder.step(x[:, t], skipping, need)
                assert torch.equal(got[need], want[need]) and not got[~need].any()
                assert torch.equal(skipping.k, plain.k) and torch.equal(skipping.v, plain.v)


@pytest.mark.parametrize("weights", ["fp32", "bf16-dot", "int8"])
def test_holes_are_not_run_and_the_other_rows_keep_their_bits(weights):
    """``holes``: the other rows get the logits, keys and values of the step that runs every row,
    bit for bit, step after step (with ``need`` too, at 1 and 2 threads, in buffers with room); a
    hole's logits are zeros and its slots are never written."""
    model = noisy_model(3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=200)
    if weights == "int8":
        from slmkit.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(8, 32, True))
    fmt = "fp32" if weights == "int8" else weights
    if weights == "bf16-dot" and not native.has_bf16_dot():
        pytest.skip("no AVX512-BF16 on this CPU")
    x = torch.randint(0, 200, (9, 12), generator=torch.Generator().manual_seed(5))
    starts = torch.tensor([0, 2, 0, 5, 1, 0, 0, 3, 0])
    holes = torch.tensor([False, True, False, False, True, True, False, False, True])
    need = torch.tensor([True, True, False, True, True, False, True, True, True])
    with torch.inference_mode():
        for threads in (1, 2):
            decoder = NativeDecoder(model, threads=threads, weights=fmt)
            plain = KVCache.empty(model.config, 9, start=starts)
            decoder.prefill(x[:, :6], plain)
            # the first 9 rows of buffers of 12, as a continuous batch keeps them
            k, v = (torch.zeros(t.size(0), 12, *t.shape[2:]) for t in (plain.k, plain.v))
            k[:, :9], v[:, :9] = plain.k, plain.v
            holey = KVCache(k[:, :9], v[:, :9], starts.clone(), plain.length, padded=True)
            assert holey.buffer_rows() == 12
            for t in range(6, 12):
                want = decoder.step(x[:, t], plain, need)
                got = decoder.step(x[:, t], holey, need, holes=holes)
                assert torch.equal(got[~holes], want[~holes]) and not got[holes].any()
            run = ~holes
            assert torch.equal(holey.k[:, run], plain.k[:, run]) and torch.equal(holey.v[:, run], plain.v[:, run])
            assert not holey.k[:, holes, :, 6:].any() and not holey.v[:, holes, :, 6:].any()


@pytest.mark.parametrize("weights", ["fp32", "bf16-dot", "int8"])
@pytest.mark.parametrize("kw", [dict(), dict(positions="learned", norm="layernorm", activation="gelu", bias=True)],
                         ids=["llama", "gpt2"])
def test_extra_tokens_in_one_step_are_the_tokens_one_a_step(weights, kw):
    """``extra``: a row fed several tokens in one step (into the slots before its new one) gets the
    keys, values and logits of feeding them one a step, bit for bit, beside rows stepping one token
    (theirs unchanged) and a hole, at 1 and 2 threads, with a bf16 or float32 cache."""
    model = noisy_model(3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=200, **kw)
    if weights == "int8":
        from slmkit.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(8, 32, True))
    if weights == "bf16-dot" and not native.has_bf16_dot():
        pytest.skip("no AVX512-BF16 on this CPU")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 200, (4, 13), generator=g)
    prompt = torch.randint(0, 200, (7,), generator=g)  # row 1: a prefix of 2, then 5 tokens in one step
    with torch.inference_mode():
        for threads, dtype in ((1, torch.float32), (2, torch.bfloat16)):
            decoder = NativeDecoder(model, threads=threads, weights="fp32" if weights == "int8" else weights)
            alone = KVCache.empty(model.config, 1, dtype=dtype)  # row 1's tokens one a step
            steps = [decoder.step(prompt[t : t + 1], alone) for t in range(7)]
            batch = KVCache.empty(model.config, 4, start=torch.tensor([0, 6, 0, 12]), dtype=dtype, max_len=32)
            decoder.prefill(x[:, :12], batch)  # rows 0 and 2: 12 tokens; row 1 from slot 6: its own below
            # row 1: a cached prefix of 2 tokens in slots 6, 7; its next 4 go to slots 8 .. 11 as extras
            batch.k[:, 1, :, 6:8], batch.v[:, 1, :, 6:8] = alone.k[:, 0, :, :2], alone.v[:, 0, :, :2]
            twin = KVCache(batch.k.clone(), batch.v.clone(), batch.start.clone(), 12, padded=True)
            ids = torch.stack([x[0, 12], prompt[6], x[2, 12], x[3, 12]])
            holes = torch.tensor([False, False, False, True])
            got = decoder.step(ids, batch, holes=holes, extra={1: prompt[2:6].tolist()})
            assert torch.equal(got[1], steps[-1][0])
            assert torch.equal(batch.k[:, 1, :, 6:13], alone.k[:, 0, :, :7])  # its extras' slots and its own
            assert torch.equal(batch.v[:, 1, :, 6:13], alone.v[:, 0, :, :7])
            # the other rows: the bits of the same step without the extras (row 1 then steps its one token)
            want = decoder.step(ids, twin, holes=holes)
            keep = torch.tensor([True, False, True, False])
            assert torch.equal(got[keep], want[keep]) and not got[3].any()
            assert torch.equal(batch.k[:, keep], twin.k[:, keep]) and torch.equal(batch.v[:, keep], twin.v[:, keep])
            with pytest.raises(ValueError, match="do not fit"):  # an extra before the row's first slot
                decoder.step(ids, batch, extra={1: [1] * 8})
            with pytest.raises(IndexError, match="token ids"):
                decoder.step(ids, batch, extra={1: [200]})


@pytest.mark.parametrize("chunk", [256, 5])
def test_prefill_is_its_tokens_stepped_one_at_a_time(monkeypatch, chunk):
    """``prefill`` runs a left-padded batch's tokens through the C++ step (each row's as extra
    tokens, ``PREFILL_TOKENS`` a step): the logits, keys and values of stepping them one a step, bit
    for bit, with bf16 products and a bf16 cache too, and a second prefill after it."""
    monkeypatch.setattr(native, "PREFILL_TOKENS", chunk)
    model = noisy_model(4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=90)
    rows, starts, x = ragged_batch()
    for weights, dtype in (("fp32", torch.float32), (native.bf16_arithmetic(), torch.bfloat16)):
        real = lambda c, b, s, e: (c.k[:, b, :, s:e], c.v[:, b, :, s:e])  # noqa: E731 - a row's real slots
        decoder = NativeDecoder(model, weights=weights)
        with torch.inference_mode():
            filled = KVCache.empty(model.config, 3, start=torch.tensor(starts), dtype=dtype)
            got = decoder.prefill(x[:, :12], filled)
            stepped = KVCache.empty(model.config, 3, start=torch.tensor(starts), dtype=dtype)
            for t in range(12):
                want = decoder.step(x[:, t], stepped)
            assert torch.equal(got, want) and filled.length == stepped.length == 12
            # and on from there: a prefill after a prefill
            more = decoder.prefill(x[:, 12:15], filled)
            for t in range(12, 15):
                want = decoder.step(x[:, t], stepped)
            assert torch.equal(more, want) and filled.length == 15
            for b, s in enumerate(starts):
                assert all(torch.equal(f, g) for f, g in zip(real(filled, b, s, 15), real(stepped, b, s, 15)))
            with pytest.raises(ValueError, match="KV cache full"):
                decoder.prefill(x, KVCache.empty(model.config, 3, max_len=8))


def test_extra_tokens_of_many_rows_on_two_threads_see_their_rows_earlier_keys():
    """Several rows with many extra tokens, on 2 threads: a query attends only after every key and
    value of the step is stored (a row's later tokens, on the other thread, see its earlier ones),
    so every row's logits are those of its tokens one a step, every time."""
    model = noisy_model(3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=200, block_size=64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (25,), generator=g) for _ in range(4)]
    with torch.inference_mode():
        one = NativeDecoder(model, threads=1)
        solo = []
        for p in prompts:
            cache = KVCache.empty(model.config, 1, max_len=64)
            solo.append([one.step(p[t : t + 1], cache) for t in range(25)][-1][0])
        two = NativeDecoder(model, threads=2)
        for _ in range(20):
            cache = KVCache.empty(model.config, 4, max_len=64)
            cache.length = 24
            got = two.step(torch.stack([p[24] for p in prompts]), cache, extra={i: p[:24].tolist() for i, p in enumerate(prompts)})
            assert all(torch.equal(got[i], solo[i]) for i in range(4))
        with pytest.raises(ValueError, match="rows"):
            two.step(torch.stack([p[0] for p in prompts]), cache, extra={-1: [1]})


@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16-dot"])
def test_thread_count_changes_no_bit(weights):
    """Each product is split by output rows and attention by (row, kv head), and each value is
    computed in one fixed order: 13 ragged rows (a prefill, steps, then steps with extra tokens and
    holes: three short riders, then one row with most of the step's queries) get the same logits,
    keys and values on 1, 2, 3 and 8 threads: float32 weights and cache, int8 blocks, and the
    server's default (vdpbf16ps products, a bf16 cache)."""
    if weights == "bf16-dot" and not native.has_bf16_dot():
        pytest.skip("no AVX512-BF16 on this CPU")
    model = noisy_model(3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=200, block_size=64)
    if weights == "int8":
        from slmkit.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(8, 32, True))
    dtype = torch.bfloat16 if weights == "bf16-dot" else torch.float32
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 200, (13, 20), generator=g)
    starts = [0, 3, 1, 7, 0, 2, 0, 5, 0, 1, 4, 0, 6]
    ids = torch.randint(0, 200, (3, 13), generator=g)
    holes = torch.zeros(13, dtype=torch.bool)
    holes[[2, 11]] = True
    riders = [{1: ids[0, :3].tolist(), 6: ids[1, :4].tolist(), 12: ids[2, :2].tolist()},  # even groups
              {4: torch.randint(0, 200, (30,), generator=g).tolist()}]  # one row has most queries
    def decoder(threads: int, rest: bool = False) -> NativeDecoder:
        d = NativeDecoder(model, threads=threads, weights="bf16-dot" if weights == "bf16-dot" else "fp32")
        assert d.packed == (weights == "int8")  # an int8 model decodes on its blocks
        d.rest = rest  # the pool's threads sleep after every step (slm serve): no bit changes either
        return d

    def run(d: NativeDecoder) -> tuple[list[torch.Tensor], KVCache]:
        logits, cache = ragged_steps(d, model, x, starts, 10, dtype)
        for extra in riders:
            cache.length += max(map(len, extra.values()))  # the riders' slots (other rows: holes in them)
            logits.append(d.step(ids[0], cache, holes=holes, extra=extra))
        return logits, cache

    with torch.inference_mode():
        runs = [run(decoder(t)) for t in (1, 2, 3, 8)]
        runs.append(run(decoder(2, rest=True)))
    for logits, cache in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(logits, runs[0][0]))
        assert torch.equal(cache.k, runs[0][1].k) and torch.equal(cache.v, runs[0][1].v)


@pytest.mark.parametrize("isa", RUNNABLE)
def test_attention_over_many_key_blocks_and_wide_heads_is_model_forward(isa):
    """Attention scores keys a vector's width (8 or 16) at a time and sums the values 4 vectors of
    the head at a time: head size 72 (4 vectors and a tail of 8 with AVX-512; 4 + 4 + 1 with AVX2),
    two query heads per kv head, rows of 70 to 19 real keys (whole blocks and a partial one, left
    padding) against model.forward; a row alone, in the batch and on 3 threads gets the same bits."""
    model = noisy_model(11, n_embd=144, n_head=2, n_kv_head=1, n_layer=1, block_size=80, vocab_size=50)
    x = torch.randint(0, 50, (3, 70), generator=torch.Generator().manual_seed(12))
    starts = [0, 51, 30]
    with torch.inference_mode():
        batch, _ = ragged_steps(NativeDecoder(model, isa=isa, threads=1), model, x, starts, 4)
        alone, _ = ragged_steps(NativeDecoder(model, isa=isa, threads=3), model, x[1:2, 51:], [0], 4)
        for b, s in enumerate(starts):
            expected = model(x[b:b + 1, s:])[0][0, -5:]
            # the whole sequence (prefill too) in C++ against PyTorch: sums in another order, so
            # float32's rounding at the logits' scale (up to ~30 here)
            atol = 1e-5 * float(expected.abs().max())
            torch.testing.assert_close(torch.stack([g[b] for g in batch]), expected, rtol=1e-4, atol=atol)
        assert all(torch.equal(a[0], g[1]) for a, g in zip(alone, batch))


@pytest.mark.parametrize("kw", ODD, ids=["llama-gqa", "gpt2"])
def test_greedy_generation_past_the_context_is_the_reference(kw):
    """40 tokens past a 24-token context (the window slides, runners' rule): one prompt gives the
    tokens of re-running the model over its window; a ragged batch of three (whose rows slide
    together when the longest fills the context) those of the module path with the cache."""
    model = noisy_model(4, **kw)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 11, 1)]
    cfg = SamplingConfig(max_new_tokens=40, **GREEDY)  # 11 + 40 > 24: the window slides
    one = generate_tokens(model, prompts[1:2], cfg, path="cpp")
    assert one == generate_tokens(model, prompts[1:2], cfg, path="uncached") and len(set(one[0])) > 5
    assert generate_tokens(model, prompts, cfg, path="cpp") == generate_tokens(model, prompts, cfg, path="cached")


def test_bad_ids_and_instruction_sets_are_refused():
    model = random_model(5)
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        cache = KVCache.empty(model.config, 1)
        decoder.prefill(torch.tensor([[1, 2]]), cache)
        for bad in (-1, 61):
            with pytest.raises(IndexError, match="token ids"):
                decoder.step(torch.tensor([bad]), cache)
        assert cache.length == 2  # nothing written
    with pytest.raises(ValueError, match="unknown instruction set"):
        NativeDecoder(model, isa="sse9")
    with pytest.raises(ValueError, match="unknown weight format"):
        NativeDecoder(model, weights="fp8")


def test_without_the_library_the_numpy_decoder_runs_after_one_note(monkeypatch, capsys):
    monkeypatch.setattr(cpu_kernels, "built", lambda: "could not build slmkit's CPU kernels: no C++ compiler")
    monkeypatch.setattr(native, "_noted", False)
    model = random_model(6)
    assert "no C++ compiler" in NativeDecoder.why_not(model)
    assert pick(model) is CPUDecoder
    pick(model)
    err = capsys.readouterr().err
    assert err.count("note: slmkit's C++ decoder is off") == 1 and "no C++ compiler" in err


def test_a_model_of_bf16_values_is_read_as_bf16_with_the_same_bits():
    """``storage_format``: a model whose matrices hold bf16 values (``slm quantize --bits 16``) is
    read as bf16 by default, half the bytes ("bf16-dot" where the CPU has AVX512-BF16: the logits
    of ``reproduces``); as "bf16" its logits are bit for bit those of reading it as float32; one
    changed value makes it float32 again."""
    from slmkit.quant import QuantConfig, quantize_model

    model = noisy_model(2, **ODD[1])
    assert native.storage_format(model) == "fp32" and NativeDecoder(model).weights == "fp32"
    quantize_model(model, QuantConfig(bits=16))
    assert native.storage_format(model) == "bf16" and native.rounded(model, "bf16") is model
    x = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        default, fp32 = NativeDecoder(model), NativeDecoder(model, weights="fp32")
        assert default.weights == native.bf16_arithmetic() and 2 * default.weight_bytes() == fp32.weight_bytes()
        a = ragged_steps(NativeDecoder(model, weights="bf16"), model, x, [0, 4, 1], 6)[0]
        b = ragged_steps(fp32, model, x, [0, 4, 1], 6)[0]
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        got = torch.stack(ragged_steps(default, model, x[:1], [0], 6)[0], 1)[0]
        want = NativeDecoder.reproduces(model)(x[:1])[0][0, -7:]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
        model.blocks[1].mlp.down.weight[0, 0] += 1e-4
    assert native.storage_format(model) == "fp32" and NativeDecoder(model).weights == "fp32"


def test_half_weights_rounds_float_runs_only():
    """``half_weights`` (``slm serve --weights bf16``): a float32 model decodes in the CPU's bf16
    arithmetic; a model of bf16 values or with int8 blocks keeps NativeDecoder's default (None)."""
    from slmkit.quant import QuantConfig, quantize_model

    assert native.half_weights(noisy_model(2, **ODD[1])) == native.bf16_arithmetic()
    for bits in (16, 8):
        model = noisy_model(2, **ODD[1])
        quantize_model(model, QuantConfig(bits=bits, group=0))
        assert native.half_weights(model) is None


@pytest.mark.skipif(not RUNNABLE or native.bf16_arithmetic() != "bf16-dot",
                    reason="no AVX512-BF16 products here (the CPU, or SLMKIT_DECODE_ISA below avx512)")
@pytest.mark.parametrize("kw", ODD, ids=["llama-gqa", "gpt2"])
def test_bf16_dot_products_give_the_logits_of_the_model_with_bf16_inputs(kw):
    """weights="bf16-dot" (vdpbf16ps): the logits of the model with its matrices and the inputs of
    its products rounded to bf16 (``bf16_inputs``), much closer to that than to the model with only
    its matrices rounded; rows alone or in a batch of 9 and 1 or 3 threads give the same bits."""
    model = noisy_model(2, **kw)
    weights_only = native.rounded(model, "bf16")
    reference = native.bf16_inputs(weights_only)
    x = torch.randint(0, 61, (9, 14), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got = torch.stack(ragged_steps(NativeDecoder(model, weights="bf16-dot"), reference, x, [0] * 9, 6)[0], 1)
        want, plain = reference(x)[0][:, -7:], weights_only(x)[0][:, -7:]
        alone = ragged_steps(NativeDecoder(model, weights="bf16-dot", threads=3), reference, x[6:7], [0], 6)[0]
    steps = got[:, 1:]
    err, err_plain = (steps - want[:, 1:]).abs().max(), (steps - plain[:, 1:]).abs().max()
    print(f"bf16-dot: max error {float(err):.2e} vs bf16 inputs, {float(err_plain):.2e} vs float32 inputs, "
          f"logits up to {float(want.abs().max()):.1f}")
    assert err < 2e-3 * float(want.abs().max()) and err < err_plain / 4, (err, err_plain)
    assert all(torch.equal(a[0], got[6, i + 1]) for i, a in enumerate(alone[1:]))


def test_bf16_dot_falls_back_to_float_arithmetic_where_the_cpu_lacks_it(capsys):
    """Forced to AVX2 (or on a CPU without AVX512-BF16), "bf16-dot" runs as "bf16", after one note."""
    model = noisy_model(1, **ODD[0])
    d = NativeDecoder(model, isa="avx2" if "avx2" in RUNNABLE else "scalar", weights="bf16-dot")
    assert d.weights == "bf16"
    capsys.readouterr()
    native._packed_notes.discard("bf16-dot")
    NativeDecoder(model, isa="scalar", weights="bf16-dot")
    NativeDecoder(model, isa="scalar", weights="bf16-dot")
    assert capsys.readouterr().err.count("no AVX512-BF16") == 1


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("kw", ODD, ids=["llama-gqa", "gpt2"])
def test_bf16_kv_cache_gives_the_logits_of_the_model_over_a_bf16_cache(kw, isa):
    """A bf16 KV cache (keys and values rounded to bf16 when stored, widened when read), on a ragged
    batch, every instruction set (AVX2 forced included): the logits of model.forward run token by
    token over a bf16 ``KVCache`` (which stores the same rounding): most of them (the median) to
    1e-5, as the fp32 paths agree, and all to 1e-2 on logits of ~15-20. Not all to 1e-5: the two float32 paths
    differ in their last bits, so a key now and then rounds to the other bf16 neighbour (one bf16
    step, 2^-8 relative), and later tokens carry that on. The bf16 cache moves the logits from the
    fp32 cache's by 1e-1 and more (8 mantissa bits: ~4e-3 relative per value), which the last
    assert sees: the tolerances are 10-100x below the effect of the rounding itself."""
    model = noisy_model(2, **kw)
    rows, starts, x = ragged_batch()
    with torch.inference_mode():
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            cache = KVCache.empty(model.config, 3, start=torch.tensor(starts), dtype=dtype)
            d = NativeDecoder(model, isa=isa)
            out[dtype] = torch.stack([d.prefill(x[:, :8], cache)] + [d.step(x[:, t], cache) for t in range(8, 16)], 1)
            assert cache.k.dtype == dtype
        ref = KVCache.empty(model.config, 3, start=torch.tensor(starts), dtype=torch.bfloat16)
        want = torch.stack([model(x[:, :8], cache=ref)[0][:, -1]]
                           + [model(x[:, t : t + 1], cache=ref)[0][:, -1] for t in range(8, 16)], 1)
        fp32 = torch.stack([model(r[None])[0][0, -9:] for r in rows])
    off = (out[torch.bfloat16] - want).abs()
    assert float(off.max()) < 1e-2 and float(off.median()) < 1e-5
    torch.testing.assert_close(out[torch.float32], fp32, rtol=1e-4, atol=1e-4)  # the fp32 cache: unchanged
    assert (out[torch.bfloat16] - out[torch.float32]).abs().max() > 5e-2  # the rounding shows


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("head", [8, 16, 48, 80])
def test_bf16_kv_cache_at_head_sizes_of_whole_vectors_gives_the_logits_of_the_model(head, isa):
    """A bf16 cache whose head size is a multiple of the vector width (16 with AVX-512, 8 with
    AVX2) takes decode.cpp's word path: 32-bit words of two elements, keys in pairs where a key's
    words are not whole vectors (48 and 80 with AVX-512, 8 and 80 with AVX2; 16 with AVX-512: a
    pair per vector; 8 with AVX-512 takes the general code). Two query heads per kv head, four rows
    left-padded to 63-70, 12-19, 33-40 and 2-9 keys over 8 steps (whole blocks of keys and a last
    partial one, odd and even counts, a pair's partner past the last key): the logits of
    model.forward over a bf16 KVCache, to the tolerances of the test above; a row stepped alone on
    one thread gets the same bits as in the batch on two."""
    model = noisy_model(3, n_embd=2 * head, n_head=2, n_kv_head=1, n_layer=1, block_size=80, vocab_size=50)
    x = torch.randint(0, 50, (4, 70), generator=torch.Generator().manual_seed(8))
    starts = torch.tensor([0, 51, 30, 61])
    with torch.inference_mode():
        cache = KVCache.empty(model.config, 4, start=starts, dtype=torch.bfloat16)
        ref = KVCache.empty(model.config, 4, start=starts, dtype=torch.bfloat16)
        d = NativeDecoder(model, isa=isa, threads=2)
        d.prefill(x[:, :62], cache)
        model(x[:, :62], cache=ref)
        got = torch.stack([d.step(x[:, t], cache) for t in range(62, 70)], 1)
        want = torch.stack([model(x[:, t : t + 1], cache=ref)[0][:, -1] for t in range(62, 70)], 1)
        alone = KVCache.empty(model.config, 1, dtype=torch.bfloat16)
        one = NativeDecoder(model, isa=isa, threads=1)
        one.prefill(x[1:2, 51:62], alone)
        by_itself = torch.stack([one.step(x[1:2, t], alone) for t in range(62, 70)], 1)
    off = (got - want).abs()
    assert float(off.max()) < 1e-2 and float(off.median()) < 1e-5
    assert torch.equal(by_itself[0], got[1])  # a row alone, on one thread: the same bits


def test_a_kv_cache_of_another_dtype_is_refused():
    model = random_model(9)
    cache = KVCache.empty(model.config, 1, dtype=torch.float16)
    with torch.inference_mode(), pytest.raises(ValueError, match="float32 or bfloat16 KV caches"):
        NativeDecoder(model).step(torch.tensor([1]), cache)
