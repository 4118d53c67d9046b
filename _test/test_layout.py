"""``ParallelLayout`` as a value: coordinates and rank order, on one process, no process group.

The layouts here describe 8-rank jobs without starting them: ``ranks`` and
``rank`` are given, so every query is pure arithmetic. What they must agree
with is written out by hand from each framework's documented order
(fairscale: dp outermost, then pp, then tp; Megatron-LM: pp, dp, tp). That
the groups a real framework builds match is checked by the multi-rank tests
(``test_distributed_tp.py``, ``test_pipeline.py``).
"""
from __future__ import annotations

import pytest

from flex_model import FAIRSCALE_ORDER, MEGATRON_ORDER, ParallelLayout


def layout(order, rank=0, dp=2, pp=2, tp=2):
    return ParallelLayout(dp=dp, pp=pp, tp=tp, order=order, ranks=tuple(range(dp * pp * tp)), rank=rank)


def test_fairscale_order_puts_tp_innermost_then_pp_then_dp():
    lay = layout(FAIRSCALE_ORDER)
    # global rank = dp * 4 + pp * 2 + tp
    assert [lay.coords(r) for r in (0, 1, 2, 5, 7)] == [
        {"dp": 0, "pp": 0, "tp": 0}, {"dp": 0, "pp": 0, "tp": 1}, {"dp": 0, "pp": 1, "tp": 0},
        {"dp": 1, "pp": 0, "tp": 1}, {"dp": 1, "pp": 1, "tp": 1}]
    assert lay.stage_ranks(0) == [0, 1, 4, 5] and lay.stage_ranks(1) == [2, 3, 6, 7]
    assert lay.root_ranks == [0, 2] and lay.owner == 0


def test_megatron_order_puts_pp_outermost():
    lay = layout(MEGATRON_ORDER, rank=6)
    # global rank = pp * 4 + dp * 2 + tp
    assert lay.my == {"pp": 1, "dp": 1, "tp": 0}
    assert lay.stage_ranks(0) == [0, 1, 2, 3] and lay.stage_ranks(1) == [4, 5, 6, 7]
    assert lay.axis_ranks("tp") == [6, 7] and lay.axis_ranks("dp") == [4, 6] and lay.axis_ranks("pp") == [2, 6]
    assert lay.root_ranks == [0, 4]


@pytest.mark.parametrize("order", [FAIRSCALE_ORDER, MEGATRON_ORDER, ("tp", "dp", "pp")])
def test_coords_and_global_rank_are_inverse_and_cover_every_rank(order):
    lay = layout(order)
    seen = {lay.global_rank(**lay.coords(r)) for r in lay.ranks}
    assert seen == set(lay.ranks)
    for r in lay.ranks:
        assert lay.global_rank(**lay.coords(r)) == r
    stages = [lay.stage_ranks(p) for p in range(lay.pp)]
    assert sorted(r for s in stages for r in s) == list(lay.ranks)  # stages partition the job


def test_ranks_of_a_subgroup_are_data():
    lay = ParallelLayout(dp=2, tp=2, ranks=(4, 5, 6, 7), rank=6)
    assert lay.my == {"dp": 1, "pp": 0, "tp": 0} and lay.owner == 4 and lay.axis_ranks("tp") == [6, 7]


def test_describe_shows_sizes_order_and_source():
    assert ParallelLayout.single().describe() == "dp=1 pp=1 tp=1 (one process)"
    lay = ParallelLayout(dp=2, tp=2, ranks=(0, 1, 2, 3), source="DeviceMesh ('dp', 'tp')")
    assert lay.describe() == "dp=2 pp=1 tp=2 order ('dp', 'pp', 'tp') (DeviceMesh ('dp', 'tp'))"


def test_a_copy_has_no_groups_and_equals_the_original():
    """FlexModel builds its groups on its own copy of a given layout; the value (not the groups) compares."""
    import dataclasses

    lay = layout(FAIRSCALE_ORDER)
    other = dataclasses.replace(lay)
    assert other == lay and other is not lay and other.stage is None and other.roots is None


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(dp=0), "dp size must be a positive int"),
    (dict(tp=1.5), "tp size must be a positive int"),
    (dict(order=("dp", "tp")), "order must be a permutation"),
    (dict(dp=3, ranks=(0, 1, 2, 3)), r"data_parallel_size 3 × pipeline_parallel_size 1 × tensor_parallel_size 1 = 3"),
    (dict(dp=2, ranks=(0, 1), rank=5), r"rank 5 is not in the wrapped process group \[0, 1\]"),
])
def test_bad_layouts(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        ParallelLayout(**kwargs)


def test_sizes_without_torch_distributed_say_what_to_do():
    with pytest.raises(ValueError, match="need torch.distributed: call torch.distributed.init_process_group"):
        ParallelLayout.from_sizes(tp=2)
    assert ParallelLayout.from_sizes().is_single
