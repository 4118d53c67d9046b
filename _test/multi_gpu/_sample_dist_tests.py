"""Tiny ``multi_process`` tests for ``test_runner_local.py``.

The file name does not start with ``test_`` so neither pytest nor the
runner's default discovery picks it up.
"""

import torch
import torch.distributed as dist

from _test.distributed import multi_process


@multi_process(world_size=2)
def all_reduce_sums_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size))


@multi_process(world_size=2)
def deliberately_fails(rank, world_size):
    t = torch.ones(1)
    dist.all_reduce(t)  # every rank reaches the same collectives, then fails
    assert t.item() == -1, f"expected -1, all_reduce gave {t.item()}"


@multi_process(world_size=2)
def fails_on_rank_0_before_a_collective(rank, world_size):
    if rank == 0:
        raise RuntimeError("rank 0 gives up before the all_reduce")
    dist.all_reduce(torch.ones(1))  # rank 1 waits here for rank 0


@multi_process(world_size=2)
def still_passes_after_a_desync(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == 3.0


@multi_process(world_size=3)
def other_world_size_is_skipped(rank, world_size):
    raise AssertionError("must not run with 2 tasks")
