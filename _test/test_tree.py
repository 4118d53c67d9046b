"""``flex_model.tree``: tensor leaves of nested hook values, in the documented order, and replace_leaf."""
from __future__ import annotations

from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flex_model.tree import replace_leaf, tensor_leaves

Pair = namedtuple("Pair", ["first", "second"])


@dataclass
class Box:
    a: Any
    b: Any = None
    note: str = "kept"


@dataclass(frozen=True)
class FrozenBox:
    a: Any
    b: Any = None


def t(i: float) -> torch.Tensor:
    return torch.full((2,), float(i))


def values(leaves):
    return [float(x[0]) for x in leaves]


def test_order_is_depth_first_sequences_dicts_dataclasses():
    value = (t(0), [t(1), {"z": t(2), "a": (t(3), None, "text")}], Box(t(4), Pair(t(5), t(6))), 7, t(8))
    assert values(tensor_leaves(value)) == [0, 1, 2, 3, 4, 5, 6, 8]  # dict: insertion order, not sorted


def test_hf_model_output_leaves_and_replace_keep_type():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    out = BaseModelOutputWithPast(last_hidden_state=t(0), hidden_states=(t(1), t(2)))
    assert values(tensor_leaves(out)) == [0, 1, 2]  # None fields (past_key_values, attentions) are absent
    new = replace_leaf(out, 2, t(9))
    assert type(new) is BaseModelOutputWithPast
    assert float(new.hidden_states[1][0]) == 9 and float(new[1][1][0]) == 9  # attribute and index agree
    assert float(out.hidden_states[1][0]) == 2  # the original is untouched
    assert new.last_hidden_state is out.last_hidden_state


@pytest.mark.parametrize("make", [
    lambda a, b: (a, b),
    lambda a, b: [a, b],
    lambda a, b: {"x": a, "y": b},
    lambda a, b: OrderedDict(x=a, y=b),
    lambda a, b: Pair(a, b),
    lambda a, b: Box(a, b),
    lambda a, b: FrozenBox(a, b),
], ids=["tuple", "list", "dict", "ordereddict", "namedtuple", "dataclass", "frozen-dataclass"])
def test_replace_leaf_keeps_container_type(make):
    old = make(t(0), (t(1), t(2)))
    new = replace_leaf(old, 2, t(7))
    assert type(new) is type(old)
    assert values(tensor_leaves(new)) == [0, 1, 7]
    assert values(tensor_leaves(old)) == [0, 1, 2]  # not mutated
    assert type(tensor_leaves(new)) is list
    if isinstance(old, Box):
        assert new.note == "kept"


def test_replace_leaf_negative_index_and_untouched_branches_are_shared():
    inner = [t(1), t(2)]
    value = {"left": inner, "right": (t(3),)}
    new = replace_leaf(value, -1, t(9))  # negative indices count from the end, as for lists
    assert values(tensor_leaves(new)) == [1, 2, 9]
    assert new["left"] is inner  # a branch without the target is not copied


def test_replace_leaf_index_out_of_range_raises():
    with pytest.raises(IndexError, match="index 2 is out of range: the value has 2 tensor leaves"):
        replace_leaf((t(0), [t(1)]), 2, t(5))
    with pytest.raises(IndexError, match="index -3 is out of range"):
        replace_leaf((t(0), [t(1)]), -3, t(5))


def test_replace_leaf_on_a_bare_tensor():
    assert float(replace_leaf(t(1), 0, t(5))[0]) == 5


def test_non_tensor_leaves_are_kept_as_they_are():
    marker = object()
    value = (marker, None, 3, "s", t(1))
    new = replace_leaf(value, 0, t(4))
    assert new[0] is marker and new[1:4] == (None, 3, "s") and float(new[4][0]) == 4


# -- property: any nesting, any index ---------------------------------------------------
leaf = st.one_of(st.integers(0, 9).map(t), st.none(), st.just("s"))


def nest(children):
    return st.one_of(
        st.tuples(children, children),
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
        st.builds(Pair, children, children),
        st.builds(Box, children, children),
        st.builds(FrozenBox, children, children),
    )


trees = st.recursive(leaf, nest, max_leaves=12)


def shape_of(obj: Any) -> Any:
    """The container skeleton with tensors replaced by their value (for structural comparison)."""
    if isinstance(obj, torch.Tensor):
        return ("T", float(obj[0]))
    if isinstance(obj, dict):
        return (type(obj), tuple((k, shape_of(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(shape_of(x) for x in obj))
    if isinstance(obj, (Box, FrozenBox)):
        return (type(obj), shape_of(obj.a), shape_of(obj.b))
    return obj


@settings(max_examples=150, deadline=None)
@given(tree=trees, data=st.data())
def test_replace_leaf_changes_exactly_one_leaf(tree, data):
    leaves = tensor_leaves(tree)
    if not leaves:
        with pytest.raises(IndexError, match="out of range: the value has 0 tensor leaves"):
            replace_leaf(tree, 0, t(99))
        return
    i = data.draw(st.integers(0, len(leaves) - 1))
    new = replace_leaf(tree, i, t(99))
    expected = values(leaves)
    expected[i] = 99
    assert values(tensor_leaves(new)) == expected
    # the skeleton is unchanged apart from that one leaf
    restored = replace_leaf(new, i, leaves[i])
    assert shape_of(restored) == shape_of(tree)
    assert tensor_leaves(restored)[i] is leaves[i]
