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
