"""slmkit's CPU kernels (csrc/): attention against PyTorch's SDPA, cross-entropy against F.cross_entropy,
and where the model uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmkit import cpu_kernels
from slmkit.model import GPT, ChunkedCrossEntropy, ModelConfig

EPS32 = torch.finfo(torch.float32).eps

# The kernels' results are checked wherever the library builds, fast on this CPU or not (where the
# model leaves it unused); the fallback tests at the end run everywhere.
needs_library = pytest.mark.skipif(cpu_kernels.built() is not None,
                                   reason=f"kernel library not built here: {cpu_kernels.built()}")


@pytest.fixture(params=cpu_kernels.isa_levels())
def each_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernels' results checked in every build this CPU runs: on an AVX-512 machine its own
    (16-float vectors) and the AVX2 one (8-float vectors, -march=x86-64-v3), as on an AVX2 laptop."""
    lib = cpu_kernels.library(request.param)
    if lib is None:
        pytest.skip(f"no {request.param} build here: {cpu_kernels.built() or cpu_kernels._libs.get(request.param)}")
    monkeypatch.setattr(cpu_kernels, "_lib", lib)
    return request.param


@pytest.fixture
def kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model takes the kernels even on a CPU where they are not fast (to test that path there)."""
    if cpu_kernels.built() is not None:
        pytest.skip(f"kernel library not built here: {cpu_kernels.built()}")
    monkeypatch.setattr(cpu_kernels, "_use_kernels", lambda: True)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def split_heads(qkv: torch.Tensor, H: int, KV: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model makes them: strided views of one fused projection."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
    return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, KV, D).transpose(1, 2),
            v.view(B, T, KV, D).transpose(1, 2))


@needs_library
@pytest.mark.parametrize("B,H,KV,T,D", [
    (2, 8, 4, 37, 8),    # grouped-query, a context that is not a multiple of the 16-lane vectors
    (1, 2, 2, 16, 16),   # exactly one block
    (2, 3, 1, 1, 8),     # one token
    (1, 3, 3, 50, 5),    # an odd head size: the generic (not unrolled) code
    (2, 4, 2, 70, 12),   # another size without its own instantiation
    (2, 4, 2, 77, 32),   # the tiled kernel (head sizes 32, 48, 64), several row and key blocks
    (2, 6, 6, 50, 48),
    (1, 2, 2, 40, 64),
    (1, 2, 1, 3, 48),    # fewer rows than one tile
    (1, 2, 2, 20, 128),  # a large head size (the model leaves these to SDPA, the kernel still works)
])
def test_matches_sdpa_forward_and_backward(B: int, H: int, KV: int, T: int, D: int, each_isa: str) -> None:
    torch.manual_seed(0)
    qkv64 = torch.randn(B, T, (H + 2 * KV) * D, dtype=torch.float64) * 2  # * 2: peakier softmaxes
    grad = torch.randn(B, T, H * D, dtype=torch.float64)

    exact = qkv64.clone().requires_grad_()
    sdpa(*split_heads(exact, H, KV, D)).backward(grad)
    ours = qkv64.float().requires_grad_()
    y = cpu_kernels.causal_attention(*split_heads(ours, H, KV, D))
    y.backward(grad.float())

    # PyTorch's own float32 SDPA against the float64 result sets the scale of rounding error.
    torch32 = qkv64.float().requires_grad_()
    y32 = sdpa(*split_heads(torch32, H, KV, D))
    y32.backward(grad.float())

    expected = sdpa(*split_heads(qkv64, H, KV, D))
    assert y.shape == expected.shape

    def within_float32(a: torch.Tensor, torch32: torch.Tensor, exact: torch.Tensor) -> bool:
        """At most 4x PyTorch's own float32 error, plus 4 float32 ulps of the largest exact value:
        an allowance on the values' scale where PyTorch happens to round to the exact result, and
        none at all where the exact result is zero."""
        allowed = 4 * (torch32.double() - exact).abs().max() + 4 * EPS32 * exact.abs().max()
        return bool((a.double() - exact).abs().max() <= allowed)

    assert within_float32(y, y32, expected)
    # dq, dk and dv apart, each on its own scale: where one is exactly zero, so must ours be.
    parts = [H * D, KV * D, KV * D]
    for a, b, c in zip(ours.grad.split(parts, -1), torch32.grad.split(parts, -1), exact.grad.split(parts, -1)):
        assert within_float32(a, b, c)
    # The first query sees one key: its softmax is exactly 1 and its dq exactly 0.
    assert (ours.grad[:, 0, : H * D] == 0).all()


@needs_library
def test_extreme_scores_give_no_nan(each_isa: str) -> None:
    """Large logits: rows where most keys are e^-80 below the maximum, and exactly tied scores."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 8) * 10 for _ in range(3))  # scores up to a few hundred
    q.requires_grad_()
    y = cpu_kernels.causal_attention(q, k, v)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(q.grad).all()
    assert torch.allclose(y.double(), sdpa(q.detach().double(), k.double(), v.double()), atol=1e-4, rtol=1e-5)
    same = torch.ones(1, 1, 20, 8)
    assert torch.allclose(cpu_kernels.causal_attention(same, same, same), same.view(1, 20, 8))


@needs_library
def test_thread_count_does_not_change_results(each_isa: str) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 4, 64, 8, requires_grad=True), torch.randn(4, 2, 64, 8), torch.randn(4, 2, 64, 8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            q.grad = None
            y = cpu_kernels.causal_attention(q, k, v)
            y.square().sum().backward()
            results.append((y.detach().clone(), q.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def tiny(head_dim: int = 8) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=4 * head_dim))


def test_model_uses_the_kernel_where_it_pays(monkeypatch: pytest.MonkeyPatch, kernels_on: None) -> None:
    calls = []
    real = cpu_kernels.causal_attention
    monkeypatch.setattr(cpu_kernels, "causal_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randint(0, 64, (2, 32))
    tiny(head_dim=8)(x, x)
    assert len(calls) == 2  # one per layer
    tiny(head_dim=48)(x, x)  # the tiled kernel
    assert len(calls) == 4
    tiny(head_dim=24)(x, x)  # a size it does not pay at: SDPA
    assert len(calls) == 4
    tiny(head_dim=8).double()(x, x)  # float64: SDPA
    assert len(calls) == 4


@pytest.mark.parametrize("head_dim", [8, 48])
def test_model_loss_and_gradients_equal_the_sdpa_path(monkeypatch: pytest.MonkeyPatch, kernels_on: None,
                                                      head_dim: int) -> None:
    x, y = torch.randint(0, 64, (3, 32)), torch.randint(0, 64, (3, 32))
    results = []
    for pays in (cpu_kernels.attention_pays, lambda head_dim: False):  # the kernel, then SDPA
        monkeypatch.setattr(cpu_kernels, "attention_pays", pays)
        model = tiny(head_dim)
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_k, grads_k), (loss_s, grads_s) = results
    assert abs(loss_k - loss_s) < 1e-5
    for a, b in zip(grads_k, grads_s):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_model_matches_eager(kernels_on: None) -> None:
    from slmkit.runtime import can_compile
    if can_compile("cpu") is not None:
        pytest.skip(can_compile("cpu"))
    x, y = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    model = tiny()
    _, eager = model(x, y)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, compiled = torch.compile(model)(x, y)
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-5
    for a, p in zip(grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


def test_traced_export_falls_back_to_sdpa(kernels_on: None) -> None:
    """TorchScript (and the ONNX exporter, which traces) cannot record a ctypes call."""
    class Logits(torch.nn.Module):
        def __init__(self, model: GPT) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(ids)[0]

    module = Logits(tiny()).eval()
    x = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        traced = torch.jit.trace(module, (x,), check_trace=False)
        assert "slmkit::" not in str(traced.inlined_graph)
        assert "scaled_dot_product_attention" in str(traced.inlined_graph)
        assert torch.allclose(traced(x), module(x), atol=1e-5)


@needs_library
def test_bf16_attention_is_the_float32_kernel_rounded() -> None:
    """bfloat16 q, k, v (bf16 autocast): the float32 kernel on float32 copies, the output and the
    gradients rounded to bf16, bit for bit."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 40, (4 + 2 * 2) * 8).bfloat16()
    a, b = qkv.clone().requires_grad_(), qkv.float().requires_grad_()
    ya, yb = cpu_kernels.causal_attention(*split_heads(a, 4, 2, 8)), cpu_kernels.causal_attention(*split_heads(b, 4, 2, 8))
    assert ya.dtype == torch.bfloat16 and torch.equal(ya, yb.bfloat16())
    grad = torch.randn(ya.shape).bfloat16()
    ya.backward(grad)
    yb.backward(grad.float())
    assert a.grad.dtype == torch.bfloat16 and torch.equal(a.grad, b.grad.bfloat16())


@pytest.mark.parametrize("head_dim", [8, 48])
def test_bf16_autocast_training_uses_the_kernels_and_is_as_close_as_pytorch(
        monkeypatch: pytest.MonkeyPatch, kernels_on: None, head_dim: int) -> None:
    """Under bf16 autocast the model takes both kernels, and its loss and gradients are as close to
    the float32 ones as PyTorch's own bf16 path (SDPA and the chunked head in PyTorch) is."""
    x, y = torch.randint(0, 64, (3, 32)), torch.randint(0, 64, (3, 32))
    calls = []
    real_attn, real_head = cpu_kernels.causal_attention, cpu_kernels.head_loss
    monkeypatch.setattr(cpu_kernels, "causal_attention", lambda *a: calls.append("attn") or real_attn(*a))
    monkeypatch.setattr(cpu_kernels, "head_loss", lambda *a: calls.append("head") or real_head(*a))
    pays, usable = cpu_kernels.attention_pays, cpu_kernels.head_loss_usable
    results = {}
    for name, dtype, fast in (("fp32", None, True), ("kernels", torch.bfloat16, True), ("pytorch", torch.bfloat16, False)):
        monkeypatch.setattr(cpu_kernels, "attention_pays", pays if fast else lambda d: False)
        monkeypatch.setattr(cpu_kernels, "head_loss_usable", usable if fast else lambda h, w: False)
        calls.clear()
        model = tiny(head_dim)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            _, loss = model(x, y, return_logits=False)
        loss.backward()
        assert calls == (["attn", "attn", "head"] if fast else []), name
        results[name] = (loss.item(), [p.grad for p in model.parameters()])
    (l32, g32), (lk, gk), (lp, gp) = results["fp32"], results["kernels"], results["pytorch"]
    assert abs(lk - l32) <= 2 * abs(lp - l32) + 1e-3 and abs(lk - lp) < 1e-2
    for a, b, c in zip(gk, gp, g32):
        scale = c.abs().max()
        assert (a - c).abs().max() <= 2 * (b - c).abs().max() + 0.01 * scale


# --------------------------------------------------------------------------- cross-entropy


@needs_library
@pytest.mark.parametrize("N,V", [(64, 4096), (37, 100), (5, 17), (3, 8)])
def test_cross_entropy_matches_torch(N: int, V: int, each_isa: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(N, V, dtype=torch.float64) * 4
    targets = torch.randint(0, V, (N,))
    targets[::3] = -1
    scale = 1.0 / (targets != -1).sum()

    x = logits.float()  # overwritten with the gradient
    rows = cpu_kernels.cross_entropy_(x, targets, scale.item())

    keep = targets != -1
    expected = F.cross_entropy(logits, targets.clamp(min=0), reduction="none") * keep
    grad = (logits.softmax(-1) - F.one_hot(targets.clamp(min=0), V)) * (keep[:, None] * scale)
    assert torch.allclose(rows.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x.double(), grad, atol=1e-7, rtol=1e-5)
    assert (x[~keep] == 0).all()


@needs_library
def test_cross_entropy_flags_out_of_range_targets(each_isa: str) -> None:
    """A target past the vocabulary gives a NaN loss for its row (never a write out of bounds)."""
    x = torch.randn(3, 10)
    rows = cpu_kernels.cross_entropy_(x, torch.tensor([1, 10, -1]), 1.0)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_fused_head_equals_the_pytorch_path(monkeypatch: pytest.MonkeyPatch, kernels_on: None) -> None:
    torch.manual_seed(0)
    h, w = torch.randn(300, 32), torch.randn(100, 32)
    targets = torch.randint(0, 100, (300,))
    targets[::5] = -1
    results, calls = [], []
    real = cpu_kernels.cross_entropy_
    monkeypatch.setattr(cpu_kernels, "cross_entropy_", lambda *a: calls.append(1) or real(*a))
    for usable in (cpu_kernels.head_loss_usable, lambda h, w: False):
        monkeypatch.setattr(cpu_kernels, "head_loss_usable", usable)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = ChunkedCrossEntropy.apply(hh, ww, targets, 64)
        loss.backward()
        results.append((loss.item(), hh.grad, ww.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    assert len(calls) == 5  # 300 rows in chunks of 64, all through the kernel the first time
    assert abs(l1 - l2) < 1e-5
    assert torch.allclose(gh1, gh2, atol=1e-6) and torch.allclose(gw1, gw2, atol=1e-6)


def test_fused_head_under_bf16_autocast_equals_the_pytorch_path(monkeypatch: pytest.MonkeyPatch,
                                                              kernels_on: None) -> None:
    """Under bf16 autocast the kernel loop does the PyTorch path's arithmetic (bf16 multiplies, the
    softmax and loss in float32): the same loss and bf16-rounded gradients, float32 gradients out."""
    torch.manual_seed(0)
    h, w = torch.randn(300, 32), torch.randn(100, 32) * 0.3
    targets = torch.randint(0, 100, (300,))
    targets[::5] = -1
    results = []
    for usable in (cpu_kernels.head_loss_usable, lambda h, w: False):
        monkeypatch.setattr(cpu_kernels, "head_loss_usable", usable)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert usable(hh, ww) == (not results)  # the kernel the first time only
            loss = ChunkedCrossEntropy.apply(hh, ww, targets, 64)
        loss.backward()
        assert loss.dtype == hh.grad.dtype == ww.grad.dtype == torch.float32
        results.append((loss.item(), hh.grad, ww.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    assert abs(l1 - l2) < 1e-5
    # Rounded to bf16 (8 bits) from float32 results that differ in their last bits, a gradient
    # may land one bf16 step apart: 2^-8 of its size.
    assert torch.allclose(gh1, gh2, rtol=2**-7, atol=1e-6) and torch.allclose(gw1, gw2, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("env,prelude,reason", [
    ({"SLMKIT_CPU_KERNELS": "0"}, "", "turned off"),
    ({"CXX": "false"}, "", "could not build"),
    # as on a CPU whose build is not measured faster than PyTorch (ARM)
    ({}, "cpu_kernels.isa_levels = lambda: ['native']\n", "not measured faster"),
    ({"SLMKIT_KERNEL_ISA": "sse9"}, "", "unknown SLMKIT_KERNEL_ISA"),
    # an AVX2-only CPU: its own build (8-float vectors), used (measured faster there)
    pytest.param({}, "cpu_kernels.isa_levels = lambda: ['avx2']\n", "None avx2 8", marks=pytest.mark.skipif(
        "avx2" not in cpu_kernels.isa_levels(), reason="this CPU runs no AVX2 code")),
])
def test_without_the_kernels_the_model_uses_pytorch(tmp_path, env: dict, prelude: str, reason: str) -> None:
    """Turned off, no working compiler, an unknown level, or a CPU they are not measured fast on: one
    line says why, and training still runs (on PyTorch's ops); on an AVX2-only CPU, its own build."""
    import os
    import subprocess
    import sys
    code = ("import torch; from slmkit import cpu_kernels; from slmkit.model import GPT, ModelConfig\n" + prelude +
            "m = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_embd=32))\n"
            "x = torch.randint(0, 64, (2, 32)); m(x, x)[1].backward()\n"
            "print(cpu_kernels.available(), cpu_kernels.kernel_isa(), cpu_kernels._lib and cpu_kernels._lib.slm_kernel_lanes())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k not in ("SLMKIT_KERNEL_ISA", "SLMKIT_CPU_KERNELS")},
                               "SLMKIT_CACHE": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    assert reason in done.stdout


@needs_library
def test_used_exactly_where_measured_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run-time detection: the best level this CPU runs is read from its flags, and the model uses
    its build exactly where that level is measured faster than PyTorch (FAST_ISAS)."""
    flags = cpu_kernels.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    levels = cpu_kernels.isa_levels()
    assert ("avx512" in levels) == ("avx512f" in flags) and ("avx2" in levels) == ({"avx2", "fma"} <= flags)
    monkeypatch.delenv("SLMKIT_KERNEL_ISA", raising=False)
    cpu_kernels.available.cache_clear()
    try:
        assert (cpu_kernels.available() is None) == (levels[0] in cpu_kernels.FAST_ISAS), cpu_kernels.available()
    finally:
        cpu_kernels.available.cache_clear()


def test_each_build_has_its_vector_width_and_no_wider_instructions() -> None:
    """The avx2 build (what an AVX2 laptop runs, also the C++ decoder forced to AVX2) holds no
    AVX-512 instruction (no EVEX encoding, no zmm or mask register) outside the decoder's own
    AVX-512 functions, which it only calls on a CPU that has them; the avx512 build uses 16 floats."""
    import re
    import shutil
    import subprocess
    lanes = {"avx512": 16, "avx2": 8, "native": 8}
    libs = {isa: cpu_kernels.library(isa) for isa in cpu_kernels.isa_levels()}
    for isa, lib in libs.items():
        if lib is not None:
            assert lib.slm_kernel_lanes() == lanes[isa], isa
    if libs.get("avx2") is None or shutil.which("objdump") is None:
        pytest.skip("no avx2 build or no objdump here")
    text = subprocess.run(["objdump", "-d", "-C", libs["avx2"]._name], capture_output=True, text=True).stdout
    function, wide, seen = None, {}, 0
    for line in text.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            function = m.group(1)
        elif m := re.match(r"^\s*[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*(.*)$", line):
            seen += 1
            code = m.group(1).split()
            while code and code[0] in ("66", "67", "f2", "f3", "2e", "3e", "26", "64", "65", "36", "f0"):
                code = code[1:]  # prefixes before the opcode; 62 there starts an EVEX instruction
            if (code and code[0] == "62") or re.search(r"%zmm|%k[0-7]\b", m.group(2)):
                wide[function] = wide.get(function, 0) + 1
    assert seen > 1000  # the disassembly was read
    assert all("512" in f for f in wide), [f for f in wide if "512" not in f][:5]
