"""Every parallel style on a hooked module's input and output, forward and backward, against one process.

Each case builds a small model, runs it in one process with plain torch
hooks (the reference: captures before the edit, the edited output, input
and parameter gradients), then parallelises the same weights on 2 real gloo
ranks with the framework's own plan and hooks it with ``FlexModel``: rank
0's captures must be the full values, the output and every gradient the
reference's. Edits mix the split dim (``log_softmax``, ``x @ A``, a roll
along the sequence), so a value assembled wrong cannot pass.

- torch ``parallelize_module``: ColwiseParallel / RowwiseParallel with and
  without Replicate output / input layouts and ``use_local_output``,
  SequenceParallel, PrepareModuleInput / PrepareModuleOutput (through
  PrepareModuleInputOutput), a Shard(1) row-parallel output; hooks
  registered before and after ``parallelize_module`` (they see plain
  values on one side of the style's hooks, DTensors on the other).
- HuggingFace ``transformers.integrations.tensor_parallel`` plans applied
  with ``apply_tensor_parallelism`` on small modules: colwise, rowwise,
  colwise_gather_output, rowwise_rep, rowwise_split_input,
  embedding_rowwise / embedding_colwise, sequence_parallel; packed_colwise
  outputs are refused.
- megatron-core ``GPTModel`` with ``sequence_parallel=True`` at TP=2 against
  the same seeded model at TP=1.
- the errors: a module with sequence parallelism inside it and nothing said
  about its value, asking for ``expected_shape``, which then works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from _test.distributed import HookSpec, fixed, register, run_ranks
from _test.models import MLP
from flex_model import MEGATRON_ORDER, FlexModel, HookFunction
from flex_model.tree import replace_leaf, tensor_leaves

B, T, D, H, V = 2, 4, 8, 12, 10  # batch, sequence, width, hidden width, vocabulary


def _import_before_forking() -> None:
    """DTensor and torch._dynamo (which DTensor imports on first use): ~6 s, paid once, not in every rank."""
    import torch._dynamo  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401


# -- the reference and the comparison -------------------------------------------------------------------
@dataclass
class Ref:
    out: torch.Tensor
    seen: Dict[str, List[torch.Tensor]]
    grads: Dict[str, torch.Tensor]
    x_grad: Optional[torch.Tensor]


def reference(model: nn.Module, specs: Sequence[HookSpec], x: torch.Tensor, w: torch.Tensor,
              forward: Optional[Callable] = None) -> Ref:
    """One process: plain torch hooks doing each spec's edit on the first tensor leaf of the value (as
    FlexModel's ``unpack_idx=0``; captured before the edit), loss ``(out * w).sum()``."""
    seen: Dict[str, List[torch.Tensor]] = {}
    handles = []
    for s in specs:
        def keep(value, s=s):
            x = tensor_leaves(value)[0]
            seen.setdefault(s.name, []).append(x.detach().clone())
            return value if s.fn is None else replace_leaf(value, 0, s.fn(x))
        if s.kind == "tensor":
            handles.append(model.get_parameter(s.name).register_hook(keep))
            continue
        m = model.get_submodule(s.name)
        if s.kind == "forward":
            handles.append(m.register_forward_hook(lambda mod, a, out, keep=keep: keep(out)))
        elif s.kind == "forward_pre":
            handles.append(m.register_forward_pre_hook(lambda mod, a, kw, keep=keep: keep((a, kw)), with_kwargs=True))
        elif s.kind == "full_backward":
            handles.append(m.register_full_backward_hook(lambda mod, gi, go, keep=keep: keep(gi)))
        else:
            handles.append(m.register_full_backward_pre_hook(lambda mod, go, keep=keep: keep(go)))
    x = x.clone().requires_grad_(x.is_floating_point())
    out = (forward or (lambda m, x: m(x)))(model, x)
    (out * w).sum().backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return Ref(out.detach(), seen, grads, x.grad)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def check(rank: int, got: Dict[str, List[torch.Tensor]], ref: Ref, label: str) -> None:
    """Rank 0 holds every capture, full, as the reference saw it; the other rank none."""
    if rank != 0:
        assert got == {}, f"{label}: rank {rank} stored {sorted(got)}"
        return
    assert sorted(got) == sorted(ref.seen), f"{label}: captured {sorted(got)}, reference {sorted(ref.seen)}"
    for name, want in ref.seen.items():
        assert [tuple(t.shape) for t in got[name]] == [tuple(t.shape) for t in want], (label, name)
        for g, r in zip(got[name], want):
            assert_close(g, r, msg=lambda m, name=name: f"{label}: capture {name}: {m}")


def roll_seq(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit that moves values across the sequence halves: wrong unless the full sequence is there."""
    return lambda x: x + 0.5 * x.roll(1, dim) - 0.25 * x.cumsum(dim)


def mix(n: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    a = fixed(n, n, seed=seed)
    return lambda x: x @ a


# == torch.distributed.tensor.parallel ================================================================
class Stack(nn.Module):
    """Five Linears under five colwise / rowwise variants (see ``STACK_PLAN``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, H)
        self.d, self.e = nn.Linear(H, V), nn.Linear(V, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.e(self.d(self.c(self.b(self.a(x).tanh())).tanh()))


def stack_plan() -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"a": ColwiseParallel(output_layouts=Replicate()),  # the lm_head plan: gathers its output
            "b": RowwiseParallel(input_layouts=Replicate()),  # takes a whole input, splits it itself
            "c": ColwiseParallel(use_local_output=False),  # returns a DTensor
            "d": RowwiseParallel(use_local_output=False),  # takes it, returns a Replicate DTensor
            "e": ColwiseParallel(output_layouts=Replicate())}


def stack_specs() -> List[HookSpec]:
    return [HookSpec("forward", "a", lambda x: x.log_softmax(-1)),  # mixes the (gathered) out_features
            HookSpec("forward_pre", "a"),
            HookSpec("full_backward_pre", "a", mix(H, 1)),
            HookSpec("forward_pre", "b", mix(H, 2)),
            HookSpec("forward", "b", mix(H, 3)),
            HookSpec("full_backward", "b", mix(H, 4)),
            HookSpec("forward", "c", mix(H, 5)),
            HookSpec("full_backward_pre", "c"),
            HookSpec("forward_pre", "d", mix(H, 6)),
            HookSpec("forward", "d", lambda x: x.softmax(-1)),
            HookSpec("forward", "e", lambda x: x.log_softmax(-1)),
            HookSpec("tensor", "a.weight", mix(D, 7)),
            HookSpec("tensor", "d.weight")]


class SPNet(nn.Module):
    """norm → mlp (up, act, down) with a residual → head. Under ``sp_plan`` the residual stream is split on
    the sequence dim (1) from the input to the column-parallel head: the model takes and the norm returns
    this rank's half of the sequence, the mlp takes it whole and returns it split."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = MLP(D, H)
        self.head = nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.head(h + self.mlp(h))


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SPNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sp_plan(prefix: str = "") -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInputOutput, RowwiseParallel,
                                                   SequenceParallel)

    plan = {"norm": SequenceParallel(use_local_output=True),
            "mlp": PrepareModuleInputOutput(input_layouts=Shard(1), desired_input_layouts=Replicate(),
                                            use_local_input=True, output_layouts=Shard(1),
                                            desired_output_layouts=Shard(1), use_local_output=True),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(output_layouts=Shard(1)),
            "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    return {prefix + k: v for k, v in plan.items()}


def sp_specs() -> List[HookSpec]:
    return [HookSpec("forward_pre", "norm", roll_seq(1)),
            HookSpec("forward", "norm", roll_seq(1)),
            HookSpec("forward_pre", "mlp", lambda x: roll_seq(1)(x) @ fixed(D, D, seed=11)),
            HookSpec("forward", "mlp.up", mix(H, 12)),
            HookSpec("forward", "mlp.down", roll_seq(1)),
            HookSpec("forward", "mlp", roll_seq(1)),
            HookSpec("forward", "head", lambda x: x.log_softmax(-1)),
            HookSpec("full_backward_pre", "head", mix(V, 13)),
            HookSpec("full_backward_pre", "mlp.down", roll_seq(1)),
            HookSpec("full_backward", "mlp.up"),
            HookSpec("full_backward", "norm", roll_seq(1)),
            HookSpec("tensor", "mlp.up.weight", lambda g: g.roll(1, 0))]


def _torch_case(rank: int, make: Callable[[], nn.Module], plan: dict, specs: List[HookSpec], order: str,
                x: torch.Tensor, w: torch.Tensor, local_in: Callable[[torch.Tensor], torch.Tensor]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    label = f"{type(make()).__name__} hooks {order} parallelize_module"
    torch.manual_seed(5)
    ref_model = make()
    net = make()
    net.load_state_dict(ref_model.state_dict())
    ref = reference(ref_model, specs, x, w)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    got: Dict[str, List[torch.Tensor]] = {}
    module_specs, param_specs = [s for s in specs if s.kind != "tensor"], [s for s in specs if s.kind == "tensor"]
    if order == "before":
        flex = FlexModel(net, got, device_mesh=mesh)
        register(flex, module_specs)
        parallelize_module(net, mesh, plan)
    else:
        parallelize_module(net, mesh, plan)
        flex = FlexModel(net, got, device_mesh=mesh)
        register(flex, module_specs)
    register(flex, param_specs)
    x_local = local_in(x).clone().requires_grad_()
    out = full(flex(x_local))
    assert_close(out, ref.out, msg=lambda m: f"{label}: output: {m}")
    (out * w).sum().backward()
    assert_close(x_local.grad, local_in(ref.x_grad), msg=lambda m: f"{label}: input grad: {m}")
    for name, p in net.named_parameters():
        assert_close(full(p.grad), ref.grads[name], msg=lambda m, name=name: f"{label}: grad {name}: {m}")
    check(rank, got, ref, label)
    flex.restore()


def _torch_styles_body(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    x, wv = torch.randn(B, T, D, generator=g), torch.randn(B, T, V, generator=g)
    half = lambda t: t.chunk(2, 1)[rank]  # noqa: E731  this rank's half of the sequence
    for order in ("before", "after"):
        _torch_case(rank, Stack, stack_plan(), stack_specs(), order, x, wv, lambda t: t)
        _torch_case(rank, SPNet, sp_plan(), sp_specs(), order, x, wv, half)


def test_torch_parallel_styles():
    """torch's styles (stack_plan, sp_plan), hooks before and after parallelize_module, on 2 ranks."""
    _import_before_forking()
    run_ranks(_torch_styles_body, 2, timeout=120)


def _the_lm_head_body(rank: int, world_size: int) -> None:
    """The issue's case: ``Linear(16, 12)`` under ``ColwiseParallel(output_layouts=Replicate())`` is captured
    (3, 12), and a log_softmax edit is exact."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    ref, net = nn.Sequential(nn.Linear(16, 12)), nn.Sequential(nn.Linear(16, 12))
    net.load_state_dict(ref.state_dict())
    parallelize_module(net, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)),
                       {"0": ColwiseParallel(output_layouts=Replicate())})
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got)
    flex.register_forward_hook(HookFunction("0", editing_function=lambda m, x, ctx, mods: x.log_softmax(-1)))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    assert_close(flex(x), ref(x).log_softmax(-1), rtol=0, atol=1e-6)
    if rank == 0:
        assert [tuple(t.shape) for t in got["0"]] == [(3, 12)]
        assert_close(got["0"][0], ref(x).detach())
    flex.restore()


def test_colwise_output_gathered_before_returning_is_whole():
    _import_before_forking()
    run_ranks(_the_lm_head_body, 2)


def _cannot_tell_body(rank: int, world_size: int) -> None:
    """A module with sequence parallelism inside it that nothing says about (Wrapped's ``net``: its output is
    whole, its residual stream split) is an error naming the shapes and the fix; expected_shape fixes it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(5)
    ref, net = Wrapped(), Wrapped()
    net.load_state_dict(ref.state_dict())
    parallelize_module(net, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), sp_plan("net."))
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    half = x.chunk(2, 1)[rank]
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got)
    flex.register_forward_hook(HookFunction("net"))
    with pytest.raises(ValueError, match=r'hook "net" \(output of SPNet\): the local value has shape '
                                         rf"\({B}, {T}, {V}\) on each of 2 tensor parallel ranks; sequence "
                                         r'parallelism runs inside it \("norm" \(SequenceParallel\)\).*'
                                         r"expected_shape="):
        flex(half)
    flex.restore()
    flex = FlexModel(net, got)
    flex.register_forward_pre_hook(HookFunction("net", expected_shape=(B, T, D),
                                                editing_function=lambda m, x, ctx, mods: roll_seq(1)(x)))
    flex.register_forward_hook(HookFunction("net", expected_shape=(B, T, V)))
    with torch.no_grad():
        out = flex(half)
        assert_close(out, ref(roll_seq(1)(x)))
    if rank == 0:  # the input before the edit, then the output
        assert [tuple(t.shape) for t in got["net"]] == [(B, T, D), (B, T, V)]
        assert_close(got["net"][0], x)
        assert_close(got["net"][1], ref(roll_seq(1)(x)))
    flex.restore()


def test_sequence_parallel_inside_a_module_is_an_error_unless_expected_shape_says():
    _import_before_forking()
    run_ranks(_cannot_tell_body, 2)


# == HuggingFace transformers tensor parallel plans ===================================================
class HFNet(nn.Module):
    """Every HF layer style on small modules: embeddings, an MLP, a packed gate/up projection, replicated-
    input rowwise layers and an lm head that gathers its output (see ``HF_PLAN``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.emb2 = nn.Embedding(V, D), nn.Embedding(V, D)
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)
        self.gate_up = nn.Linear(D, 2 * H, bias=False)  # packed [gate; up], as HF models have it
        self.down2 = nn.Linear(H, D)
        self.mid, self.mid2 = nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.emb2(ids)
        x = x + self.down(self.up(x).tanh())
        gate, up = self.gate_up(x).chunk(2, -1)
        x = x + self.down2(gate.tanh() * up)
        return self.head(self.mid2(self.mid(x)))


HF_PLAN = {"emb": "embedding_rowwise", "emb2": "embedding_colwise", "up": "colwise", "down": "rowwise",
           "gate_up": "packed_colwise", "down2": "rowwise", "mid": "rowwise_rep", "mid2": "rowwise_split_input",
           "head": "colwise_gather_output"}


class SeqNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * 2


def hf_parallel(net: nn.Module, plan: Dict[str, str]) -> None:
    """``plan`` (module name → HF style name) applied with transformers' own helper; parameters get their
    module's style (``from_pretrained`` expands the plan to them as it loads)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.integrations.tensor_parallel import apply_tensor_parallelism

    full_plan = dict(plan)
    full_plan.update({n: plan[n.rsplit(".", 1)[0]] for n, _ in net.named_parameters() if n.rsplit(".", 1)[0] in plan})
    apply_tensor_parallelism(net, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), full_plan)


def hf_specs() -> List[HookSpec]:
    return [HookSpec("forward_pre", "emb"),  # token ids: capture only
            HookSpec("forward", "emb", mix(D, 21)),
            HookSpec("forward", "emb2", mix(D, 22)),
            HookSpec("forward", "up", mix(H, 23)),
            HookSpec("full_backward_pre", "up", mix(H, 24)),
            HookSpec("full_backward", "up"),
            HookSpec("forward_pre", "down", mix(H, 25)),
            HookSpec("forward", "down", mix(D, 26)),
            HookSpec("forward_pre", "gate_up", mix(D, 27)),
            HookSpec("forward_pre", "down2", mix(H, 28)),
            HookSpec("forward_pre", "mid", mix(D, 29)),
            HookSpec("forward", "mid", mix(D, 30)),
            HookSpec("forward_pre", "mid2", mix(D, 31)),
            HookSpec("forward", "head", lambda x: x.log_softmax(-1)),
            HookSpec("full_backward_pre", "head", mix(V, 32)),
            HookSpec("tensor", "up.weight", lambda g: g.roll(1, 0)),
            HookSpec("tensor", "head.weight")]


def _hf_case(rank: int, make: Callable[[], nn.Module], plan: Dict[str, str], specs: List[HookSpec],
             x: torch.Tensor, w: torch.Tensor, local: Callable[[torch.Tensor], torch.Tensor]) -> None:
    label = f"HF {type(make()).__name__}"
    torch.manual_seed(6)
    ref_model, net = make(), make()
    net.load_state_dict(ref_model.state_dict())
    ref = reference(ref_model, specs, x, w)
    hf_parallel(net, plan)
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got)
    register(flex, specs)
    x_local = local(x).clone().requires_grad_(x.is_floating_point())
    out = flex(x_local)
    assert_close(out, local(ref.out), msg=lambda m: f"{label}: output: {m}")
    (out * local(w)).sum().backward()
    if x.is_floating_point():
        assert_close(x_local.grad, local(ref.x_grad), msg=lambda m: f"{label}: input grad: {m}")
    for name, p in net.named_parameters():
        assert_close(full(p.grad), ref.grads[name], msg=lambda m, name=name: f"{label}: grad {name}: {m}")
    check(rank, got, ref, label)
    flex.restore()
    # HF's inference path (no grad: local kernels, plain tensors throughout) is placed the same way
    looks = [HookSpec(s.kind, s.name) for s in specs if s.kind in ("forward", "forward_pre")]
    plain = reference(ref_model, looks, x, w)
    got.clear()
    flex = FlexModel(net, got)
    register(flex, looks)
    with torch.no_grad():
        assert_close(flex(local(x)), local(plain.out), msg=lambda m: f"{label} (no grad): output: {m}")
    check(rank, got, plain, f"{label} (no grad)")
    flex.restore()


def _hf_body(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(4)
    ids, x = torch.randint(0, V, (B, T), generator=g), torch.randn(B, T, D, generator=g)
    w, wd = torch.randn(B, T, V, generator=g), torch.randn(B, T, D, generator=g)
    _hf_case(rank, HFNet, HF_PLAN, hf_specs(), ids, w, lambda t: t)
    seq = [HookSpec("forward_pre", "norm", roll_seq(1)), HookSpec("forward", "norm", roll_seq(1)),
           HookSpec("full_backward_pre", "norm", roll_seq(1)), HookSpec("full_backward", "norm"),
           HookSpec("tensor", "norm.weight")]
    _hf_case(rank, SeqNorm, {"norm": "sequence_parallel"}, seq, x, wd, lambda t: t.chunk(2, 1)[rank])

    # the packed gate/up output and weight gradient hold interleaved pieces: refused, never assembled wrong
    torch.manual_seed(6)
    net = HFNet()
    hf_parallel(net, HF_PLAN)
    flex = FlexModel(net, {})
    flex.register_forward_hook(HookFunction("gate_up"))
    with pytest.raises(ValueError, match=r'hook "gate_up" \(output of Linear\): HF PackedColwiseParallel on the '
                                         r"module: its output holds this rank's slice of each of the 2 packed "
                                         r"parts \(interleaved\)"):
        flex(ids)
    flex.restore()
    flex = FlexModel(net, {})
    flex.register_hook(HookFunction("gate_up.weight"))
    with pytest.raises(ValueError, match=r"placed _StridedShard.*holds interleaved pieces"):
        flex(ids).sum().backward()
    flex.restore()


def test_huggingface_tensor_parallel_plans():
    """HF's colwise, rowwise, colwise_gather_output, rowwise_rep, rowwise_split_input, embedding_rowwise,
    embedding_colwise, sequence_parallel and packed_colwise styles, applied by transformers on 2 ranks."""
    pytest.importorskip("transformers.integrations.tensor_parallel")
    _import_before_forking()
    run_ranks(_hf_body, 2, timeout=120)


# == megatron-core GPTModel, sequence parallel ========================================================
S, MB, MD, MV = 8, 2, 16, 32  # sequence, batch, hidden, vocabulary of the GPT


class TaggedLayerNorm(nn.LayerNorm):
    """A plain LayerNorm built like Megatron's norms and tagged like them: its parameters are
    ``sequence_parallel`` when the config is (megatron's torch norm refuses sequence parallel; apex's
    FusedLayerNorm is what it wants, and sets these tags)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


def megatron_gpt(tp: int):
    """A seeded 2-layer megatron-core GPTModel (local layer spec, CPU initialisation) at ``tp``; sequence
    parallel when tp > 1. One seed gives the same full weights at any tp (CPU init slices a full master)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(123, inference_rng_tracker=True)
    cfg = TransformerConfig(num_layers=2, hidden_size=MD, num_attention_heads=4, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp, sequence_parallel=tp > 1, hidden_dropout=0.0,
                            attention_dropout=0.0, params_dtype=torch.float32)
    spec = get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TaggedLayerNorm
    torch.manual_seed(0)
    return GPTModel(cfg, TransformerBlockSubmodules(layer_specs=[spec] * 2, layer_norm=TaggedLayerNorm),
                    vocab_size=MV, max_sequence_length=S)


def gpt_specs() -> List[HookSpec]:
    """Megatron is [s, b, h]: under sequence parallel every value from a row-parallel layer's output up to
    the next column-parallel layer is split on dim 0. Edits roll along the sequence or mix the split dim."""
    L0, attn = "decoder.layers.0", "decoder.layers.0.self_attention"
    return [HookSpec("forward", "embedding", roll_seq(0)),
            HookSpec("forward_pre", L0, roll_seq(0)),  # called with hidden_states= (a keyword)
            HookSpec("forward", L0, lambda x: roll_seq(0)(x) @ fixed(MD, MD, seed=41)),
            HookSpec("forward", f"{L0}.input_layernorm"),
            HookSpec("forward", f"{attn}.linear_qkv", mix(3 * MD, 42)),
            HookSpec("forward", f"{attn}.core_attention", mix(MD, 43)),
            HookSpec("forward_pre", f"{attn}.linear_proj", mix(MD, 44)),
            HookSpec("forward", f"{attn}.linear_proj", roll_seq(0)),
            HookSpec("full_backward", f"{attn}.linear_proj", mix(MD, 45)),
            HookSpec("forward", f"{L0}.mlp", roll_seq(0)),
            HookSpec("full_backward_pre", f"{L0}.mlp", roll_seq(0)),
            HookSpec("forward_pre", f"{L0}.mlp.linear_fc2", mix(4 * MD, 46)),
            HookSpec("forward_pre", "decoder.layers.1.pre_mlp_layernorm", roll_seq(0)),
            HookSpec("forward", "decoder.final_layernorm"),
            HookSpec("forward_pre", "output_layer", roll_seq(0)),
            HookSpec("forward", "output_layer", lambda x: x.log_softmax(-1)),
            HookSpec("full_backward_pre", "output_layer", mix(MV, 47)),
            HookSpec("tensor", f"{L0}.mlp.linear_fc1.weight", lambda g: g.roll(1, 0))]


def _megatron_gpt_body(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state as ps

    torch.set_num_threads(1)
    torch.cuda.current_device = lambda: "cpu"  # megatron asks for a device where it means "here"
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, MV, (MB, S), generator=g)
    w = torch.randn(MB, S, MV, generator=g)
    pos = torch.arange(S).expand(MB, S)
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
    gpt = lambda m, x: m(x, pos, mask)  # noqa: E731
    specs = gpt_specs()

    ref = reference(megatron_gpt(1), specs, ids, w, forward=gpt)
    ps.destroy_model_parallel()
    net = megatron_gpt(2)
    assert net.config.sequence_parallel
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(net, got, tensor_parallel_size=2, parallel_order=MEGATRON_ORDER)
    register(flex, specs)
    out = flex(ids, pos, mask)  # this rank's slice of the vocabulary (parallel_output)
    assert_close(out, ref.out.chunk(2, -1)[rank], msg=lambda m: f"GPT output: {m}")
    (out * w.chunk(2, -1)[rank]).sum().backward()
    tp_group = ps.get_tensor_model_parallel_group()
    for name, p in net.named_parameters():
        if getattr(p, "sequence_parallel", False):  # what megatron's finalize_model_grads does
            dist.all_reduce(p.grad, group=tp_group)
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        want = ref.grads[name] if dim is None else ref.grads[name].chunk(2, dim)[rank]
        assert_close(p.grad, want, msg=lambda m, name=name: f"GPT grad {name}: {m}")
    check(rank, got, ref, "GPT sequence parallel")

    # a sequence-parallel parameter's gradient is a partial sum until finalize_model_grads: refused
    flex.restore()
    flex = FlexModel(net, {}, tensor_parallel_size=2, parallel_order=MEGATRON_ORDER)
    flex.register_hook(HookFunction("decoder.final_layernorm.weight"))
    with pytest.raises(ValueError, match=r'hook "decoder.final_layernorm.weight".*sequence_parallel.*partial'):
        flex(ids, pos, mask).sum().backward()
    flex.restore()
    ps.destroy_model_parallel()


def test_megatron_gpt_sequence_parallel():
    """megatron-core GPTModel, sequence_parallel=True at TP=2 on 2 ranks, against the same model at TP=1."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core)")
    import megatron.core.models.gpt.gpt_model  # noqa: F401  (imported before forking: the ranks share it)

    run_ranks(_megatron_gpt_body, 2, timeout=180)
