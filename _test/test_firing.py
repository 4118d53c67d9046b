"""Each hook type (``flex_model.firing.HOOK_KINDS``) against a plain torch hook, on one process.

A FlexModel hook doing an edit must give exactly what the same edit gives
as a plain torch hook on a ``copy.deepcopy`` of the model: the output, the
value captured before the edit, and every parameter's ``.grad``
(``torch.equal``: the computation is the same). Models: TinyGPT, HF GPT-2
(ModelOutput outputs) and HF Llama (decoder layers take keyword arguments).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from _test.models import TinyGPT, lm_loss, tiny_gpt2, tiny_llama
from flex_model import FlexModel, HookFunction

torch.set_num_threads(1)


def fixed_matrix(d: int) -> torch.Tensor:
    """A fixed random (d, d) matrix: the non-elementwise edit is ``x @ A``."""
    return torch.randn(d, d, generator=torch.Generator().manual_seed(1000 + d)) / d ** 0.5


EDITS = {
    "double": lambda x: x * 2,
    "matmul": lambda x: x @ fixed_matrix(x.shape[-1]).to(x.dtype),
}


@dataclass
class Case:
    """Where a hook goes and how to reach its tensor by hand (``get``/``put``) for the reference."""

    model: str
    hook_type: str
    name: str
    get: Callable[[Any], torch.Tensor]
    put: Callable[[Any, torch.Tensor], Any]
    unpack_idx: int = 0


first = lambda v: v[0]  # noqa: E731
put_first = lambda v, t: (t, *v[1:])  # noqa: E731
same = lambda v: v  # noqa: E731
replace = lambda v, t: t  # noqa: E731
pre_arg0 = lambda v: v[0][0]  # noqa: E731
put_pre_arg0 = lambda v, t: ((t, *v[0][1:]), v[1])  # noqa: E731


def _put_cos(v, t):
    args, kwargs = v
    return args, {**kwargs, "position_embeddings": (t, kwargs["position_embeddings"][1])}


def _put_hidden(v, t):
    v = copy.copy(v)
    v["last_hidden_state"] = t
    return v


CASES = [
    Case("tinygpt", "forward", "layers.0.mlp", same, replace),
    Case("tinygpt", "forward_pre", "layers.1.attn", pre_arg0, put_pre_arg0),
    Case("tinygpt", "full_backward", "layers.0.mlp.down", first, put_first),
    Case("tinygpt", "full_backward_pre", "layers.1.mlp", first, put_first),
    Case("tinygpt", "tensor", "layers.0.attn.qkv.weight", same, replace),
    Case("tinygpt", "tensor", "head.weight", same, replace),  # tied to wte.weight
    Case("gpt2", "forward", "transformer", lambda v: v["last_hidden_state"], _put_hidden),  # a ModelOutput
    Case("gpt2", "forward", "transformer.h.0.mlp", same, replace),
    Case("gpt2", "forward_pre", "transformer.h.1", pre_arg0, put_pre_arg0),
    Case("gpt2", "full_backward", "transformer.h.0.mlp", first, put_first),
    Case("gpt2", "full_backward_pre", "transformer.h.1.mlp", first, put_first),
    Case("gpt2", "tensor", "transformer.h.0.attn.c_attn.weight", same, replace),
    Case("llama", "forward", "model.layers.0.self_attn", first, put_first),
    Case("llama", "forward_pre", "model.layers.1", pre_arg0, put_pre_arg0),
    # position_embeddings=(cos, sin) is a keyword argument: leaves are [hidden, cos, sin, position_ids]
    Case("llama", "forward_pre", "model.layers.1", lambda v: v[1]["position_embeddings"][0], _put_cos, 1),
    Case("llama", "full_backward", "model.layers.0.mlp", first, put_first),
    Case("llama", "full_backward_pre", "model.layers.1.mlp", first, put_first),
    Case("llama", "tensor", "model.layers.0.self_attn.q_proj.weight", same, replace),
]

VOCAB = {"tinygpt": 61, "gpt2": 97, "llama": 97}


def make_model(kind: str) -> torch.nn.Module:
    if kind == "tinygpt":
        torch.manual_seed(0)
        return TinyGPT()
    return tiny_gpt2() if kind == "gpt2" else tiny_llama()


def run(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    lm_loss(logits, idx).backward()
    return logits.detach()


def reference(model: torch.nn.Module, case: Case, edit: Callable, captured: list) -> None:
    """The same edit as a plain torch hook, written out by hand."""

    def apply(value):
        captured.append(case.get(value).detach().clone())
        return case.put(value, edit(case.get(value)))

    if case.hook_type == "tensor":
        model.get_parameter(case.name).register_hook(apply)
        return
    m = model.get_submodule(case.name)
    if case.hook_type == "forward":
        m.register_forward_hook(lambda mod, args, out: apply(out))
    elif case.hook_type == "forward_pre":
        m.register_forward_pre_hook(lambda mod, args, kwargs: apply((args, kwargs)), with_kwargs=True)
    elif case.hook_type == "full_backward":
        m.register_full_backward_hook(lambda mod, gin, gout: apply(gin))
    else:
        m.register_full_backward_pre_hook(lambda mod, gout: apply(gout))


REGISTER = {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
            "full_backward": "register_full_backward_hook", "full_backward_pre": "register_full_backward_pre_hook",
            "tensor": "register_hook"}


def assert_same_grads(a: torch.nn.Module, b: torch.nn.Module) -> None:
    grads_a, grads_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert grads_a.keys() == grads_b.keys()
    for name, p in grads_a.items():
        q = grads_b[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), f"grad of {name} differs"


@pytest.mark.parametrize("edit_name", list(EDITS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.hook_type}-{c.name}-{c.unpack_idx}")
def test_edit_matches_plain_torch_hook(case: Case, edit_name: str) -> None:
    edit = EDITS[edit_name]
    model = make_model(case.model)
    ref_model = copy.deepcopy(model)
    idx = torch.randint(0, VOCAB[case.model], (2, 7), generator=torch.Generator().manual_seed(3))

    ref_captured: list = []
    reference(ref_model, case, edit, ref_captured)
    ref_logits = run(ref_model, idx)

    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    calls = []

    def editing_function(module, x, save_ctx, modules):
        calls.append(module)
        return edit(x)

    getattr(flex, REGISTER[case.hook_type])(HookFunction(case.name, editing_function=editing_function,
                                                         unpack_idx=case.unpack_idx))
    logits = run(flex, idx)

    assert len(ref_captured) == 1 and len(output_dict[case.name]) == 1 and len(calls) == 1
    owner = case.name.rsplit(".", 1)[0] if case.hook_type == "tensor" else case.name
    assert calls[0] is model.get_submodule(owner)  # the editing function gets the hooked (or owning) module
    assert torch.equal(output_dict[case.name][0], ref_captured[0]), "captured value differs (must be pre-edit)"
    assert not torch.equal(edit(ref_captured[0]), ref_captured[0])  # the edit changes something
    assert torch.equal(logits, ref_logits)
    assert_same_grads(model, ref_model)
    # the edit did matter: without it, the output or the gradients differ
    plain = make_model(case.model)
    plain_logits = run(plain, idx)
    changed = not torch.equal(plain_logits, logits) or any(
        p.grad is not None and not torch.equal(p.grad, q.grad)
        for p, q in zip(plain.parameters(), model.parameters()))
    assert changed


def plain_backward_noops(model: torch.nn.Module) -> None:
    """Identity full backward (pre) hooks on every module, as plain torch hooks.

    Torch's own backward-hook machinery may reorder gradient sums (it does in
    Llama: last-bit differences), so hooked models are compared with a copy
    carrying the same plain hooks.
    """
    for name, m in model.named_modules():
        if name:
            m.register_full_backward_hook(lambda mod, gin, gout: None)
            m.register_full_backward_pre_hook(lambda mod, gout: None)


@pytest.mark.parametrize("hook_types", [("forward", "forward_pre", "tensor"), tuple(REGISTER)], ids=["fwd", "all"])
@pytest.mark.parametrize("kind", ["tinygpt", "gpt2", "llama"])
def test_capture_only_hooks_everywhere_change_nothing(kind: str, hook_types: tuple) -> None:
    """Capture-only hooks on every module and parameter: bit-identical outputs and grads."""
    model = make_model(kind)
    bare_model = copy.deepcopy(model)
    ref_model = copy.deepcopy(model)
    with_backward = "full_backward" in hook_types
    if with_backward:
        plain_backward_noops(ref_model)
    idx = torch.randint(0, VOCAB[kind], (2, 7), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        # embeddings get integer inputs, Llama's attention keyword inputs: no input gradients there;
        # torch warns that it runs no backward hooks on modules returning a ModelOutput
        warnings.simplefilter("ignore")
        ref_logits = run(ref_model, idx)
        bare_logits = run(bare_model, idx)
        output_dict: dict = {}
        flex = FlexModel(model, output_dict)
        for hook_type in hook_types:
            flex.create_hook_group(hook_type, "", hook_type=hook_type)
        logits = run(flex, idx)
    assert torch.equal(logits, ref_logits) and torch.equal(logits, bare_logits)
    assert_same_grads(model, ref_model)
    for p, q in zip(model.parameters(), bare_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert len(output_dict) >= len(dict(model.named_parameters()))  # every parameter's grad captured
    assert all(len(v) == 1 for k, v in output_dict.items() if k.endswith("weight"))
    mlp_fired = [len(v) for k, v in output_dict.items() if k.endswith("mlp")]
    assert mlp_fired and all(n == (4 if with_backward else 2) for n in mlp_fired)  # one per hook type

def test_gradient_hook_without_gradient_tensors_warns_and_does_nothing() -> None:
    """An embedding's full backward hook sees grad_input == (None,): nothing to capture, a warning."""
    model = make_model("tinygpt")
    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    flex.register_full_backward_hook(HookFunction("wte", editing_function=lambda *a: pytest.fail("ran")))
    idx = torch.randint(0, 61, (2, 5))
    with pytest.warns(UserWarning, match='"wte".*no gradient tensors'):
        run(flex, idx)
    assert "wte" not in output_dict
