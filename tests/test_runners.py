"""Runners: the KV cache paths == the uncached reference, the CPU and graph decoders, the context
rule (window slides, long prompts), batches == one-by-one runs.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import slmkit.generate as G
from slmkit import cpu_decode, gpu_decode
from slmkit.cpu_decode import CPUDecoder
from slmkit.generate import SamplingConfig, beam_search, generate_tokens
from slmkit.model import KVCache, ModelConfig, apply_rope, rope_matrix, rope_tables

from conftest import check_bf16_decode_step
from generation_models import GREEDY, one_thread, random_model  # noqa: F401 (one_thread: a fixture)


# --- the KV cache ---------------------------------------------------------------------------------

VARIANTS = [
    dict(positions=pos, n_kv_head=kv, norm=norm, activation=act)
    for pos, kv, norm, act in itertools.product(["learned", "rope"], [None, 2], ["layernorm", "rmsnorm"], ["gelu", "swiglu"])
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cache_matches_uncached_for_every_variant(kw):
    model = random_model(1, **kw, bias=kw["norm"] == "layernorm")
    with torch.no_grad():  # non-zero biases and uneven norm weights (were 0 and 6): every path must apply them
        g = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(6.0 * (1.0 + 0.3 * noise) if name.endswith("weight") else 0.5 * noise)
    prompt = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(2)).tolist()
    cfg = SamplingConfig(max_new_tokens=40, **GREEDY)  # 9 + 40 > 24: the window slides twice
    reference = generate_tokens(model, prompt, cfg, path="uncached")
    assert len(set(reference[0])) > 3  # the text is not one repeated token
    assert generate_tokens(model, prompt, cfg, path="cached") == reference
    assert generate_tokens(model, prompt, cfg, path="step") == reference
    assert generate_tokens(model, prompt, cfg, path="fast") == reference  # CPUDecoder here
    # Logits, not just argmaxes: a padded batch through prefill, forward_cached, decode_step and
    # the CPU decoder.
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    full, _ = model(x)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # noqa: E731
    with torch.inference_mode():
        a, b, c = (KVCache.empty(model.config, 2) for _ in range(3))
        close(model.forward_cached(x[:, :8], a, all_logits=True), full[:, :8])
        model.forward_cached(x[:, :8], b)
        model.forward_cached(x[:, :8], c)
        decoder = CPUDecoder(model)
        chunked = KVCache.empty(model.config, 2)  # a prefill in two parts
        model.forward_cached(x[:, :5], chunked)
        close(model.forward_cached(x[:, 5:8], chunked, all_logits=True), full[:, 5:8])
        weights = model.decode_weights()  # looked up once, as generation does; or per call (None)
        for t in range(8, 12):
            close(model.forward_cached(x[:, t : t + 1], a), full[:, t])
            close(model.decode_step(x[:, t], b, weights if t % 2 else None), full[:, t])
            close(decoder.step(x[:, t], c), full[:, t])
        close(c.k, b.k)  # the decoder wrote the same keys and values
        close(c.v, b.v)
        padded, padded2 = (KVCache.empty(model.config, 2, start=torch.tensor([4, 0])) for _ in range(2))
        short = torch.cat([torch.zeros(1, 4, dtype=torch.long), x[:1, :8]], dim=1)
        model.forward_cached(torch.cat([short, x[1:]]), padded)
        model.forward_cached(torch.cat([short, x[1:]]), padded2)
        step = model.decode_step(torch.tensor([x[0, 8], 5]), padded, weights)
        close(step[0], model(x[:1, :9])[0][0, -1])
        close(decoder.step(torch.tensor([x[0, 8], 5]), padded2), step)


def test_rope_matrix_is_apply_rope():
    """decode_step rotates queries and keys with one matmul: the same rotation as apply_rope, at
    one position for the whole batch and at one position per row (padded batches)."""
    cfg = ModelConfig(n_embd=48, n_head=4, block_size=32)
    cos, sin = rope_tables(cfg, cfg.block_size)
    x = torch.randn(3, 5, cfg.head_dim)  # (rows, heads, head_dim)
    expected = apply_rope(x, cos[7], sin[7])
    torch.testing.assert_close(x @ rope_matrix(cos[7], sin[7]), expected)
    pos = torch.tensor([7, 0, 31])
    per_row = x @ rope_matrix(cos[pos], sin[pos])  # (3, D, D): one rotation per row
    for row, p in enumerate(pos.tolist()):
        torch.testing.assert_close(per_row[row], apply_rope(x[row], cos[p], sin[p]))
    assert not torch.allclose(per_row[1], expected[1])  # position 0 is no rotation: really differs


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, positions="learned", norm="layernorm")])
def test_decode_step_in_bfloat16_is_as_close_to_fp32_as_forward_cached(kw):
    """Low precision (what a GPU generates in): the fast path rounds no worse than the module path
    (it keeps the attention softmax in fp32, like SDPA), measured against the fp32 model."""
    model = random_model(5, **kw).to(torch.bfloat16)
    x = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(6))
    check_bf16_decode_step(model, x, random_model(5, **kw)(x)[0].detach(), prompt=6)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, positions="learned", norm="layernorm", bias=True)])
def test_cpu_decoder_follows_reordered_rows_and_a_changing_batch(kw):
    """Beam search and finished rows reorder and shrink the cache between steps: the decoder must
    read the new cache (not stale views) and size its buffers to the new batch. With max_work=700
    (rows x positions x width 32) the steps at t = 7 and 10 go through decode_step and the others
    through NumPy, on one cache."""
    model = random_model(8, **kw)
    x = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        a, b = (KVCache.empty(model.config, 3, start=torch.tensor([0, 2, 1])) for _ in range(2))
        model.forward_cached(x[:, :6], a)
        model.forward_cached(x[:, :6], b)
        decoder, weights = CPUDecoder(model, max_work=700), model.decode_weights()
        expected = {}
        for t, rows in [(6, None), (7, [2, 0, 0]), (8, [1, 2]), (9, [0]), (10, [0, 0, 0]), (11, [1])]:
            if rows is not None:
                a.reorder(torch.tensor(rows))
            expected[t] = model.decode_step(x[: a.k.size(1), t], a, weights)
        handed_over = []  # cache lengths at which the decoder called decode_step
        real_step = model.decode_step
        model.decode_step = lambda idx, cache, w=None: handed_over.append(cache.length) or real_step(idx, cache, w)
        for t, rows in [(6, None), (7, [2, 0, 0]), (8, [1, 2]), (9, [0]), (10, [0, 0, 0]), (11, [1])]:
            if rows is not None:
                b.reorder(torch.tensor(rows))
            torch.testing.assert_close(decoder.step(x[: b.k.size(1), t], b), expected[t], rtol=1e-4, atol=1e-4)
        assert handed_over == [7, 10]  # 3 rows x 8 (or 11) positions x 32 > 700; the rest in NumPy
        torch.testing.assert_close(b.k, a.k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.v, a.v, rtol=1e-4, atol=1e-4)


def test_cpu_decoder_handles_overflowing_swiglu_gates_quietly():
    """silu(g) for a very negative gate g: exp(-g) overflows to inf in float32, and g / inf = -0
    is the right value. No NaN, no RuntimeWarning, the same logits as PyTorch's silu."""
    model = random_model(10, activation="swiglu")
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.up.weight.mul_(500.0)  # gates of +-1e4: exp(1e4) = inf in float32
    x = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = KVCache.empty(model.config, 1), KVCache.empty(model.config, 1)
        model.forward_cached(x[:, :7], a)
        model.forward_cached(x[:, :7], b)
        expected = model.decode_step(x[:, 7], a)
        got = CPUDecoder(model).step(x[:, 7], b)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_fast_path_is_the_cpu_decoder_for_float32_and_decode_step_otherwise(monkeypatch):
    """"fast" steps through CPUDecoder for a float32 CPU model. CPUDecoder is float32-only, so on
    a bf16 model "fast" steps through decode_step (and not the module path): checked by counting
    its calls, and by its logits along the float32 model's greedy tokens, which must be as close
    to the float32 ones as the bf16 module path's ("cached", another computation) are."""
    calls = []
    real_step = CPUDecoder.step
    monkeypatch.setattr(CPUDecoder, "step", lambda self, idx, cache: calls.append(cache.length) or real_step(self, idx, cache))
    cfg = SamplingConfig(max_new_tokens=12, **GREEDY)
    tokens = generate_tokens(random_model(12), [[1, 2, 3]], cfg)[0]
    assert calls == list(range(3, 14))  # one step per new token after the first (from the prefill)
    calls.clear()
    model = random_model(12).to(torch.bfloat16)
    assert not cpu_decode.supported(model)
    with pytest.raises(ValueError, match="float32"):
        CPUDecoder(model)
    real_decode_step = model.decode_step
    steps = []
    monkeypatch.setattr(model, "decode_step", lambda idx, cache, weights=None: steps.append(cache.length) or real_decode_step(idx, cache, weights))
    with torch.inference_mode():
        runners = {"fast": G.make_runner("fast", model, [[1, 2, 3]], 12),
                   "cached": G.make_runner("cached", model, [[1, 2, 3]], 12),
                   "fp32": G.make_runner("uncached", random_model(12), [[1, 2, 3]], 12)}
        errors: dict[str, list[float]] = {"fast": [], "cached": []}
        for token in tokens[:-1]:  # teacher-forced: the same context on every path, whatever bf16 picks
            for path in runners:
                runners[path].advance([token])
            for path in errors:
                errors[path].append((runners[path].logits - runners["fp32"].logits).abs().max().item())
    assert steps == list(range(3, 14)) and calls == []  # "fast" stepped through decode_step; "cached" never did
    assert 0 < max(errors["fast"]) <= 2 * max(errors["cached"]) + 0.05, errors
    assert max(errors["fast"]) < 0.1 * runners["fp32"].logits.abs().max().item()


def test_cpu_decoder_refuses_negative_ids_and_works_outside_inference_mode():
    """NumPy indexing would read row -1 from the end; decode_step raises, so must the decoder. Its
    buffers are made outside inference mode, so a decoder first used inside it still works after."""
    model = random_model(13)
    with torch.no_grad():  # caches made outside inference mode, as a caller of decode_step would
        a, b = KVCache.empty(model.config, 1), KVCache.empty(model.config, 1)
        model.forward_cached(torch.tensor([[1, 2, 3]]), a)
        model.forward_cached(torch.tensor([[1, 2, 3]]), b)
    decoder = CPUDecoder(model)
    with torch.inference_mode():
        decoder.step(torch.tensor([4]), a)  # its buffers are made here
        with pytest.raises(IndexError):
            decoder.step(torch.tensor([-1]), a)
        model.decode_step(torch.tensor([4]), b)
    with torch.no_grad():
        torch.testing.assert_close(decoder.step(torch.tensor([5]), a), model.decode_step(torch.tensor([5]), b))


class CPUGraph:
    """What a CUDA graph does, on the CPU: ``replay()`` runs the recorded step again on the same
    cache and input buffers, into the same output tensor."""

    def __init__(self, decoder: gpu_decode.GraphDecoder, cache: KVCache, out: torch.Tensor) -> None:
        self.decoder, self.cache, self.out = decoder, cache, out

    def replay(self) -> None:
        self.out.copy_(self.decoder._fixed_step(self.cache))


def cpu_capture(decoder: gpu_decode.GraphDecoder, idx: torch.Tensor, cache: KVCache):
    """``GraphDecoder._capture`` on the CPU: the warm-up run with this step's inputs (as on a GPU),
    then a CPUGraph in place of the recording. Logs the slot each recording happens at."""
    decoder.recorded_at = getattr(decoder, "recorded_at", []) + [cache.length]
    decoder._set_inputs(idx, cache)
    out = decoder._fixed_step(cache)
    return CPUGraph(decoder, cache, out), out


@pytest.fixture
def graph_step_on_cpu(monkeypatch):
    """Generation's "fast" path through ``GraphDecoder`` on the CPU, with its record-and-replay
    logic driven by CPUGraph: how CI checks what a GPU replays. Yields the decoders made."""
    made = []
    monkeypatch.setattr(cpu_decode, "supported", lambda model: False)
    monkeypatch.setattr(gpu_decode, "supported", lambda model: True)
    monkeypatch.setattr(gpu_decode.GraphDecoder, "_capture", cpu_capture)
    real = gpu_decode.GraphDecoder

    def spy(model):
        made.append(real(model, graphs=True))
        return made[-1]

    monkeypatch.setattr(gpu_decode, "GraphDecoder", spy)
    yield made


@pytest.mark.parametrize("kw", VARIANTS[::3], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_graph_decoder_step_gives_the_uncached_tokens(kw, graph_step_on_cpu):
    """Attention over every slot with a mask made from the filled length, the new key and value
    written at a slot index held in a tensor, and a graph per cache: the same tokens as the uncached
    reference through window slides, a padded batch, a row that finishes early and beam search."""
    model = random_model(2, **kw, bias=kw["norm"] == "layernorm")
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, 61, (1, 9), generator=g).tolist()
    cfg = SamplingConfig(max_new_tokens=40, **GREEDY)  # 9 + 40 > 24: the window slides at 24 and 36
    assert generate_tokens(model, prompt, cfg, path="fast") == generate_tokens(model, prompt, cfg, path="uncached")
    assert graph_step_on_cpu[-1].recorded_at == [10, 13, 13]  # the 2nd step on each cache (9 slots prefilled, then 12)

    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 11, 1)]
    cfg = SamplingConfig(max_new_tokens=12, **GREEDY)
    alone = [generate_tokens(model, [p], cfg, path="uncached")[0] for p in prompts]
    gen = G.Generation(model, prompts, cfg, path="fast")
    for _ in range(5):
        gen.step()
    gen.finish(1)  # row 1 leaves the batch: a new, smaller cache, so a new graph
    while not gen.finished:
        gen.step()
    assert gen.tokens == [alone[0], alone[1][:5], alone[2]]
    assert graph_step_on_cpu[-1].recorded_at == [12, 17]

    beams = SamplingConfig(max_new_tokens=20, beams=3)
    assert beam_search(model, prompt[0], beams, path="fast") == beam_search(model, prompt[0], beams, path="uncached")
    assert not hasattr(graph_step_on_cpu[-1], "recorded_at")  # beams reorder the cache every step: never recorded
    assert len(graph_step_on_cpu) == 3


def test_graph_decoder_replays_give_decode_steps_logits(monkeypatch):
    """Step by step against decode_step, on a padded batch whose rows are swapped half-way (a new
    cache: a new recording); logits returned earlier stay as they were after later replays."""
    monkeypatch.setattr(gpu_decode.GraphDecoder, "_capture", cpu_capture)
    model = random_model(3, n_kv_head=2)
    x = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        a, b = (KVCache.empty(model.config, 2, start=torch.tensor([3, 0])) for _ in range(2))
        model.forward_cached(x[:, :8], a)
        model.forward_cached(x[:, :8], b)
        decoder = gpu_decode.GraphDecoder(model, graphs=True)
        returned = []
        for t in range(8, 14):
            if t == 11:  # rows swap, as beam search does: the decoder must follow the new cache
                a.reorder(torch.tensor([1, 0]))
                b.reorder(torch.tensor([1, 0]))
            logits = decoder.step(x[:, t], b)
            torch.testing.assert_close(logits, model.decode_step(x[:, t], a), rtol=1e-5, atol=1e-5)
            returned.append((logits, logits.clone()))
        assert b.length == a.length == 14
        torch.testing.assert_close(b.k, a.k)
    assert decoder.recorded_at == [9, 12] and decoder.replays == 4
    assert all(torch.equal(kept, copy) for kept, copy in returned)


def test_graph_decoder_works_outside_inference_mode():
    model = random_model(4)
    cache = KVCache.empty(model.config, 1)
    with torch.no_grad():
        model.forward_cached(torch.tensor([[1, 2, 3]]), cache)
    logits = gpu_decode.GraphDecoder(model).step(torch.tensor([4]), cache)
    assert not logits.requires_grad and not cache.k.requires_grad


def test_forward_for_training_is_unchanged():
    model = random_model(0)
    x = torch.randint(0, 61, (2, 24))
    logits, loss = model(x, x)
    assert logits.shape == (2, 24, 61) and loss.ndim == 0


def test_window_slides_past_the_context():
    """Past block_size tokens each row keeps its last block_size // 2 and goes on."""
    model = random_model(4, block_size=16)
    cfg = SamplingConfig(max_new_tokens=50, **GREEDY)
    out = generate_tokens(model, [[1, 2, 3]], cfg)[0]
    assert len(out) == 50
    # Replay the rule by hand: before each step the context is the tokens since the last slide.
    context = [1, 2, 3]
    for token in out:
        logits, _ = model(torch.tensor([context]))
        assert int(logits[0, -1].argmax()) == token
        context.append(token)
        if len(context) > 16:
            context = context[-8:]


def test_long_prompt_is_cut_from_the_left_with_a_warning():
    model = random_model(5)
    prompt = list(range(40))
    cfg = SamplingConfig(max_new_tokens=5, **GREEDY)
    with pytest.warns(UserWarning, match="longer than the context"):
        out = generate_tokens(model, [prompt], cfg)
    assert out == generate_tokens(model, [prompt[-24:]], cfg)


@pytest.mark.parametrize("kw", [dict(), dict(positions="learned", n_kv_head=2)])
@pytest.mark.parametrize("path", ["fast", "cached"])
def test_batch_equals_one_by_one(kw, path):
    model = random_model(6, **kw)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    cfg = SamplingConfig(max_new_tokens=12, **GREEDY)  # 11 + 12 <= 24: within the context
    alone = [generate_tokens(model, [p], cfg, path="uncached")[0] for p in prompts]
    assert generate_tokens(model, prompts, cfg, path=path) == alone
