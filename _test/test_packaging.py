"""Packaging tells the truth: what ``pip install flex_model`` (no extras) gives works, the rest names its extra.

A subprocess hides every package that only an extra installs (an import of
it raises ImportError, as on a machine without it), then imports each name
in ``flex_model.__all__`` and runs the documented one-process entry points:
a hook, a group, an activation dump read back. ``launch.submit`` (submitit,
test extra) must fail with an error that says what to install.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ["transformers", "fairscale", "megatron", "accelerate", "submitit", "matplotlib", "hypothesis",
               "mkdocs", "pytest"]

SCRIPT = r'''
import sys, tempfile
for name in NAMES:
    sys.modules[name] = None  # "import name" now raises ImportError
import torch
import flex_model
from flex_model import *  # noqa: F403
missing = [n for n in flex_model.__all__ if not hasattr(flex_model, n)]
assert not missing, missing
from flex_model import FlexModel, HookFunction, dump_activations
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
out = {}
flex = FlexModel(model, out)
flex.register_forward_hook(HookFunction("0", editing_function=lambda m, x, c, mods: x * 2))
flex.create_hook_group("g", "2")
flex(torch.randn(3, 4), groups="g")
assert [tuple(t.shape) for t in out["2"]] == [(3, 2)]
with tempfile.TemporaryDirectory() as d:
    reader = dump_activations(flex, [torch.randn(3, 4) for _ in range(2)], d, ["1"], progress=False)
    assert tuple(reader.read("1").shape) == (6, 8)
flex.restore()
try:
    from flex_model.launch import submit
    submit(print, nodes=1, tasks_per_node=1, folder=tempfile.mkdtemp())
except ImportError as e:
    assert "pip install" in str(e) and "test" in str(e), e
else:
    raise AssertionError("submit ran without submitit")
print("OK")
'''


def test_the_install_without_extras_works_and_extras_are_named():
    code = SCRIPT.replace("NAMES", repr(EXTRAS_ONLY))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


def test_install_requires_cover_what_the_package_imports():
    """Every third-party module imported at the top of ``flex_model/*.py`` is torch or in requirements.txt."""
    required = {re.split(r"[<>=\[ ]", line)[0].strip().lower()
                for line in (ROOT / "requirements" / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    stdlib = set(sys.stdlib_module_names)
    top_level = set()
    for path in (ROOT / "flex_model").glob("*.py"):
        for line in path.read_text().splitlines():  # module level only: optional imports are indented
            m = re.match(r"(?:from|import) ([a-zA-Z_]\w*)", line)
            if m and m.group(1) not in stdlib and m.group(1) not in ("flex_model", "__future__"):
                top_level.add(m.group(1).lower())
    assert top_level <= required, f"imported at module level but not installed: {sorted(top_level - required)}"
    assert "torch" in required
