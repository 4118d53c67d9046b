"""Runs each example's ``--smoke`` mode as a user would (``python examples/x.py --smoke``) and checks its output.

quickstart, megatron_fairscale, dump_activations, logit_lens,
activation_patching and steering spawn their own 2 CPU ranks and check
themselves against the same model on one process; induction_heads runs on
one process. Here we check that each exits 0, printed its checks and left
nothing behind: each runs from the repository root (as a
user would) with its own empty ``TMPDIR``; afterwards that folder is empty
again, and no file was added to the repository root nor added or changed
under docs/ or examples/.
About 5-15 s each on 2 idle cores (induction_heads: 20 s of training + ~10 s; logit_lens,
activation_patching, steering: ~30 s each on 2 busy cores, mostly imports).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _snapshot() -> dict:
    """What an example could litter: the repository root's entries (files with their mtime, folders by
    name) and every file under docs/ and examples/ (mtime). Other folders (flex_model/, _test/) are left
    out: someone may be editing them while the tests run."""
    snap = {p.name: p.stat().st_mtime if p.is_file() else "dir" for p in ROOT.iterdir()}
    for folder in ("docs", "examples"):
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts:
                snap[str(p.relative_to(ROOT))] = p.stat().st_mtime
    return snap


def run_example(name: str, *args: str, tmp_root: Path, timeout: float = 120.0) -> str:
    tmpdir = tmp_root / "TMPDIR"
    tmpdir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmpdir))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # spawn ranks, do not join an outer job
    before = _snapshot()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out[-4000:]}"
    left = sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_"))
    assert not left, f"{name} left {left} in its temp folder:\n{out[-2000:]}"
    after = _snapshot()
    written = sorted(p for p in after if before.get(p) != after[p])
    assert not written, f"{name} wrote {written} into the repository:\n{out[-2000:]}"
    return out


def test_quickstart_smoke(tmp_path):
    out = run_example("quickstart.py", "--smoke", tmp_root=tmp_path)
    assert "retrieved model.layers.0.mlp [firing 0]: shape (4, 8, 32)" in out, out
    assert "retrieved model.layers.1.self_attn.o_proj [firing 0]: shape (4, 8, 32)" in out, out
    assert "retrieved model.layers.1.self_attn.o_proj [firing 2]: shape (4, 8, 32)" in out, out
    assert "edit changed the logits: True" in out, out
    assert "every capture compared: model.layers.0.mlp 2, model.layers.1.self_attn.o_proj 3" in out, out
    assert "matches single process: True" in out, out


def test_megatron_fairscale_smoke(tmp_path):
    out = run_example("megatron_fairscale.py", "--smoke", tmp_root=tmp_path)
    assert "layout dp=1 pp=1 tp=2" in out, out
    assert "local w1 weight on each rank: (32, 32)" in out, out
    assert "retrieved layers.0.feed_forward.w1: full shape (2, 8, 64)" in out, out
    assert "retrieved output: full shape (2, 8, 128)" in out, out
    assert "matches single process: True" in out, out
    assert "gradients of every parameter shard through the edit match single process: True" in out, out


def test_induction_heads_smoke(tmp_path):
    pytest.importorskip("matplotlib", reason="induction_heads.py saves PNGs with matplotlib (the examples extra)")
    pngs = tmp_path / "pngs"
    out = run_example("induction_heads.py", "--smoke", "--out", str(pngs), tmp_root=tmp_path)
    assert "retrieved attention patterns: [(64, 4, 32, 32), (64, 4, 32, 32)], rows sum to 1: True" in out, out
    assert "induction score layer 1:" in out, out
    assert "second-half per-token loss, clean:" in out and "ablated:" in out, out
    assert out.count("copies the sequence at") == 3, out
    assert "hooks fired while sampling: 36 times per layer" in out, out
    assert f"wrote {pngs / 'induction_scores.png'} and {pngs / 'loss_by_position.png'}" in out, out
    assert (pngs / "induction_scores.png").stat().st_size > 0
    assert (pngs / "loss_by_position.png").stat().st_size > 0


def test_dump_activations_default_temp_folder_is_removed(tmp_path):
    """Without --out: rank 0 makes one temp folder, both ranks use it, it is gone at the end (~15 s).
    (``_test/test_activations.py`` runs it with ``--out`` and reads the dump back.)"""
    out = run_example("dump_activations.py", "--smoke", tmp_root=tmp_path)
    assert "model.layers.0.mlp match a single process: True" in out, out
    assert f"removed the temp folder {tmp_path / 'TMPDIR'}{os.sep}flex_acts_" in out, out


def test_logit_lens_smoke(tmp_path):
    """2 ranks (DDP): a few training steps, the lens over every block's resid_post, one figure (--out)."""
    pytest.importorskip("matplotlib", reason="logit_lens.py saves a PNG with matplotlib (the examples extra)")
    pngs = tmp_path / "pngs"
    out = run_example("logit_lens.py", "--smoke", "--out", str(pngs), tmp_root=tmp_path)
    assert "stacked (4, 8, 12, 32)" in out, out
    assert out.count("resid_post: correct-token probability first half") == 4, out
    assert "matches one process: True" in out, out
    assert f"wrote {pngs / 'logit_lens.png'}" in out, out
    assert (pngs / "logit_lens.png").stat().st_size > 0


def test_activation_patching_smoke(tmp_path):
    """2 ranks (DDP): patching_sweep over blocks x positions; without --out the temp folder is removed."""
    pytest.importorskip("matplotlib", reason="activation_patching.py saves a PNG with matplotlib (the examples extra)")
    out = run_example("activation_patching.py", "--smoke", tmp_root=tmp_path)
    assert "Sweep(4 names x 7 positions" in out, out
    assert "largest recovered logit difference: blocks.0.resid_pre at position" in out, out
    assert "matches one process: True" in out, out
    assert f"removed the temp folder {tmp_path / 'TMPDIR'}{os.sep}flex_patching_" in out, out


def test_steering_smoke(tmp_path):
    """2 ranks (DDP): a steering vector from run_with_cache, added on every step of flex.generate."""
    pytest.importorskip("matplotlib", reason="steering.py saves a PNG with matplotlib (the examples extra)")
    pngs = tmp_path / "pngs"
    out = run_example("steering.py", "--smoke", "--out", str(pngs), tmp_root=tmp_path)
    assert "steering vector at blocks.1.resid_post" in out, out
    assert "unsteered continuation:" in out and "steered (scale 1):" in out, out
    assert "scale 0.00: target-topic token frequency" in out and "scale 1.00: target-topic token frequency" in out
    assert "matches one process: True" in out, out
    assert f"wrote {pngs / 'steering.png'}" in out, out
    assert (pngs / "steering.png").stat().st_size > 0
