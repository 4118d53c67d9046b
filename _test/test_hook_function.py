"""``HookFunction`` validation, and the errors a bad hook or editing function gets on one process.

Each error is checked for its type and a phrase that names the problem.
"""
from __future__ import annotations

import copy

import pytest
import torch

from _test.models import TinyGPT, lm_loss
from flex_model import FlexModel, HookFunction, ShardInfo, ShardwiseEdit

torch.set_num_threads(1)
IDX = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))


def make_flex(**kwargs):
    torch.manual_seed(0)
    output_dict = {}
    return FlexModel(TinyGPT(), output_dict, **kwargs), output_dict


# -- construction ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, phrase", [
    (dict(module_name=""), TypeError, "module_name must be a non-empty dotted name"),
    (dict(module_name=3), TypeError, "module_name must be a non-empty dotted name"),
    (dict(module_name="a", expected_shape="abc"), TypeError, "expected_shape must be a sequence of positive"),
    (dict(module_name="a", expected_shape=(2, 0)), TypeError, "expected_shape must be a sequence of positive"),
    (dict(module_name="a", expected_shape=(2, 1.5)), TypeError, "expected_shape must be a sequence of positive"),
    (dict(module_name="a", editing_function=42), TypeError, "editing_function must be callable, got int"),
    (dict(module_name="a", unpack_idx="0"), TypeError, "unpack_idx must be an int"),
])
def test_bad_construction(kwargs, error, phrase):
    with pytest.raises(error, match=phrase):
        HookFunction(**kwargs)


def test_expected_shape_accepts_none_dims_and_repr_names_everything():
    def my_edit(module, x, ctx, mods):
        return x

    hook = HookFunction("layers.0.mlp", expected_shape=[2, None, 32], editing_function=my_edit, unpack_idx=1)
    assert hook.expected_shape == (2, None, 32)
    assert repr(hook) == ("HookFunction('layers.0.mlp', expected_shape=(2, None, 32), "
                          "editing_function=my_edit, unpack_idx=1)")
    flex, _ = make_flex()
    handle = flex.register_forward_pre_hook(hook)
    assert repr(hook) == repr(HookFunction("layers.0.mlp", [2, None, 32], my_edit, 1))  # registering adds nothing
    assert vars(hook) == {"module_name": "layers.0.mlp", "expected_shape": (2, None, 32),
                          "editing_function": my_edit, "unpack_idx": 1, "scope": None}
    assert "Registration(HookFunction('layers.0.mlp'" in repr(handle.registration)
    assert handle.registration.hook_type == "forward_pre" and handle.hook is hook


def test_an_editing_function_passed_as_expected_shape_is_named():
    def edit(module, x, ctx, mods):
        return x

    with pytest.raises(TypeError, match=r"expected_shape \(the second argument\) got the callable edit; pass an "
                                        r"editing function by keyword: HookFunction\('0', editing_function=...\)"):
        HookFunction("0", edit)


# -- registration ------------------------------------------------------------------------
def test_registering_a_hook_function_twice_as_one_type_on_one_wrapper_raises():
    flex, _ = make_flex()
    hook = HookFunction("layers.0.mlp")
    handle = flex.register_forward_hook(hook)
    with pytest.raises(ValueError, match="already registered here as a forward hook; remove the first"):
        flex.register_forward_hook(hook)
    with pytest.raises(ValueError, match="already registered here as a forward hook"):
        flex.register(hook, "forward")
    handle.remove()
    handle.remove()  # a second removal is fine
    flex.register_forward_hook(hook)  # free again after removal
    with pytest.raises(TypeError, match="expected a HookFunction, got str"):
        flex.register_forward_hook("layers.0.mlp")
    with pytest.raises(ValueError, match="unknown hook_type 'sideways'"):
        flex.register(hook, "sideways")


def test_one_hook_function_on_two_wrappers_and_as_two_types_fires_for_each_registration():
    """The registration record belongs to the wrapper: the same HookFunction registered on two wrappers, or
    as two hook types on one, fires once per registration, and each handle removes only its own."""
    seen = []

    def record(module, x, ctx, mods):
        seen.append(tuple(x.shape))

    hook = HookFunction("layers.0.mlp", editing_function=record)
    first, out1 = make_flex()
    second, out2 = make_flex()
    fwd = first.register_forward_hook(hook)
    pre = first.register(hook, "full_backward_pre")
    other = second.register_forward_hook(hook)
    first.update_hook_groups(hook, "g")  # tags every registration of the hook on this wrapper
    assert [r.hook_type for r in first.registrations(hook)] == ["forward", "full_backward_pre"]
    assert first.get_hook_function_groups(hook) == {"all", "g"}
    assert second.get_hook_function_groups(hook) == {"all"}
    first(IDX).sum().backward()
    assert seen == [(2, 6, 32), (2, 6, 32)] and len(out1["layers.0.mlp"]) == 2  # forward, then its gradient
    seen.clear()
    second(IDX)
    assert seen == [(2, 6, 32)] and len(out2["layers.0.mlp"]) == 1
    fwd.remove()
    seen.clear()
    first(IDX).sum().backward()
    assert seen == [(2, 6, 32)]  # the backward registration is left
    assert [r.hook_type for r in first.registrations(hook)] == ["full_backward_pre"]
    pre.remove()
    other.remove()
    with pytest.raises(ValueError, match="is not registered with this model"):
        first.get_hook_function_groups(hook)


def test_tensor_hook_on_a_module_name_and_module_hook_on_a_parameter():
    flex, _ = make_flex()
    with pytest.raises(ValueError, match="names a module, not a tensor"):
        flex.register_hook(HookFunction("layers.0.mlp.up"))
    with pytest.raises(ValueError, match="names a parameter, not a module"):
        flex.register_full_backward_hook(HookFunction("layers.0.mlp.up.bias"))
    with pytest.raises(ValueError, match=r'no module named "layers.0.mlp.upp".*closest names: \[\'layers.0.mlp.up\''):
        flex.register_forward_hook(HookFunction("layers.0.mlp.upp"))
    assert flex.get_hook_function_groups() == {}  # failed registrations leave nothing behind


# -- firing errors -------------------------------------------------------------------------
def test_editing_function_returning_a_wrong_shape():
    flex, _ = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, c, mods: x[:, :-1]))
    with pytest.raises(ValueError, match=r'editing function of hook "layers.0.mlp" returned shape \(2, 5, 32\) '
                                         r"torch.float32 on cpu, but its input is shape \(2, 6, 32\)"):
        flex(IDX)


def test_editing_function_returning_a_wrong_dtype():
    flex, _ = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, c, mods: x.double()))
    with pytest.raises(ValueError, match=r'hook "layers.0.mlp" returned shape \(2, 6, 32\) torch.float64 .* '
                                         r"input is shape \(2, 6, 32\) torch.float32"):
        flex(IDX)


def test_editing_function_returning_a_non_tensor():
    flex, _ = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, c, mods: 3.0))
    with pytest.raises(TypeError, match='hook "layers.0.mlp" returned float; return a tensor'):
        flex(IDX)


def test_wrong_shape_in_a_backward_hook():
    flex, _ = make_flex()
    flex.register_full_backward_pre_hook(HookFunction("layers.1.mlp", editing_function=lambda m, g, c, mods: g[0]))
    with pytest.raises(ValueError, match=r'"layers.1.mlp" returned shape \(6, 32\).*input is shape \(2, 6, 32\)'):
        lm_loss(flex(IDX), IDX).backward()


def test_unpack_idx_out_of_range():
    flex, _ = make_flex()
    flex.register_forward_pre_hook(HookFunction("layers.0.mlp", unpack_idx=1))
    with pytest.raises(IndexError, match=r'unpack_idx 1 is out of range on hook "layers.0.mlp" \(forward_pre\): '
                                         r"the hooked value has 1 tensor\(s\) \[\(2, 6, 32\)\]"):
        flex(IDX)


def test_negative_unpack_idx_counts_from_the_end():
    flex, out = make_flex()
    plain = copy.deepcopy(flex.module)
    plain.layers[0].mlp.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    flex.register_forward_pre_hook(HookFunction("layers.0.mlp", unpack_idx=-1,
                                                editing_function=lambda m, x, c, mods: x * 0))
    assert torch.equal(flex(IDX), plain(IDX))
    assert out["layers.0.mlp"][0].shape == (2, 6, 32) and out["layers.0.mlp"][0].abs().sum() > 0


def test_expected_shape_of_the_wrong_length_or_size():
    flex, _ = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp", expected_shape=(2, 32)))
    with pytest.raises(ValueError, match=r"expected_shape has 2 dims, the value has 3"):
        flex(IDX)
    flex, _ = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp", expected_shape=(2, 7, None)))
    with pytest.raises(ValueError, match=r'on hook "layers.0.mlp": dim 1 is 6 locally.*not 7'):
        flex(IDX)
    flex, out = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp", expected_shape=(None, 6, 32)))
    flex(IDX)
    assert out["layers.0.mlp"][0].shape == (2, 6, 32)


class Boom(KeyError):
    pass


@pytest.mark.parametrize("register, name", [("register_forward_hook", "layers.0.mlp"),
                                            ("register_full_backward_hook", "layers.0.mlp"),
                                            ("register_hook", "layers.0.mlp.up.weight")])
def test_exception_in_editing_function_keeps_type_and_names_hook_and_rank(register, name):
    def explode(module, x, save_ctx, modules):
        raise Boom("user bug")

    flex, _ = make_flex()
    getattr(flex, register)(HookFunction(name, editing_function=explode))
    with pytest.raises(Boom) as info:
        lm_loss(flex(IDX), IDX).backward()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f'editing function of hook "{name}"' in notes and "on rank 0" in notes


# -- ShardwiseEdit on one process ----------------------------------------------------------
class DoubleFirstHalf(ShardwiseEdit):
    def __init__(self):
        self.shards = []

    def edit_shard(self, current_module, local, shard, modules):
        self.shards.append(shard)
        keep = (shard.global_index(-1, local.shape[-1]) < local.shape[-1] // 2).to(local.dtype)
        return local * (1 + keep)


def test_shardwise_edit_on_one_process_sees_the_whole_tensor():
    torch.manual_seed(0)
    ref = TinyGPT()
    ref.layers[0].mlp.up.register_forward_hook(lambda m, a, out: torch.cat([out[..., :32] * 2, out[..., 32:]], -1))
    ref_out = ref(IDX)
    edit = DoubleFirstHalf()
    flex, output_dict = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp.up", editing_function=edit))
    assert torch.equal(flex(IDX), ref_out)
    assert edit.shards[0].tp_dim is None and edit.shards[0].tp_size == 1 and edit.shards[0].dp_dim is None
    assert edit.shards[0].module_args[0].shape == (2, 6, 32)
    assert output_dict == {}  # shardwise edits store nothing


def test_shardwise_edit_returning_a_wrong_shape():
    class Bad(ShardwiseEdit):
        def edit_shard(self, current_module, local, shard, modules):
            return local[0]

    flex, _ = make_flex()
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=Bad()))
    with pytest.raises(ValueError, match=r'shardwise edit of hook "layers.0.mlp" returned shape \(6, 32\)'):
        flex(IDX)
    assert ShardInfo().global_index(0, 3).tolist() == [0, 1, 2]
    assert ShardInfo(tp_dim=1, tp_rank=2, tp_size=4).global_index(1, 3).tolist() == [6, 7, 8]
