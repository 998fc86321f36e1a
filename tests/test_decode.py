"""The decode package: every backend against ``model.forward``, the registry's choice and its
support rule, and what each backend does on its own (the CPU decoder's hand-over and NumPy
corners, the graph decoder's replays, the step's bf16 rounding)."""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass

import pytest
import torch

from slmkit import cpu_kernels
from slmkit.decode import (
    BACKENDS, CPUDecoder, GraphDecoder, KVCache, ModuleDecoder, NativeDecoder, StepDecoder, make_decoder, pick,
    rope_matrix,
)
from slmkit.model import GPT, ModelConfig, apply_rope, rope_tables

from conftest import check_bf16_decode_step, cpu_capture
from generation_models import noisy_model, one_thread, random_model  # noqa: F401 (one_thread: a fixture)

VARIANTS = [
    dict(positions=pos, n_kv_head=kv, norm=norm, activation=act, bias=norm == "layernorm")
    for pos, kv, norm, act in itertools.product(["learned", "rope"], [None, 2], ["layernorm", "rmsnorm"], ["gelu", "swiglu"])
] + [dict(positions="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=False),  # GPT-2
     dict(n_kv_head=1, tie_embeddings=False)]  # Llama with one kv head
IDS = ["-".join(str(v) for v in kw.values()) for kw in VARIANTS]
# The registry's pick for a float32 CPU model: the C++ decoder where slmkit's library builds.
FAST_CPU = NativeDecoder if cpu_kernels.built() is None else CPUDecoder


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- the parity test: every backend against model.forward ------------------------------------------


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_every_backend_gives_the_logits_of_model_forward(kw, name):
    """Prefill, four steps, and a left-padded batch (rows of 8 and 12 tokens) stepped twice: the
    logits of the whole-sequence forward at every position, and the same keys and values in the
    same cache slots. On the CPU the CUDA-graph decoder runs its fixed-shape step without a graph.
    A backend that stores the weights rounded (cpp-bf16) is held to the forward of the model it
    reproduces (``Decoder.reproduces``: the weights rounded so; test_decode_native checks that step)."""
    model = BACKENDS[name].reproduces(noisy_model(1, **kw))
    if issubclass(BACKENDS[name], NativeDecoder) and cpu_kernels.built() is not None:
        pytest.skip(f"slmkit's C++ library is not built here: {cpu_kernels.built()}")
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    full, _ = model(x)
    with torch.inference_mode():
        decoder = BACKENDS[name](model)
        cache = KVCache.empty(model.config, 2)
        close(decoder.prefill(x[:, :8], cache), full[:, 7])
        for t in range(8, 12):
            close(decoder.step(x[:, t], cache), full[:, t])
        reference = KVCache.empty(model.config, 2)
        model(x, cache=reference)
        close(cache.k, reference.k)
        close(cache.v, reference.v)
        assert cache.length == reference.length == 12

        padded = KVCache.empty(model.config, 2, start=torch.tensor([4, 0]))
        short = torch.cat([torch.zeros(1, 4, dtype=torch.long), x[:1, :8]], dim=1)
        close(decoder.prefill(torch.cat([short, x[1:]]), padded), torch.stack([full[0, 7], full[1, 11]]))
        row1 = x[1].tolist()
        for t, new in [(8, 5), (9, 7)]:
            row1.append(new)
            logits = decoder.step(torch.tensor([x[0, t], new]), padded)
            close(logits[0], full[0, t])
            close(logits[1], model(torch.tensor([row1]))[0][0, -1])


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_forward_with_a_cache_is_the_whole_sequence_pass(kw):
    """The reference itself: a prefill in two parts, then one token at a time, gives the logits
    of every position of the pass over the whole sequence."""
    model = noisy_model(1, **kw)
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    full, _ = model(x)
    with torch.inference_mode():
        cache = KVCache.empty(model.config, 2)
        close(model(x[:, :5], cache=cache)[0], full[:, :5])
        close(model(x[:, 5:8], cache=cache)[0], full[:, 5:8])
        for t in range(8, 12):
            close(model(x[:, t : t + 1], cache=cache, last_only=True)[0][:, 0], full[:, t])
        with pytest.raises(ValueError, match="KV cache full"):
            model(torch.cat([x, x], dim=1)[:, :13], cache=cache)  # 12 + 13 > 24 slots


# --- the registry and its rule ---------------------------------------------------------------------


def test_the_registry_picks_the_fastest_backend_that_runs_the_model():
    model = random_model(0)
    # fastest first, then those asked for by name only (after the reference, which runs anything)
    assert list(BACKENDS) == ["cuda-graph", "cpp", "numpy", "step", "cached", "cpp-bf16"]
    assert pick(model) is FAST_CPU and isinstance(make_decoder(model), FAST_CPU)
    assert pick(copy.deepcopy(model).to(torch.bfloat16)) is StepDecoder
    q8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    assert pick(q8) is ModuleDecoder
    with pytest.raises(ValueError, match="path='cached'"):
        make_decoder(q8, "step")
    with pytest.raises(ValueError, match="unknown decoder 'numba'"):
        make_decoder(model, "numba")
    # The declarations, read without a GPU: on CUDA the graph comes first in any dtype, NumPy never.
    cuda = torch.device("cuda")
    assert GraphDecoder.supports(model, cuda, torch.bfloat16) and StepDecoder.supports(model, cuda, torch.float16)
    assert not CPUDecoder.supports(model, cuda, torch.float32)
    assert not GraphDecoder.supports(model, torch.device("cpu"), torch.float32)
    assert "float32" in CPUDecoder.why_not(model, torch.device("cpu"), torch.bfloat16)


@dataclass
class ConfigWithQKNorm(ModelConfig):
    """A config with a feature no backend has heard of, as a new field in ModelConfig would be."""

    qk_norm: bool = False


def test_a_new_model_feature_runs_on_the_reference_until_a_backend_opts_in(monkeypatch):
    """A config field that a backend does not list is accepted only at its default: models that
    leave the feature off keep every fast path, models that use it get the reference, which runs
    everything, until a backend declares the feature."""
    shape = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
    plain, new = (GPT(ConfigWithQKNorm(**shape, qk_norm=on)).eval() for on in (False, True))
    for name, backend in BACKENDS.items():
        device = torch.device("cuda" if name == "cuda-graph" else "cpu")
        runs_here = name != "cpp" or cpu_kernels.built() is None  # the C++ one needs its library
        assert backend.supports(plain, device, torch.float32) == runs_here, name
        assert backend.supports(new, device, torch.float32) == (name == "cached"), name
        if name != "cached":
            assert "model.qk_norm=True" in backend.why_not(new)
    assert pick(plain) is FAST_CPU and pick(new) is ModuleDecoder
    with pytest.raises(ValueError, match="qk_norm"):
        StepDecoder(new)
    monkeypatch.setattr(StepDecoder, "handles", {**StepDecoder.handles, "qk_norm": {False, True}})
    assert pick(new) is StepDecoder  # opted in (the C++ and numpy decoders, listed before it, have not)


# --- the step's pieces and rounding -----------------------------------------------------------------


def test_rope_matrix_is_apply_rope():
    """The step rotates queries and keys with one matmul: the same rotation as apply_rope, at
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
def test_decode_step_in_bfloat16_is_as_close_to_fp32_as_the_module_path(kw):
    """Low precision (what a GPU generates in): the step rounds no worse than the module path
    (it keeps the attention softmax in fp32, like SDPA), measured against the fp32 model."""
    model = random_model(5, **kw).to(torch.bfloat16)
    x = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(6))
    check_bf16_decode_step(model, x, random_model(5, **kw)(x)[0].detach(), prompt=6)


# --- the CPU decoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, positions="learned", norm="layernorm", bias=True)])
def test_cpu_decoder_follows_reordered_rows_and_a_changing_batch(kw):
    """Beam search and finished rows reorder and shrink the cache between steps: the decoder must
    read the new cache (not stale views) and size its buffers to the new batch. With max_work=700
    (rows x positions x width 32) the steps at t = 7 and 10 go through the PyTorch step and the
    others through NumPy, on one cache."""
    model = random_model(8, **kw)
    x = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(9))
    steps = [(6, None), (7, [2, 0, 0]), (8, [1, 2]), (9, [0]), (10, [0, 0, 0]), (11, [1])]
    with torch.inference_mode():
        a, b = (KVCache.empty(model.config, 3, start=torch.tensor([0, 2, 1])) for _ in range(2))
        step, decoder = StepDecoder(model), CPUDecoder(model, max_work=700)
        step.prefill(x[:, :6], a)
        decoder.prefill(x[:, :6], b)
        expected = {}
        for t, rows in steps:
            if rows is not None:
                a.reorder(torch.tensor(rows))
            expected[t] = step.step(x[: a.k.size(1), t], a)
        handed_over = []  # cache lengths at which the decoder called the PyTorch step
        real_step = decoder.fallback.step
        decoder.fallback.step = lambda idx, cache: handed_over.append(cache.length) or real_step(idx, cache)
        for t, rows in steps:
            if rows is not None:
                b.reorder(torch.tensor(rows))
            close(decoder.step(x[: b.k.size(1), t], b), expected[t])
        assert handed_over == [7, 10]  # 3 rows x 8 (or 11) positions x 32 > 700; the rest in NumPy
        close(b.k, a.k)
        close(b.v, a.v)


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
        model(x[:, :7], cache=a)
        model(x[:, :7], cache=b)
        expected = StepDecoder(model).step(x[:, 7], a)
        got = CPUDecoder(model).step(x[:, 7], b)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_cpu_decoder_refuses_negative_ids_and_works_outside_inference_mode():
    """NumPy indexing would read row -1 from the end; the PyTorch step raises, so must the decoder.
    Its buffers are made outside inference mode, so a decoder first used inside it still works after."""
    model = random_model(13)
    with torch.no_grad():  # caches made outside inference mode, as a caller of the step would
        a, b = KVCache.empty(model.config, 1), KVCache.empty(model.config, 1)
        model(torch.tensor([[1, 2, 3]]), cache=a)
        model(torch.tensor([[1, 2, 3]]), cache=b)
    decoder, step = CPUDecoder(model), StepDecoder(model)
    with torch.inference_mode():
        decoder.step(torch.tensor([4]), a)  # its buffers are made here
        with pytest.raises(IndexError):
            decoder.step(torch.tensor([-1]), a)
        step.step(torch.tensor([4]), b)
    with torch.no_grad():
        torch.testing.assert_close(decoder.step(torch.tensor([5]), a), step.step(torch.tensor([5]), b))


def test_cpu_decoder_is_float32_only():
    model = random_model(12).to(torch.bfloat16)
    assert not CPUDecoder.supports(model, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        CPUDecoder(model)


# --- the CUDA-graph decoder, on the CPU ------------------------------------------------------------


def test_graph_decoder_replays_give_the_steps_logits(monkeypatch):
    """Step by step against the PyTorch step, on a padded batch whose rows are swapped half-way (a
    new cache: a new recording); logits returned earlier stay as they were after later replays."""
    monkeypatch.setattr(GraphDecoder, "_capture", cpu_capture)
    model = random_model(3, n_kv_head=2)
    x = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        a, b = (KVCache.empty(model.config, 2, start=torch.tensor([3, 0])) for _ in range(2))
        step, decoder = StepDecoder(model), GraphDecoder(model, graphs=True)
        step.prefill(x[:, :8], a)
        decoder.prefill(x[:, :8], b)
        returned = []
        for t in range(8, 14):
            if t == 11:  # rows swap, as beam search does: the decoder must follow the new cache
                a.reorder(torch.tensor([1, 0]))
                b.reorder(torch.tensor([1, 0]))
            logits = decoder.step(x[:, t], b)
            torch.testing.assert_close(logits, step.step(x[:, t], a), rtol=1e-5, atol=1e-5)
            returned.append((logits, logits.clone()))
        assert b.length == a.length == 14
        torch.testing.assert_close(b.k, a.k)
    assert decoder.recorded_at == [9, 12] and decoder.replays == 4
    assert all(torch.equal(kept, copy) for kept, copy in returned)


def test_graph_decoder_works_outside_inference_mode():
    model = random_model(4)
    cache = KVCache.empty(model.config, 1)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    logits = GraphDecoder(model).step(torch.tensor([4]), cache)
    assert not logits.requires_grad and not cache.k.requires_grad
