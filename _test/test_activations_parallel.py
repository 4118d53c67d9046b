"""Activation dumps written in parallel (replica scope): every rank writes its own part, against one process.

DDP on 2 ranks and fairscale TP=2 x DP=2 on 4 ranks, with a value replicated over tensor parallel (a block's
output) and one split over it (the column-parallel ``layers.0.mlp.up``): the dataset read back equals the
single-process activations of the full batches in global-sample order; every rank wrote 1/(DP*TP) of the
rows (and about that of the bytes); a replicated value moved no bytes, a split one half its local bytes per
rank; a run killed after k batches (the loader raising on every rank) resumes per replica to the same files,
also when one replica got one step further than the other; refusals reach every rank. Then the reader: random
access by global row and by global sample id, a seeded shuffle, ``to_hf_dataset``, the progress bar.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _test.distributed import captured_on_one_process, run_ranks
from _test.models import TinyGPT, fairscale_tp_gpt
from flex_model import FlexModel
from flex_model.activations import ActivationDataset, ActivationReader, dump_activations

N_BATCHES, GLOBAL_BATCH, SEQ = 5, 8, 8
NAMES = ["layers.0", "layers.0.mlp.up"]  # replicated over tp; split over tp (dim 2) under fairscale


class KilledRun(Exception):
    pass


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().eval()


def _batches() -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(N_BATCHES)]


def _reference(names=NAMES) -> dict:
    """One process, full batches, plain captures: the rows in global-sample order."""
    return captured_on_one_process(_model(), names, _batches())


def _loader(replica: int, replicas: int, fail_after=None, n=N_BATCHES):
    for i, b in enumerate(_batches()[:n]):
        if i == fail_after:
            raise KilledRun(f"loader stopped after {i} batches")
        yield b.chunk(replicas)[replica]


def _dump(flex, out, replica, replicas, fail_after=None, n=N_BATCHES, **kw) -> int:
    """One dump on every rank; the number of batches this rank ran."""
    calls = []

    def run(f, batch):
        calls.append(1)
        f(batch)

    kw.setdefault("batches_per_shard", 2)
    try:
        dump_activations(flex, _loader(replica, replicas, fail_after, n), out, NAMES, run=run, progress=False, **kw)
    except KilledRun:
        pass
    return len(calls)


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_same_dump(a: Path, b: Path) -> None:
    """The same index, manifests and shards, byte for byte (nothing lost, nothing listed twice)."""
    assert _files(a) == _files(b)
    assert not list(b.rglob("*.tmp")) and not (b / ".lock").exists()


def _check_matches_one_process(path: Path, ranks: int) -> dict:
    ref = _reference()
    reader = ActivationReader(path)
    reader.verify()
    assert reader.scope == "replica" and len(reader) == N_BATCHES * GLOBAL_BATCH
    data = ActivationDataset(path)
    for n in NAMES:
        assert reader.shape(n) == ref[n].shape and reader.dtype(n) == ref[n].dtype
        torch.testing.assert_close(reader.read(n), ref[n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reader.read(n, 5, 21), ref[n][5:21], rtol=1e-5, atol=1e-5)  # across files
        for row in (0, 3, 17, len(data) - 1):
            torch.testing.assert_close(data[row][n], ref[n][row], rtol=1e-5, atol=1e-5)
    index = reader.index
    assert len(index["ranks"]) == ranks
    per_rank = {r["rank"]: (r["rows"], r["bytes"]) for r in index["ranks"]}
    on_disk = {r["rank"]: sum(p.stat().st_size for p in (path / r["dir"]).glob("shard-*.safetensors"))
               for r in index["ranks"]}
    total_rows, total_bytes = sum(v[0] for v in per_rank.values()), sum(on_disk.values())
    for rank, (rows, nbytes) in per_rank.items():
        assert rows * ranks == total_rows, per_rank  # exactly 1/(DP*TP) of the rows
        assert nbytes == on_disk[rank]
        assert abs(nbytes * ranks - total_bytes) <= 0.02 * total_bytes, on_disk  # the same but for headers
    return on_disk


# == DDP, 2 ranks ==============================================================================================
def _ddp_body(rank: int, world_size: int, root: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    root = Path(root)
    flex = FlexModel(DDP(_model()), {}, scope="replica")  # the dump follows the wrapper's scope
    flex.comm_stats()
    seen: dict = {"calls": {}}
    seen["calls"]["whole"] = _dump(flex, root / "whole", rank, world_size)
    stats = flex.comm_stats()
    seen["replica_collectives"], seen["stage_collectives"] = stats["replica_collectives"], stats["stage_collectives"]
    seen["calls"]["cut"] = _dump(flex, root / "cut", rank, world_size, fail_after=3)
    seen["calls"]["resumed"] = _dump(flex, root / "cut", rank, world_size)
    # one replica one step ahead of the other: both ran 4 batches, then rank 1 "lost" its second shard (as if
    # killed while writing it, before the index listed that step)
    seen["calls"]["ahead"] = _dump(flex, root / "ahead", rank, world_size, n=4)
    torch.distributed.barrier()
    if rank == 1:
        manifest = root / "ahead" / "replica-00001" / "tp-00000" / "manifest.json"
        m = json.loads(manifest.read_text())
        m["shards"] = m["shards"][:1]
        manifest.write_text(json.dumps(m))
        (manifest.parent / "shard-00001.safetensors").rename(manifest.parent / "shard-00001.safetensors.tmp")
        index = root / "ahead" / "index.json"
        i = json.loads(index.read_text())
        i["shards"] = [s for s in i["shards"] if s["batches"][1] <= 2]
        index.write_text(json.dumps(i))
    torch.distributed.barrier()
    seen["calls"]["ahead resumed"] = _dump(flex, root / "ahead", rank, world_size)

    # refusals reach every rank, and leave the dump as it was
    _dump(flex, root / "bad", rank, world_size, n=2, batches_per_shard=1)
    torch.distributed.barrier()
    if rank == 1:  # a byte of rank 1's own shard: only rank 1 reads it on resume
        shard = root / "bad" / "replica-00001" / "tp-00000" / "shard-00000.safetensors"
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    torch.distributed.barrier()
    before = _files(root / "bad")
    for key, kw in (("corrupt", {}), ("scope", {"scope": "global"})):
        try:
            _dump(flex, root / "bad", rank, world_size, batches_per_shard=1, **kw)
            seen[key] = "not refused"
        except ValueError as e:
            seen[key] = f"{type(e).__name__}: {e}"
    torch.distributed.barrier()
    seen["left as it was"] = _files(root / "bad") == before
    flex.restore()
    return seen


def test_ddp_two_ranks_write_in_parallel_and_resume(tmp_path):
    seen = run_ranks(_ddp_body, 2, str(tmp_path), timeout=120)
    for rank in (0, 1):
        assert seen[rank]["calls"] == {"whole": 5, "cut": 3, "resumed": 3, "ahead": 4, "ahead resumed": 3}, seen
        assert seen[rank]["replica_collectives"] == 0  # tp 1: a rank keeps all of its replica's rows
        assert seen[rank]["stage_collectives"] == N_BATCHES  # only the end-of-forward checks span the replicas
        assert seen[rank]["left as it was"]
        assert seen[rank]["scope"].startswith("DumpMismatch: ") and "written in replica scope" in seen[rank]["scope"]
        assert "Pass scope='replica' to resume it" in seen[rank]["scope"]
    bad = tmp_path / "bad" / "replica-00001" / "tp-00000" / "shard-00000.safetensors"
    assert seen[1]["corrupt"].startswith(f"ShardCorrupted: {bad} fails its sha256 check"), seen[1]
    assert seen[0]["corrupt"].startswith(f"ShardCorrupted: rank 1 (replica 1, tp 0) refused to write to "
                                         f"{tmp_path / 'bad'}: ShardCorrupted: {bad} fails its sha256"), seen[0]
    on_disk = _check_matches_one_process(tmp_path / "whole", ranks=2)
    print("bytes per rank:", on_disk)
    assert sorted(on_disk) == [0, 1]
    _assert_same_dump(tmp_path / "whole", tmp_path / "cut")
    _assert_same_dump(tmp_path / "whole", tmp_path / "ahead")


# == fairscale TP=2 x DP=2, 4 ranks ===========================================================================
def _fairscale_body(rank: int, world_size: int, root: str) -> dict:
    from fairscale.nn.model_parallel import initialize as fs

    torch.set_num_threads(1)
    root = Path(root)
    fs.initialize_model_parallel(2)
    tp_rank, dp_rank = fs.get_model_parallel_rank(), fs.get_data_parallel_rank()
    flex = FlexModel(fairscale_tp_gpt(_model(), tp_rank), {})  # global scope; the dump asks for replica scope
    assert (flex.layout.dp, flex.layout.tp) == (2, 2) and flex.layout.my == {"dp": dp_rank, "pp": 0, "tp": tp_rank}
    flex.comm_stats()
    seen = {"calls": [_dump(flex, root / "whole", dp_rank, 2, scope="replica")]}
    seen["stats"] = flex.comm_stats()
    seen["calls"].append(_dump(flex, root / "cut", dp_rank, 2, fail_after=3, scope="replica"))
    seen["calls"].append(_dump(flex, root / "cut", dp_rank, 2, scope="replica"))
    flex.restore()
    fs.destroy_model_parallel()
    return seen


@pytest.fixture(scope="module")
def fairscale_dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairscale")
    seen = run_ranks(_fairscale_body, 4, str(root), timeout=150)
    return root, seen


def test_fairscale_tp2_dp2_dataset_equals_one_process_and_each_rank_wrote_a_quarter(fairscale_dump):
    root, seen = fairscale_dump
    on_disk = _check_matches_one_process(root / "whole", ranks=4)
    print("bytes per rank:", on_disk)
    index = ActivationReader(root / "whole").index
    assert [(r["dp"], r["tp"], r["rows"]) for r in index["ranks"]] == [(0, 0, 10), (0, 1, 10), (1, 0, 10),
                                                                       (1, 1, 10)]
    # the split value (up: 4 rows per replica per batch, 8 positions, 32 of its 64 units per tp rank) moved by
    # one all-to-all per shard: each rank sent the other tp rank's rows of its slice (half its local bytes,
    # what a gather to the replica's root would make one rank send), plus a 104-byte header all-gather;
    # the replicated block output moved nothing, and no data went between replicas
    local_bytes = N_BATCHES * (GLOBAL_BATCH // 2) * SEQ * 32 * 4
    shards = 3  # batches [0, 2), [2, 4), [4, 5)
    for rank, s in enumerate(seen):
        stats = s["stats"]
        assert stats["replica_collectives"] == 2 * shards, (rank, stats)
        assert stats["sent_bytes"] - stats["stage_collectives"] * 448 == local_bytes // 2 + shards * 104, stats
        assert stats["stage_collectives"] == N_BATCHES  # the end-of-forward checks: 448 bytes each


def test_fairscale_kill_and_resume_per_replica_loses_and_duplicates_nothing(fairscale_dump):
    root, seen = fairscale_dump
    assert [s["calls"] for s in seen] == [[5, 3, 3]] * 4  # killed after 3 batches; 2 on disk, 3 run again
    _assert_same_dump(root / "whole", root / "cut")
    reader = ActivationReader(root / "cut")
    ids = [tuple(reader.locate(g)[k] for k in ("replica", "step", "row")) for g in range(len(reader))]
    want = [(d, b, r) for b in range(N_BATCHES) for d in range(2) for r in range(GLOBAL_BATCH // 2)]
    assert ids == want  # every global sample id exactly once, in global order
    assert [reader.global_row(*i) for i in ids] == list(range(len(reader)))


def test_shuffle_is_a_seeded_permutation_of_every_replicas_rows(fairscale_dump):
    root, _ = fairscale_dump
    plain = ActivationDataset(root / "whole")
    a, b = (ActivationDataset(root / "whole", shuffle=True, seed=s) for s in (3, 3))
    other = ActivationDataset(root / "whole", shuffle=True, seed=4)
    assert sorted(a.permutation.tolist()) == list(range(len(plain)))
    assert torch.equal(a.permutation, b.permutation) and not torch.equal(a.permutation, other.permutation)
    for i in (0, 7, len(a) - 1):
        row = int(a.permutation[i])
        for n in NAMES:
            assert torch.equal(a[i][n], plain[row][n])
    loader = torch.utils.data.DataLoader(a, batch_size=8)
    first = next(iter(loader))
    assert torch.equal(first["layers.0"], torch.stack([plain[int(j)]["layers.0"] for j in a.permutation[:8]]))


def test_to_hf_dataset_rows_equal_the_reader_rows(fairscale_dump, tmp_path):
    pytest.importorskip("datasets")
    root, _ = fairscale_dump
    for shuffle in (False, True):
        data = ActivationDataset(root / "whole", shuffle=shuffle, seed=5)
        hf = data.to_hf_dataset(cache_dir=tmp_path / "hf")
        assert len(hf) == len(data) and sorted(hf.column_names) == sorted(NAMES)
        for i in (0, 11, len(data) - 1):
            for n in NAMES:
                assert torch.equal(hf[i][n], data[i][n]), (shuffle, i, n)


# == one process: the reader, the progress bar ==================================================================
def test_one_process_replica_dump_equals_the_global_dump_and_shows_throughput(tmp_path, capsys):
    kw = dict(batches_per_shard=2, progress=True)
    glob = dump_activations(FlexModel(_model(), {}), _batches(), tmp_path / "g", NAMES, **kw)
    capsys.readouterr()
    par = dump_activations(FlexModel(_model(), {}), _batches(), tmp_path / "r", NAMES, scope="replica", **kw)
    err = capsys.readouterr().err
    assert "rows/s=" in err and "MB/s=" in err, err
    assert par.scope == "replica" and glob.scope == "global" and len(par) == len(glob)
    for n in NAMES:
        assert torch.equal(par.read(n), glob.read(n))
        assert torch.equal(ActivationDataset(tmp_path / "g")[9][n], glob.read(n)[9])  # the dataset reads both
    assert par.locate(9) == {"file": "replica-00000/tp-00000/shard-00000.safetensors", "file_row": 9,
                             "replica": 0, "step": 1, "row": 1}
    assert (tmp_path / "r" / "replica-00000" / "tp-00000" / "manifest.json").exists()
    with pytest.raises(ValueError, match="pipeline parallelism"):
        flex = FlexModel(_model(), {})
        flex.layout.pp = 2  # (a layout this one process cannot have; the check comes before anything runs)
        dump_activations(flex, _batches(), tmp_path / "p", NAMES, scope="replica")
    assert not (tmp_path / "p").exists()
    shutil.rmtree(tmp_path / "g")
