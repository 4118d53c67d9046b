"""FSDP1, FSDP2 (``fully_shard``) and a HuggingFace Llama under FSDP1, on real gloo ranks, against one process.

Each rank builds the same seeded model, runs the single-process reference
(plain torch hooks, full batch; ``_test.distributed.reference_run``), then
the FSDP-wrapped model under FlexModel on its batch slice, with hooks named as
in the unwrapped model (no ``_fsdp_wrapped_module``). Compared: outputs,
full captures on rank 0, edited outputs, every full parameter gradient, and
``get_module_parameter``.
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from _test.distributed import (HookSpec, Result, check_captures, check_grads, five_hook_types, flex_step,
                               multi_process, reference_run, register, run_ranks, tokens)
from _test.models import Block, tiny_gpt, tiny_llama
from flex_model import FlexModel, HookFunction

WRAPPER = "_fsdp_wrapped_module."


def fsdp_hooks() -> List[HookSpec]:
    """The DDP cases' hooks minus the parameter tensor hook, which FSDP refuses (see test below)."""
    return [s for s in five_hook_types() if s.kind != "tensor"]


def fsdp1_full_grads(model: FSDP, use_orig_params: bool) -> Dict[str, torch.Tensor]:
    """Every full (reduced) gradient, by unwrapped name. ``with_grads`` needs ``use_orig_params=True``;
    otherwise copy each flat parameter's gradient shard into its data and let FSDP unshard that."""
    if use_orig_params:
        with FSDP.summon_full_params(model, with_grads=True):
            return {n.replace(WRAPPER, ""): p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for flat in model.parameters():
            flat.copy_(flat.grad)
    with FSDP.summon_full_params(model):
        return {n.replace(WRAPPER, ""): p.detach().clone() for n, p in model.named_parameters()}


def _hook_step_and_check(rank: int, world_size: int, flex: FlexModel, output_dict: Dict[str, List[torch.Tensor]],
                         idx: torch.Tensor, rows: slice, ref: Result, specs: List[HookSpec],
                         tensor_hook_refused: bool) -> None:
    """Register ``specs``, check the full parameter by unwrapped name, run this rank's step, check captures."""
    register(flex, specs)
    if tensor_hook_refused:  # the parameter exists by name, but FSDP sets its .grad outside autograd
        with pytest.raises(ValueError, match="would never fire"):
            flex.register_hook(HookFunction("layers.1.mlp.up.weight"))
    torch.testing.assert_close(flex.get_module_parameter("layers.0.mlp.up.weight"),
                               tiny_gpt().get_parameter("layers.0.mlp.up.weight"))
    flex_step(flex, idx, rows, ref, world_size)
    check_captures(rank, output_dict, ref, specs)


def _fsdp1_case(rank: int, world_size: int, use_orig_params: bool) -> None:
    specs = fsdp_hooks()
    idx = tokens(2 * world_size)
    rows = slice(2 * rank, 2 * rank + 2)
    ref = reference_run(tiny_gpt(), idx, specs)
    model = FSDP(tiny_gpt(), auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"),
                 use_orig_params=use_orig_params)
    assert any(WRAPPER in n for n, _ in model.named_modules())
    output_dict: Dict[str, List[torch.Tensor]] = {}
    # sizes given with the original params; read off the model (FSDP = dp over the world) otherwise
    flex = FlexModel(model, output_dict, data_parallel_size=world_size if use_orig_params else 1)
    assert flex.layout.dp == world_size
    assert sorted(flex.wrapped_module_names) == sorted(n for n, _ in tiny_gpt().named_modules() if n)
    _hook_step_and_check(rank, world_size, flex, output_dict, idx, rows, ref, specs,
                         tensor_hook_refused=use_orig_params)
    flex.restore()
    check_grads(fsdp1_full_grads(model, use_orig_params), ref)


@pytest.mark.parametrize("use_orig_params", [True, False])
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp1_auto_wrapped_per_block(world_size, use_orig_params):
    run_ranks(_fsdp1_case, world_size, use_orig_params, timeout=120)


@multi_process(world_size=2, timeout=120)
def test_fsdp2_fully_shard(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    specs = fsdp_hooks()
    idx = tokens(4)
    rows = slice(2 * rank, 2 * rank + 2)
    ref = reference_run(tiny_gpt(), idx, specs)
    mesh = init_device_mesh("cpu", (world_size,))
    model = tiny_gpt()
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict)  # layout read off the model: dp over the world
    assert flex.layout.dp == world_size
    _hook_step_and_check(rank, world_size, flex, output_dict, idx, rows, ref, specs, tensor_hook_refused=True)
    check_grads({n: p.grad.full_tensor() for n, p in model.named_parameters()}, ref)
    flex.restore()


@multi_process(world_size=2, timeout=120)
def test_hf_llama_under_fsdp1(rank, world_size):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    up = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) / 8
    specs = [
        HookSpec("forward", "model.layers.0.mlp", lambda x: x * 2 + x.flip(0)),
        HookSpec("forward", "model.layers.1.self_attn.o_proj"),
        HookSpec("forward_pre", "model.layers.1.mlp.down_proj", lambda x: x @ up),
        HookSpec("full_backward_pre", "model.norm"),
    ]
    idx = tokens(4, vocab=97)
    rows = slice(2 * rank, 2 * rank + 2)
    logits = lambda m, x: m(x, use_cache=False).logits  # noqa: E731
    ref = reference_run(tiny_llama(), idx, specs, forward=logits)
    model = FSDP(tiny_llama(), auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                 device_id=torch.device("cpu"), use_orig_params=True)
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict, data_parallel_size=world_size)
    register(flex, specs)
    flex_step(flex, idx, rows, ref, world_size, forward=logits)
    check_captures(rank, output_dict, ref, specs)
    flex.restore()
    check_grads(fsdp1_full_grads(model, True), ref)
