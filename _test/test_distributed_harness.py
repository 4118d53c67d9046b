"""Tests of the multi-process harness in ``_test/distributed.py`` itself."""

import time

import pytest
import torch
import torch.distributed as dist

from _test.distributed import device_for_rank, multi_process, run_ranks


def _sum_of_ranks(rank, world_size, offset=0):
    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return (rank, t.item() + offset)


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_ranks_return_all_reduced_values(world_size):
    results = run_ranks(_sum_of_ranks, world_size, offset=100)
    expected = sum(range(world_size)) + 100
    assert results == [(rank, expected) for rank in range(world_size)]


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def test_error_on_one_rank_is_reported():
    with pytest.raises(AssertionError) as info:
        run_ranks(_raise_on_rank_1, 2, timeout=30)
    message = str(info.value)
    assert "rank 1 raised" in message
    assert "ValueError: boom from rank 1" in message
    assert "rank 0: ok" in message


def _rank_0_hangs(rank, world_size):
    if rank == 0:
        while True:
            time.sleep(1)
    return rank


def test_hanging_rank_is_killed_within_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(_rank_0_hangs, 2, timeout=5)
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"took {elapsed:.1f}s"
    assert "rank 0: timed out after 5s, killed" in str(info.value)
    assert "rank 1: ok" in str(info.value)


def _rank_1_raises_while_rank_0_hangs(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 gave up")
    while True:  # e.g. stuck in a collective that will never complete
        time.sleep(1)


def test_ranks_still_running_after_a_failure_are_killed_early():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(_rank_1_raises_while_rank_0_hangs, 2, timeout=60)
    assert time.monotonic() - start < 20, "should not wait the full 60s timeout"
    message = str(info.value)
    assert "RuntimeError: rank 1 gave up" in message
    assert "rank 0: still running 5s after rank 1 failed, killed" in message


@multi_process(world_size=2)
def test_multi_process_decorator(rank, world_size):
    """Runs as a zero-argument pytest test on two ranks."""
    assert device_for_rank(rank) == torch.device("cpu")
    t = torch.ones(3) * (rank + 1)
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((3,), 3.0))


def test_multi_process_wrapper_attributes():
    wrapper = test_multi_process_decorator
    assert wrapper.world_size == 2
    assert wrapper.body.__name__ == "test_multi_process_decorator"
    assert wrapper.__doc__ == "Runs as a zero-argument pytest test on two ranks."
    assert not hasattr(wrapper, "__wrapped__")
    assert wrapper.__code__.co_argcount == 0


def _sum_on_gpu(rank, world_size):
    device = device_for_rank(rank)
    assert device.type == "cuda"
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_ranks_are_spawned_and_use_their_gpu():
    # One rank per GPU (NCCL refuses two ranks on one GPU). The skipif above
    # already touched CUDA in this process, so fork would fail here.
    world_size = min(2, torch.cuda.device_count())
    results = run_ranks(_sum_on_gpu, world_size, backend="nccl", timeout=120)
    expected = float(sum(range(1, world_size + 1)))
    assert results == [[expected] * 4] * world_size
