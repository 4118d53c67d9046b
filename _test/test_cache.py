"""``flex.run_with_cache``: every module's full output by name, against plain torch hooks on one process, and
under DDP (global and replica scope), FSDP1 and fairscale TP=2 against one process."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from _test.distributed import multi_process, tokens
from _test.models import tiny_gpt, tiny_llama
from flex_model import ActivationCache, FlexModel, HookFunction
from flex_model.tree import tensor_leaves

B, T, D = 4, 6, 32  # batch, sequence, width of TinyGPT


def plain_cache(model: nn.Module, *args, names: Optional[Sequence[str]] = None, **kwargs):
    """The reference: a plain forward hook on every named module (or ``names``) keeping its output's first
    tensor; ``(output, {name: [values]})``."""
    seen: Dict[str, List[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if name and (names is None or name in names):
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: seen.setdefault(name, []).append(tensor_leaves(out)[0].detach().clone())))
    try:
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def check_cache(cache: ActivationCache, want: Dict[str, List[torch.Tensor]], rows: slice = slice(None),
                skip: Sequence[str] = ()) -> None:
    names = sorted(n for n in want if n not in skip)
    assert sorted(n for n in cache if n not in skip) == names
    for name in names:
        assert_close(cache.firings(name), [w[rows] for w in want[name]], msg=lambda m, name=name: f"{name}: {m}")


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- one process ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_every_module_against_plain_hooks(make):
    """Every module's output as plain forward hooks see it; the model's aliases (where the wrapper has them:
    HF models) as the module (output or input) each stands for."""
    model = make()
    x = tokens(B, T, vocab=61)
    with torch.no_grad():
        ref_out, want = plain_cache(model, x)
        inputs: Dict[str, List[torch.Tensor]] = {}
        handles = [m.register_forward_pre_hook(lambda m, a, kw, n=n: inputs.setdefault(n, []).append(
            tensor_leaves((a, kw))[0].clone()), with_kwargs=True) for n, m in model.named_modules() if n]
        model(x)
        for h in handles:
            h.remove()
        output_dict: Dict[str, List[torch.Tensor]] = {}
        flex = FlexModel(model, output_dict)
        before = hooks_on(model)
        out, cache = flex.run_with_cache(x)
    assert_close(tensor_leaves(out)[0], tensor_leaves(ref_out)[0])
    aliases = flex.aliases() if hasattr(flex, "aliases") else {}
    check_cache(cache, want, skip=list(aliases))
    for alias, target in aliases.items():
        module, _, side = target.partition(" (")
        if module in want:  # an alias of a module's output (or input); attention internals have no plain twin
            assert_close(cache[alias], (inputs if side else want)[module][0], msg=lambda m, a=alias: f"{a}: {m}")
        else:
            assert alias in cache
    assert cache.here and output_dict == {} and flex.registrations() == [] and hooks_on(model) == before
    flex.restore()


def test_filters_layers_moving_and_the_users_hooks():
    model = tiny_gpt()
    x = tokens(B, T)
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict)
    zero = HookFunction("layers.0.mlp", editing_function=lambda m, v, ctx, mods: v * 0)
    flex.register(zero)  # the user's edit fires in the pass; the cache holds what flowed out of the module
    with torch.no_grad():
        _, cache = flex.run_with_cache(x, names_filter=["layers.{i}.mlp", "ln_f"])
        _, by_callable = flex.run_with_cache(x, names_filter=lambda n: n.endswith(".attn"))
        _, one = flex.run_with_cache(x, names_filter="layers.1", groups=[])  # no hook of the user's fires
        _, want = plain_cache(model, x, names=["layers.1"])
    assert list(cache) == ["layers.0.mlp", "layers.1.mlp", "ln_f"]
    assert cache["layers.0.mlp"].abs().max() == 0
    assert sorted(by_callable) == ["layers.0.attn", "layers.1.attn"]
    assert_close(one["layers.1"], want["layers.1"][0])
    assert list(output_dict) == ["layers.0.mlp"] and len(output_dict["layers.0.mlp"]) == 2  # the user's, 2 passes
    assert [r.hook for r in flex.registrations()] == [zero]
    # layers stacked, by a pattern or by the family's last name
    assert cache.stack("layers.{i}.mlp").shape == (2, B, T, D)
    assert_close(cache.stack("mlp"), cache.stack("layers.{i}.mlp"))
    assert cache.layer_names("mlp") == ["layers.0.mlp", "layers.1.mlp"]
    moved = cache.to(torch.float64)
    assert moved["ln_f"].dtype == torch.float64 and cache["ln_f"].dtype == torch.float32
    with pytest.raises(KeyError, match="closest names"):
        cache["layers.0.mpl"]
    with pytest.raises(ValueError, match="no name matches"):
        flex.run_with_cache(x, names_filter="blocks.{i}")
    with pytest.raises(ValueError, match='no module named "nope"'):
        flex.run_with_cache(x, names_filter=["nope"])
    assert [r.hook for r in flex.registrations()] == [zero]
    flex.restore()


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(self.act(x)))


def test_a_module_called_twice_and_hooks_removed_on_error():
    model = Twice()
    flex = FlexModel(model, {})
    before = hooks_on(model)
    x = torch.randn(3, 4)
    _, cache = flex.run_with_cache(x)
    assert len(cache.firings("act")) == 2
    with pytest.raises(ValueError, match="fired 2 times"):
        cache["act"]
    with pytest.raises(RuntimeError):
        flex.run_with_cache(torch.randn(3, 5))  # the model itself fails: the capture hooks go anyway
    assert hooks_on(model) == before and flex.registrations() == []
    flex.restore()


# -- several ranks ---------------------------------------------------------------------------------------------
@multi_process(world_size=2, timeout=120)
def test_cache_ddp_fsdp1_against_one_process(rank, world_size):
    """DDP: global scope gives the owner every rank's rows, replica scope gives each rank its own; FSDP1 the
    same as DDP. "wpe" (positions, no batch dim) is the same on every rank: its full shape says so."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP

    from _test.models import Block

    torch.set_num_threads(1)
    x = tokens(B, T)
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    with torch.no_grad():
        _, want = plain_cache(tiny_gpt(), x)
    shapes = {"wpe": (T, D)}
    for wrap in (lambda m: DDP(m), lambda m: FSDP(m, auto_wrap_policy=ModuleWrapPolicy({Block}),
                                                   device_id=torch.device("cpu"), use_orig_params=True)):
        output_dict: Dict[str, List[torch.Tensor]] = {}
        flex = FlexModel(wrap(tiny_gpt()), output_dict)
        assert flex.layout.dp == 2
        with torch.no_grad():
            _, cache = flex.run_with_cache(x[rows], expected_shapes=shapes)
            _, mine = flex.run_with_cache(x[rows], scope="replica", expected_shapes=shapes)
        if rank == 0:
            check_cache(cache, want)
        else:
            assert not cache.here and len(cache) == 0 and "layers.0" in cache.names
            with pytest.raises(KeyError, match="holds no captures"):
                cache["layers.0"]
        check_cache(mine, want, rows, skip=["wpe"])
        assert_close(mine["wpe"], want["wpe"][0])
        assert output_dict == {} and flex.registrations() == []
        flex.restore()


@multi_process(world_size=2, timeout=120)
def test_cache_fairscale_tp2_against_one_process(rank, world_size):
    """fairscale TP=2: values split over tp (the column-parallel "up", the GELU after it) come out whole. The
    GELU's split is said by expected_shapes; without it the error says how to go on, and the hooks are gone."""
    from fairscale.nn.model_parallel import initialize as fs

    from _test.models import fairscale_tp_gpt

    torch.set_num_threads(1)
    fs.initialize_model_parallel(2)
    x = tokens(B, T)
    ref = tiny_gpt()
    with torch.no_grad():
        _, want = plain_cache(ref, x)
        model = fairscale_tp_gpt(ref, rank)
        flex = FlexModel(model, {})
        assert flex.layout.tp == 2
        before = hooks_on(model)
        with pytest.raises(Exception) as failure:
            flex.run_with_cache(x)
        assert "layers.0.mlp.act" in str(failure.value) or rank != 0
        assert 'expected_shapes={"layers.0.mlp.act"' in "".join(getattr(failure.value, "__notes__", [])) or rank != 0
        assert hooks_on(model) == before and flex.registrations() == []
        _, cache = flex.run_with_cache(x, expected_shapes={"layers.{i}.mlp.act": (None, None, 64)})
        with flex.storing("all"):
            _, everywhere = flex.run_with_cache(x, names_filter="layers.{i}.mlp.up")
    if rank == 0:
        check_cache(cache, want)
    assert everywhere.here and everywhere.stack("up").shape == (2, B, T, 64)
    assert_close(everywhere.stack("up"), torch.stack([want[f"layers.{i}.mlp.up"][0] for i in range(2)]))
    flex.restore()
    fs.destroy_model_parallel()


def test_store_as_keeps_a_registrations_captures_apart():
    """The public addition the cache stands on: two hooks on one module, one keeping its captures elsewhere."""
    model = tiny_gpt()
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict)
    flex.register(HookFunction("layers.0", editing_function=lambda m, v, ctx, mods: v * 2))
    flex.register(HookFunction("layers.0"), store_as="after the edit")
    with pytest.raises(TypeError, match="store_as"):
        flex.register(HookFunction("layers.1"), store_as="")
    with torch.no_grad():
        flex(tokens(B, T))
    assert sorted(output_dict) == ["after the edit", "layers.0"]
    assert_close(output_dict["after the edit"][0], 2 * output_dict["layers.0"][0])
    assert "after the edit" in flex.describe()
    flex.restore()
