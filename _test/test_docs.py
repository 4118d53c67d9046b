"""Every ```python block of docs/*.md and README.md runs; the docs site builds with ``mkdocs build --strict``.

A block preceded by ``<!-- multi-rank -->`` runs on 2 gloo ranks (``run_ranks``):
the code sees an initialised default process group. Other blocks run in this
process, each in a fresh namespace.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _test.distributed import run_ranks

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"(?P<marker><!-- multi-rank -->\s*\n)?^```python[^\n]*\n(?P<code>.*?)^```", re.S | re.M)


def blocks():
    for path in FILES:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            yield pytest.param(m.group("code"), bool(m.group("marker")), path.name, line,
                               id=f"{path.name}:{line}")


def _run(code: str, name: str) -> None:
    torch.set_num_threads(1)
    try:
        exec(compile(code, name, "exec"), {"__name__": "__docs__"})
    except NameError as e:
        raise AssertionError(f"{name}: {e}. Every ```python block of the docs runs on its own, in a fresh "
                             "namespace: define (or import) what it uses in the block itself") from e


def _run_on_rank(rank: int, world_size: int, code: str, name: str) -> None:
    _run(code, name)


def test_docs_have_code_blocks():
    found = list(blocks())
    assert len(found) >= 8, [p.id for p in found]
    assert any(p.values[1] for p in found), "no multi-rank block found"


@pytest.mark.parametrize("code, multi_rank, file, line", list(blocks()))
def test_code_block_runs(code, multi_rank, file, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    name = f"{file}:{line}"
    if multi_rank:
        run_ranks(_run_on_rank, 2, code, name, timeout=90)
    else:
        _run(code, name)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason='the docs extra is not installed (pip install -e ".[docs]")')
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
