"""What every benchmark records beside its numbers: the machine, the code and the command.

Results from several machines live side by side in bench/results/, so each file says which CPU (or
GPU) it was measured on; docs/benchmarks.md groups the numbers by that label.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (or what platform knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that decide which CPU code paths run (slmkit's kernels need AVX-512)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def machine_label() -> str:
    """A short label for docs: "AMD EPYC, AVX2, 2 cores"."""
    flags = cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu_name()}, {isa}, {os.cpu_count()} cores"


def git_commit() -> str:
    """HEAD's short hash, with "+dirty" when tracked files under slmkit/ or bench/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "slmkit", "bench"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """The fields every results file carries: machine, software, code version, time and command."""
    import torch

    # Settings that change which code runs (PyTorch's and slmkit's instruction sets), as the command's prefix.
    env = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                                            "SLMKIT_KERNEL_ISA", "SLMKIT_CPU_KERNELS", "SLMKIT_DECODE_ISA") if k in os.environ]
    info: dict[str, Any] = {
        "command": " ".join([*env, "python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": machine_label(), "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
        "when_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_command() -> str:
    """How this script was run, without ``--out`` (where the file went is not how it was measured)."""
    argv = sys.argv[1:]
    if "--out" in argv:
        del argv[argv.index("--out") : argv.index("--out") + 2]
    return " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *argv])


def save(out: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``out`` as JSON after the fields every results file carries
    (``machine_info``, ``bench_command``), its folder made if need be, and say where."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**machine_info(), "bench_command": bench_command(), **result}, indent=1) + "\n")
    print(f"wrote {out}")
