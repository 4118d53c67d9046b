"""``flex.generate``: hooks and captures on every decoding step of HF ``generate`` (KV cache on), against the
same step logic written with plain torch hooks; the step and positions editing functions see; DDP and FSDP1
on 2 ranks (each rank its own prompts) against one process."""
from __future__ import annotations

from typing import Dict, List, Sequence

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from _test.distributed import multi_process, tokens
from _test.models import tiny_llama
from flex_model import FlexModel, Generation, GenerationContext, HookFunction, generation_context
from flex_model.tree import tensor_leaves

B, P, NEW, START = 4, 5, 7, 3  # prompts, prompt length, new tokens, the first steered step
CAPTURED = ["model.layers.1", "lm_head"]
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def vector() -> torch.Tensor:
    return 4 * torch.randn(32, generator=torch.Generator().manual_seed(2))


def prompts(n: int = B) -> torch.Tensor:
    return tokens(n, P, vocab=97, seed=4)


def steer(module, x, save_ctx, modules):
    return x + vector()  # registered for the selected steps only


def plain_generate(model: nn.Module, ids: torch.Tensor, start: int = START, names: Sequence[str] = CAPTURED):
    """The reference: a pre-hook counting the model's passes (step 0 = the prompt), a forward hook adding the
    vector to layer 0's output from step ``start`` on, captures of ``names`` on those steps."""
    step, caps = [-1], {}  # type: List[int], Dict[int, Dict[str, torch.Tensor]]

    def count(m, a, kw):
        step[0] += 1

    def add(m, a, out):
        return out + vector() if step[0] >= start else None

    def keep(m, a, out, name):
        if step[0] >= start:
            caps.setdefault(step[0], {})[name] = tensor_leaves(out)[0].detach().clone()

    handles = [model.register_forward_pre_hook(count, with_kwargs=True),
               model.model.layers[0].register_forward_hook(add)]
    handles += [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n)) for n in names]
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    finally:
        for h in handles:
            h.remove()
    return out, caps


def check_steps(got: Generation, caps: Dict[int, Dict[str, torch.Tensor]], rows: slice = slice(None)) -> None:
    assert got.captures.steps == sorted(caps) == list(range(START, NEW))
    for step, want in caps.items():
        at = got.captures.at(step)
        assert sorted(at) == sorted(want)
        for name in want:
            assert_close(at[name], want[name][rows], msg=lambda m, s=step, n=name: f"step {s} {n}: {m}")


def test_steering_from_step_3_against_plain_hooks():
    model = tiny_llama()
    ids = prompts()
    want_ids, caps = plain_generate(model, ids)
    with torch.no_grad():
        plain_ids = model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    assert not torch.equal(want_ids, plain_ids), "the steering vector changes nothing: the test has no teeth"
    seen = []

    def watch(module, x, save_ctx, modules):  # the user's own hook: fires on every step
        g = generation_context(save_ctx)
        assert isinstance(g, GenerationContext) and g.is_prefill == (g.step == 0)
        seen.append((g.step, g.positions, g.selected, x.shape[1]))

    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict)
    mine = HookFunction("model.layers.1.mlp", editing_function=watch)
    flex.register(mine)
    with torch.no_grad():
        got = flex.generate(ids, attention_mask=torch.ones_like(ids), hooks=HookFunction("model.layers.0",
                            editing_function=steer), capture=CAPTURED, steps=range(START, 100), **GEN)
    ids_out, captures = got  # unpacks as (ids, captures)
    assert torch.equal(ids_out, want_ids)
    check_steps(got, caps)
    assert captures.stack("model.layers.1").shape == (NEW - START, B, 1, 32)
    assert [s for s, *_ in seen] == list(range(NEW))
    assert seen[0] == (0, range(0, P), False, P)  # the prefill: every prompt position
    assert all(pos == range(P + s - 1, P + s) and n == 1 and sel == (s >= START) for s, pos, sel, n in seen[1:])
    assert [r.hook for r in flex.registrations()] == [mine] and not hasattr(flex.save_ctx, "generation")
    # hooks keep their captures as every hook does: the user's on every step, the steering one on its steps
    assert {n: len(v) for n, v in output_dict.items()} == {"model.layers.1.mlp": NEW, "model.layers.0": NEW - START}
    flex.restore()


def test_every_step_without_the_kv_cache_groups_and_errors():
    model = tiny_llama()
    ids = prompts(2)
    flex = FlexModel(model, {})
    seen = []
    other = HookFunction("model.norm", editing_function=lambda m, x, ctx, mods: seen.append("other"))
    flex.register(other)
    flex.update_hook_groups(other, "other")
    record = HookFunction("model.layers.0", editing_function=lambda m, x, ctx, mods: seen.append(
        (ctx.generation.step, ctx.generation.positions, x.shape[1])))
    with torch.no_grad():
        got = flex.generate(ids, attention_mask=torch.ones_like(ids), hooks=[record], capture="model.layers.{i}",
                            groups=[], use_cache=False, **dict(GEN, max_new_tokens=3, min_new_tokens=3))
    assert seen == [(s, range(0, P + s), P + s) for s in range(3)]  # no KV cache: every position each step
    assert got.captures.steps == [0, 1, 2]
    assert got.captures.at(2)["model.layers.1"].shape == (2, P + 2, 32)
    with pytest.raises(ValueError, match="differ in shape"):
        got.captures.stack("model.layers.0")
    broken = HookFunction("model.layers.0", editing_function=lambda m, x, ctx, mods: x[..., :1])
    with pytest.raises(ValueError, match="returned shape"):
        flex.generate(ids, hooks=broken, steps=[1], **dict(GEN, max_new_tokens=3, min_new_tokens=3))
    assert [r.hook for r in flex.registrations()] == [other]
    flex.restore()


# -- several ranks ---------------------------------------------------------------------------------------------
@multi_process(world_size=2, timeout=150)
def test_generation_ddp_fsdp1_against_one_process(rank, world_size):
    """Each rank generates its own 2 prompts; the steering edit runs on the gathered rows (global scope) or on
    each rank's (replica scope); the tokens and per-step captures are the one-process ones."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.set_num_threads(1)
    ids = prompts()
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    want_ids, caps = plain_generate(tiny_llama(), ids)
    wraps = {"ddp": lambda m: DDP(m),
             "fsdp1": lambda m: FSDP(m, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                     device_id=torch.device("cpu"), use_orig_params=True)}
    for kind, wrap in wraps.items():
        flex = FlexModel(wrap(tiny_llama()), {})
        assert flex.layout.dp == 2
        for scope in ("global", "replica") if kind == "ddp" else ("global",):
            with torch.no_grad():
                got = flex.generate(ids[rows], attention_mask=torch.ones_like(ids[rows]),
                                    hooks=HookFunction("model.layers.0", editing_function=steer, scope=scope),
                                    capture=CAPTURED, steps=range(START, NEW), scope=scope, **GEN)
            assert torch.equal(got.sequences, want_ids[rows]), f"{kind} {scope}"
            if scope == "replica":
                check_steps(got, caps, rows)
            elif rank == 0:
                check_steps(got, caps)
            else:
                assert not got.captures.here and len(got.captures) == 0
        assert flex.registrations() == []
        flex.restore()
