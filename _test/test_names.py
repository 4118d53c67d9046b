"""``flex_model.names``: a layer may be named with or without wrapper prefixes; unknown names list close matches.

Real wrappers, built on one process: ``torch.compile`` (``_orig_mod``),
activation checkpointing (``_checkpoint_wrapped_module``) and
``nn.DataParallel`` (``module``; on CPU it just calls the module).
"""
from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from _test.models import TinyGPT, lm_loss
from flex_model import FlexModel, HookFunction
from flex_model.names import NameResolver

torch.set_num_threads(1)
IDX = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))


def tiny() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def double(module, x, save_ctx, modules):
    return x * 2


def checkpointed(model: TinyGPT) -> TinyGPT:
    model.layers[0] = checkpoint_wrapper(model.layers[0])
    return model


WRAPPERS = {
    "compile": (lambda m: torch.compile(m, backend="eager"), "_orig_mod."),
    "dataparallel": (torch.nn.DataParallel, "module."),
    "checkpoint": (checkpointed, None),  # the prefix sits inside: layers.0._checkpoint_wrapped_module.mlp
}


def wrapped_name(kind: str, name: str) -> str:
    if kind == "checkpoint":
        return name.replace("layers.0.", "layers.0._checkpoint_wrapped_module.")
    return WRAPPERS[kind][1] + name


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_both_names_resolve_to_the_inner_module(kind):
    inner = tiny()
    wrapper = WRAPPERS[kind][0](inner)
    names = NameResolver(wrapper)
    target = inner.layers[0].mlp if kind != "checkpoint" else inner.layers[0]._checkpoint_wrapped_module.mlp
    for name in ["layers.0.mlp", wrapped_name(kind, "layers.0.mlp")]:
        real, module = names.module(name)
        assert module is target
        assert real == wrapped_name(kind, "layers.0.mlp")
    # the wrapper node's name resolves to the innermost module on that path
    block = inner.layers[0]._checkpoint_wrapped_module if kind == "checkpoint" else inner.layers[0]
    assert names.module("layers.0")[1] is block
    assert "layers.0.mlp" in names.module_names()
    assert not any(w in n for n in names.module_names() for w in ("_orig_mod", "_checkpoint_wrapped"))
    _, owner, param = names.parameter(wrapped_name(kind, "layers.0.mlp.up.weight"))
    assert param is target.up.weight and owner is target.up
    _, _, param = names.parameter("layers.0.mlp.up.weight")
    assert param is target.up.weight
    assert "layers.0.mlp.up.weight" in names.parameter_names()


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_hooks_on_wrapped_models_land_on_the_right_module(kind):
    """Edit one layer by its plain name and capture another by its wrapped name; compare with no wrapper."""
    ref = tiny()
    ref.layers[0].mlp.register_forward_hook(lambda m, a, out: out * 2)
    ref_out = ref(IDX)
    lm_loss(ref_out, IDX).backward()

    inner = tiny()
    output_dict = {}
    flex = FlexModel(WRAPPERS[kind][0](inner), output_dict)
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=double))
    flex.register_forward_hook(HookFunction(wrapped_name(kind, "layers.1.mlp.up")))
    flex.register_hook(HookFunction(wrapped_name(kind, "layers.0.attn.qkv.weight")))
    out = flex(IDX)
    lm_loss(out, IDX).backward()

    mlp = inner.layers[0].mlp if kind != "checkpoint" else inner.layers[0]._checkpoint_wrapped_module.mlp
    assert len(mlp._forward_hooks) == 1
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for (name, p), q in zip(ref.named_parameters(), inner.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
    up = output_dict[wrapped_name(kind, "layers.1.mlp.up")]
    assert len(up) == 1 and up[0].shape == (2, 6, 64)
    torch.testing.assert_close(output_dict[wrapped_name(kind, "layers.0.attn.qkv.weight")][0],
                               ref.layers[0].attn.qkv.weight.grad, rtol=1e-6, atol=1e-7)
    assert flex.restore() is not None and len(mlp._forward_hooks) == 0


def test_wrapped_module_names_are_the_unwrapped_names():
    plain = FlexModel(tiny(), {}).wrapped_module_names
    assert FlexModel(torch.nn.DataParallel(tiny()), {}).wrapped_module_names == plain
    assert FlexModel(torch.compile(tiny(), backend="eager"), {}).wrapped_module_names == plain
    assert FlexModel(checkpointed(tiny()), {}).wrapped_module_names == plain


def test_unknown_names_list_close_matches():
    flex = FlexModel(torch.nn.DataParallel(tiny()), {})
    with pytest.raises(ValueError, match=r'no module named "layers.0.mpl".*closest names: \[\'layers.0.mlp\''):
        flex.register_forward_hook(HookFunction("layers.0.mpl"))
    with pytest.raises(ValueError, match=r'no parameter named "layers.0.mlp.up.wieght".*closest names: '
                                         r"\['layers.0.mlp.up.weight'"):
        flex.register_hook(HookFunction("layers.0.mlp.up.wieght"))
    with pytest.raises(ValueError, match="some existing names"):  # nothing close: a sample of names
        flex.register_forward_hook(HookFunction("qqqqqqqqqqqqqqqqqq"))


def test_parameter_and_module_names_are_not_confused():
    flex = FlexModel(tiny(), {})
    with pytest.raises(ValueError, match='"layers.0.mlp.up.weight" names a parameter, not a module; use '
                                         'register_hook'):
        flex.register_forward_hook(HookFunction("layers.0.mlp.up.weight"))
    with pytest.raises(ValueError, match='"layers.0.mlp.up" names a module, not a tensor.*"layers.0.mlp.up.weight"'):
        flex.register_hook(HookFunction("layers.0.mlp.up"))
    with pytest.raises(TypeError, match="module name must be a string"):
        NameResolver(tiny()).module(3)


def test_tied_parameter_resolves_under_both_names():
    model = tiny()
    names = NameResolver(model)
    assert names.parameter("head.weight")[2] is names.parameter("wte.weight")[2] is model.wte.weight


def test_checkpoint_recomputation_fires_forward_hooks_again():
    """Under activation checkpointing, backward recomputes the layer: its forward hooks fire again and
    output_dict gets a second, identical entry (torch stops recomputing early, so the last hooks of a
    layer may not fire again)."""
    inner = tiny()
    output_dict = {}
    flex = FlexModel(checkpointed(inner), output_dict)
    flex.register_forward_hook(HookFunction("layers.0.mlp.up"))
    out = flex(IDX)
    assert len(output_dict["layers.0.mlp.up"]) == 1
    lm_loss(out, IDX).backward()
    first, *again = output_dict["layers.0.mlp.up"]
    assert len(again) == 1 and torch.equal(again[0], first)
