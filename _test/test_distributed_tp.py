"""Tensor parallel: fairscale, megatron-core and DTensor models under FlexModel, against one process.

Every rank builds the same seeded full model, runs it in-process with plain
torch hooks (the single-process reference), then builds the sharded model
from slices of the same weights, wraps it with ``FlexModel`` and compares
outputs, rank 0's captures (full tensors), edited outputs and every
parameter gradient (each shard against the matching slice of the reference
gradient). gloo on CPU, real process groups (``_test/distributed.py``).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from _test.distributed import (HookSpec, check_capture_dict, check_shard_grads, mix_hidden, mix_rows, multi_process,
                               reference_hooks, register, run_ranks)
from _test.models import (FAIRSCALE_DIMS, MLP, MLP_DIMS, NET_D as D, NET_H as H, NET_VOCAB as V, MegatronMlp, Net,
                          fairscale_net)
from flex_model import FlexModel, HookFunction

B, T = 4, 5  # batch, sequence


# -- fairscale --------------------------------------------------------------------------------
def _fairscale_body(rank: int, world_size: int, sizes: bool, store: str = "root") -> None:
    from fairscale.nn.model_parallel import initialize as fs

    torch.set_num_threads(1)
    tp, dp = 2, world_size // 2
    fs.initialize_model_parallel(tp)
    tp_rank, dp_rank = fs.get_model_parallel_rank(), fs.get_data_parallel_rank()
    torch.manual_seed(0)
    ref = Net()
    idx, w = torch.randint(0, V, (B, T)), torch.randn(B, T, D)
    a_fwd, a_bwd = torch.randn(H, H) / H ** 0.5, torch.randn(H, H) / H ** 0.5
    # "act" is a plain GELU on a split value: only expected_shape says so.
    specs = [HookSpec("forward", "emb"), HookSpec("forward", "pemb"), HookSpec("forward", "up", mix_hidden(a_fwd)),
             HookSpec("forward", "act", expected_shape=(None, None, H)), HookSpec("forward_pre", "down"),
             HookSpec("full_backward", "down", mix_hidden(a_bwd)), HookSpec("full_backward_pre", "up"),
             HookSpec("tensor", "up.weight", mix_rows(a_bwd))]
    with reference_hooks(ref, specs) as want:
        ref_out = ref(idx)
        ((ref_out * w).sum() / B).backward()

    net = fairscale_net(ref, tp_rank, tp)
    got: Dict[str, List[torch.Tensor]] = {}
    if sizes:
        flex = FlexModel(net, got, tensor_parallel_size=tp, data_parallel_size=dp, store=store)
    else:
        flex = FlexModel(net, got, store=store)
    assert (flex.layout.tp, flex.layout.dp, flex.layout.pp) == (tp, dp, 1)
    register(flex, specs)
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    out = flex(idx[rows])
    assert_close(out, ref_out[rows])
    assert not torch.allclose(out, Net.forward(ref, idx[rows])), "the edit on up did not change the output"
    ((out * w[rows]).sum() / (B // dp)).backward()
    for p in net.parameters():  # what DDP would do
        dist.all_reduce(p.grad, group=fs.get_data_parallel_group())
        p.grad /= dp
    check_shard_grads(net, ref, FAIRSCALE_DIMS, tp_rank, tp)
    if rank == 0 or store == "all":
        check_capture_dict(got, want)
    else:
        assert got == {}, f"rank {rank} stored {sorted(got)}"
    for name in FAIRSCALE_DIMS:
        assert_close(flex.get_module_parameter(name), ref.get_parameter(name),
                     msg=lambda m, name=name: f"{name}: {m}")

    bad = flex.register_forward_hook(HookFunction("up", expected_shape=(B // dp, T, H + 1)))
    with pytest.raises(ValueError, match=rf'expected_shape \({B // dp}, {T}, {H + 1}\).*local shape '
                                         rf'\({B // dp}, {T}, {H // tp}\).*"up"'):
        flex(idx[rows])
    bad.remove()
    flex.restore()
    fs.destroy_model_parallel()


@multi_process(world_size=2)
def test_fairscale_tp2(rank, world_size):
    """Embeddings, column/row parallel linears at TP=2: captures, a mixing edit, backward edit, grads."""
    _fairscale_body(rank, world_size, sizes=True)


@multi_process(world_size=2)
def test_fairscale_tp2_store_all(rank, world_size):
    """store="all": every rank's output_dict holds the full captures."""
    _fairscale_body(rank, world_size, sizes=True, store="all")


@multi_process(world_size=4)
def test_fairscale_tp2_dp2(rank, world_size):
    """TP=2 × DP=2 with the sizes given (fairscale's rank order is FlexModel's default)."""
    _fairscale_body(rank, world_size, sizes=True)


@multi_process(world_size=4)
def test_fairscale_tp2_dp2_layout_read_from_fairscale(rank, world_size):
    _fairscale_body(rank, world_size, sizes=False)


# -- megatron-core ----------------------------------------------------------------------------
def test_megatron_core_tp2():
    """megatron-core Column/RowParallelLinear at TP=2 (tuple outputs): every hook type, edits, grads."""
    # Imported here, before the ranks fork, so they share it (and a missing package is a skip).
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core)")
    run_ranks(_megatron_body, 2, timeout=120)


def _megatron_body(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state as ps
    from flex_model import MEGATRON_ORDER

    torch.set_num_threads(1)
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_rank = ps.get_tensor_model_parallel_rank()
    assert tp_rank == rank
    torch.manual_seed(1)
    ref = MLP(D, H)
    x, w = torch.randn(T, B, D), torch.randn(T, B, D)  # megatron's [seq, batch, hidden]
    a_fwd, a_bwd = torch.randn(H, H) / H ** 0.5, torch.randn(H, H) / H ** 0.5
    specs = [HookSpec("forward", "up", mix_hidden(a_fwd)), HookSpec("forward_pre", "down"), HookSpec("forward", "down"),
             HookSpec("full_backward", "down", mix_hidden(a_bwd)), HookSpec("full_backward_pre", "up"),
             HookSpec("tensor", "up.weight"), HookSpec("tensor", "down.weight")]
    with reference_hooks(ref, specs) as want:
        x_ref = x.clone().requires_grad_()
        ref_out = ref(x_ref)
        (ref_out * w).sum().backward()

    net = MegatronMlp(ref, tp_rank, 2)
    assert net.up.weight.partition_dim == 0 and net.down.weight.partition_dim == 1
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got, tensor_parallel_size=2, parallel_order=MEGATRON_ORDER)
    register(flex, specs)
    x_par = x.clone().requires_grad_()
    out = flex(x_par)
    assert_close(out, ref_out)
    assert not torch.allclose(out, MLP.forward(ref, x)), "the edit on up did not change the output"
    (out * w).sum().backward()
    assert_close(x_par.grad, x_ref.grad)
    check_shard_grads(net, ref, MLP_DIMS, tp_rank, 2)
    if rank == 0:
        check_capture_dict(got, want)
    for name in MLP_DIMS:
        assert_close(flex.get_module_parameter(name), ref.get_parameter(name),
                     msg=lambda m, name=name: f"{name}: {m}")
    flex.restore()
    ps.destroy_model_parallel()


# -- DTensor (torch.distributed.tensor.parallel) --------------------------------------------
def _dtensor_run(order: str, ref: nn.Module, net: nn.Module, plan: dict, specs: List[HookSpec], x: torch.Tensor,
                 w: torch.Tensor, unedited: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Reference run of ``ref``; then ``net`` (same weights) parallelized by ``plan`` at TP=2 and hooked.

    ``order``: "before" registers the module hooks, then parallelizes (they see DTensors and plain local
    shards); "after" parallelizes first (they see plain / AsyncCollectiveTensor locals, and some
    DTensors) and lets FlexModel read the layout off the DTensor parameters. Parameter hooks always
    come after: ``parallelize_module`` replaces the parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import parallelize_module

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    with reference_hooks(ref, specs) as want:
        x_ref = x.clone().requires_grad_(x.is_floating_point())
        ref_out = ref(x_ref)
        (ref_out * w).sum().backward()

    net.load_state_dict(ref.state_dict())
    got: Dict[str, List[torch.Tensor]] = {}
    seen: List[str] = []  # what torch hands the first forward hook: it depends on the order
    first = net.get_submodule(specs[0].name)
    module_specs, param_specs = [s for s in specs if s.kind != "tensor"], [s for s in specs if s.kind == "tensor"]
    if order == "before":
        flex = FlexModel(net, got, device_mesh=mesh)
        register(flex, module_specs)
        first.register_forward_hook(lambda m, a, o: seen.append(type(o).__name__))
        parallelize_module(net, mesh, plan)
    else:
        parallelize_module(net, mesh, plan)
        flex = FlexModel(net, got)
        register(flex, module_specs)
        first.register_forward_hook(lambda m, a, o: seen.append(type(o).__name__))
    register(flex, param_specs)
    assert (flex.layout.tp, flex.layout.dp) == (2, 1)
    x_par = x.clone().requires_grad_(x.is_floating_point())
    with implicit_replication():  # lets plain tensors meet DTensors in unsharded code
        out = flex(x_par)
    out = out.full_tensor() if isinstance(out, DTensor) else out
    assert len(seen) == 1 and (order == "after" or seen == ["DTensor"]), seen
    assert_close(out, ref_out)
    assert not torch.allclose(out, unedited(x)), "the edit did not change the output"
    with implicit_replication():
        (out * w).sum().backward()
    if x.is_floating_point():
        assert_close(x_par.grad, x_ref.grad)
    for name, p in net.named_parameters():  # a DTensor grad may be placed unlike its parameter
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        assert_close(grad, ref.get_parameter(name).grad, msg=lambda m, name=name: f"grad {name}: {m}")
    if rank == 0:
        check_capture_dict(got, want)
    for name, _ in net.named_parameters():
        assert_close(flex.get_module_parameter(name), ref.get_parameter(name),
                     msg=lambda m, name=name: f"{name}: {m}")
    flex.restore()


def _dtensor_mlp_body(rank: int, world_size: int, order: str) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    torch.set_num_threads(1)
    torch.manual_seed(2)
    ref = MLP(D, H)
    x, w = torch.randn(B, T, D), torch.randn(B, T, D)
    a_fwd, a_bwd = torch.randn(H, H) / H ** 0.5, torch.randn(H, H) / H ** 0.5
    specs = [HookSpec("forward", "up", mix_hidden(a_fwd)), HookSpec("forward_pre", "down"), HookSpec("forward", "down"),
             HookSpec("full_backward", "down", mix_hidden(a_bwd)), HookSpec("full_backward_pre", "up"),
             HookSpec("tensor", "up.weight", mix_rows(a_bwd)), HookSpec("tensor", "down.weight")]
    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    _dtensor_run(order, ref, MLP(D, H), plan, specs, x, w, lambda x: MLP.forward(ref, x))


# "before": module hooks registered, then parallelize_module; "after": the other way round.
ORDERS = pytest.mark.parametrize("order", ["before", "after"], ids=["hooks_before_parallelize",
                                                                    "hooks_after_parallelize"])


@ORDERS
def test_dtensor_mlp(order):
    run_ranks(_dtensor_mlp_body, 2, order)


def _dtensor_gpt_body(rank: int, world_size: int, order: str) -> None:
    """TinyGPT with both blocks' attention tensor parallel: qkv colwise (left a DTensor, so the
    unsharded attention math runs on DTensors), proj rowwise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from _test.models import TinyGPT

    torch.set_num_threads(1)
    torch.manual_seed(3)
    ref = TinyGPT()
    vocab, d = ref.wte.weight.shape
    idx, w = torch.randint(0, vocab, (2, 7)), torch.randn(2, 7, vocab)
    a = torch.randn(3 * d, 3 * d) / (3 * d) ** 0.5
    specs = [HookSpec("forward", "layers.0.attn.qkv", mix_hidden(a)), HookSpec("forward_pre", "layers.0.attn.proj"),
             HookSpec("forward", "layers.1.attn"), HookSpec("full_backward", "layers.1.attn.proj"),
             HookSpec("full_backward_pre", "layers.0.attn.qkv"), HookSpec("tensor", "layers.0.attn.qkv.weight"),
             HookSpec("tensor", "layers.1.attn.proj.weight")]
    plan = {}
    for i in range(2):
        plan[f"layers.{i}.attn.qkv"] = ColwiseParallel(use_local_output=False)
        plan[f"layers.{i}.attn.proj"] = RowwiseParallel()
    _dtensor_run(order, ref, TinyGPT(), plan, specs, idx, w, lambda x: TinyGPT.forward(ref, x))


@ORDERS
def test_dtensor_tiny_gpt_attention(order):
    run_ranks(_dtensor_gpt_body, 2, order)


@multi_process(world_size=4)
def test_dtensor_mlp_tp2_dp2_mesh(rank, world_size):
    """A 2-D ("dp", "tp") mesh: the MLP tensor parallel on mesh["tp"], each dp row its batch slice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    torch.manual_seed(4)
    ref = MLP(D, H)
    x, w = torch.randn(B, T, D), torch.randn(B, T, D)
    a = torch.randn(H, H) / H ** 0.5
    specs = [HookSpec("forward", "up", mix_hidden(a)), HookSpec("forward_pre", "down"), HookSpec("forward", "down"),
             HookSpec("full_backward", "down"), HookSpec("tensor", "up.weight", mix_rows(a))]
    with reference_hooks(ref, specs) as want:
        ref_out = ref(x)
        ((ref_out * w).sum() / B).backward()

    net = MLP(D, H)
    net.load_state_dict(ref.state_dict())
    parallelize_module(net, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got, device_mesh=mesh)
    assert (flex.layout.dp, flex.layout.tp) == (2, 2)
    register(flex, specs)
    rows = slice(dp_rank * B // 2, (dp_rank + 1) * B // 2)
    out = flex(x[rows])
    assert_close(out, ref_out[rows])
    ((out * w[rows]).sum() / (B // 2)).backward()
    for name, p in net.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(grad, group=mesh.get_group("dp"))  # what DDP / FSDP would do
        assert_close(grad / 2, ref.get_parameter(name).grad, msg=lambda m, name=name: f"grad {name}: {m}")
    if rank == 0:
        check_capture_dict(got, want)
    flex.restore()
