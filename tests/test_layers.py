"""The package's shape: imports flow one way (import-linter contracts in pyproject.toml), no import cycles, no
private names imported across packages, and importing minimind changes no process-wide setting."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "minimind"


def test_import_contracts_hold():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists() and shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    res = subprocess.run([str(exe) if exe.exists() else "lint-imports", "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (pip install -e '.[dev]')")
    graph = grimp.build_graph("minimind", exclude_type_checking_imports=True)
    # a package's __init__ re-exporting its own submodules is not a cycle between modules
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if not m.startswith(d + ".")}
             for m in graph.modules}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])  # minimind.<package> (or minimind.<module> for top-level files)


def test_no_private_names_across_packages():
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1 packages
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                target = ".".join(package[:len(package) - node.level + 1] + ([target] if target else []))
            if not target or not target.startswith("minimind") or _package(target) == _package(module):
                continue
            found += [f"{module}: from {target} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "\n".join(found)


def test_importing_minimind_changes_no_process_setting():
    code = """
import torch
before = (torch.get_num_threads(), torch.backends.mkldnn.enabled)
import minimind, minimind.engine, minimind.checkpoint.loader, minimind.text.reply
from minimind import LLM, MiniMindConfig
from minimind.model import MiniMindForCausalLM
model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=64, vocab_size=64))
llm = LLM(model, max_num_seqs=1, fused=False, keep_freed_memory=False)
llm.generate([[1, 2, 3]], minimind.SamplingParams(max_tokens=3, temperature=0))
after = (torch.get_num_threads(), torch.backends.mkldnn.enabled)
print(before == after, before, after)
"""
    # -W error: a step must not warn either (what `minimind chat` would print between the question and the answer)
    res = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == "True", res.stdout
