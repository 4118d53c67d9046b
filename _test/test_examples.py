"""Runs each example's ``--smoke`` mode as a user would (``python examples/x.py --smoke``) and checks its output.

quickstart and megatron_fairscale spawn their own 2 CPU ranks and check
themselves against the same model on one process; induction_heads runs on one
process. Here we check that each exits 0 and printed its checks.
About 5-15 s each on 2 idle cores (induction_heads: 20 s of training + ~10 s).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: float = 120.0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # spawn ranks, do not join an outer job
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def test_quickstart_smoke():
    out = run_example("quickstart.py", "--smoke")
    assert "retrieved model.layers.0.mlp [firing 0]: shape (4, 8, 32)" in out, out
    assert "retrieved model.layers.1.self_attn.o_proj [firing 0]: shape (4, 8, 32)" in out, out
    assert "edit changed the logits: True" in out, out
    assert "matches single process: True" in out, out


def test_megatron_fairscale_smoke():
    out = run_example("megatron_fairscale.py", "--smoke")
    assert "layout dp=1 pp=1 tp=2" in out, out
    assert "local w1 weight on each rank: (32, 32)" in out, out
    assert "retrieved layers.0.feed_forward.w1: full shape (2, 8, 64)" in out, out
    assert "retrieved output: full shape (2, 8, 128)" in out, out
    assert "matches single process: True" in out, out
    assert "gradients of every parameter shard through the edit match single process: True" in out, out


def test_induction_heads_smoke(tmp_path):
    pytest.importorskip("matplotlib", reason="induction_heads.py saves PNGs with matplotlib (the examples extra)")
    out = run_example("induction_heads.py", "--smoke", "--out", str(tmp_path))
    assert "retrieved attention patterns: [(64, 4, 32, 32), (64, 4, 32, 32)], rows sum to 1: True" in out, out
    assert "induction score layer 1:" in out, out
    assert "second-half per-token loss, clean:" in out and "ablated:" in out, out
    assert out.count("copies the sequence at") == 3, out
    assert "hooks fired while sampling: 36 times per layer" in out, out
    assert (tmp_path / "induction_scores.png").stat().st_size > 0
    assert (tmp_path / "loss_by_position.png").stat().st_size > 0
