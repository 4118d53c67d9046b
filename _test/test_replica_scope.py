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


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from _test.models import Block

    return FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}),
                use_orig_params=True)


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def _fsdp_body(rank: int, world_size: int, wrap) -> None:
    """A sharded-data-parallel model in replica scope: each rank's captures and edits are its own slice's."""
    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    specs = replica_specs()
    out_ref, seen, _ = _reference(tiny_gpt(), mine, specs)
    got = {}
    flex = FlexModel(wrap(tiny_gpt()), got, scope="replica")
    register(flex, specs)
    out = flex(mine)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    (lm_loss_sum(out, mine) / (mine.numel() - mine.shape[0])).backward()
    check_capture_dict(got, seen)
    assert flex.comm_stats()["replica_collectives"] == 0
    flex.restore()


@pytest.mark.parametrize("wrap", [_fsdp1, _fsdp2], ids=["fsdp1", "fsdp2"])
def test_replica_scope_under_fsdp(wrap):
    run_ranks(_fsdp_body, 2, wrap, timeout=120)


@multi_process(4, timeout=120)
def test_replica_scope_under_dtensor_tp2_dp2(rank, world_size):
    """A 2-D ("dp", "tp") mesh, the MLP colwise / rowwise on "tp": each replica gathers its two tp shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    mine = x[dp_rank * 2:(dp_rank + 1) * 2]
    a = fixed(16, 16, seed=2)
    specs = [HookSpec("forward", "0", lambda h: h @ a + h.flip(0)), HookSpec("forward", "2")]
    with reference_hooks(ref, specs) as seen:
        want = ref(mine)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    got = {}
    flex = FlexModel(model, got, device_mesh=mesh, scope="replica")
    register(flex, specs)
    torch.testing.assert_close(flex(mine), want, rtol=1e-5, atol=1e-6)
    if mesh.get_local_rank("tp") == 0:
        check_capture_dict(got, seen)
    else:
        assert got == {}
    assert flex.comm_stats()["stage_collectives"] == 1  # the end-of-forward check only


class _Stage(torch.nn.ModuleDict):
    def forward(self, x):
        for block in self.values():
            x = block(x)
        return x


@multi_process(4, timeout=120)
def test_replica_scope_with_pipeline_stages(rank, world_size):
    """pp=2 x dp=2 (fairscale order: rank = dp * 2 + pp): each replica's stage-1 capture is shipped to that
    replica's owner (its stage-0 rank), not to global rank 0."""
    import torch.distributed as dist

    dp_rank, pp_rank = divmod(rank, 2)
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(4, 4) for _ in range(4)]
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    mine = x[dp_rank * 2:(dp_rank + 1) * 2]
    got = {}
    stage = _Stage({f"b{i}": blocks[i] for i in ((0, 1) if pp_rank == 0 else (2, 3))})
    flex = FlexModel(stage, got, pipeline_parallel_size=2, data_parallel_size=2, scope="replica")
    flex.create_hook_group("late", "b3")
    other = flex.layout.global_rank(dp_rank, 1 - pp_rank, 0)
    with torch.no_grad():
        if pp_rank == 0:
            dist.send(flex(mine).contiguous(), dst=other)
        else:
            h = torch.empty(2, 4)
            dist.recv(h, src=other)
            flex(h)
    flex.gather_pipeline_outputs()
    if pp_rank == 0:  # this replica's owner
        with torch.no_grad():
            want = blocks[3](blocks[2](blocks[1](blocks[0](mine))))
        torch.testing.assert_close(got["b3"][0], want)
    else:
        assert got == {}


@multi_process(2, timeout=120)
def test_trainable_modules_in_replica_scope_get_the_replicas_own_gradient(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    torch.manual_seed(4)
    probe = torch.nn.Linear(32, 32)
    ref_probe = copy.deepcopy(probe)
    ref = tiny_gpt()
    ref.layers[0].mlp.register_forward_hook(lambda m, a, out: ref_probe(out))
    (lm_loss_sum(ref(mine), mine) / (mine.numel() - mine.shape[0])).backward()
    flex = FlexModel(DDP(tiny_gpt()), {}, scope="replica")
    flex.register_trainable_module("probe", probe)
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, c, mods: mods["probe"](x)))
    out = flex(mine)
    (lm_loss_sum(out, mine) / (mine.numel() - mine.shape[0])).backward()
    torch.testing.assert_close(probe.weight.grad, ref_probe.weight.grad, rtol=1e-5, atol=1e-6)
