"""Expansion on TinyGPT: zero-init is the identity, ablation and contract() give the original
architecture's outputs, and routed expanded training matches a hand-written detach reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _test.distributed import multi_process
from _test.models import TinyGPT, lm_loss
from flex_model import FlexModel, ParallelLayout, RouteActivation, Router, expand

D_HIDDEN, D_EXPAND = 64, 8
LAYERS = ["layers.0.mlp", "layers.1.mlp"]


def setup(seed: int = 0, router=None, param_level=False):
    torch.manual_seed(seed)
    model = TinyGPT(vocab=61, d_model=32, n_heads=4, n_layers=2, d_hidden=D_HIDDEN, max_len=16)
    original = copy.deepcopy(model)
    flex = FlexModel(model, {})
    expanded = expand(flex, LAYERS, D_EXPAND, router=router, unit_offset=D_HIDDEN, param_level=param_level)
    return model, original, flex, expanded


def tokens(seed: int = 1, batch: int = 4, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 61, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_down(expanded) -> None:
    with torch.no_grad():
        for units in expanded.units.values():
            units.down.weight.normal_(std=0.5)


def test_zero_init_expansion_is_the_original_model():
    model, original, flex, expanded = setup()
    idx = tokens()
    assert torch.equal(flex(idx, groups="expand"), original(idx))
    assert sorted(flex.trainable_modules_names) == ["expand_layers_0_mlp", "expand_layers_1_mlp"]
    assert len(expanded.parameters()) == 2 * 3


def test_ablate_and_contract_equal_the_original_architecture():
    model, original, flex, expanded = setup()
    randomize_down(expanded)
    idx = tokens()
    full = flex(idx, groups="expand")
    ablated = flex(idx, groups=[])  # no expansion hook fires: expanded units ablated
    assert not torch.allclose(full, ablated)  # the expansion matters once trained
    assert torch.equal(ablated, original(idx))
    contracted = expanded.contract()
    assert type(contracted) is type(original)
    assert contracted.state_dict().keys() == original.state_dict().keys()
    assert all(not m._forward_hooks for m in contracted.modules())
    assert torch.equal(contracted(idx), ablated)
    assert torch.equal(flex(idx, groups="expand"), full)  # the wrapped model keeps its expansion


def ref_mlp_step(model: TinyGPT, units: dict, idx, w_orig, w_exp, param_level: bool) -> torch.Tensor:
    """TinyGPT forward with expanded MLPs and routing written with detach."""
    x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
    for i, block in enumerate(model.layers):
        x = x + block.attn(block.ln1(x))
        z = block.ln2(x)
        h = block.mlp.up(z)
        h = h * w_orig + h.detach() * (1 - w_orig)
        u = units[LAYERS[i]]
        if param_level:
            a = F.linear(z, u.up.weight.detach(), u.up.bias.detach())
            e = a + w_exp * (F.linear(z.detach(), u.up.weight, u.up.bias) - a.detach())
        else:
            e = u.up(z)
            e = e * w_exp + e.detach() * (1 - w_exp)
        x = x + block.mlp.down(block.mlp.act(h)) + u.down(u.act(e))
    return model.head(model.ln_f(x))


@pytest.mark.parametrize("param_level", [False, True])
def test_routed_expansion_matches_detach_reference(param_level):
    table = {0: [-0.75, 1.0], 1: [1.0, 0.0]}
    router = Router(D_HIDDEN + D_EXPAND, [(0, D_HIDDEN), (D_HIDDEN, D_HIDDEN + D_EXPAND)], table)
    model, _, flex, expanded = setup(router=router, param_level=param_level)
    flex.create_hook_group("route", "mlp.up", editing_function=RouteActivation(router))
    randomize_down(expanded)
    ref_model, ref_units = copy.deepcopy(model), copy.deepcopy(expanded.units)
    idx = tokens()
    mask = torch.randint(0, 2, idx.shape, generator=torch.Generator().manual_seed(2))
    w_orig = torch.tensor([table[int(m)][0] for m in mask.flatten()]).view(*mask.shape, 1)
    w_exp = torch.tensor([table[int(m)][1] for m in mask.flatten()]).view(*mask.shape, 1)

    with router.masks(mask):
        logits = flex(idx, groups=["expand", "route"])
    assert torch.equal(logits, flex(idx, groups="expand"))  # routing leaves the forward value alone
    lm_loss(logits, idx).backward()
    lm_loss(ref_mlp_step(ref_model, ref_units, idx, w_orig, w_exp, param_level), idx).backward()
    mine = list(model.named_parameters()) + [(f"{k}.{n}", p) for k, u in expanded.units.items()
                                             for n, p in u.named_parameters()]
    ref = list(ref_model.named_parameters()) + [(f"{k}.{n}", p) for k, u in ref_units.items()
                                                for n, p in u.named_parameters()]
    for (n, p), (_, q) in zip(mine, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    # retain tokens (weight 0 on the expanded units) leave no gradient on the expanded up-projection
    only_retain = torch.ones_like(mask)
    for p in expanded.parameters():
        p.grad = None
    with router.masks(only_retain):
        lm_loss(flex(idx, groups=["expand", "route"]), idx).backward()
    assert torch.count_nonzero(expanded.units["layers.0.mlp"].up.weight.grad) == 0
    assert torch.count_nonzero(expanded.units["layers.0.mlp"].down.weight.grad) > 0


def test_expansion_errors():
    torch.manual_seed(0)
    flex = FlexModel(TinyGPT(), {})
    with pytest.raises(ValueError, match="d_expand must be a positive int"):
        expand(flex, LAYERS, 0)
    with pytest.raises(ValueError, match='no module named "layers.0.mpl"'):
        expand(flex, ["layers.0.mpl"], 4)
    expanded = expand(flex, ["layers.0.mlp"], 4, router=Router(8, [(0, 4)], {0: [0.0]}), unit_offset=4)
    with expanded.hooks[0].editing_function.router.masks(torch.zeros(2, 5, dtype=torch.long)), \
            pytest.raises(ValueError, match="mask_ids has shape"):
        flex(tokens(batch=2, seq=6), groups="expand")


def _routed_expansion_grads(flex, model, expanded, router, idx, mask) -> dict:
    with router.masks(mask):
        lm_loss(flex(idx, groups=["expand", "route"]), idx).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads.update({f"{k}.{n}": p.grad.clone() for k, u in expanded.units.items() for n, p in u.named_parameters()})
    return grads


@multi_process(2)
def test_routed_expansion_under_ddp(rank, world_size):
    """Each rank routes its batch slice; after all_reduce_grads every gradient is the single-process one."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    table = {0: [-0.75, 1.0], 1: [1.0, 0.0]}
    idx = tokens()
    mask = torch.randint(0, 2, idx.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for distributed in (False, True):
        router = Router(D_HIDDEN + D_EXPAND, [(0, D_HIDDEN), (D_HIDDEN, D_HIDDEN + D_EXPAND)], table)
        torch.manual_seed(0)
        model = TinyGPT(vocab=61, d_model=32, n_heads=4, n_layers=2, d_hidden=D_HIDDEN, max_len=16)
        flex = FlexModel(DDP(model), {}) if distributed else FlexModel(model, {}, layout=ParallelLayout.single())
        expanded = expand(flex, LAYERS, D_EXPAND, router=router, unit_offset=D_HIDDEN)
        flex.create_hook_group("route", "mlp.up", editing_function=RouteActivation(router))
        torch.manual_seed(3)
        randomize_down(expanded)
        mine = slice(2 * rank, 2 * rank + 2) if distributed else slice(None)
        grads = _routed_expansion_grads(flex, model, expanded, router, idx[mine], mask[mine])
        if distributed:
            expanded.all_reduce_grads()
            grads.update({f"{k}.{n}": p.grad for k, u in expanded.units.items() for n, p in u.named_parameters()})
            flex.restore()
        results.append(grads)
    for n, g in results[0].items():
        torch.testing.assert_close(results[1][n], g, rtol=1e-5, atol=1e-6, msg=n)
