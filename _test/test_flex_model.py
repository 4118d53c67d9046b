"""``FlexModel`` on one process: save_ctx, trainable modules, output_dict, restore, describe.

Hook-type-by-hook-type equivalence with plain torch hooks is in
``test_firing.py``; groups in ``test_groups.py``; names in ``test_names.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _test.models import TinyGPT, lm_loss
from flex_model import DummyModule, FlexModel, HookFunction

torch.set_num_threads(1)
IDX = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))


def tiny() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


# -- save_ctx ---------------------------------------------------------------------------------
def test_save_ctx_carries_values_across_layers_and_passes():
    """Layer 1 adds what layer 0 produced in the previous pass; a counter survives passes."""

    def remember(module, x, ctx, mods):
        ctx.passes = getattr(ctx, "passes", 0) + 1
        ctx.previous = getattr(ctx, "current", torch.zeros_like(x))
        ctx.current = x.detach()
        return None

    def add_previous(module, x, ctx, mods):
        return x + ctx.previous

    model = tiny()
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=remember))
    flex.register_forward_hook(HookFunction("layers.1.mlp", editing_function=add_previous))
    other = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    outs = [flex(IDX), flex(other), flex(IDX)]
    assert flex.save_ctx.passes == 3

    ref = copy.deepcopy(flex.restore())  # copy after restore: a deep copy would copy the hooks too
    seen = []
    ref.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    ref.layers[1].mlp.register_forward_hook(lambda m, a, out: out + (seen[-2] if len(seen) > 1 else 0))
    for out, idx in zip(outs, [IDX, other, IDX]):
        assert torch.equal(out, ref(idx))


# -- trainable modules -------------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_trainable_module_gets_the_hand_written_gradient():
    """Edit ``y = x * w`` at ln_f: dL/dw = sum over batch and positions of x * dL/dy."""
    model = tiny()
    ref = copy.deepcopy(model)
    flex = FlexModel(model, {})
    flex.register_trainable_module("scale", Scale(32))
    flex.register_forward_hook(HookFunction("ln_f", editing_function=lambda m, x, c, mods: mods["scale"](x)))
    lm_loss(flex(IDX), IDX).backward()

    seen = {}

    def cut(module, args, out):  # y as a fresh leaf, to read dL/dy
        seen["x"] = out.detach()
        seen["y"] = (out.detach() * torch.linspace(0.5, 1.5, 32)).requires_grad_()
        return seen["y"]

    ref.ln_f.register_forward_hook(cut)
    lm_loss(ref(IDX), IDX).backward()
    expected = (seen["x"] * seen["y"].grad).sum((0, 1))
    torch.testing.assert_close(flex.trainable_modules["scale"].w.grad, expected, rtol=1e-5, atol=1e-7)
    assert flex.trainable_modules_names == ["scale"]
    assert "trainable_modules.scale" in flex.all_modules_names
    assert any(p is flex.trainable_modules["scale"].w for p in flex.parameters())  # one optimizer for both


def test_trainable_linear_matches_a_plain_hook_and_names_are_unique():
    model = tiny()
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    probe = nn.Linear(32, 32)
    ref_probe = copy.deepcopy(probe)
    flex = FlexModel(model, {})
    flex.register_trainable_module("probe", probe)
    with pytest.raises(ValueError, match='trainable module named "probe" is already registered'):
        flex.register_trainable_module("probe", nn.Linear(2, 2))
    flex.register_forward_hook(HookFunction("layers.0.mlp",
                                            editing_function=lambda m, x, c, mods: x + mods["probe"](x)))
    ref.layers[0].mlp.register_forward_hook(lambda m, a, out: out + ref_probe(out))
    out, ref_out = flex(IDX), ref(IDX)
    lm_loss(out, IDX).backward()
    lm_loss(ref_out, IDX).backward()
    assert torch.equal(out, ref_out)
    assert torch.equal(probe.weight.grad, ref_probe.weight.grad) and torch.equal(probe.bias.grad, ref_probe.bias.grad)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


# -- several hooks on one module, a module called twice -----------------------------------------
def test_hooks_on_one_module_apply_in_registration_order():
    model = tiny()
    ref = copy.deepcopy(model)
    A = torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
    flex = FlexModel(model, {})
    flex.register_forward_hook(HookFunction("layers.0.attn", editing_function=lambda m, x, c, mods: x @ A))
    flex.register_forward_hook(HookFunction("layers.0.attn", editing_function=lambda m, x, c, mods: x + 1))
    ref.layers[0].attn.register_forward_hook(lambda m, a, out: out @ A)
    ref.layers[0].attn.register_forward_hook(lambda m, a, out: out + 1)
    assert torch.equal(flex(IDX), ref(IDX))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tap = DummyModule()

    def forward(self, x):
        return self.tap(self.lin(self.tap(self.lin(x))))


def test_output_dict_has_one_detached_cpu_entry_per_firing_captured_before_the_edit():
    output_dict = {}
    model = Twice()
    flex = FlexModel(model, output_dict)

    def double_in_place(module, x, ctx, mods):
        return x.mul_(2)  # an in-place edit must not change what was captured

    flex.register_forward_hook(HookFunction("lin", editing_function=double_in_place))
    flex.register_forward_hook(HookFunction("tap"))
    x = torch.randn(3, 4)
    y = flex(x)
    flex(x)
    assert [len(output_dict[k]) for k in ("lin", "tap")] == [4, 4]  # two calls per pass, two passes
    with torch.no_grad():
        pre = x @ model.lin.weight.T + model.lin.bias
        second = 2 * pre @ model.lin.weight.T + model.lin.bias
    torch.testing.assert_close(output_dict["lin"][0], pre)
    torch.testing.assert_close(output_dict["tap"][0], 2 * pre)  # tap sees the edited value
    torch.testing.assert_close(output_dict["lin"][1], second)
    assert torch.equal(output_dict["tap"][1], 2 * output_dict["lin"][1]) and torch.equal(output_dict["tap"][1], y)
    assert torch.equal(output_dict["lin"][0], output_dict["lin"][2])  # second pass: same values again
    assert all(not t.requires_grad and t.grad_fn is None and t.device.type == "cpu"
               for v in output_dict.values() for t in v)
    flex.clear_output_dict()
    assert output_dict == {} and flex.output_dict is output_dict


def test_offload_to_cpu_false_keeps_the_device():
    """On a meta-device model, entries stay on meta (offloading would have to copy data meta lacks)."""
    output_dict = {}
    flex = FlexModel(TinyGPT().to("meta"), output_dict, offload_to_cpu=False)
    flex.register_forward_hook(HookFunction("layers.0.mlp"))
    flex(torch.zeros(2, 5, dtype=torch.long, device="meta"))
    assert output_dict["layers.0.mlp"][0].device.type == "meta"
    assert output_dict["layers.0.mlp"][0].shape == (2, 5, 32)


def test_offload_to_cpu_false_still_copies():
    output_dict = {}
    flex = FlexModel(tiny(), output_dict, offload_to_cpu=False)
    flex.register_forward_hook(HookFunction("layers.0.mlp.up", editing_function=lambda m, x, c, mods: x.mul_(3)))
    flex.register_forward_hook(HookFunction("layers.0.mlp.up"))  # sees the edited value
    flex(IDX)
    before, after = output_dict["layers.0.mlp.up"]
    assert torch.equal(after, 3 * before)


@pytest.mark.parametrize("store, stored", [("none", False), ("all", True), ("root", True)])
def test_store_modes_on_one_process(store, stored):
    output_dict = {}
    flex = FlexModel(tiny(), output_dict, store=store)
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, c, mods: x * 0))
    ref = tiny()
    ref.layers[0].mlp.register_forward_hook(lambda m, a, out: out * 0)
    assert torch.equal(flex(IDX), ref(IDX))  # the edit applies whatever is stored
    assert ("layers.0.mlp" in output_dict) == stored


# -- restore ----------------------------------------------------------------------------------
HOOK_DICTS = ["_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"]


def hook_state(model: nn.Module) -> dict:
    modules = {(n, d): dict(getattr(m, d)) for n, m in model.named_modules() for d in HOOK_DICTS}
    params = {n: dict(p._backward_hooks or {}) for n, p in model.named_parameters()}
    # every plain attribute too (e.g. torch's _is_full_backward_hook flag)
    attrs = {n: {k: v for k, v in vars(m).items() if v is None or isinstance(v, (bool, int, float, str))}
             for n, m in model.named_modules()}
    return {"modules": modules, "params": params, "attrs": attrs}


def test_restore_leaves_no_hooks_and_keeps_the_users_own():
    model = tiny()
    user_calls = []
    model.layers[0].mlp.register_forward_hook(lambda m, a, out: user_calls.append(1))
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = hook_state(model)
    reference = copy.deepcopy(model)

    flex = FlexModel(model, {})
    for hook_type in ["forward", "forward_pre", "full_backward", "full_backward_pre", "tensor"]:
        flex.create_hook_group(hook_type, "layers.0" if hook_type != "tensor" else "weight", hook_type=hook_type)
    flex.register_trainable_module("probe", nn.Linear(2, 2))
    assert hook_state(model) != hooks_before
    for groups, complement in [("forward", False), (["tensor", "full_backward"], True), ("all", False)]:
        lm_loss(flex(IDX, groups=groups, complement=complement), IDX).backward()
    n_user_calls = len(user_calls)

    assert flex.restore() is model
    assert hook_state(model) == hooks_before
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert torch.equal(model(IDX), reference(IDX))
    assert len(user_calls) == n_user_calls + 2  # still runs, on the model and on its copy
    model.layers[0].mlp.register_backward_hook(lambda m, gi, go: None)  # the user's own old-style hook: allowed
    with pytest.raises(RuntimeError, match="restored"):
        flex(IDX)
    with pytest.raises(RuntimeError, match="restored"):
        flex.register_forward_hook(HookFunction("layers.0.mlp"))


def test_copy_without_hooks_is_the_model_as_it_was():
    model = tiny()
    model.layers[1].mlp.register_forward_hook(lambda m, a, out: None)  # the user's own: kept in the copy
    before = hook_state(model)
    flex = FlexModel(model, {})
    for hook_type in ["forward", "forward_pre", "full_backward", "full_backward_pre", "tensor"]:
        flex.create_hook_group(hook_type, "layers.0" if hook_type != "tensor" else "weight", hook_type=hook_type)
    plain = flex.copy_without_hooks()
    assert hook_state(plain) == before and hook_state(model) != before
    assert torch.equal(plain(IDX), flex.restore()(IDX))
    plain.layers[0].register_backward_hook(lambda m, gi, go: None)


def test_removing_a_handle_twice_is_fine_and_stops_firing():
    output_dict = {}
    flex = FlexModel(tiny(), output_dict)
    hook = HookFunction("layers.0.mlp")
    handle = flex.register_forward_hook(hook)
    keep = flex.register_forward_hook(HookFunction("layers.1.mlp"))
    flex(IDX)
    handle.remove()
    handle.remove()
    flex(IDX)
    assert len(output_dict["layers.0.mlp"]) == 1 and len(output_dict["layers.1.mlp"]) == 2
    assert list(flex.get_hook_function_groups()) == [keep.hook]
    assert len(flex.module.layers[0].mlp._forward_hooks) == 0
    flex.restore()
    keep.remove()  # after restore too


# -- describe, names, construction --------------------------------------------------------------------
def test_describe_lists_hooks_types_edits_and_groups():
    flex = FlexModel(tiny(), {})
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, c, mods: x))
    flex.create_hook_group("grads", "layers.1.attn.proj.weight", hook_type="tensor")
    flex.register_trainable_module("probe", nn.Linear(2, 2))
    text = flex.describe()
    lines = text.splitlines()
    assert lines[0] == "FlexModel(TinyGPT, layout dp=1 pp=1 tp=1 (one process), 2 hooks)"
    assert lines[1].split() == ["layers.0.mlp", "forward", "edit", "groups=['all']"]
    assert lines[2].split() == ["layers.1.attn.proj.weight", "tensor", "capture", "groups=['all',", "'grads']"]
    assert lines[3] == "  trainable modules: ['probe']"
    assert repr(flex) == text


def test_module_names_and_parameters():
    model = tiny()
    flex = FlexModel(model, {})
    assert flex.wrapped_module_names == sorted(n for n, _ in model.named_modules() if n)
    full = flex.get_module_parameter("layers.0.mlp.up.weight")
    assert torch.equal(full, model.layers[0].mlp.up.weight) and full is not model.layers[0].mlp.up.weight
    assert not full.requires_grad


@pytest.mark.parametrize("args, kwargs, error, phrase", [
    ((torch.zeros(2), {}), {}, TypeError, "FlexModel wraps an nn.Module, got Tensor"),
    ((nn.Linear(2, 2), []), {}, TypeError, "output_dict must be a dict"),
    ((nn.Linear(2, 2), {}), {"store": "everywhere"}, ValueError, 'store must be "root", "all" or "none"'),
    ((nn.Linear(2, 2), {}), {"tensor_parallel_size": 2}, ValueError, "need torch.distributed"),
])
def test_bad_construction(args, kwargs, error, phrase):
    with pytest.raises(error, match=phrase):
        FlexModel(*args, **kwargs)


def test_forward_passes_keyword_arguments_through_to_hf_models():
    from _test.models import tiny_gpt2

    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    output_dict = {}
    flex = FlexModel(model, output_dict)
    flex.create_hook_group("mlps", "mlp.c_fc")
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    out = flex(input_ids=idx, use_cache=False, groups="mlps")
    assert type(out) is type(ref(input_ids=idx))
    assert torch.equal(out.logits, ref(input_ids=idx, use_cache=False).logits) and out.past_key_values is None
    assert sorted(output_dict) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


def test_original_api_forms_of_group_queries_parameters_and_hook_types():
    """flex-model 0.1.0 callers: per-hook / per-group queries, get_module_parameter(name, expected_shape),
    hook_type "backward_pre"."""
    flex = FlexModel(TinyGPT(), {})
    hooks = flex.create_hook_group("mlps", "mlp.up", hook_type="backward_pre")
    assert all([r.hook_type for r in flex.registrations(h)] == ["full_backward_pre"] for h in hooks)
    assert flex.get_hook_function_groups(hooks[0]) == {"all", "mlps"}
    assert flex.get_group_hook_functions("mlps") == hooks
    with pytest.raises(ValueError, match="unknown hook group"):
        flex.get_group_hook_functions("nope")
    weight = flex.get_module_parameter("layers.0.mlp.up.weight", expected_shape=(64, None))
    assert torch.equal(weight, flex.module.layers[0].mlp.up.weight)
    with pytest.raises(ValueError, match="not expected_shape"):
        flex.get_module_parameter("layers.0.mlp.up.weight", expected_shape=(32, 32))
