"""Placement inference as a value: which dim of a local value is split, on one process.

``infer_placement`` reads a ``LocalValue`` (module, side, local tensor,
DTensor info) against a layout. The layouts are pure values (a tp=2 or
dp=2 job described, not started), so no collective runs: the module types
are what is tested. Framework layers need their framework's state, so those
cases run on one real rank (a process group of size 1, forked).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _test.distributed import multi_process
from flex_model.layout import ParallelLayout
from flex_model.placement import (LocalValue, Placement, dp_grad_divisor, gradient_placement, infer_placement,
                                  param_tp_dim)

TP2 = ParallelLayout(tp=2, ranks=(0, 1))
DP2 = ParallelLayout(dp=2, ranks=(0, 1))
DP2_SEQ_FIRST = ParallelLayout(dp=2, ranks=(0, 1), batch_dim=1)
X = torch.zeros(2, 5, 8)


def seen(module, side="output", tensor=X, **kwargs):
    return LocalValue("m", module, side, tensor, **kwargs)


def test_plain_modules_are_replicated_over_tp_and_batch_split_over_dp():
    assert infer_placement(seen(nn.Linear(8, 8)), TP2) == Placement()
    assert infer_placement(seen(nn.Linear(8, 8)), DP2) == Placement(dp_dim=0)
    assert infer_placement(seen(nn.Linear(8, 8)), DP2_SEQ_FIRST) == Placement(dp_dim=1)


def test_gradients_of_values_every_dp_rank_holds_whole_are_means():
    assert infer_placement(seen(nn.Linear(8, 8), "param", torch.zeros(8, 8), is_grad=True, param_name="weight"),
                           DP2) == Placement(dp_mean=True)
    # expected_shape gives the batch dim its local size: the same on every rank; its gradient is a mean
    assert infer_placement(seen(nn.Linear(8, 8), is_grad=True), DP2, (2, 5, 8)) == Placement(dp_mean=True)
    assert infer_placement(seen(nn.Linear(8, 8), is_grad=True), DP2) == Placement(dp_dim=0)


def test_the_dp_gradient_rule():
    split, whole = Placement(dp_dim=0), Placement()
    assert dp_grad_divisor(split, 4, grad_mean=True) == 4
    assert dp_grad_divisor(split, 4, grad_mean=False) == 1
    assert dp_grad_divisor(whole, 4, grad_mean=True) == 1
    assert gradient_placement(whole, 2) == Placement(dp_mean=True)
    assert gradient_placement(whole, 1) == whole and gradient_placement(split, 2) == split


def test_a_dtensor_placement_wins_over_the_module():
    linear = nn.Linear(8, 8)
    assert infer_placement(seen(linear, from_dtensor=True, dtensor_tp_dim=1), TP2) == Placement(tp_dim=1)
    assert infer_placement(seen(linear, from_dtensor=True, dtensor_tp_dim=None), TP2) == Placement()


def test_expected_shape_picks_the_split_dim_and_is_checked():
    linear = nn.Linear(8, 8)
    assert infer_placement(seen(linear), TP2, (2, 5, 16)) == Placement(tp_dim=2)
    assert infer_placement(seen(linear), TP2, (None, 10, None)) == Placement(tp_dim=1)
    with pytest.raises(ValueError, match=r"dim 2 is 8 locally, so its full size is 8 \(replicated\) or 16 \(split "
                                         r"over tp\), not 24"):
        infer_placement(seen(linear), TP2, (2, 5, 24))
    with pytest.raises(ValueError, match=r"dim 2 is 8 locally, so its full size is 8, not 16"):
        infer_placement(seen(linear), ParallelLayout.single(), (2, 5, 16))
    with pytest.raises(ValueError, match="expected_shape has 2 dims, the value has 3"):
        infer_placement(seen(linear), TP2, (2, 5))


def test_a_value_without_a_batch_dim_under_dp_is_refused():
    with pytest.raises(ValueError, match="a 0-d value cannot be split on batch dim 0 under data parallel"):
        infer_placement(seen(nn.Linear(8, 8), tensor=torch.zeros(())), DP2)


@multi_process(1)
def test_every_framework_layer_type_maps_to_its_dims(rank, world_size):
    """fairscale and megatron-core parallel layers and DTensor-sharded Linears, built for real on one rank
    (so their sizes are the full sizes): a local value of the full width is whole, one of half the width
    split on the last dim (read against a tp=2 layout), any other width an error; their parameters' dims."""
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel import layers as F
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as M
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    fs.initialize_model_parallel(1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    cfg = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True)
    init = nn.init.normal_
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))

    def parallel(style):
        return parallelize_module(nn.Sequential(nn.Linear(8, 16)), mesh, {"0": style})[0]

    cases = [  # module, full input width, full output width, {parameter: dim}
        (F.ColumnParallelLinear(8, 16, gather_output=False), {"weight": 0, "bias": 0}),
        (F.ColumnParallelLinear(8, 16, gather_output=True), {"weight": 0, "bias": 0}),
        (F.RowParallelLinear(8, 16, input_is_parallel=True), {"weight": 1, "bias": None}),
        (F.RowParallelLinear(8, 16, input_is_parallel=False), {"weight": 1, "bias": None}),
        (M.ColumnParallelLinear(8, 16, config=cfg, init_method=init, bias=True, gather_output=False),
         {"weight": 0, "bias": 0}),
        (M.RowParallelLinear(8, 16, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                             skip_bias_add=False), {"weight": 1}),
        (parallel(ColwiseParallel()), {}),
        (parallel(ColwiseParallel(output_layouts=Replicate())), {}),
        (parallel(RowwiseParallel()), {}),
        (nn.Linear(8, 16), {"weight": None, "bias": None}),
    ]
    for module, params in cases:
        name = type(module).__name__
        for side, full in (("input", 8), ("output", 16)):
            assert infer_placement(seen(module, side, torch.zeros(2, 5, full)), TP2) == Placement(), (name, side)
            assert infer_placement(seen(module, side, torch.zeros(2, 5, full // 2)), TP2) == Placement(tp_dim=2)
            with pytest.raises(ValueError, match=rf"dim 2 is 3 on this rank, .*full size as {full}: 3 is neither "
                                                 rf"the whole \({full}\) nor a 1/2 slice"):
                infer_placement(seen(module, side, torch.zeros(2, 5, 3)), TP2)
        for name, dim in params.items():
            assert param_tp_dim(module, name, getattr(module, name)) == dim, (type(module).__name__, name)
    for module in (F.VocabParallelEmbedding(16, 8), F.ParallelEmbedding(16, 8), nn.Embedding(16, 8)):
        assert infer_placement(seen(module, "output", torch.zeros(2, 5, 8)), TP2) == Placement()
        assert infer_placement(seen(module, "output", torch.zeros(2, 5, 4)), TP2) == Placement(tp_dim=2)
        assert infer_placement(seen(module, "input", torch.zeros(2, 5, dtype=torch.long)), TP2) == Placement()
    assert param_tp_dim(F.VocabParallelEmbedding(16, 8), "weight", None) == 0
    assert param_tp_dim(F.ParallelEmbedding(16, 8), "weight", None) == 1
    ps.destroy_model_parallel()
    fs.destroy_model_parallel()


def test_megatron_tagged_norms_are_sequence_split_and_their_gradient_hooks_refused():
    ln = nn.LayerNorm(8)
    ln.weight.sequence_parallel = True
    ln.bias.sequence_parallel = True  # Megatron's tag: the norm runs on a sequence-split value (dim 0)
    assert infer_placement(seen(ln, "input"), TP2) == Placement(tp_dim=0)
    with pytest.raises(ValueError, match=r'hook "m": LayerNorm.weight is tagged sequence_parallel: during '
                                         r"backward each tp rank holds the partial gradient"):
        infer_placement(seen(ln, "param", torch.zeros(8), is_grad=True, param_name="weight"), TP2)


def test_a_module_with_sequence_parallelism_inside_needs_every_full_size():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = nn.LayerNorm(8), nn.Linear(8, 8)

    block = Block()
    block.norm.weight.sequence_parallel = block.norm.bias.sequence_parallel = True
    with pytest.raises(ValueError, match=r'hook "m" \(output of Block\): the local value has shape \(2, 5, 8\) on '
                                         r"each of 2 tensor parallel ranks; sequence parallelism runs inside it "
                                         r'\("norm" \(LayerNorm, Megatron sequence parallel\)\).*expected_shape='):
        infer_placement(seen(block), TP2)
    with pytest.raises(ValueError, match=r"leaves dims unsaid, but sequence parallelism runs inside it"):
        infer_placement(seen(block), TP2, (None, 10, None))
    assert infer_placement(seen(block), TP2, (2, 10, 8)) == Placement(tp_dim=1)
    assert infer_placement(seen(block), TP2, (2, 5, 8)) == Placement()
    assert infer_placement(seen(block, tensor=torch.zeros(2, 5, dtype=torch.long)), TP2) == Placement()  # ids


@multi_process(1)
def test_torch_styles_are_read_off_their_hooks_and_where_ours_runs(rank, world_size):
    """What a plain value is depends on whether our hook runs before or after the style's hook: before it,
    the layout the style takes (``input_layouts`` / ``output_layouts``); after it, what the style leaves
    (``desired_*`` with ``use_local_output``, else a DTensor). Without knowing where ours runs, views that
    differ are an error. Read against a tp=2 layout (the 1-rank mesh only builds the hooks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (PrepareModuleInput, PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))

    def hooked(style, module=None):
        module = module or nn.Identity()
        early = (module.register_forward_pre_hook(lambda *a: None).id, module.register_forward_hook(lambda *a: None).id)
        parallelize_module(module, mesh, style)
        late = (module.register_forward_pre_hook(lambda *a: None).id, module.register_forward_hook(lambda *a: None).id)
        return module, early, late

    def place(module, side, hook_id, hooked_value=None, tensor=X, **kw):
        return infer_placement(LocalValue("m", module, side, tensor, hook_id=hook_id, hooked=hooked_value, **kw), TP2)

    pmi, early, late = hooked(PrepareModuleInput(input_layouts=(Shard(1), None),
                                                 desired_input_layouts=(Replicate(), None), use_local_output=True))
    args = ((X, torch.zeros(5, 8)), {})
    assert place(pmi, "input", early[0], args) == Placement(tp_dim=1)  # before: its input_layouts
    assert place(pmi, "input", late[0], args) == Placement()  # after: its desired_input_layouts, local
    with pytest.raises(ValueError, match=r"sequence parallelism runs inside it \(the module itself "
                                         r"\(PrepareModuleInput\)\)"):  # an argument it leaves alone: unsaid
        place(pmi, "input", late[0], args, tensor=args[0][1], leaf_index=1)
    with pytest.raises(ValueError, match=r"PrepareModuleInput on it changes the input, and where this hook runs "
                                         r"among its hooks is not known"):
        place(pmi, "input", None, args)
    assert place(pmi, "input", None, args[0], is_grad=True) == Placement()  # grad_input: after every pre-hook

    pmo, early, late = hooked(PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()))
    assert place(pmo, "output", early[1], X) == Placement(tp_dim=1)
    assert place(pmo, "output", late[1], X) == Placement()

    sp, early, late = hooked(SequenceParallel(sequence_dim=0, use_local_output=True), nn.LayerNorm(8))
    assert place(sp, "input", early[0], ((X,), {})) == Placement(tp_dim=0)
    assert place(sp, "output", late[1], X) == Placement(tp_dim=0)

    row, early, late = hooked(RowwiseParallel(output_layouts=Shard(1)), nn.Linear(16, 8))
    assert place(row, "output", late[1], X) == Placement(tp_dim=1)  # the sequence, and the full out_features
    with pytest.raises(ValueError, match=r"RowwiseParallel on the module \(output after it\).*says dim 1 is split, "
                                         r"but dim 2 holds a 1/2 slice"):
        place(row, "output", late[1], None, tensor=torch.zeros(2, 5, 4))
