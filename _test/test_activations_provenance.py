"""What wrote an activation dump, and clear refusals: another model, a second writer, a short loader, a
broken index, a dangling out_dir, a wrong activation size on resume; on 2 FSDP2 ranks every rank refuses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _test.distributed import run_ranks
from _test.models import TinyGPT
from flex_model import FlexModel
from flex_model.activations import ActivationReader, dump_activations

NAMES = ["layers.0.mlp", "ln_f"]
FIX = "pass another out_dir, or delete it to start over"


def _model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT().eval()


def _batches(n: int = 5, rows: int = 4, seq: int = 8) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (rows, seq), generator=g) for _ in range(n)]


def _dump(out, model=None, loader=None, names=NAMES, run=None, **kw):
    flex = FlexModel(model if model is not None else _model(), {})
    extra = {"run": run} if run is not None else {}
    return dump_activations(flex, _batches() if loader is None else loader, out, names, batches_per_shard=2,
                            progress=False, **extra, **kw)


def _files(d: Path) -> dict:
    """Every file under ``d`` (hidden ones too) and its bytes: a dump 'left as it was' has the same."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_by_a_model_with_other_weights_is_refused_and_the_dump_left_as_it_was(tmp_path):
    _dump(tmp_path, loader=_batches(3))
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["model"]["layout"] == {"dp": 1, "pp": 1, "tp": 1} and len(index["model"]["sha256"]) == 64
    assert {n: m["dtype"] for n, m in index["names"].items()} == {n: "torch.float32" for n in NAMES}
    before = _files(tmp_path)
    other = _model()
    with torch.no_grad():
        other.ln_f.weight[0] += 1e-3  # one weight of one module: same names, shapes and dtypes
    with pytest.raises(ValueError, match=f"the model's weights differ from those that wrote {tmp_path} "
                                         rf"\(sha256 [0-9a-f]{{12}}… now vs {index['model']['sha256'][:12]}… "
                                         f"in its index\\): resume with the model that wrote it, or {FIX}") as info:
        _dump(tmp_path, model=other)
    assert type(info.value).__name__ == "DumpMismatch"
    assert _files(tmp_path) == before  # nothing appended, no lock left, nothing cleaned
    reader = _dump(tmp_path)  # the model that wrote it resumes
    assert [s["batches"] for s in reader.index["shards"]] == [[0, 2], [2, 3], [3, 5]]


def test_a_second_writer_is_refused_while_the_first_runs_and_a_stale_lock_is_taken_over(tmp_path):
    lock = tmp_path / "d" / ".lock"
    refusals = []

    def run_and_intrude(flex, batch):
        flex(batch)
        if not refusals:  # a second writer on the same directory, while the first holds it
            holder = json.loads(lock.read_text())
            assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
            with pytest.raises(RuntimeError, match=f"{tmp_path / 'd'} is being written by another dump_activations"
                                                   rf" \(process {os.getpid()} on host .*delete {lock}$") as info:
                _dump(tmp_path / "d")
            refusals.append(type(info.value).__name__)

    reader = _dump(tmp_path / "d", run=run_and_intrude)
    assert refusals == ["DumpLocked"] and len(reader) == 20
    assert not lock.exists()  # released at the end

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}))
    _dump(tmp_path / "d", loader=_batches(6))  # stale: its pid is gone from this host; taken over
    assert not lock.exists() and len(ActivationReader(tmp_path / "d")) == 24

    lock.write_text(json.dumps({"pid": dead.pid, "host": "another-host", "token": "x"}))
    before = _files(tmp_path / "d")
    with pytest.raises(RuntimeError, match=f"process {dead.pid} on host another-host"):
        _dump(tmp_path / "d", loader=_batches(7))  # a pid on another host cannot be checked: refused
    assert _files(tmp_path / "d") == before  # the other writer's lock is kept

    lock.unlink()
    with pytest.raises(ZeroDivisionError):  # a failing run releases the lock too
        _dump(tmp_path / "e", run=lambda f, b: 1 / 0)
    assert not (tmp_path / "e" / ".lock").exists()


def test_resume_with_a_shorter_loader_says_so(tmp_path):
    _dump(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path} already holds 5 batches, but the loader gave only 3"):
        _dump(tmp_path, loader=_batches(3))
    assert _files(tmp_path) == before
    _dump(tmp_path)  # the same loader: nothing to do


def test_truncated_index_names_its_path(tmp_path):
    _dump(tmp_path, loader=_batches(2))
    index = tmp_path / "index.json"
    index.write_text(index.read_text()[:40])
    before = _files(tmp_path)
    want = f"{index} is not valid JSON .*truncated or was edited; restore it from a backup, or delete {tmp_path}"
    with pytest.raises(ValueError, match=want):
        ActivationReader(tmp_path)
    with pytest.raises(ValueError, match=want):
        _dump(tmp_path)
    assert _files(tmp_path) == before


def test_dangling_symlink_or_a_file_as_out_dir_is_named(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"out_dir {link} is a symlink to {tmp_path / 'missing'}, which does not "
                                         "exist: create that directory, or pass another out_dir"):
        _dump(link)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"out_dir {tmp_path / 'file'} exists and is not a directory"):
        _dump(tmp_path / "file")


def test_wrong_activation_size_on_resume_is_raised_after_the_first_batch(tmp_path):
    _dump(tmp_path, loader=_batches(2))
    before = _files(tmp_path)
    calls = []

    def run(flex, batch):
        calls.append(1)
        flex(batch)

    longer = _batches(2) + _batches(4, seq=6)[2:]  # same model, same first batches; then shorter sequences
    with pytest.raises(ValueError, match=rf'"layers.0.mlp" is torch.float32 \[4, 6, 32\] in batch 2, but {tmp_path} '
                                         rf"holds it as torch.float32 \[8, 8, 32\] .*{FIX}"):
        _dump(tmp_path, loader=longer, run=run)
    assert len(calls) == 1  # not a whole shard (2 batches) computed first
    assert _files(tmp_path) == before


def _sharded_refusals(rank: int, world_size: int, out_dir: str) -> dict:
    """FSDP2 on 2 ranks: each rank holds half of every weight. Every refusal must reach both ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))

    def sharded(bump_rank_1: bool = False) -> FlexModel:
        model = _model()
        fully_shard(model, mesh=mesh)
        if bump_rank_1 and rank == 1:  # a change in rank 1's shard only: rank 0's shards are identical
            with torch.no_grad():
                model.ln_f.weight.to_local()[0] += 1e-3
        return FlexModel(model, {})

    loader = [b.chunk(world_size)[rank] for b in _batches()]
    seen = {}

    def refused(key, flex, batches):
        try:
            dump_activations(flex, batches, out_dir, NAMES, batches_per_shard=2, progress=False)
        except (ValueError, RuntimeError) as e:
            seen[key] = f"{type(e).__name__}: {e}"
        else:
            seen[key] = "not refused"
        flex.restore()

    flex = sharded()
    dump_activations(flex, loader[:3], out_dir, NAMES, batches_per_shard=2, progress=False)
    flex.restore()
    refused("weights", sharded(bump_rank_1=True), loader)
    refused("short", sharded(), loader[:2])
    if rank == 0:  # a live writer's lock (this rank's parent, the test process)
        Path(out_dir, ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    refused("locked", sharded(), loader)
    if rank == 0:
        Path(out_dir, ".lock").unlink()
    flex = sharded()
    reader = dump_activations(flex, loader, out_dir, NAMES, batches_per_shard=2, progress=False)
    flex.restore()
    seen["rows"] = len(reader) if reader is not None else None
    return seen


def test_on_a_sharded_model_each_rank_hashes_its_own_shards_and_every_rank_refuses(tmp_path):
    out = str(tmp_path)
    seen = run_ranks(_sharded_refusals, 2, out, timeout=90)
    weights = f"the model's weights differ from those that wrote {out} (sha256 "
    assert seen[0]["weights"].startswith(f"DumpMismatch: {weights}"), seen
    assert "; the shards of rank 1 differ): resume with the model that wrote it" in seen[0]["weights"], seen
    assert seen[1]["weights"].startswith(f"DumpMismatch: the owner rank 0 refused to write to {out}: "
                                         f"DumpMismatch: {weights}"), seen
    assert seen[0]["weights"].split(weights)[1] == seen[1]["weights"].split(weights)[1]  # the same verdict
    for rank in (0, 1):
        assert "already holds 3 batches, but the loader gave only 2" in seen[rank]["short"], seen
        assert seen[rank]["locked"].startswith("DumpLocked: ") and "is being written by another" in seen[rank][
            "locked"], seen
    assert seen[0]["rows"] == 20 and seen[1]["rows"] is None
    index = ActivationReader(tmp_path).index
    assert index["model"]["layout"] == {"dp": 2, "pp": 1, "tp": 1}
    assert len(set(index["model"]["rank_sha256"])) == 2  # each rank hashed its own (different) shards
    with pytest.raises(ValueError, match=rf"{out} was written by a model laid out as dp=2 pp=1 tp=1; this one is "
                                         rf"dp=1 pp=1 tp=1\. Resume with the same layout, or {FIX}"):
        _dump(tmp_path, loader=_batches(6))  # the same weights on one process
