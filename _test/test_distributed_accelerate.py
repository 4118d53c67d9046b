"""accelerate: a model prepared by ``Accelerator(cpu=True)`` under torchrun (2 processes, DDP over gloo).

The work happens in ``_test/scripts/accelerate_ddp.py``, which checks FlexModel
against one process on every rank and prints one ``RESULT`` line per rank.
The test judges by those lines, not by torchrun's exit code: about one
torchrun+DDP run in 15 aborts at exit after the work succeeded.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from _test.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "_test" / "scripts" / "accelerate_ddp.py"


def _torchrun(nprocs: int, timeout: float) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
           "--master_port", str(free_port()), str(SCRIPT)]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        text = f"timed out after {timeout}s\n{e.stdout or ''}{e.stderr or ''}"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    results = {int(m.group(1)): m.group(2) for m in re.finditer(r"^RESULT rank=(\d+) (.*)$", text, re.M)}
    return results, text


def test_accelerate_prepared_ddp_matches_one_process():
    results, text = _torchrun(2, timeout=180)
    if sorted(results) != [0, 1] and not any(r.startswith("FAIL") for r in results.values()):
        results, text = _torchrun(2, timeout=180)  # a rank printed nothing (start-up race): once more
    assert sorted(results) == [0, 1], f"expected a RESULT line from ranks 0 and 1, got {results}\n{text[-4000:]}"
    for rank, line in results.items():
        assert line.startswith("ok"), f"rank {rank}: {line.replace(' | ', chr(10))}"
    assert "layers.0.mlp" in results[0] and results[1].endswith("captures=[]")
