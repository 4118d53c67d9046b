"""Replica scope: each data-parallel replica fires on its own batch slice, as one process would on it.

In ``scope="replica"`` a firing gathers over one replica's tensor-parallel
ranks only; the edit runs once per replica; captures land in the replica
owner's ``output_dict``; gradients are those of the replica's own loss. Each
rank checks against one process run on ITS replica's batch slice with the
same plain torch hooks; ``comm_stats()`` shows that no firing collective
spanned data-parallel ranks (only the end-of-pass checks do).
"""
from __future__ import annotations

import copy

import pytest
import torch

from _test.distributed import (HookSpec, check_capture_dict, fixed, lm_loss_sum, multi_process, reference_hooks,
                               register, run_ranks, tokens)
from _test.models import fairscale_tp_gpt, tiny_gpt
from flex_model import FlexModel, HookFunction


def replica_specs():
    a = fixed(32, 32, seed=3)
    return [
        HookSpec("forward", "layers.0.mlp", lambda x: x @ a + x.flip(0)),  # mixes the replica's rows
        HookSpec("forward", "layers.1.ln2"),
        HookSpec("full_backward_pre", "ln_f", lambda g: g * 2),
        HookSpec("full_backward", "layers.1.attn"),
    ]


def _reference(model, idx, specs):
    """One process on this replica's slice; loss = the replica's own mean token loss."""
    with reference_hooks(model, specs) as seen:
        out = model(idx)
        (lm_loss_sum(out, idx) / (idx.numel() - idx.shape[0])).backward()
    return out.detach(), seen, {n: p.grad.clone() for n, p in model.named_parameters()}


def _ddp_body(rank: int, world_size: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    idx = tokens(n=2 * world_size)
    mine = idx[rank * 2:(rank + 1) * 2]
    specs = replica_specs()
    out_ref, seen, grads = _reference(tiny_gpt(), mine, specs)
    model = tiny_gpt()
    got = {}
    flex = FlexModel(DDP(model), got, scope="replica")
    register(flex, specs)
    flex.comm_stats()
    out = flex(mine)
    torch.testing.assert_close(out, out_ref)
    (lm_loss_sum(out, mine) / (mine.numel() - mine.shape[0])).backward()
    check_capture_dict(got, seen)  # every rank is its replica's owner (tp 1)
    stats = flex.comm_stats()
    assert stats["firings"] == 4 and stats["replica_collectives"] == 0, stats
    assert stats["stage_collectives"] == 2, stats  # the end-of-forward and end-of-backward checks, nothing else
    # DDP averages the replicas' gradients: the mean of each replica's own reference gradient
    for name, p in model.named_parameters():
        mean = grads[name].clone()
        torch.distributed.all_reduce(mean)
        torch.testing.assert_close(p.grad, mean / world_size, msg=lambda m, name=name: f"grad {name}: {m}")
    flex.restore()


@pytest.mark.parametrize("world_size", [2, 4])
def test_replica_scope_under_ddp(world_size):
    run_ranks(_ddp_body, world_size, timeout=120)


@multi_process(4, timeout=120)
def test_replica_scope_under_fairscale_tp2_dp2(rank, world_size):
    """Each replica's two TP ranks gather the split up-projection output; the edit mixes its hidden units."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    tp_rank, dp_rank = fs.get_model_parallel_rank(), fs.get_data_parallel_rank()
    idx = tokens()
    mine = idx[dp_rank * 2:(dp_rank + 1) * 2]
    a = fixed(64, 64, seed=5)
    specs = [HookSpec("forward", "layers.0.mlp.up", lambda x: x @ a), HookSpec("forward", "layers.1.mlp.up"),
             HookSpec("full_backward", "layers.1.mlp.down")]
    out_ref, seen, _ = _reference(tiny_gpt(), mine, specs)
    got = {}
    flex = FlexModel(fairscale_tp_gpt(tiny_gpt(), tp_rank), got, scope="replica")
    assert (flex.layout.dp, flex.layout.tp) == (2, 2)
    register(flex, specs)
    # the replica's group is fairscale's tensor-parallel group: no firing spans data-parallel ranks
    assert list(flex.layout.replica.ranks) == torch.distributed.get_process_group_ranks(fs.get_model_parallel_group())
    flex.comm_stats()
    out = flex(mine)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    (lm_loss_sum(out, mine) / (mine.numel() - mine.shape[0])).backward()
    if tp_rank == 0:  # the replica's owner
        check_capture_dict(got, seen)
    else:
        assert got == {}
    stats = flex.comm_stats()
    assert stats["replica_collectives"] > 0 and stats["stage_collectives"] == 2, stats
    fs.destroy_model_parallel()


@multi_process(2, timeout=90)
def test_a_hook_can_choose_replica_scope_in_a_global_wrapper(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    got = {}
    flex = FlexModel(DDP(tiny_gpt()), got)  # global scope
    flex.register_forward_hook(HookFunction("layers.0.mlp", scope="replica"))
    flex.register_forward_hook(HookFunction("layers.1.mlp"))
    with torch.no_grad():
        flex(mine)
    ref = copy.deepcopy(tiny_gpt())
    with reference_hooks(ref, [HookSpec("forward", "layers.0.mlp"), HookSpec("forward", "layers.1.mlp")]) as seen:
        ref(idx)
    torch.testing.assert_close(got["layers.0.mlp"][0], seen["layers.0.mlp"][0][rank * 2:(rank + 1) * 2])
    if rank == 0:
        torch.testing.assert_close(got["layers.1.mlp"][0], seen["layers.1.mlp"][0])  # the global batch
    else:
        assert "layers.1.mlp" not in got


@multi_process(2, timeout=90)
def test_a_replica_scope_failure_on_one_replica_raises_on_every_rank(rank, world_size):
    import time

    from torch.nn.parallel import DistributedDataParallel as DDP

    from flex_model import HookFailure

    def broken(module, x, ctx, mods):
        if torch.distributed.get_rank() == 1:
            raise KeyError("replica 1 broke")
        return x * 2

    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    flex = FlexModel(DDP(tiny_gpt()), {}, scope="replica")
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=broken))
    start = time.monotonic()
    with pytest.raises(KeyError if rank == 1 else HookFailure):
        flex(mine)
    assert time.monotonic() - start < 30
