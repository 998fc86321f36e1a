"""Generation: KV cache == uncached, each decoding option's effect, streaming, batching, the CLI.

Two kinds of model: small random GPTs (weights scaled up so that greedy text varies with the
context) for the cache and batching checks, and "scripted" GPTs whose weights are set by hand so
that the next token depends only on the last one (a bigram table): they write exactly the text a
test needs, through the real model code and every decoding path.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings

import pytest
import torch

import slmkit.generate as G
from slmkit import cpu_decode, gpu_decode
from slmkit.cpu_decode import CPUDecoder
from slmkit.errors import SlmError
from slmkit.generate import (
    Generation, SamplingConfig, TextStream, apply_min_p, apply_repetition_penalty, apply_temperature,
    apply_top_k, apply_top_k_top_p, apply_top_p, beam_search, generate, generate_tokens, logits_pipeline, stream,
)
from slmkit.model import GPT, KVCache, ModelConfig, apply_rope, rope_matrix, rope_tables

from conftest import check_bf16_decode_step

GREEDY = dict(temperature=0.0, stop_at_eot=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: threads only add waiting, a lot of it on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(seed: int = 0, scale: float = 6.0, **kw) -> GPT:
    base = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**base)).eval()
    with torch.no_grad():  # larger weights: peaked, context-dependent predictions
        for p in model.parameters():
            p.mul_(scale)
    return model


class ByteTokenizer:
    """Stand-in tokenizer: one token per byte, so every multi-byte character spans tokens."""

    eot_token = "<|endoftext|>"
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.eot_token.encode() if i == self.eot_id else bytes([i]) for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def bigram_model(logprobs: dict[int, dict[int, float]], vocab_size: int = 257, **kw) -> GPT:
    """A real GPT whose next-token log-probabilities depend only on the last token: attention and
    MLP write nothing, the embedding is one-hot and the head holds ``logprobs[prev][next]``
    (tokens not listed: -30)."""
    width = 8 * math.ceil(vocab_size / 8)
    base = dict(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=width, tie_embeddings=False)
    base.update(kw)
    model = GPT(ModelConfig(**base)).eval()
    scale = math.sqrt(width)  # RMSNorm turns a one-hot row into sqrt(width) * one-hot
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_emb.weight[:, :vocab_size] = torch.eye(vocab_size)
        for module in model.modules():
            if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                module.weight.fill_(1.0)
        model.lm_head.weight.fill_(-30.0 / scale)
        for prev, nexts in logprobs.items():
            for nxt, lp in nexts.items():
                model.lm_head.weight[nxt, prev] = lp / scale
    return model


def script_model(text: str, then_eot: bool = False, **kw) -> GPT:
    """A bigram GPT that, after each byte of ``text``, writes the next one (cyclically, or
    <|endoftext|> after the last byte): the bytes of ``text`` must all differ."""
    data = text.encode()
    assert len(set(data)) == len(data)
    follow = {a: b for a, b in zip(data, data[1:])}
    follow[data[-1]] = TOK.eot_id if then_eot else data[0]
    follow[TOK.eot_id] = data[0]
    return bigram_model({a: {b: 0.0} for a, b in follow.items()}, **kw)


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


def test_finished_rows_leave_the_batch():
    model = script_model("abc", then_eot=True)  # "a" -> "bc" then <|endoftext|>
    gen = Generation(model, [[ord("a")], [ord("x")], [ord("b")]], SamplingConfig(max_new_tokens=6, temperature=0), TOK.eot_id)
    while not gen.finished:
        gen.step()
    assert gen.tokens[0] == [ord("b"), ord("c")] and gen.tokens[2] == [ord("c")]
    assert len(gen.tokens[1]) == 6  # "x" is not in the script: it never writes <|endoftext|>


# --- logits processors ----------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest_and_never_samples_outside():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    out = apply_top_k(logits, 5)
    assert (out.isfinite().sum(-1) == 5).all()
    top = logits.topk(5).indices
    assert torch.equal(out.gather(-1, top), logits.gather(-1, top))
    draws = torch.multinomial(out.softmax(-1), 2000, replacement=True, generator=torch.Generator().manual_seed(1))
    assert all(set(d.tolist()) <= set(t.tolist()) for d, t in zip(draws, top))
    assert torch.equal(apply_top_k(logits, 1000), logits)


def test_top_k_in_generation_stays_in_the_top_k():
    model = random_model(8)
    cfg = SamplingConfig(max_new_tokens=15, temperature=2.0, top_k=2, top_p=1.0, seed=3, stop_at_eot=False)
    context = [4, 5]
    for token in generate_tokens(model, [context], cfg)[0]:
        assert token in model(torch.tensor([context]))[0][0, -1].topk(2).indices.tolist()
        context.append(token)


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: set(apply_top_p(logits, p)[0].isfinite().nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.45) == {1}
    assert kept(0.7) == {1, 3}
    assert kept(0.85) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(0.01) == {1}  # the most likely token always stays
    out = apply_top_p(logits, 0.7)
    assert torch.allclose(out.softmax(-1)[0, [1, 3]], torch.tensor([0.5, 0.3]) / 0.8)


def test_top_k_top_p_in_one_pass_equals_top_k_then_top_p():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(9)) * 3
    for k, p in [(40, 0.9), (300, 0.5), (1000, 0.99), (1, 0.9), (40, 1.0)]:
        assert torch.equal(apply_top_k_top_p(logits, k, p), apply_top_p(apply_top_k(logits, k), p)), (k, p)


def test_sampling_draws_the_softmax_and_never_a_removed_token(monkeypatch):
    """``choose`` (inverse-CDF, one uniform per row): frequencies match the probabilities, filtered
    (-inf) tokens never come up, and every row of a batch draws from its own distribution."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([G.choose(probs.log(), 1.0, g) for _ in range(20000)])  # (n, 2)
    freq = torch.bincount(draws[:, 0], minlength=6) / len(draws)
    assert torch.allclose(freq, probs[0], atol=0.015), freq
    assert freq[1] == 0 and freq[5] == 0
    assert (draws[:, 1] == 5).all()
    # A removed last token is not drawn even by a uniform at the very top of [0, 1].
    monkeypatch.setattr(G.torch, "rand", lambda shape, generator, dtype, device: torch.ones(shape, dtype=dtype))
    assert G.choose(torch.tensor([[0.0, 0.0, -math.inf]]), 1.0, g).tolist() == [1]


def test_min_p_cuts_relative_to_the_top_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert apply_min_p(logits, 0.2)[0].isfinite().tolist() == [True, True, True, False]  # below 0.1
    assert apply_min_p(logits, 0.5)[0].isfinite().tolist() == [True, True, False, False]  # below 0.25
    assert torch.equal(apply_min_p(logits, 0.0), logits)


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0]]
    p, q = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert q[0] < p[0] and q[1] < p[1] and q[2] > p[2]
    # In generation: "a" is always a bit more likely than "b"; the penalty makes "b" win once "a" was said.
    model = bigram_model({t: {ord("a"): 2.0, ord("b"): 1.5} for t in range(257)})
    plain = generate_tokens(model, [[ord("c")]], SamplingConfig(max_new_tokens=3, **GREEDY))[0]
    penalized = generate_tokens(model, [[ord("c")]], SamplingConfig(max_new_tokens=3, repetition_penalty=2.0, **GREEDY))[0]
    assert bytes(plain) == b"aaa" and bytes(penalized) == b"aba"
    # Prompt tokens count as seen (as in CTRL and Hugging Face).
    assert bytes(generate_tokens(model, [[ord("a")]], SamplingConfig(max_new_tokens=1, repetition_penalty=2.0, **GREEDY))[0]) == b"b"


def test_temperature_and_pipeline():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert apply_temperature(logits, 0.5).softmax(-1)[0, 2] > logits.softmax(-1)[0, 2]
    assert logits_pipeline(SamplingConfig(temperature=0)) == []
    names = [p.func.__name__ for p in logits_pipeline(SamplingConfig(min_p=0.1, repetition_penalty=1.2), torch.zeros(1, 3, dtype=torch.bool))]
    assert names == ["apply_repetition_penalty", "apply_temperature", "apply_top_k_top_p", "apply_min_p"]
    assert [p.func.__name__ for p in logits_pipeline(SamplingConfig(top_k=5, top_p=1.0))][-1] == "apply_top_k"
    assert [p.func.__name__ for p in logits_pipeline(SamplingConfig(top_k=None, top_p=0.9))][-1] == "apply_top_p"
    assert [p.func.__name__ for p in logits_pipeline(SamplingConfig(temperature=1.0, top_k=None, top_p=1.0))] == []


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(top_k=-1),
    dict(repetition_penalty=0.0), dict(beams=0), dict(max_new_tokens=0), dict(stop=[""]), dict(seed=-1),
    dict(length_penalty=math.inf),
])
def test_validate_rejects_out_of_range(bad):
    with pytest.raises(SlmError):
        SamplingConfig(**bad).validate()


def test_seed_makes_sampling_reproducible():
    model = random_model(9)
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.5, seed=123, stop_at_eot=False)
    a = generate_tokens(model, [[1, 2], [3]], cfg)
    assert generate_tokens(model, [[1, 2], [3]], cfg) == a
    cfg.seed = 124
    assert generate_tokens(model, [[1, 2], [3]], cfg) != a


# --- beam search ----------------------------------------------------------------------------------


def test_beam_search_finds_what_greedy_misses():
    # From token 0: 1 is likelier (0.6) than 2 (0.4), but after 1 the model is unsure (three ways,
    # 1/3 each) while after 2 it is sure (0.95). Best sequence: 0 2 6 (0.38) over 0 1 x (0.2).
    lp = math.log
    model = bigram_model({0: {1: lp(0.6), 2: lp(0.4)}, 1: {3: lp(1 / 3), 4: lp(1 / 3), 5: lp(1 / 3)},
                          2: {6: lp(0.95), 3: lp(0.05)}, 3: {9: 0.0}, 4: {9: 0.0}, 5: {9: 0.0}, 6: {9: 0.0}},
                         vocab_size=10)
    greedy = generate_tokens(model, [[0]], SamplingConfig(max_new_tokens=5, temperature=0), eot_id=9)[0]
    beams = beam_search(model, [0], SamplingConfig(max_new_tokens=5, beams=2), eot_id=9)
    assert greedy[:1] == [1] and beams == [2, 6]
    assert generate_tokens(model, [[0]], SamplingConfig(max_new_tokens=5, beams=2), eot_id=9) == [[2, 6]]


def test_beam_search_paths_agree_and_one_beam_is_greedy():
    model = random_model(10)
    cfg = SamplingConfig(max_new_tokens=30, beams=3, length_penalty=0.8)
    fast = beam_search(model, [5, 6, 7], cfg)
    assert len(fast) == 30 and beam_search(model, [5, 6, 7], cfg, path="uncached") == fast
    cfg.beams = 1
    assert beam_search(model, [5, 6, 7], cfg) == generate_tokens(model, [[5, 6, 7]], SamplingConfig(max_new_tokens=30, **GREEDY))[0]


def test_beam_search_finishes_only_the_best_candidates_of_a_step():
    """As Hugging Face: of a step's 2N candidates only the N best may finish. Here, at step 2 the
    order is [1, eot], [1, 5], [2, eot], [2, 7]: [2, eot] is a spare, not a finished text. Had it
    counted, two texts would be finished and at step 3 the best live beam (-2.33 / 3) would look
    unable to beat the worse of them (-1.51 / 2), ending the search with [1]; instead it goes on
    to [1, 5, 10, 16] (-2.33 / 5), which beats [1] (-1.20 / 2). (transformers gives the same.)"""
    lp = math.log
    model = bigram_model({0: {1: lp(0.6), 2: lp(0.4)}, 1: {9: lp(0.5), 5: lp(0.45), 3: lp(0.05)},
                          2: {9: lp(0.55), 7: lp(0.45)}, 5: {10: lp(0.36), 11: lp(0.33), 12: lp(0.31)},
                          7: {13: lp(0.4), 14: lp(0.3), 15: lp(0.3)}, 10: {16: 0.0}, 11: {17: 0.0},
                          16: {9: 0.0}, 17: {9: 0.0}}, vocab_size=32)
    assert beam_search(model, [0], SamplingConfig(max_new_tokens=8, beams=2), eot_id=9) == [1, 5, 10, 16]
    # A length penalty of 0.5 favours shorter texts: [1] wins (-1.20 / 2 ** 0.5 against -2.33 / 5 ** 0.5).
    assert beam_search(model, [0], SamplingConfig(max_new_tokens=8, beams=2, length_penalty=0.5), eot_id=9) == [1]


def hf_twin(model: GPT):
    """The same model as a transformers GPT-2 or Llama module, through slmkit's export mapping."""
    transformers = pytest.importorskip("transformers")
    from slmkit.export import hf_config, hf_state_dict

    config = {k: v for k, v in hf_config(model.config, None).items() if k != "architectures"}
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and model.config.tie_embeddings == bool(missing)
    x = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], rtol=0, atol=1e-4)
    return hf


@pytest.mark.parametrize("seed,kw", [(0, dict()), (1, dict(positions="learned", norm="layernorm", activation="gelu"))],
                         ids=["llama", "gpt2"])
def test_beam_search_matches_transformers(seed, kw):
    """The same tokens as Hugging Face's ``generate(num_beams=N, do_sample=False,
    repetition_penalty=R, length_penalty=L)``: the penalty on log-probabilities, only the N best
    candidates of a step may finish, the early-stopping rule. <|endoftext|> is a token the model
    likes, so hypotheses end at many lengths and the length penalty matters."""
    model = random_model(seed, scale=3.0, block_size=64, **kw)  # flatter than x6: more beams in the running
    hf = hf_twin(model)
    g, ended, total = torch.Generator().manual_seed(seed), 0, 0
    for length in (3, 5, 7):
        prompt = torch.randint(0, 61, (length,), generator=g).tolist()
        eot = generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=5, **GREEDY))[0][4]
        for beams, penalty, length_penalty in [(2, 1.3, 1.0), (3, 1.5, 0.5), (4, 1.2, 2.0), (3, 0.8, 1.0), (4, 1.0, 1.5)]:
            cfg = SamplingConfig(max_new_tokens=16, beams=beams, repetition_penalty=penalty, length_penalty=length_penalty)
            ours = beam_search(model, prompt, cfg, eot)
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), num_beams=beams, do_sample=False, max_new_tokens=16,
                                  repetition_penalty=penalty, length_penalty=length_penalty,
                                  eos_token_id=eot, pad_token_id=eot)[0, length:].tolist()
            theirs = out[: out.index(eot)] if eot in out else out  # ours leaves <|endoftext|> out
            assert ours == theirs, (prompt, beams, penalty, length_penalty)
            ended, total = ended + (len(theirs) < 16), total + 1
    assert 0 < ended < total  # some hypotheses end at <|endoftext|>, some run to max_new_tokens


def test_beam_search_honours_stop_strings():
    model = script_model("Ha!ZQ_STOP.wxyz")
    cfg = SamplingConfig(max_new_tokens=30, beams=2, stop=["STOP"])
    assert generate(model, TOK, ["H"], cfg) == ["a!ZQ_"]


# --- text: stop strings, streaming, UTF-8 ---------------------------------------------------------


def test_stop_strings_cut_exactly():
    model = script_model("Ha!ZQ_STOP.wxyz")
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.7, stop=["STOP"])
    assert generate(model, TOK, ["H"], cfg) == ["a!ZQ_"]
    assert generate(model, TOK, ["Z"], SamplingConfig(max_new_tokens=40, stop=["xyz", "Q_S"])) == [""]
    pieces = list(stream(model, TOK, "Ha", SamplingConfig(max_new_tokens=40, stop=["_STOP", "!Z"])))
    assert "".join(pieces) == ""
    pieces = list(stream(model, TOK, "H", SamplingConfig(max_new_tokens=40, stop=["OP.w"])))
    assert "".join(pieces) == "a!ZQ_ST"
    # No stop: the text runs on to max_new_tokens.
    assert generate(model, TOK, ["H"], SamplingConfig(max_new_tokens=18)) == ["a!ZQ_STOP.wxyzHa!Z"]


def test_text_stream_holds_back_possible_stop_starts():
    s = TextStream(TOK, stop=["The end"])
    out = [s.push(t) for t in TOK.encode("Go. The eagle. The en")]
    assert "".join(out) == "Go. The eagle. "  # "The en" could still become "The end"
    assert s.push(ord("d")) == "" and s.stopped
    s = TextStream(TOK, stop=["The end"])
    assert "".join(s.push(t) for t in TOK.encode("The en")) == "" and s.finish() == "The en"


def test_eot_stops_by_default_and_no_stop_runs_on():
    model = script_model("Hi.", then_eot=True)
    assert generate(model, TOK, ["H"], SamplingConfig(max_new_tokens=20)) == ["i."]
    text = generate(model, TOK, ["H"], SamplingConfig(max_new_tokens=7, stop_at_eot=False))[0]
    assert text == "i.<|endoftext|>Hi.<|endoftext|>"


def test_streaming_multibyte_characters():
    text = "é€😀ß"
    s = TextStream(TOK)
    pieces = [s.push(t) for t in TOK.encode(text)]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[0] == "" and pieces[1] == "é"  # the first byte of é waits for the second
    s = TextStream(TOK)
    assert s.push(0xE2) == "" and s.push(0x82) == "" and s.finish() == "\ufffd"  # cut off: replaced
    # Through the model: each piece is whole characters, in order.
    model = script_model("xé€😀")
    pieces = list(stream(model, TOK, "x", SamplingConfig(max_new_tokens=12)))
    assert "".join(pieces) == "é€😀xé" and all("\ufffd" not in p for p in pieces)
    assert len(pieces) == 5


def test_generate_returns_completions_only_and_batches():
    model = script_model("Helo wrd!")
    prompts = ["H", "w", "!"]
    cfg = SamplingConfig(max_new_tokens=4, seed=0)
    out = generate(model, TOK, prompts, cfg)
    assert out == [generate(model, TOK, [p], cfg)[0] for p in prompts]


def test_seeded_text_is_reproducible():
    model = random_model(11, vocab_size=257, n_embd=32)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.2, seed=5, stop_at_eot=False)
    first = "".join(stream(model, TOK, "ab", cfg))
    assert "".join(stream(model, TOK, "ab", cfg)) == first == generate(model, TOK, ["ab"], cfg)[0]


def test_empty_prompt_starts_a_new_document():
    model = script_model("Hi.", then_eot=True)
    assert generate(model, TOK, [""], SamplingConfig(max_new_tokens=10)) == ["Hi."]


# --- CLI ------------------------------------------------------------------------------------------


def cli_args(command: str, *argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    (G.add_generate_arguments if command == "generate" else G.add_chat_arguments)(parser)
    return parser.parse_args(["RUN", *argv])


@pytest.fixture
def scripted_run(monkeypatch):
    model = script_model("Hi, Bob.", then_eot=True)
    monkeypatch.setattr(G, "_load", lambda args: (model, TOK))
    return model


def test_cli_generate_streams_prompt_and_continuation(scripted_run, capsys):
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--seed", "1")) == 0
    assert capsys.readouterr().out == "Hi, Bob.\n"
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--num-samples", "3", "--stop", "B")) == 0
    assert capsys.readouterr().out == "Hi, \n---\nHi, \n---\nHi, \n"
    assert G.run_generate(cli_args("generate", "--prompt", "B", "--no-stop", "--max-new-tokens", "9", "--stop", "\\n")) == 0
    assert capsys.readouterr().out == "Bob.<|endoftext|>Hi, B\n"
    with pytest.raises(SlmError, match="top_p"):
        G.run_generate(cli_args("generate", "--top-p", "2"))


def test_cli_chat_loop(scripted_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nB\n"))
    assert G.run_chat(cli_args("chat")) == 0
    assert capsys.readouterr().out == ", Bob.\nob.\n"


def test_cli_chat_ctrl_c_stops_the_reply_only(scripted_run, monkeypatch, capsys):
    def interrupted(*args):
        yield "partial"
        raise KeyboardInterrupt

    replies = iter([interrupted, lambda *a: iter(["fine"])])
    monkeypatch.setattr(G, "stream", lambda *a: next(replies)(*a))
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert G.run_chat(cli_args("chat")) == 0
    assert capsys.readouterr().out == "partial [stopped]\nfine\n"
