"""Data flows one way through the stages (docs/architecture.md): no module imports a later stage.

Imports are read from the source (every ``import`` and ``from ... import``, also those inside
functions, which the CLI uses to stay fast), so a lazy import of a later stage is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slmkit"

# Stage of every module, in pipeline order. A module may import its own stage and earlier ones.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("shared", ("errors", "files", "config", "runtime", "cpu_kernels")),
    ("model", ("model", "loss", "lora", "quant")),
    ("prepare/data", ("tokenizer", "prepare", "data", "chat", "prepare_chat")),
    ("checkpoint", ("checkpoint",)),
    ("train", ("schedules", "distributed", "rundir", "scoring", "trainer", "train", "finetune", "prune")),
    ("decode", ("decode",)),
    ("generate", ("generate",)),
    ("evaluate/export", ("evaluate", "export")),
    ("serve", ("serve",)),
    ("cli", ("cli", "quickstart")),
]
RANK = {name: rank for rank, (_, names) in enumerate(STAGES) for name in names}


def module_files() -> dict[str, Path]:
    """``slmkit.x.y`` -> its file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def stage(module: str) -> int | None:
    """The stage rank of ``slmkit.<top>...`` (None for the package itself: ``slmkit.__version__``)."""
    parts = module.split(".")
    return RANK[parts[1]] if len(parts) > 1 else None


def slmkit_imports(path: Path) -> set[str]:
    """The slmkit modules a file imports, resolving ``from slmkit import x`` to ``slmkit.x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "slmkit"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "slmkit":
            if node.module == "slmkit":
                found |= {f"slmkit.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                found.add(node.module)
    return found


def test_every_module_has_a_stage():
    tops = {m.split(".")[1] for m in module_files() if "." in m}
    assert tops - RANK.keys() == set(), "add new modules to STAGES here and to docs/architecture.md"


@pytest.mark.parametrize("module", sorted(m for m in module_files() if "." in m))
def test_no_module_imports_a_later_stage(module):
    rank = stage(module)
    later = sorted(m for m in slmkit_imports(module_files()[module]) if (stage(m) or 0) > rank)
    assert later == [], f"{module} ({STAGES[rank][0]}) imports a later stage: {later}"


def test_the_rule_catches_a_backward_import(tmp_path):
    # The checker itself: a decode module that imports generation is reported.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from slmkit.generate import runners\n    import slmkit.export.hf\n")
    assert slmkit_imports(bad) == {"slmkit.generate", "slmkit.export.hf"}
    assert all(stage(m) > RANK["decode"] for m in slmkit_imports(bad))
