"""Activation dumps on disk: DDP round trip vs one process, kill + resume, corruption, lazy range reads."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from _test.distributed import captured_on_one_process, run_ranks
from _test.models import TinyGPT, lm_loss
from flex_model import FlexModel, HookFunction
from flex_model import activations as A
from flex_model.activations import ActivationReader, ShardCorrupted, dump_activations

NAMES = ["layers.0.mlp", "layers.1.attn.proj", "ln_f"]
N_BATCHES, GLOBAL_BATCH, SEQ = 5, 4, 8


class KilledRun(Exception):
    pass


def _batches() -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(N_BATCHES)]


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().eval()


def _reference(names=NAMES, batch_dim: int = 0) -> dict:
    """Single-process captures of every batch, concatenated along ``batch_dim``."""
    return captured_on_one_process(_model(), names, _batches(), batch_dim)


def _loader(rank: int, world_size: int, fail_after=None):
    for i, b in enumerate(_batches()):
        if i == fail_after:
            raise KilledRun(f"loader stopped after {i} batches")
        yield b.chunk(world_size)[rank]


def _ddp_dump(rank: int, world_size: int, out_dir: str, fail_after=None) -> int:
    torch.set_num_threads(1)
    flex = FlexModel(DDP(_model()), {})
    assert flex.layout.dp == world_size
    calls = []

    def run(f, batch):
        calls.append(1)
        f(batch)

    reader = dump_activations(flex, _loader(rank, world_size, fail_after), out_dir, NAMES, batches_per_shard=2,
                              run=run, progress=False)
    assert (reader is not None) == (rank == 0)
    assert not flex.output_dict  # flushed: nothing left in memory
    flex.restore()
    return len(calls)


def _assert_same_dump(a: Path, b: Path, names=NAMES) -> None:
    ra, rb = ActivationReader(a), ActivationReader(b)
    assert ra.index == rb.index  # same shards, batch/row ranges and sha256 of every file
    for shard in ra.index["shards"]:
        assert (a / shard["file"]).read_bytes() == (b / shard["file"]).read_bytes()
    for n in names:
        torch.testing.assert_close(ra.read(n), rb.read(n), rtol=0, atol=0)
    assert not list(b.glob("*.tmp"))


def test_ddp_round_trip_matches_one_process(tmp_path):
    calls = run_ranks(_ddp_dump, 2, str(tmp_path), timeout=60)
    assert calls == [N_BATCHES, N_BATCHES]
    reader = ActivationReader(tmp_path)
    reader.verify()
    assert [s["batches"] for s in reader.index["shards"]] == [[0, 2], [2, 4], [4, 5]]
    ref = _reference()
    assert sorted(reader.names) == sorted(NAMES) and len(reader) == N_BATCHES * GLOBAL_BATCH
    for n in NAMES:
        assert reader.shape(n) == ref[n].shape and reader.dtype(n) == ref[n].dtype
        torch.testing.assert_close(reader.read(n), ref[n])


def test_ddp_dump_stopped_midway_resumes_to_the_same_files(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_ranks(_ddp_dump, 2, str(whole), timeout=60)
    with pytest.raises(AssertionError, match="KilledRun"):
        run_ranks(_ddp_dump, 2, str(cut), 3, timeout=60)
    # batch 2 ran but its shard was not complete: only shard [0, 2) is on disk
    assert [s["batches"] for s in ActivationReader(cut).index["shards"]] == [[0, 2]]
    calls = run_ranks(_ddp_dump, 2, str(cut), timeout=60)
    assert calls == [N_BATCHES - 2] * 2  # both ranks skipped the same two batches
    _assert_same_dump(whole, cut)


def test_ddp_write_failure_on_the_owner_raises_on_every_rank(tmp_path):
    (tmp_path / "shard-00001.safetensors").mkdir()  # the owner cannot put shard 1 there
    with pytest.raises(AssertionError) as info:
        run_ranks(_ddp_dump, 2, str(tmp_path), timeout=60)
    report = str(info.value)
    assert "IsADirectoryError" in report.split("rank 1")[0], report  # rank 0: the real error
    assert "the owner rank 0 failed to write the shard of batches [2, 4)" in report, report  # rank 1
    assert [s["file"] for s in ActivationReader(tmp_path).index["shards"]] == ["shard-00000.safetensors"]


def _single_dump(out_dir, batches_per_shard=2, names=NAMES, batch_dim=0) -> ActivationReader:
    flex = FlexModel(_model(), {}, batch_dim=batch_dim)
    return dump_activations(flex, _batches(), out_dir, names, batches_per_shard=batches_per_shard, progress=False)


def _killed_while_writing_shard(out_dir: str) -> None:
    """Child process: dies by SIGKILL half-way through writing the second shard's temp file."""
    torch.set_num_threads(1)
    writes = []
    real = A._atomic_write

    def dying_write(path, write):
        writes.append(path.name)
        if len(writes) == 3:  # shard 0, index, then shard 1
            tmp = path.with_name(path.name + ".tmp")
            write(tmp)
            os.truncate(tmp, tmp.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, write)

    A._atomic_write = dying_write
    _single_dump(out_dir)


def test_sigkill_during_a_shard_write_leaves_complete_shards_and_resumes(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _single_dump(whole)
    child = multiprocessing.get_context("fork").Process(target=_killed_while_writing_shard, args=(str(cut),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert (cut / "shard-00001.safetensors.tmp").exists()
    assert [s["file"] for s in ActivationReader(cut).index["shards"]] == ["shard-00000.safetensors"]
    _single_dump(cut)
    _assert_same_dump(whole, cut)


def test_flipped_bytes_and_truncation_are_detected(tmp_path):
    reader = _single_dump(tmp_path)
    shard1, shard2 = tmp_path / "shard-00001.safetensors", tmp_path / "shard-00002.safetensors"
    data = bytearray(shard1.read_bytes())
    data[-7] ^= 0xFF  # a byte inside the tensor data, size unchanged
    shard1.write_bytes(bytes(data))
    shard2.write_bytes(shard2.read_bytes()[:-10])
    reader = ActivationReader(tmp_path)
    torch.testing.assert_close(reader.read("ln_f", 0, 8), _reference(["ln_f"])["ln_f"][:8])  # shard 0 only
    with pytest.raises(ShardCorrupted, match=r"shard-00001.safetensors fails its sha256 check"):
        reader.read("ln_f", 8, 9)
    with pytest.raises(ShardCorrupted, match=r"shard-00002.safetensors has \d+ bytes but index.json recorded"):
        reader.read("ln_f", 16, 20)
    with pytest.raises(ShardCorrupted, match="shard-00001"):
        ActivationReader(tmp_path).verify()
    with pytest.raises(ShardCorrupted, match="shard-00001"):  # a rerun does not build on a bad shard
        _single_dump(tmp_path)


def _data_offsets(path: Path, name: str) -> tuple:
    """Byte range of tensor ``name`` in a safetensors file's data section (from its JSON header)."""
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return tuple(header[name]["data_offsets"])


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_lazy_range_reads_return_exactly_those_rows(tmp_path, batch_dim):
    reader = _single_dump(tmp_path, batches_per_shard=2, batch_dim=batch_dim)
    ref = _reference(batch_dim=batch_dim)
    rows = ref["ln_f"].shape[batch_dim]
    assert len(reader) == rows
    for start, stop in [(0, rows), (0, 1), (3, 11), (7, 8), (8, 16), (15, 20), (5, 5), (-3, None), (2, -2)]:
        lo, hi, _ = slice(start, stop).indices(rows)
        want = ref["ln_f"].narrow(batch_dim, lo, hi - lo)
        torch.testing.assert_close(reader.read("ln_f", start, stop), want, rtol=0, atol=0)
    (tmp_path / "shard-00002.safetensors").unlink()  # rows 16..19 (batch_dim 0) live only there
    fresh = ActivationReader(tmp_path)
    first_two = 4 * GLOBAL_BATCH if batch_dim == 0 else 4 * SEQ
    torch.testing.assert_close(fresh.read("layers.0.mlp", 0, first_two),
                               ref["layers.0.mlp"].narrow(batch_dim, 0, first_two), rtol=0, atol=0)
    with pytest.raises(ShardCorrupted, match="missing"):
        fresh.read("layers.0.mlp", first_two, first_two + 1)
    # without hashing, a read touches only its tensor's rows: bytes changed in another tensor go unseen
    shard0 = tmp_path / "shard-00000.safetensors"
    header_len = 8 + int.from_bytes(shard0.read_bytes()[:8], "little")
    data = bytearray(shard0.read_bytes())
    lo, hi = _data_offsets(shard0, "layers.0.mlp")
    data[header_len + lo: header_len + hi] = bytes(hi - lo)  # zero every byte of another tensor
    shard0.write_bytes(bytes(data))
    lazy = ActivationReader(tmp_path, verify_on_read=False)
    torch.testing.assert_close(lazy.read("ln_f", 0, 3), ref["ln_f"].narrow(batch_dim, 0, 3), rtol=0, atol=0)
    assert lazy.read("layers.0.mlp", 0, 1).abs().sum() == 0
    with pytest.raises(ShardCorrupted, match="shard-00000.safetensors fails its sha256 check"):
        ActivationReader(tmp_path).read("ln_f", 0, 3)
    with pytest.raises(IndexError, match=f"has {rows} rows"):
        fresh.read("ln_f", 0, rows + 1)
    with pytest.raises(KeyError, match="ln_f"):
        fresh.read("ln_g")


def test_gradients_dumped_with_a_backward_pre_hook(tmp_path):
    backward = lambda f, batch: lm_loss(f(batch), batch).backward()  # noqa: E731
    reader = dump_activations(FlexModel(_model(), {}), _batches(), tmp_path, ["ln_f"], hook_type="full_backward_pre",
                              batches_per_shard=2, run=backward, progress=False)
    want: dict = {}
    flex = FlexModel(_model(), want)
    flex.register_full_backward_pre_hook(HookFunction("ln_f"))
    for b in _batches():
        backward(flex, b)
    torch.testing.assert_close(reader.read("ln_f"), torch.cat(want["ln_f"]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="hook_type must be one of"):
        dump_activations(FlexModel(_model(), {}), _batches(), tmp_path / "t", ["ln_f"], hook_type="tensor")


def test_resume_with_other_names_or_a_module_firing_twice_is_refused(tmp_path):
    _single_dump(tmp_path / "a", names=["ln_f"])
    with pytest.raises(ValueError, match=r"holds a dump of \['ln_f'\]"):
        _single_dump(tmp_path / "a", names=["layers.0.mlp"])
    with pytest.raises(ValueError, match="'unpack_idx': 0.*'unpack_idx': 1"):
        dump_activations(FlexModel(_model(), {}), _batches(), tmp_path / "a", ["ln_f"], unpack_idx=1)
    flex = FlexModel(_model(), {})
    twice = lambda f, batch: (f(batch), f(batch))  # noqa: E731
    with pytest.raises(ValueError, match='"ln_f" fired 2 times in batch 0'):
        dump_activations(flex, _batches(), tmp_path / "b", ["ln_f"], run=twice, progress=False)
    assert not flex.get_hook_function_groups()  # its capture hooks were removed


def test_example_smoke(tmp_path):
    """examples/dump_activations.py --smoke as a user runs it (2 spawned CPU ranks, ~20 s)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "dump_activations.py"), "--smoke", "--out",
                           str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "model.layers.0.mlp match a single process: True" in out, out
    reader = ActivationReader(tmp_path)
    reader.verify()
    assert [s["batches"] for s in reader.index["shards"]] == [[i, i + 1] for i in range(6)]
    assert sorted(reader.names) == ["model.layers.0.mlp", "model.layers.1.self_attn.o_proj", "model.norm"]
