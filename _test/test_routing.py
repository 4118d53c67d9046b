"""Routing hooks on TinyGPT against a hand-written detach reference, in one process and sharded.

The reference re-implements TinyGPT's forward on a deep copy, with the
routing written out as ``x * w + x.detach() * (1 - w)`` (activation level) or
``linear(x, W.detach(), b.detach()) + w * (linear(x.detach(), W, b) - that.detach())``
(parameter level), and weights built by explicit loops over tokens and
blocks. Distributed tests (DDP, FSDP1, fairscale TP=2) compare every
gradient with that single-process reference.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _test.distributed import multi_process
from _test.models import TinyGPT, fairscale_tp_gpt, lm_loss
from flex_model import FlexModel, Router, RouteActivation, RouteParameters

D_HIDDEN = 64
BLOCKS = [(0, 16), (16, 40)]  # units 40..63 keep weight 1
TABLES = {
    "binary": {0: [0.0, 1.0], 1: [1.0, 0.0]},
    "fractional": {0: [0.25, 0.5], 1: [1.0, 0.75], 2: [0.1, 0.3]},
    "negative": {0: [-0.75, 1.0], 1: [1.0, 0.0]},
}
TOL = dict(rtol=1e-5, atol=1e-6)


def make_model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab=61, d_model=32, n_heads=4, n_layers=2, d_hidden=D_HIDDEN, max_len=16)


def make_batch(table: str, continuous: bool = False, batch: int = 4, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 61, (batch, seq), generator=g)
    if continuous:
        mask = torch.rand(batch, seq, generator=g)
        mask[0, :3] = torch.tensor([0.0, 1.0, 0.5])
    else:
        mask = torch.randint(0, len(TABLES[table]), (batch, seq), generator=g)
    return idx, mask


def ref_weights(table: dict, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, D_HIDDEN] weights, written out token by token."""
    w = torch.ones(*mask.shape, D_HIDDEN)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            m = float(mask[b, t])
            for (start, end), w0, w1 in zip(BLOCKS, table[0], table[1]):
                if mask.is_floating_point():
                    w[b, t, start:end] = (1 - m) * w0 + m * w1
                else:
                    w[b, t, start:end] = table[int(m)][BLOCKS.index((start, end))]
    return w


def ref_forward(model: TinyGPT, idx: torch.Tensor, w: torch.Tensor, level: str) -> torch.Tensor:
    """TinyGPT's forward with routing on every ``mlp.up``, written with detach."""
    x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
    for block in model.layers:
        x = x + block.attn(block.ln1(x))
        z, up = block.ln2(x), block.mlp.up
        if level == "activation":
            h = up(z)
            h = h * w + h.detach() * (1 - w)
        else:
            a = F.linear(z, up.weight.detach(), up.bias.detach())
            h = a + w * (F.linear(z.detach(), up.weight, up.bias) - a.detach())
        x = x + block.mlp.down(block.mlp.act(h))
    return model.head(model.ln_f(x))


def ref_grads(model: TinyGPT, idx, mask, table: dict, level: str) -> dict:
    model = copy.deepcopy(model)
    lm_loss(ref_forward(model, idx, ref_weights(table, mask), level), idx).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def edit_for(level: str, router: Router):
    return RouteActivation(router) if level == "activation" else RouteParameters(router)


CASES = [(t, lvl, False) for t in TABLES for lvl in ("activation", "parameter")] + \
        [("binary", lvl, True) for lvl in ("activation", "parameter")]


@pytest.mark.parametrize("table,level,continuous", CASES)
def test_routing_matches_detach_reference(table, level, continuous):
    model = make_model()
    idx, mask = make_batch(table, continuous)
    expected = ref_grads(model, idx, mask, TABLES[table], level)
    plain = copy.deepcopy(model)(idx)

    router = Router(D_HIDDEN, BLOCKS, TABLES[table])
    flex = FlexModel(model, {})
    flex.create_hook_group("route", "mlp.up", editing_function=edit_for(level, router))
    with router.masks(mask):
        logits = flex(idx, groups="route")
    assert torch.equal(logits, plain)  # forward bit-identical
    lm_loss(logits, idx).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], **TOL, msg=n)
    # routing changed the gradient at all (so the comparison can fail)
    free = copy.deepcopy(make_model())
    lm_loss(free(idx), idx).backward()
    assert not torch.allclose(free.layers[0].mlp.up.weight.grad, expected["layers.0.mlp.up.weight"], **TOL)


def test_groups_choose_routing_per_pass():
    model = make_model()
    idx, mask = make_batch("binary")
    router = Router(D_HIDDEN, BLOCKS, TABLES["binary"])
    flex = FlexModel(model, {})
    flex.create_hook_group("route", "mlp.up", editing_function=RouteActivation(router))
    flex.create_hook_group("other", "ln_f")
    lm_loss(flex(idx, groups="other"), idx).backward()  # no routing and no mask needed
    plain = make_model()
    lm_loss(plain(idx), idx).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_routing_errors():
    model = make_model()
    idx, mask = make_batch("binary")
    flex = FlexModel(model, {})
    router = Router(D_HIDDEN, BLOCKS, TABLES["binary"])
    flex.create_hook_group("route", "mlp.up", editing_function=RouteActivation(router))
    with pytest.raises(ValueError, match="no mask_ids"):
        flex(idx, groups="route")
    with router.masks(mask[:, :-1]), pytest.raises(ValueError, match=r"mask_ids has shape \(4, 11\).*\(4, 12\)"):
        flex(idx, groups="route")
    with router.masks(torch.full_like(mask, 5)), pytest.raises(ValueError, match=r"class id\(s\) \[5\]"):
        flex(idx, groups="route")
    with router.masks(torch.full_like(mask, -1)), pytest.raises(ValueError, match=r"class id\(s\) \[-1\]"):
        flex(idx, groups="route")
    with router.masks(torch.full(mask.shape, 1.5)), pytest.raises(ValueError, match=r"\[0, 1\]"):
        flex(idx, groups="route")
    only_forget = Router(D_HIDDEN, BLOCKS, {0: [0.0, 1.0]})
    flex.create_hook_group("forget_only", "layers.0.mlp.up", editing_function=RouteActivation(only_forget))
    with only_forget.masks(torch.rand(mask.shape)), pytest.raises(ValueError, match=r"lacks class\(es\) \[1\]"):
        flex(idx, groups="forget_only")
    narrow = Router(32, [(0, 8)], {0: [0.0]})
    flex.create_hook_group("narrow", "layers.1.mlp.up", editing_function=RouteActivation(narrow))
    with narrow.masks(torch.zeros_like(mask)), pytest.raises(ValueError, match="hidden_size 32"):
        flex(idx, groups="narrow")
    with pytest.raises(ValueError, match="beyond the hidden size 64"):
        Router(D_HIDDEN, [(0, 65)], {0: [0.0]})
    with pytest.raises(ValueError, match="class 1 has 1 weight"):
        Router(D_HIDDEN, BLOCKS, {0: [0.0, 1.0], 1: [1.0]})
    with pytest.raises(ValueError, match="non-negative"):
        Router(D_HIDDEN, BLOCKS, {-1: [0.0, 1.0]})


# -- distributed: every rank routes its own slice (DP) or its own units (TP) ----------------------------
def _dp_body(rank: int, wrap: str) -> None:
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for table, level in [("negative", "activation"), ("fractional", "parameter")]:
        model = make_model()
        idx, mask = make_batch(table)
        expected = ref_grads(model, idx, mask, TABLES[table], level)
        if wrap == "ddp":
            wrapped = DDP(model)
        else:
            wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        router = Router(D_HIDDEN, BLOCKS, TABLES[table])
        flex = FlexModel(wrapped, {})
        assert flex.layout.dp == 2
        flex.create_hook_group("route", "mlp.up", editing_function=edit_for(level, router))
        mine = slice(2 * rank, 2 * rank + 2)
        with router.masks(mask[mine]):
            logits = flex(idx[mine], groups="route")
        lm_loss(logits, idx[mine]).backward()
        if wrap == "ddp":
            grads = {n: p.grad for n, p in model.named_parameters()}
        else:
            with FSDP.summon_full_params(wrapped, with_grads=True):
                grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                         for n, p in wrapped.named_parameters()}
        for n, g in expected.items():
            torch.testing.assert_close(grads[n], g, **TOL, msg=f"{wrap} {table} {level} {n}")
        flex.restore()


@multi_process(2)
def test_routing_under_ddp(rank, world_size):
    _dp_body(rank, "ddp")


@multi_process(2)
def test_routing_under_fsdp1(rank, world_size):
    _dp_body(rank, "fsdp")


@multi_process(2)
def test_routing_under_fairscale_tp(rank, world_size):
    torch.set_num_threads(1)
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    part = slice(rank * D_HIDDEN // 2, (rank + 1) * D_HIDDEN // 2)
    for table, level, continuous in [("negative", "activation", False), ("fractional", "parameter", False),
                                     ("binary", "parameter", True)]:
        model = make_model()
        idx, mask = make_batch(table, continuous)
        expected = ref_grads(model, idx, mask, TABLES[table], level)
        tp = fairscale_tp_gpt(model, rank)
        router = Router(D_HIDDEN, BLOCKS, TABLES[table])
        flex = FlexModel(tp, {})
        assert flex.layout.tp == 2
        flex.create_hook_group("route", "mlp.up", editing_function=edit_for(level, router))
        with router.masks(mask):
            logits = flex(idx, groups="route")
        lm_loss(logits, idx).backward()
        for n, p in tp.named_parameters():
            g = expected[n]
            if n.endswith("mlp.up.weight") or n.endswith("mlp.up.bias"):
                g = g[part]
            elif n.endswith("mlp.down.weight"):
                g = g[:, part]
            torch.testing.assert_close(p.grad, g, **TOL, msg=f"tp {table} {level} {n}")
        flex.restore()
    fs.destroy_model_parallel()
