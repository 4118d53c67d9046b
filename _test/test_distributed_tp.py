"""Tensor parallel: fairscale, megatron-core and DTensor models under FlexModel, against one process.

Every rank builds the same seeded full model, runs it in-process with plain
torch hooks (the single-process reference), then builds the sharded model
from slices of the same weights, wraps it with ``FlexModel`` and compares
outputs, rank 0's captures (full tensors), edited outputs and every
parameter gradient (each shard against the matching slice of the reference
gradient). gloo on CPU, real process groups (``_test/distributed.py``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from _test.distributed import multi_process, run_ranks
from flex_model import FlexModel, HookFunction

V, D, H, B, T = 16, 8, 12, 4, 5
Spec = List[Tuple[str, str, Optional[Callable[[torch.Tensor], torch.Tensor]]]]  # (name, hook type, edit)


# -- the single-process reference: plain torch hooks -------------------------------------
def reference_hooks(model: nn.Module, spec: Spec, captures: Dict[str, List[torch.Tensor]]) -> list:
    """Register ``spec`` on ``model`` with torch's own hooks: capture (before the edit), then edit."""
    def keep(name: str, value: torch.Tensor) -> None:
        captures.setdefault(name, []).append(value.detach().clone())

    handles = []
    for name, kind, edit in spec:
        def swap(value, name=name, edit=edit):  # first tensor of a tuple, or the tensor
            first = value[0] if isinstance(value, tuple) else value
            keep(name, first)
            if edit is None:
                return None
            new = edit(first)
            return (new, *value[1:]) if isinstance(value, tuple) else new

        if kind == "tensor":
            handles.append(model.get_parameter(name).register_hook(swap))
            continue
        module = model.get_submodule(name)
        if kind == "forward":
            handles.append(module.register_forward_hook(lambda m, a, out, f=swap: f(out)))
        elif kind == "forward_pre":
            handles.append(module.register_forward_pre_hook(lambda m, a, f=swap: f(a)))
        elif kind == "full_backward":
            handles.append(module.register_full_backward_hook(lambda m, gi, go, f=swap: f(gi)))
        else:
            handles.append(module.register_full_backward_pre_hook(lambda m, go, f=swap: f(go)))
    return handles


def flex_hooks(flex: FlexModel, spec: Spec, expected: Optional[Dict[str, tuple]] = None) -> None:
    """Register ``spec`` on a FlexModel (editing functions get the full tensor)."""
    register = {"forward": flex.register_forward_hook, "forward_pre": flex.register_forward_pre_hook,
                "full_backward": flex.register_full_backward_hook,
                "full_backward_pre": flex.register_full_backward_pre_hook, "tensor": flex.register_hook}
    for name, kind, edit in spec:
        fn = None if edit is None else (lambda m, x, ctx, mods, edit=edit: edit(x))
        register[kind](HookFunction(name, (expected or {}).get(name), fn))


def shard(full: torch.Tensor, dim: Optional[int], rank: int, size: int) -> torch.Tensor:
    return full if dim is None else full.chunk(size, dim)[rank]


def check_captures(got: Dict[str, List[torch.Tensor]], want: Dict[str, List[torch.Tensor]], **tol) -> None:
    assert sorted(got) == sorted(want), f"captured {sorted(got)}, reference {sorted(want)}"
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name]):
            assert_close(g, w, msg=lambda m, name=name: f"capture {name}: {m}", **tol)


def check_grads(par: nn.Module, ref: nn.Module, dims: Dict[str, Optional[int]], tp_rank: int, tp: int,
                **tol) -> None:
    names = [n for n, _ in par.named_parameters()]
    assert sorted(names) == sorted(dims), names
    for name, p in par.named_parameters():
        want = shard(ref.get_parameter(name).grad, dims[name], tp_rank, tp)
        assert p.grad is not None, f"no grad on {name}"
        assert_close(p.grad, want, msg=lambda m, name=name: f"grad {name}: {m}", **tol)


# -- fairscale --------------------------------------------------------------------------------
class Net(nn.Module):
    """Two embeddings, an MLP: the reference for the fairscale and megatron models."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pemb = nn.Embedding(V, D), nn.Embedding(V, D)
        self.up, self.act, self.down = nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(self.emb(idx) + self.pemb(idx))))


FAIRSCALE_DIMS = {"emb.weight": 0, "pemb.weight": 1, "up.weight": 0, "up.bias": 0, "down.weight": 1,
                  "down.bias": None}


def fairscale_net(ref: Net, tp_rank: int, tp: int) -> Net:
    """``ref`` with fairscale's parallel layers holding this rank's slices of its weights."""
    from fairscale.nn.model_parallel import layers as L

    skip = lambda w: None  # noqa: E731  (the weights are copied below)
    net = Net()
    net.emb = L.VocabParallelEmbedding(V, D, init_method=skip)
    net.pemb = L.ParallelEmbedding(V, D, init_method=skip)
    net.up = L.ColumnParallelLinear(D, H, gather_output=False, init_method=skip)
    net.down = L.RowParallelLinear(H, D, input_is_parallel=True, init_method=skip)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(shard(ref.get_parameter(name), FAIRSCALE_DIMS[name], tp_rank, tp))
    return net


def mix_hidden(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A non-elementwise edit: every hidden unit becomes a mix of all of them (the sharded dim)."""
    return lambda x: x @ a


def mix_rows(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A non-elementwise edit of a column-parallel weight's gradient: mixes its (split) rows."""
    return lambda g: a @ g


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
    spec: Spec = [("emb", "forward", None), ("pemb", "forward", None), ("up", "forward", mix_hidden(a_fwd)),
                  ("act", "forward", None), ("down", "forward_pre", None),
                  ("down", "full_backward", mix_hidden(a_bwd)), ("up", "full_backward_pre", None),
                  ("up.weight", "tensor", mix_rows(a_bwd))]
    want: Dict[str, List[torch.Tensor]] = {}
    handles = reference_hooks(ref, spec, want)
    ref_out = ref(idx)
    ((ref_out * w).sum() / B).backward()
    for h in handles:
        h.remove()

    net = fairscale_net(ref, tp_rank, tp)
    got: Dict[str, List[torch.Tensor]] = {}
    if sizes:
        flex = FlexModel(net, got, tensor_parallel_size=tp, data_parallel_size=dp, store=store)
    else:
        flex = FlexModel(net, got, store=store)
    assert (flex.layout.tp, flex.layout.dp, flex.layout.pp) == (tp, dp, 1)
    # "act" is a plain GELU on a split value: only expected_shape says so.
    flex_hooks(flex, spec, expected={"act": (None, None, H)})
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    out = flex(idx[rows])
    assert_close(out, ref_out[rows])
    assert not torch.allclose(out, Net.forward(ref, idx[rows])), "the edit on up did not change the output"
    ((out * w[rows]).sum() / (B // dp)).backward()
    for p in net.parameters():  # what DDP would do
        dist.all_reduce(p.grad, group=fs.get_data_parallel_group())
        p.grad /= dp
    check_grads(net, ref, FAIRSCALE_DIMS, tp_rank, tp)
    if rank == 0 or store == "all":
        check_captures(got, want)
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
class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class MegatronMlp(nn.Module):
    """``Mlp`` with megatron-core's parallel linears, which return ``(output, bias)``."""

    def __init__(self, ref: Mlp, tp_rank: int, tp: int) -> None:
        super().__init__()
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
        init = nn.init.normal_  # overwritten below; running it makes megatron tag partition dims
        self.up = ColumnParallelLinear(D, H, config=cfg, init_method=init, bias=True, gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(H, D, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                      skip_bias_add=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(shard(ref.get_parameter(name), MLP_DIMS[name], tp_rank, tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.up(x)
        y, _ = self.down(self.act(h))
        return y


MLP_DIMS = {"up.weight": 0, "up.bias": 0, "down.weight": 1, "down.bias": None}


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
    ref = Mlp()
    x, w = torch.randn(T, B, D), torch.randn(T, B, D)  # megatron's [seq, batch, hidden]
    a_fwd, a_bwd = torch.randn(H, H) / H ** 0.5, torch.randn(H, H) / H ** 0.5
    spec: Spec = [("up", "forward", mix_hidden(a_fwd)), ("down", "forward_pre", None), ("down", "forward", None),
                  ("down", "full_backward", mix_hidden(a_bwd)), ("up", "full_backward_pre", None),
                  ("up.weight", "tensor", None), ("down.weight", "tensor", None)]
    want: Dict[str, List[torch.Tensor]] = {}
    handles = reference_hooks(ref, spec, want)
    x_ref = x.clone().requires_grad_()
    ref_out = ref(x_ref)
    (ref_out * w).sum().backward()
    for h in handles:
        h.remove()

    net = MegatronMlp(ref, tp_rank, 2)
    assert net.up.weight.partition_dim == 0 and net.down.weight.partition_dim == 1
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got, tensor_parallel_size=2, parallel_order=MEGATRON_ORDER)
    flex_hooks(flex, spec)
    x_par = x.clone().requires_grad_()
    out = flex(x_par)
    assert_close(out, ref_out)
    assert not torch.allclose(out, Mlp.forward(ref, x)), "the edit on up did not change the output"
    (out * w).sum().backward()
    assert_close(x_par.grad, x_ref.grad)
    check_grads(net, ref, MLP_DIMS, tp_rank, 2)
    if rank == 0:
        check_captures(got, want)
    for name in MLP_DIMS:
        assert_close(flex.get_module_parameter(name), ref.get_parameter(name),
                     msg=lambda m, name=name: f"{name}: {m}")
    flex.restore()
    ps.destroy_model_parallel()


# -- DTensor (torch.distributed.tensor.parallel) --------------------------------------------
def _dtensor_run(order: str, ref: nn.Module, net: nn.Module, plan: dict, spec: Spec, x: torch.Tensor,
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
    want: Dict[str, List[torch.Tensor]] = {}
    handles = reference_hooks(ref, spec, want)
    x_ref = x.clone().requires_grad_(x.is_floating_point())
    ref_out = ref(x_ref)
    (ref_out * w).sum().backward()
    for h in handles:
        h.remove()

    net.load_state_dict(ref.state_dict())
    got: Dict[str, List[torch.Tensor]] = {}
    seen: List[str] = []  # what torch hands the first forward hook: it depends on the order
    first = net.get_submodule(spec[0][0])
    module_spec, param_spec = [s for s in spec if s[1] != "tensor"], [s for s in spec if s[1] == "tensor"]
    if order == "before":
        flex = FlexModel(net, got, device_mesh=mesh)
        flex_hooks(flex, module_spec)
        first.register_forward_hook(lambda m, a, o: seen.append(type(o).__name__))
        parallelize_module(net, mesh, plan)
    else:
        parallelize_module(net, mesh, plan)
        flex = FlexModel(net, got)
        flex_hooks(flex, module_spec)
        first.register_forward_hook(lambda m, a, o: seen.append(type(o).__name__))
    flex_hooks(flex, param_spec)
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
        check_captures(got, want)
    for name, _ in net.named_parameters():
        assert_close(flex.get_module_parameter(name), ref.get_parameter(name),
                     msg=lambda m, name=name: f"{name}: {m}")
    flex.restore()


def _dtensor_mlp_body(rank: int, world_size: int, order: str) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    torch.set_num_threads(1)
    torch.manual_seed(2)
    ref = Mlp()
    x, w = torch.randn(B, T, D), torch.randn(B, T, D)
    a_fwd, a_bwd = torch.randn(H, H) / H ** 0.5, torch.randn(H, H) / H ** 0.5
    spec: Spec = [("up", "forward", mix_hidden(a_fwd)), ("down", "forward_pre", None), ("down", "forward", None),
                  ("down", "full_backward", mix_hidden(a_bwd)), ("up", "full_backward_pre", None),
                  ("up.weight", "tensor", mix_rows(a_bwd)), ("down.weight", "tensor", None)]
    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    _dtensor_run(order, ref, Mlp(), plan, spec, x, w, lambda x: Mlp.forward(ref, x))


@multi_process(world_size=2)
def test_dtensor_mlp_hooks_before_parallelize(rank, world_size):
    _dtensor_mlp_body(rank, world_size, "before")


@multi_process(world_size=2)
def test_dtensor_mlp_hooks_after_parallelize(rank, world_size):
    _dtensor_mlp_body(rank, world_size, "after")


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
    spec: Spec = [("layers.0.attn.qkv", "forward", mix_hidden(a)), ("layers.0.attn.proj", "forward_pre", None),
                  ("layers.1.attn", "forward", None), ("layers.1.attn.proj", "full_backward", None),
                  ("layers.0.attn.qkv", "full_backward_pre", None), ("layers.0.attn.qkv.weight", "tensor", None),
                  ("layers.1.attn.proj.weight", "tensor", None)]
    plan = {}
    for i in range(2):
        plan[f"layers.{i}.attn.qkv"] = ColwiseParallel(use_local_output=False)
        plan[f"layers.{i}.attn.proj"] = RowwiseParallel()
    _dtensor_run(order, ref, TinyGPT(), plan, spec, idx, w, lambda x: TinyGPT.forward(ref, x))


@multi_process(world_size=2)
def test_dtensor_tiny_gpt_attention_hooks_before_parallelize(rank, world_size):
    _dtensor_gpt_body(rank, world_size, "before")


@multi_process(world_size=2)
def test_dtensor_tiny_gpt_attention_hooks_after_parallelize(rank, world_size):
    _dtensor_gpt_body(rank, world_size, "after")


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
    ref = Mlp()
    x, w = torch.randn(B, T, D), torch.randn(B, T, D)
    a = torch.randn(H, H) / H ** 0.5
    spec: Spec = [("up", "forward", mix_hidden(a)), ("down", "forward_pre", None), ("down", "forward", None),
                  ("down", "full_backward", None), ("up.weight", "tensor", mix_rows(a))]
    want: Dict[str, List[torch.Tensor]] = {}
    handles = reference_hooks(ref, spec, want)
    ref_out = ref(x)
    ((ref_out * w).sum() / B).backward()
    for h in handles:
        h.remove()

    net = Mlp()
    net.load_state_dict(ref.state_dict())
    parallelize_module(net, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got, device_mesh=mesh)
    assert (flex.layout.dp, flex.layout.tp) == (2, 2)
    flex_hooks(flex, spec)
    rows = slice(dp_rank * B // 2, (dp_rank + 1) * B // 2)
    out = flex(x[rows])
    assert_close(out, ref_out[rows])
    ((out * w[rows]).sum() / (B // 2)).backward()
    for name, p in net.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(grad, group=mesh.get_group("dp"))  # what DDP / FSDP would do
        assert_close(grad / 2, ref.get_parameter(name).grad, msg=lambda m, name=name: f"grad {name}: {m}")
    if rank == 0:
        check_captures(got, want)
    flex.restore()
