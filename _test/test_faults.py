"""A failure on one rank is an error on every rank, never a hang, and the next pass is right.

Each case breaks a hook on ONE rank of a real gloo job (the others are
fine), checks that every rank raises within a bounded time — the failing
rank its own exception, the others ``HookFailure`` (or the same ValueError,
when every rank can see the problem) — and then runs a correct pass on the
same wrapper and compares it with one process. The harness kills ranks that
do not report (a hang fails the test).
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import pytest
import torch
from torch import nn

from _test.distributed import multi_process, tokens
from _test.models import fairscale_tp_gpt, tiny_gpt
from flex_model import FlexModel, HookFailure, HookFunction, RouteActivation, Router, ShardInfo, ShardwiseEdit

LIMIT_S = 30


def raises_on_every_rank(rank: int, failing: int, error: type, call: Callable[[], object],
                         others: type = HookFailure) -> BaseException:
    """``call()`` raises ``error`` on rank ``failing`` and ``others`` elsewhere, within LIMIT_S."""
    start = time.monotonic()
    with pytest.raises(error if rank == failing else others) as info:
        call()
    assert time.monotonic() - start < LIMIT_S
    return info.value


class FailOn(ShardwiseEdit):
    """A shardwise edit that doubles its shard, and raises on one rank while ``armed``."""

    def __init__(self, rank: int, failing: int) -> None:
        self.rank, self.failing, self.armed = rank, failing, True

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> Optional[torch.Tensor]:
        if self.armed and self.rank == self.failing:
            raise KeyError(f"broken on rank {self.rank}")
        return local * 2


def _double(module, args, out):
    return out * 2


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from _test.models import Block

    return FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}),
                use_orig_params=True)


def _fairscale(model: nn.Module, rank: int) -> nn.Module:
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    return fairscale_tp_gpt(model, rank)


@pytest.mark.parametrize("failing", [0, 1])
@pytest.mark.parametrize("layout", ["fsdp1", "fairscale_tp2"])
def test_a_shardwise_edit_failing_on_one_rank(layout, failing):
    """Under FSDP the peers used to hang in the next pass; under fairscale TP they got a wrong value."""
    _shardwise_case(layout, failing)


def _shardwise_case(layout: str, failing: int) -> None:
    @multi_process(2, timeout=60)
    def body(rank, world_size):
        model, idx = tiny_gpt(), tokens()
        ref = copy.deepcopy(model)
        ref.layers[0].mlp.up.register_forward_hook(_double)
        if layout == "fsdp1":
            wrapped, mine, want = _fsdp(model), idx[rank * 2:(rank + 1) * 2], slice(rank * 2, (rank + 1) * 2)
        else:
            wrapped, mine, want = _fairscale(model, rank), idx, slice(None)
        flex = FlexModel(wrapped, {})
        edit = FailOn(rank, failing)
        flex.register_forward_hook(HookFunction("layers.0.mlp.up", editing_function=edit))
        error = raises_on_every_rank(rank, failing, KeyError, lambda: flex(mine))
        if rank != failing:
            assert f"rank {failing}" in str(error) and "layers.0.mlp.up" in str(error), str(error)
        edit.armed = False
        for _ in range(2):  # the next passes are right
            torch.testing.assert_close(flex(mine), ref(idx)[want], rtol=1e-5, atol=1e-5)

    body()


@multi_process(2, timeout=60)
def test_routing_with_bad_mask_ids_on_one_rank_under_fsdp(rank, world_size):
    """The router's own mask_ids check raising on rank 1 only: both raise, then routing works."""
    model, idx = tiny_gpt(), tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    flex = FlexModel(_fsdp(model), {})
    router = Router(64, [(0, 32)], {0: [0.0], 1: [1.0]})
    flex.create_hook_group("route", "layers.0.mlp.act", editing_function=RouteActivation(router))
    bad = torch.ones(3 if rank == 1 else 2, 8, dtype=torch.long)
    with router.masks(bad):
        raises_on_every_rank(rank, 1, ValueError, lambda: flex(mine, groups="route"))
    with router.masks(torch.ones(2, 8, dtype=torch.long)):
        out = flex(mine, groups="route")
    torch.testing.assert_close(out, tiny_gpt()(idx)[rank * 2:(rank + 1) * 2], rtol=1e-5, atol=1e-5)


@multi_process(2, timeout=60)
def test_a_shardwise_gradient_hook_failing_on_one_rank_raises_at_the_end_of_backward(rank, world_size):
    model, idx = tiny_gpt(), tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    flex = FlexModel(_fsdp(model), {})
    edit = FailOn(rank, 1)
    flex.register_full_backward_hook(HookFunction("layers.1.mlp", editing_function=edit))
    out = flex(mine)
    raises_on_every_rank(rank, 1, KeyError, lambda: out.sum().backward())
    edit.armed = False
    flex(mine).sum().backward()  # the next pass runs through


@pytest.mark.parametrize("failing", [0, 1])
def test_a_capture_nobody_keeps_failing_on_one_tp_rank(failing):
    """No collective of ours follows a store="none" capture without dp: the failure waits for the pass end."""
    @multi_process(2, timeout=60)
    def body(rank, world_size):
        model, idx = tiny_gpt(), tokens()
        flex = FlexModel(_fairscale(model, rank), {}, store="none")
        flex.register_forward_hook(HookFunction("layers.0.mlp.up", unpack_idx=5 if rank == failing else 0))
        raises_on_every_rank(rank, failing, IndexError, lambda: flex(idx))
        torch.testing.assert_close(flex(idx, groups=[]), tiny_gpt()(idx), rtol=1e-5, atol=1e-5)

    body()


@pytest.mark.parametrize("failing", [0, 1])
def test_a_placement_error_on_one_tp_rank_before_the_gather(failing):
    """A capture under TP whose expected_shape is wrong on one rank only: it travels in the exchange."""
    @multi_process(2, timeout=60)
    def body(rank, world_size):
        model, idx = tiny_gpt(), tokens()
        out = {}
        flex = FlexModel(_fairscale(model, rank), out)
        shape = (4, 8, 99) if rank == failing else (4, 8, 64)
        flex.register_forward_hook(HookFunction("layers.0.mlp.up", expected_shape=shape))
        raises_on_every_rank(rank, failing, ValueError, lambda: flex(idx))
        out.clear()
        flex(idx, groups=[])

    body()


@multi_process(2, timeout=60)
def test_expected_shape_with_the_local_batch_under_dp_is_an_error_on_every_rank(rank, world_size):
    """Giving the batch dim its LOCAL size reads as "the same on every rank"; the ranks' values differ, so
    every rank raises (it used to keep rank 0's rows only)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    out = {}
    flex = FlexModel(DDP(tiny_gpt()), out)
    flex.register_forward_hook(HookFunction("layers.0.mlp", expected_shape=(2, 8, 32),
                                            editing_function=lambda m, x, c, mods: x * 2))
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"taken as the same on every dp rank .* ranks 0 and 1 hold different "
                                         r"values: it is split over dp"):
        flex(mine)
    assert time.monotonic() - start < LIMIT_S
    flex.remove_hook(flex.registrations()[0].hook)
    flex.register_forward_hook(HookFunction("layers.0.mlp", expected_shape=(4, 8, 32)))  # the full batch: right
    flex(mine)
    if rank == 0:
        torch.testing.assert_close(out["layers.0.mlp"][-1], _capture(tiny_gpt(), "layers.0.mlp", idx))


@multi_process(2, timeout=60)
def test_uneven_local_batches_that_fit_expected_shape_on_one_rank_only(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    idx = tokens(n=5)
    mine = idx[:3] if rank == 0 else idx[3:]
    flex = FlexModel(DDP(tiny_gpt()), {})
    flex.register_forward_hook(HookFunction("layers.0.mlp", expected_shape=(3, 8, 32)))
    with pytest.raises(ValueError, match="the ranks disagree on how the value is split"):
        flex(mine)


@multi_process(2, timeout=60)
def test_an_edit_in_place_returning_none_applies_as_on_one_process(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def in_place(module, x, ctx, mods):
        x.mul_(3)

    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    ref = tiny_gpt()
    ref.layers[0].mlp.register_forward_hook(lambda m, a, out: out.mul_(3))
    want = ref(idx)
    flex = FlexModel(DDP(tiny_gpt()), {})
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=in_place))
    got = flex(mine)
    torch.testing.assert_close(got, want[rank * 2:(rank + 1) * 2], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(flex(mine), want[rank * 2:(rank + 1) * 2], rtol=1e-5, atol=1e-5)


def _capture(model: nn.Module, name: str, idx: torch.Tensor) -> torch.Tensor:
    seen = []
    model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    model(idx)
    return seen[0]


@multi_process(2, timeout=60)
def test_hook_groups_under_pipeline_stages_run_the_same_collectives_everywhere(rank, world_size):
    """Stage 0 holds layers 0-1, stage 1 layers 2-4 of one model: a pattern that matches on one stage only,
    or a different number of modules per stage, registers on the stage that holds them, with no hang; a
    pattern that matches nowhere is a ValueError on every rank."""
    stage = nn.ModuleDict({f"block{i}": nn.Linear(4, 4) for i in ((0, 1) if rank == 0 else (2, 3, 4))})
    flex = FlexModel(stage, {}, pipeline_parallel_size=2)
    start = time.monotonic()
    only_1 = flex.create_hook_group("late", "block3")  # on stage 1 only
    all_of_them = flex.create_hook_group("all_blocks", "block")  # 2 modules on stage 0, 3 on stage 1
    assert [h.module_name for h in only_1] == ["block3"]
    assert [h.module_name for h in all_of_them] == [f"block{i}" for i in range(5)]
    here = sorted(r.name for r in flex.registrations() if r.handle is not None)
    assert here == (["block0", "block1"] if rank == 0 else ["block2", "block3", "block3", "block4"])
    with pytest.raises(ValueError, match='no module name contains "block9" on any pipeline stage'):
        flex.create_hook_group("none", "block9")
    assert time.monotonic() - start < LIMIT_S
    flex.restore()


@multi_process(2, timeout=60)
def test_an_edit_of_token_ids_under_dp_works_as_on_one_process(rank, world_size):
    """Integer values carry no gradient: editing them sharded used to fail ("only Tensors of floating point
    dtype can require gradients") while one process worked."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def shift(module, inputs, ctx, mods):
        return (inputs + 1) % 61

    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    ref = tiny_gpt()
    ref.wte.register_forward_pre_hook(lambda m, args: ((args[0] + 1) % 61,))
    want = ref(idx)[rank * 2:(rank + 1) * 2]
    flex = FlexModel(DDP(tiny_gpt()), {})
    flex.register_forward_pre_hook(HookFunction("wte", editing_function=shift))
    torch.testing.assert_close(flex(mine), want, rtol=1e-5, atol=1e-5)
