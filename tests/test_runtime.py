"""slmkit.runtime: the one device resolver that train, generate and evaluate share."""

import pytest
import torch

from slmkit import runtime
from slmkit.errors import SlmError
from slmkit.runtime import resolve_device


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_has_mps", lambda: False)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cpu_only):
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(runtime, "_has_mps", lambda: True)
    assert resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_missing_devices_name_the_setting(cpu_only):
    with pytest.raises(SlmError) as e:
        resolve_device("cuda", setting="train.device={}")
    assert str(e.value) == "train.device=cuda but no CUDA GPU is visible: use train.device=cpu or auto"
    with pytest.raises(SlmError) as e:
        resolve_device("mps", setting="train.device={}")
    assert str(e.value) == "train.device=mps but MPS is not available: use train.device=cpu or auto"
    with pytest.raises(SlmError) as e:
        resolve_device("cuda")
    assert str(e.value) == "--device cuda but no CUDA GPU is visible: use --device cpu or auto"
    with pytest.raises(SlmError) as e:
        resolve_device("tpu")
    assert str(e.value) == "--device tpu is not available on this machine: use --device cpu or auto"


def test_present_devices_pass_through(monkeypatch, cpu_only):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == "cuda"


def test_matmul_peak_is_plausible():
    from slmkit.runtime import measure_matmul_peak

    peak = measure_matmul_peak("cpu", n=256, reps=2)
    assert 1e8 < peak < 1e14


# --------------------------------------------------------------------------- training precision


@pytest.fixture
def x86(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")


@pytest.mark.parametrize("flags,unit", [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),  # AMD Zen 4/5, Intel Cooper Lake
    ({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "AMX-BF16"),  # Intel Sapphire Rapids on
    ({"avx2", "fma"}, None),  # AVX2 only
    ({"avx2", "avx512f", "avx512bw"}, None),  # AVX-512 without its bf16 instructions (Skylake-X, Zen 3)
])
def test_auto_on_a_cpu_is_bf16_exactly_where_it_has_native_bf16(monkeypatch, x86, flags, unit):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert runtime.cpu_bf16() == unit
    dtype, why = runtime.choose_dtype("auto", "cpu")
    if unit:
        assert dtype == torch.bfloat16 and why == f"train.dtype=auto: this CPU has {unit}"
    else:
        assert dtype == torch.float32 and why == "train.dtype=auto: no AVX512-BF16 or AMX-BF16 on this CPU"
    assert runtime.pick_dtype("auto", "cpu") == dtype
    # An explicit choice is taken as given, whatever the CPU.
    assert runtime.choose_dtype("float32", "cpu") == (torch.float32, "train.dtype=float32")
    assert runtime.choose_dtype("bfloat16", "cpu") == (torch.bfloat16, "train.dtype=bfloat16")


def test_auto_keeps_float32_on_arm_cpus_even_with_bf16(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"fp", "asimd", "sve", "bf16"}))  # e.g. Graviton3
    assert runtime.cpu_bf16() is None
    dtype, why = runtime.choose_dtype("auto", "cpu")
    assert dtype == torch.float32 and "ARM" in why and "train.dtype=bfloat16" in why


def test_cpu_flags_without_proc_cpuinfo_come_from_torch(monkeypatch, x86):
    """macOS and Windows have no /proc/cpuinfo: torch's cpuinfo answers for the bf16 flags."""
    import builtins

    real_open = builtins.open

    def no_cpuinfo(path, *a, **k):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert runtime.cpu_flags() == {"avx512_bf16"} and runtime.cpu_bf16() == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert runtime.cpu_flags() == frozenset() and runtime.choose_dtype("auto", "cpu")[0] == torch.float32


def test_cpu_flags_read_this_machine():
    """On Linux the flags are /proc/cpuinfo's own: this CPU's bf16 answer follows them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no x86 /proc/cpuinfo here")
    assert runtime.cpu_flags() == set(line.partition(":")[2].split())
    assert (runtime.cpu_bf16() is not None) == bool({"avx512_bf16", "amx_bf16"} & runtime.cpu_flags())


def test_other_devices_keep_their_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert runtime.choose_dtype("auto", "cuda")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.choose_dtype("auto", "cuda")[0] == torch.float16
    assert runtime.choose_dtype("auto", "mps")[0] == torch.float32
    with pytest.raises(SlmError, match="float16 needs CUDA"):
        runtime.choose_dtype("float16", "cpu")


def test_peak_is_cheap_where_bf16_is_emulated(monkeypatch):
    """Without native bf16 a CPU emulates bf16 matmuls many times slower: the peak is taken at 256,
    not 1024, so that measuring it stays a fraction of a second (the float32 peak keeps 1024)."""
    sizes = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: sizes.append(a[:2]) or real(*a, **k))
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: None)
    runtime.measure_matmul_peak("cpu", torch.bfloat16, reps=1)
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: "AVX512-BF16")
    runtime.measure_matmul_peak("cpu", torch.bfloat16, reps=1)
    runtime.measure_matmul_peak("cpu", torch.float32, reps=1)
    assert sizes == [(256, 256)] * 2 + [(1024, 1024)] * 4
