"""Pipeline parallel: captures and edits on every stage of a 2-stage pipeline, against one process.

Each rank builds the same seeded two-stage model, runs it in-process with
plain torch hooks (the reference), then wraps its own stage with
``FlexModel(stage, out, pipeline_parallel_size=2)``; stages pass the
activation forward and its gradient backward with hand-made send/recv.
After ``gather_pipeline_outputs()`` rank 0's ``output_dict`` must hold both
stages' captures, equal to the reference's; an edit on stage 1 must change
the final output as in one process; every parameter gradient must match.
Runs: fp32/fp16/bf16 on 2 ranks; PP=2 × DP=2; ``torch.distributed.pipelining``
(PipelineStage + ScheduleGPipe); TP × DP × PP = 2 × 2 × 2 with fairscale
(rank order dp, pp, tp) and megatron-core (pp, dp, tp) stages.
gloo on CPU, real process groups (``_test/distributed.py``).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from _test.distributed import (HookSpec, check_capture_dict, check_shard_grads, mix_hidden, multi_process,
                               reference_hooks, register, run_ranks)
from _test.models import (FAIRSCALE_DIMS, MLP, MLP_DIMS, NET_D as TD, NET_H as TH, NET_VOCAB as TV, Block,
                          MegatronMlp, Net, fairscale_net, shard)
from flex_model import FlexModel, HookFunction, ParallelLayout

V, D, NH, HID, B, T = 23, 16, 2, 32, 4, 6
TB, TT = 4, 5  # batch and sequence of the 3-D runs (on the tensor-parallel models of _test/models.py)


class Stage0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.block0 = nn.Embedding(V, D), Block(D, NH, HID)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.block0(self.emb(idx))


class Stage1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1, self.ln_f, self.head = Block(D, NH, HID), nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.block1(x)))


def stage_specs(seed: int, dtype: torch.dtype) -> Tuple[List[HookSpec], List[HookSpec]]:
    """Hooks of every type on both stages; non-elementwise edits on stage 1, forward and backward (the
    backward one changes the gradient stage 0 receives)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(HID, HID, generator=g) / HID ** 0.5).to(dtype)
    a_grad = (torch.randn(D, D, generator=g) / D ** 0.5).to(dtype)
    spec0 = [HookSpec("forward", "emb"), HookSpec("forward", "block0.attn"), HookSpec("forward_pre", "block0.mlp.down"),
             HookSpec("full_backward_pre", "block0.mlp"), HookSpec("tensor", "emb.weight")]
    spec1 = [HookSpec("forward", "block1.mlp.up", mix_hidden(a)), HookSpec("forward", "block1.ln1"),
             HookSpec("forward", "ln_f"), HookSpec("full_backward", "block1.attn", mix_hidden(a_grad)),
             HookSpec("tensor", "head.weight")]
    return spec0, spec1


def _pipeline_body(rank: int, world_size: int, dtype: torch.dtype) -> None:
    torch.set_num_threads(1)
    dp = world_size // 2
    layout = ParallelLayout.from_sizes(pp=2, dp=dp)  # fairscale order (dp, pp, tp)
    pp_rank = layout.my["pp"]
    dp_groups = [dist.new_group([layout.global_rank(d, p) for d in range(dp)]) for p in range(2)]
    torch.manual_seed(0)
    ref0, ref1 = Stage0().to(dtype), Stage1().to(dtype)
    idx, w = torch.randint(0, V, (B, T)), torch.randn(B, T, V).to(dtype)
    specs = stage_specs(1, dtype)
    with reference_hooks(ref0, specs[0]) as want, reference_hooks(ref1, specs[1], want):
        ref_out = ref1(ref0(idx))
        ((ref_out * w).sum() / B).backward()
    unedited = Stage1.forward(ref1, Stage0.forward(ref0, idx))

    mine = copy.deepcopy((ref0, ref1)[pp_rank])
    mine.zero_grad(set_to_none=True)
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(mine, got, pipeline_parallel_size=2, data_parallel_size=dp)
    assert flex.layout.my == layout.my
    register(flex, specs[0] + specs[1])  # every rank registers every hook: names resolve on their stage
    rows, out = _stage_step(flex, layout, idx, w, ref_out, dp_groups[pp_rank], D, dtype)
    if out is not None:
        assert not torch.allclose(out, unedited[rows]), "the edit on stage 1 did not change the output"
    ref = (ref0, ref1)[pp_rank]
    for name, p in mine.named_parameters():
        assert_close(p.grad, ref.get_parameter(name).grad, msg=lambda m, name=name: f"grad {name}: {m}")

    flex.gather_pipeline_outputs()
    if rank == 0:
        check_capture_dict(got, want)
        assert all(t.dtype == dtype for ts in got.values() for t in ts)
    else:
        assert got == {}, f"rank {rank} kept {sorted(got)}"
    with pytest.raises(ValueError, match='no module named "block2.attn"'):  # on no stage: fails on every rank
        flex.register_forward_hook(HookFunction("block2.attn"))
    flex.restore()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_two_stage_pipeline(dtype):
    run_ranks(_pipeline_body, 2, dtype, timeout=90)


@multi_process(world_size=4)
def test_two_stage_pipeline_times_two_data_parallel(rank, world_size):
    """PP=2 × DP=2: stage roots gather their dp ranks' batch slices, then ship to rank 0."""
    _pipeline_body(rank, world_size, torch.float32)


def _torch_pipelining_body(rank: int, world_size: int) -> None:
    """``torch.distributed.pipelining``: PipelineStage + ScheduleGPipe, 2 microbatches; hooks fire once
    per microbatch, so each capture is the reference's split in two along the batch."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref0, ref1 = Stage0(), Stage1()
    idx, w = torch.randint(0, V, (B, T)), torch.randn(B, T, V)
    specs = stage_specs(1, torch.float32)
    with reference_hooks(ref0, specs[0]) as want, reference_hooks(ref1, specs[1], want):
        ref_out = ref1(ref0(idx))
        (ref_out * w).sum().backward()

    mine = copy.deepcopy((ref0, ref1)[rank])
    mine.zero_grad(set_to_none=True)
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(mine, got, pipeline_parallel_size=2)
    register(flex, specs[0] + specs[1])
    mb = B // 2
    # Static stage metadata (no shape inference run); requires_grad=True marks what gets gradients.
    example_in = idx[:mb] if rank == 0 else torch.zeros(mb, T, D, requires_grad=True)
    example_out = torch.zeros(mb, T, (D, V)[rank], requires_grad=True)
    stage = PipelineStage(mine, rank, 2, torch.device("cpu"), input_args=example_in, output_args=example_out)
    schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=lambda out, target: (out * target).sum(),
                             scale_grads=False)
    if rank == 0:
        schedule.step(idx)
    else:
        out = schedule.step(target=w)
        assert_close(out, ref_out)
    ref = (ref0, ref1)[rank]
    for name, p in mine.named_parameters():
        assert_close(p.grad, ref.get_parameter(name).grad, msg=lambda m, name=name: f"grad {name}: {m}")

    flex.gather_pipeline_outputs()
    if rank == 0:
        assert sorted(got) == sorted(want)
        for name in want:
            if name.endswith(".weight"):  # a parameter's grad: one firing per microbatch, summed
                assert_close(sum(got[name]), want[name][0], msg=lambda m, name=name: f"{name}: {m}")
            else:
                assert_close(torch.cat(got[name]), torch.cat(want[name]), msg=lambda m, name=name: f"{name}: {m}")
    flex.restore()


@multi_process(world_size=2)
def test_torch_pipelining_gpipe(rank, world_size):
    _torch_pipelining_body(rank, world_size)


# -- TP × DP × PP = 2 × 2 × 2 with fairscale layers ------------------------------------------------
class Mlp2(nn.Module):
    """Stage 1 of the 3-D run (its own names, so no hook name resolves on both stages)."""

    def __init__(self) -> None:
        super().__init__()
        self.up2, self.act2, self.down2 = nn.Linear(TD, TH), nn.GELU(), nn.Linear(TH, TD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down2(self.act2(self.up2(x)))


MLP2_DIMS = {"up2.weight": 0, "up2.bias": 0, "down2.weight": 1, "down2.bias": None}


def fairscale_mlp2(ref: Mlp2, tp_rank: int, tp: int) -> Mlp2:
    from fairscale.nn.model_parallel import layers as L

    net = Mlp2()
    net.up2 = L.ColumnParallelLinear(TD, TH, gather_output=False, init_method=lambda w: None)
    net.down2 = L.RowParallelLinear(TH, TD, input_is_parallel=True, init_method=lambda w: None)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(shard(ref.get_parameter(name), MLP2_DIMS[name], tp_rank, tp))
    return net


@pytest.mark.parametrize("sizes", [True, False], ids=["sizes_given", "layout_read_from_fairscale"])
def test_tp2_dp2_pp2_fairscale(sizes):
    """8 ranks: each stage tensor parallel (fairscale) and data parallel; captures of split values on
    both stages reach rank 0 in full; an edit mixing stage 1's split dim; every gradient."""
    run_ranks(_tp_dp_pp_body, 8, sizes, timeout=180)


def _stage_step(flex: FlexModel, layout: ParallelLayout, idx: torch.Tensor, w: torch.Tensor,
                ref_out: torch.Tensor, dp_group, width: int, dtype: torch.dtype = torch.float32) -> tuple:
    """One step of a 2-stage pipeline on this rank's batch rows: stage 0 sends its activation (``width``
    features, ``dtype``) to the same tp rank of stage 1 and back-propagates the gradient it gets back;
    stage 1 checks its output against one process and runs the loss backward. Gradients are then averaged
    over dp (what DDP would do). Returns ``(rows, stage 1's output or None)``."""
    me, dp = layout.my, layout.dp
    n = idx.shape[0] // dp
    rows = slice(me["dp"] * n, (me["dp"] + 1) * n)
    other = layout.global_rank(me["dp"], 1 - me["pp"], me["tp"])
    out = None
    if me["pp"] == 0:
        h = flex(idx[rows])
        dist.send(h.detach().contiguous(), dst=other)
        grad = torch.empty_like(h)
        dist.recv(grad, src=other)
        h.backward(grad)
    else:
        h = torch.empty(n, idx.shape[1], width, dtype=dtype)
        dist.recv(h, src=other)
        h.requires_grad_()
        out = flex(h)
        assert_close(out, ref_out[rows])
        ((out * w[rows]).sum() / n).backward()
        dist.send(h.grad.contiguous(), dst=other)
    for p in flex.module.parameters():
        dist.all_reduce(p.grad, group=dp_group)
        p.grad /= dp
    return rows, out


def _tp_dp_pp_body(rank: int, world_size: int, sizes: bool) -> None:
    from fairscale.nn.model_parallel import initialize as fs

    torch.set_num_threads(1)
    fs.initialize_model_parallel(2, pipeline_length=2)
    layout = ParallelLayout.from_sizes(tp=2, pp=2, dp=2)  # fairscale's order
    me = layout.my
    assert (me["tp"], me["dp"]) == (fs.get_model_parallel_rank(), fs.get_data_parallel_rank())
    torch.manual_seed(0)
    ref0, ref1 = Net(), Mlp2()
    idx, w = torch.randint(0, TV, (TB, TT)), torch.randn(TB, TT, TD)
    a = torch.randn(TH, TH) / TH ** 0.5
    spec0 = [HookSpec("forward", "pemb"), HookSpec("forward", "up"), HookSpec("forward_pre", "down"),
             HookSpec("full_backward", "down"), HookSpec("tensor", "up.weight")]
    spec1 = [HookSpec("forward", "up2", mix_hidden(a)), HookSpec("forward_pre", "down2"),
             HookSpec("full_backward_pre", "up2"), HookSpec("tensor", "down2.weight")]
    with reference_hooks(ref0, spec0) as want, reference_hooks(ref1, spec1, want):
        ref_out = ref1(ref0(idx))
        ((ref_out * w).sum() / TB).backward()

    mine = fairscale_net(ref0, me["tp"], 2) if me["pp"] == 0 else fairscale_mlp2(ref1, me["tp"], 2)
    got: Dict[str, List[torch.Tensor]] = {}
    if sizes:
        flex = FlexModel(mine, got, tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2)
    else:
        flex = FlexModel(mine, got)
    assert flex.layout == layout, flex.layout
    register(flex, spec0 + spec1)
    rows, out = _stage_step(flex, layout, idx, w, ref_out, fs.get_data_parallel_group(), TD)
    if out is not None:
        unedited = Mlp2.forward(ref1, Net.forward(ref0, idx))
        assert not torch.allclose(out, unedited[rows]), "the edit on stage 1 did not change the output"
    if me["pp"] == 0:
        check_shard_grads(mine, ref0, FAIRSCALE_DIMS, me["tp"], 2)
    else:
        check_shard_grads(mine, ref1, MLP2_DIMS, me["tp"], 2)
    flex.gather_pipeline_outputs()
    if rank == 0:
        check_capture_dict(got, want)
    else:
        assert got == {}, f"rank {rank} kept {sorted(got)}"
    name = ("up.weight", "down2.weight")[me["pp"]]  # collective over the stage that holds it
    assert_close(flex.get_module_parameter(name), (ref0, ref1)[me["pp"]].get_parameter(name))
    flex.restore()
    fs.destroy_model_parallel()


# -- TP × DP × PP = 2 × 2 × 2 with megatron-core: Megatron's rank order (pp, dp, tp) ----------------
class MStage0(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.emb, self.mlp0 = nn.Embedding(TV, TD), mlp

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.mlp0(self.emb(idx))


class MStage1(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp1 = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp1(x)


def test_tp2_dp2_pp2_megatron_order():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core)")
    run_ranks(_megatron_3d_body, 8, timeout=180)


def _megatron_3d_body(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state as ps
    from flex_model import MEGATRON_ORDER

    torch.set_num_threads(1)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    layout = ParallelLayout.from_sizes(tp=2, pp=2, dp=2, order=MEGATRON_ORDER)
    me = layout.my
    assert me == {"tp": ps.get_tensor_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
                  "pp": ps.get_pipeline_model_parallel_rank()}, me
    torch.manual_seed(5)
    ref0, ref1 = MStage0(MLP(TD, TH)), MStage1(MLP(TD, TH))
    idx, w = torch.randint(0, TV, (TB, TT)), torch.randn(TB, TT, TD)
    a = torch.randn(TH, TH) / TH ** 0.5
    spec0 = [HookSpec("forward", "mlp0.up"), HookSpec("forward_pre", "mlp0.down"), HookSpec("tensor", "mlp0.up.weight")]
    spec1 = [HookSpec("forward", "mlp1.up", mix_hidden(a)), HookSpec("full_backward", "mlp1.down"),
             HookSpec("tensor", "mlp1.down.weight")]
    with reference_hooks(ref0, spec0) as want, reference_hooks(ref1, spec1, want):
        ref_out = ref1(ref0(idx))
        ((ref_out * w).sum() / TB).backward()

    if me["pp"] == 0:
        ref, mine = ref0, MStage0(MegatronMlp(ref0.mlp0, me["tp"], 2))
        mine.emb.load_state_dict(ref0.emb.state_dict())
    else:
        ref, mine = ref1, MStage1(MegatronMlp(ref1.mlp1, me["tp"], 2))
    prefix = ("mlp0.", "mlp1.")[me["pp"]]
    dims = {"emb.weight": None, **{prefix + k: v for k, v in MLP_DIMS.items()}}
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(mine, got, tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2,
                     parallel_order=MEGATRON_ORDER)
    assert flex.layout == layout
    register(flex, spec0 + spec1)
    _stage_step(flex, layout, idx, w, ref_out, ps.get_data_parallel_group(), TD)
    check_shard_grads(mine, ref, {k: v for k, v in dims.items() if k in dict(mine.named_parameters())}, me["tp"], 2)
    flex.gather_pipeline_outputs()
    if rank == 0:
        check_capture_dict(got, want)
    else:
        assert got == {}, f"rank {rank} kept {sorted(got)}"
    flex.restore()
    ps.destroy_model_parallel()


@multi_process(world_size=4)
def test_wrong_rank_order_is_an_error_on_every_rank_not_a_hang(rank, world_size):
    """fairscale orders (dp, pp, tp); saying Megatron's (pp, dp, tp) pairs the wrong ranks as stages."""
    from fairscale.nn.model_parallel import initialize as fsi

    from flex_model import FlexModel, MEGATRON_ORDER

    fsi.initialize_model_parallel(1, pipeline_length=2)  # 4 ranks: dp 2 × pp 2
    try:
        with pytest.raises(ValueError, match="parallel_order"):
            FlexModel(nn.Linear(2, 2), {}, pipeline_parallel_size=2, data_parallel_size=2,
                      parallel_order=MEGATRON_ORDER)
        flex = FlexModel(nn.Linear(2, 2), {}, pipeline_parallel_size=2, data_parallel_size=2)  # fairscale's order
        flex.restore()
    finally:
        fsi.destroy_model_parallel()
