"""Exact parity: hooks that only look leave a sharded model's outputs and gradients bit-identical.

Each case builds one sharded model twice from the same seeded weights (deep
copies): the reference runs as it is, with no FlexModel; the other is wrapped
by ``FlexModel`` with two hooks per (module, hook type): a capture-only
``HookFunction`` (no editing function) and one whose editing function returns
``None`` ("unchanged"), on many modules and every hook type that applies
(forward, forward_pre, full_backward, full_backward_pre, and tensor hooks
where the framework allows: not under FSDP). The embeddings' integer token
ids get the capture-only hook alone: on more than one rank any editing
function on an integer value fails ("only Tensors of floating point dtype can
require gradients"), even one returning None. Both run the same step on the
same inputs; the output and every (local) parameter gradient must be
``torch.equal`` to the reference's: not close, the same bits. Then
``flex.restore()`` must leave exactly the hooks the model had before it was
wrapped (those of DDP / FSDP / parallelize_module). Cases: DDP, FSDP1,
fairscale TP=2 and DTensor TP=2, each on 2 gloo ranks.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

from _test.distributed import HookSpec, multi_process, register, row_slices, tokens
from _test.models import NET_D, NET_H, NET_VOCAB, Block, Net, fairscale_net, lm_loss, tiny_gpt
from flex_model import FlexModel

Step = Callable[[nn.Module], torch.Tensor]  # forward and backward of one model (or its FlexModel); returns the output
Grads = Callable[[nn.Module], Dict[str, Optional[torch.Tensor]]]

MODULE_KINDS = ("forward", "forward_pre", "full_backward", "full_backward_pre")
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                      "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def hook_state(model: nn.Module) -> dict:
    """The ids of every module, parameter and global nn.Module hook (what torch would run), by owner name."""
    state = {}
    for name, module in model.named_modules():
        state[name] = {d: sorted(getattr(module, d, {}) or {}) for d in _MODULE_HOOK_DICTS}
        for pname, p in module._parameters.items():
            if p is not None:
                state[f"{name}:{pname}"] = (sorted(getattr(p, "_backward_hooks", None) or {}),
                                            sorted(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
    state["<global>"] = {d: sorted(getattr(nn.modules.module, d)) for d in _GLOBAL_HOOK_DICTS}
    return state


def module_hooks(names: List[str], kinds=MODULE_KINDS, shapes: Optional[Dict[str, tuple]] = None) -> List[HookSpec]:
    """One spec per (module, hook type); ``shapes`` gives the full shape of values not split like the batch."""
    return [HookSpec(kind, name, expected_shape=(shapes or {}).get(name)) for name in names for kind in kinds]


def gpt_hooks(tensor: bool, shapes: Optional[Dict[str, tuple]] = None) -> List[HookSpec]:
    """Hooks on every TinyGPT module (all four module hook types where the value is a float tensor: the
    embeddings take integer ids, so no full_backward on them; their forward_pre is in ``ID_HOOKS``), and
    with ``tensor`` parameter hooks, the tied ``wte.weight`` among them."""
    blocks = [f"layers.{i}{m}" for i in range(2) for m in ("", ".ln1", ".attn", ".attn.qkv", ".attn.proj", ".ln2",
                                                          ".mlp", ".mlp.up", ".mlp.act", ".mlp.down")]
    shapes = {"wpe": (8, 32), **(shapes or {})}  # position embeddings: (T, D), no batch dim
    specs = (module_hooks(["wte"], ("forward", "full_backward_pre"))
             + module_hooks(["wpe"], ("forward", "full_backward_pre"), shapes)
             + module_hooks(blocks + ["ln_f", "head"], shapes=shapes))
    if tensor:
        specs += [HookSpec("tensor", n) for n in ("wte.weight", "wpe.weight", "layers.0.attn.qkv.weight",
                                                   "layers.0.ln1.bias", "layers.1.mlp.up.weight",
                                                   "layers.1.mlp.down.bias", "ln_f.weight")]
    return specs


ID_HOOKS = module_hooks(["wte"], ("forward_pre",))  # TinyGPT's token ids: capture only (see the docstring)


def check_parity(rank: int, make: Callable[[], nn.Module], step: Step, grads: Grads, specs: List[HookSpec],
                 id_hooks: List[HookSpec], **flex_kwargs) -> None:
    """``make()`` twice; the reference runs ``step`` bare, the other under FlexModel with a capture-only and an
    "unchanged" hook per spec, and a capture-only hook per ``id_hooks`` spec (each fires once per step).
    Outputs and gradients must be bit-identical; restore() leaves no hook of ours."""
    reference = make()
    want_out = step(reference).detach()
    want_grads = grads(reference)

    model = make()
    before = hook_state(model)
    edits: List[int] = []

    def unchanged(x: torch.Tensor) -> Optional[torch.Tensor]:
        edits.append(1)
        return None

    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict, **flex_kwargs)
    register(flex, specs + id_hooks + [dataclasses.replace(s, fn=unchanged) for s in specs])
    out = step(flex).detach()
    got_grads = grads(model)
    assert hook_state(model) != before, "FlexModel registered no torch hook"

    assert out.dtype == want_out.dtype and torch.equal(out, want_out), \
        f"output differs: max |diff| {(out - want_out).abs().max().item():g}"
    assert sorted(got_grads) == sorted(want_grads)
    for name, want in want_grads.items():
        got = got_grads[name]
        assert (got is None) == (want is None), f"grad of {name}: {got is None=} {want is None=}"
        if want is not None:
            assert got.dtype == want.dtype and torch.equal(got, want), \
                f"grad of {name} differs: max |diff| {(got - want).abs().max().item():g}"
    if rank == 0:  # the owner holds every capture: two per firing of a spec, of which one ran the edit
        assert sorted(output_dict) == sorted({s.name for s in specs + id_hooks})
        assert len(edits) > 0 and sum(map(len, output_dict.values())) == 2 * len(edits) + len(id_hooks)
    else:
        assert output_dict == {} and edits == [], "the edits run on the root only"

    assert flex.restore() is model
    assert hook_state(model) == before, "restore() left hooks behind"


def local_grads(model: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    """Every parameter's local gradient (a DTensor's local shard), by name."""
    return {n: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}


def gpt_step(idx: torch.Tensor) -> Step:
    def step(m: nn.Module) -> torch.Tensor:
        out = m(idx)
        lm_loss(out, idx).backward()
        return out
    return step


@multi_process(world_size=2)
def test_ddp_parity(rank, world_size):
    base, idx = tiny_gpt(), tokens()[row_slices([2, 2])[rank]]
    check_parity(rank, lambda: DDP(copy.deepcopy(base)), gpt_step(idx), local_grads, gpt_hooks(tensor=True),
                 ID_HOOKS, data_parallel_size=world_size)


@multi_process(world_size=2)
def test_fsdp1_parity(rank, world_size):
    base, idx = tiny_gpt(), tokens()[row_slices([2, 2])[rank]]

    def make() -> nn.Module:
        return FSDP(copy.deepcopy(base), auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"),
                    use_orig_params=True)

    check_parity(rank, make, gpt_step(idx), local_grads, gpt_hooks(tensor=False), ID_HOOKS,
                 data_parallel_size=world_size)


@multi_process(world_size=2)
def test_fairscale_tp2_parity(rank, world_size):
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    torch.manual_seed(0)
    full = Net()
    idx, w = torch.randint(0, NET_VOCAB, (4, 5)), torch.randn(4, 5, NET_D)

    def step(m: nn.Module) -> torch.Tensor:
        out = m(idx)
        ((out * w).sum() / 4).backward()
        return out

    # "act" is a plain GELU on a split value: only expected_shape says so.
    specs = (module_hooks(["emb", "pemb"], ("forward", "full_backward_pre"))
             + module_hooks(["up", "act", "down"], shapes={"act": (None, None, NET_H)})
             + [HookSpec("tensor", n) for n, _ in full.named_parameters()])
    check_parity(rank, lambda: fairscale_net(full, fs.get_model_parallel_rank(), 2), step, local_grads, specs,
                 module_hooks(["emb", "pemb"], ("forward_pre",)), tensor_parallel_size=2)
    fs.destroy_model_parallel()


@multi_process(world_size=2)
def test_dtensor_tp2_parity(rank, world_size):
    """TinyGPT with both MLPs tensor parallel (up colwise, down rowwise) on a 1-D ("tp",) mesh."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    base, idx = tiny_gpt(), tokens()
    plan = {f"layers.{i}.mlp.{name}": style for i in range(2)
            for name, style in (("up", ColwiseParallel()), ("down", RowwiseParallel()))}

    def make() -> nn.Module:
        return parallelize_module(copy.deepcopy(base), mesh, plan)

    # the GELU between them sees the split hidden units: only expected_shape says so
    check_parity(rank, make, gpt_step(idx), local_grads,
                 gpt_hooks(tensor=True, shapes={f"layers.{i}.mlp.act": (None, None, 64) for i in range(2)}),
                 ID_HOOKS, device_mesh=mesh)
