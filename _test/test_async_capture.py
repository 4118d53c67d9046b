"""Captures off the critical path (``firing.Runtime.store_value``): on CUDA a capture's copy to host memory
runs on a side stream and is waited for only at the end of the pass; on CPU and gloo nothing changes.

The CUDA path itself is checked by ``_test/multi_gpu/gpu_check.py`` (single-process section). Here, on
CPU: (1) captures are exactly those of plain torch hooks and nothing is ever deferred; (2) the deferral
machinery — pending captures, their order, the waits at the end of ``FlexModel.forward``, at the end
of a backward pass and before an editing function — runs with a stand-in for the CUDA copy
(``_host_copy`` returning a clone and a fake event, ``ASYNC_DEVICES`` widened to CPU), which records
whether any tensor was visible in ``output_dict`` before its event was waited for.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import pytest
import torch

from _test.distributed import HookSpec, check_capture_dict, fixed, lm_loss_sum, reference_hooks, register, \
    run_ranks, tokens
from _test.models import tiny_gpt
from flex_model import FlexModel, HookFunction
from flex_model import firing

torch.set_num_threads(1)


class FakeEvent:
    """Stands in for the CUDA event of one copy: ``done`` once waited for."""

    def __init__(self) -> None:
        self.done = False

    def synchronize(self) -> None:
        self.done = True


class FakeCopies:
    """A ``_host_copy`` stand-in: a clone and a FakeEvent per call; ``events`` maps the tensor to its event."""

    def __init__(self) -> None:
        self.events: Dict[int, FakeEvent] = {}
        self.calls = 0

    def __call__(self, value, fresh, streams):
        self.calls += 1
        host = value.clone()
        self.events[id(host)] = event = FakeEvent()
        return host, event

    def unfinished_in(self, output_dict: Dict[str, List[torch.Tensor]]) -> List[str]:
        """Names of captures in ``output_dict`` whose copy was not waited for (there must be none)."""
        return [n for n, ts in output_dict.items() for t in ts if id(t) in self.events and
                not self.events[id(t)].done]


@pytest.fixture
def fake_async(monkeypatch):
    copies = FakeCopies()
    monkeypatch.setattr(firing, "ASYNC_DEVICES", ("cpu",))
    monkeypatch.setattr(firing, "_host_copy", copies)
    return copies


def every_module_specs(model) -> List[HookSpec]:
    return [HookSpec("forward", n) for n, _ in model.named_modules() if n]


def test_cpu_captures_are_those_of_plain_hooks_and_nothing_waits(monkeypatch):
    def no_async_copy(*a):
        raise AssertionError("a CPU capture went through the asynchronous copy")

    monkeypatch.setattr(firing, "_host_copy", no_async_copy)
    model, idx = tiny_gpt(), tokens()
    specs = every_module_specs(model)
    ref = copy.deepcopy(model)
    with reference_hooks(ref, specs) as seen:
        want = ref(idx)
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, got)
    register(flex, specs)
    syncs = []
    real_sync = flex._runtime.sync
    monkeypatch.setattr(flex._runtime, "sync", lambda: (syncs.append(list(flex._runtime.pending)), real_sync()))
    assert torch.equal(flex(idx), want)
    check_capture_dict(got, seen)
    for name in seen:
        assert all(torch.equal(g, w) and g.device.type == "cpu" for g, w in zip(got[name], seen[name])), name
    assert flex._runtime.pending == [] and all(p == [] for p in syncs), syncs  # nothing was ever deferred
    flex.restore()


def test_deferred_captures_enter_output_dict_only_after_their_copy(fake_async):
    model, idx = tiny_gpt(), tokens()
    specs = every_module_specs(model)
    ref = copy.deepcopy(model)
    with reference_hooks(ref, specs) as seen:
        want = ref(idx)
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, got)
    register(flex, specs)
    during = []  # what user code running in the pass (a plain torch hook of its own) can see
    model.ln_f.register_forward_hook(lambda m, a, o: during.append((sum(map(len, got.values())),
                                                                     fake_async.unfinished_in(got))))
    assert torch.equal(flex(idx), want)
    assert fake_async.calls == sum(map(len, seen.values()))
    assert during == [(0, [])], during  # deferred: nothing half-copied is ever visible
    assert fake_async.unfinished_in(got) == [] and flex._runtime.pending == []
    check_capture_dict(got, seen)  # the same values, in the same order, once forward returned
    flex.restore()


def test_an_editing_function_sees_every_earlier_capture(fake_async):
    """Before user code runs, pending copies are waited for: an edit reads output_dict as it always could."""
    model, idx = tiny_gpt(), tokens()
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, got)
    for name in ("layers.0.ln1", "layers.0.attn", "layers.0.mlp"):
        flex.register_forward_hook(HookFunction(name))
    seen = []

    def edit(module, x, ctx, mods):
        seen.append(({n: len(v) for n, v in got.items()}, fake_async.unfinished_in(got)))
        return x * 2

    flex.register_forward_hook(HookFunction("layers.1.mlp", editing_function=edit))
    ref = copy.deepcopy(tiny_gpt())
    ref.layers[1].mlp.register_forward_hook(lambda m, a, o: o * 2)
    assert torch.equal(flex(idx), ref(idx))
    # layers.1.mlp's own capture is in output_dict too when its edit runs (stored before the edit)
    assert seen == [({"layers.0.ln1": 1, "layers.0.attn": 1, "layers.0.mlp": 1, "layers.1.mlp": 1}, [])], seen
    flex.restore()


def test_order_is_kept_when_synchronous_and_deferred_copies_mix(fake_async):
    flex = FlexModel(torch.nn.Linear(2, 2), got := {})
    rt = flex._runtime
    a, b, c = torch.ones(1), torch.full((1,), 2.0), torch.full((1,), 3.0)
    with rt.deferred_copies():
        rt.store_value("x", a)               # deferred
        rt.async_copies = False
        rt.store_value("x", b)               # synchronous, but queued behind the pending one
        rt.async_copies = True
        rt.store_value("x", c)
        assert got == {} and len(rt.pending) == 3
    assert [float(t) for t in got["x"]] == [1.0, 2.0, 3.0] and rt.pending == []
    flex.restore()


def test_a_pass_that_raises_still_puts_its_captures_in_output_dict(fake_async):
    model, idx = tiny_gpt(), tokens()
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, got)
    flex.register_forward_hook(HookFunction("layers.0.mlp"))
    model.layers[1].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(KeyError("boom")))
    with pytest.raises(KeyError):
        flex(idx)
    assert len(got["layers.0.mlp"]) == 1 and flex._runtime.pending == [] and fake_async.unfinished_in(got) == []
    flex.restore()


def test_the_wrapped_module_called_directly_copies_synchronously(fake_async):
    model, idx = tiny_gpt(), tokens()
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, got)
    flex.register_forward_hook(HookFunction("layers.0.mlp"))
    with torch.no_grad():
        model(idx)  # no FlexModel.forward around it: no window whose end would wait
    assert fake_async.calls == 0 and len(got["layers.0.mlp"]) == 1
    flex.restore()


def test_gradient_captures_are_waited_for_at_the_end_of_backward(fake_async):
    model, idx = tiny_gpt(), tokens()
    specs = [HookSpec("full_backward", "layers.0.attn"), HookSpec("full_backward_pre", "ln_f"),
             HookSpec("tensor", "layers.1.mlp.up.weight")]
    ref = copy.deepcopy(model)
    with reference_hooks(ref, specs) as seen:
        lm_loss_sum(ref(idx), idx).backward()
    got: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, got)
    register(flex, specs)
    during = []
    model.wte.weight.register_hook(lambda g: during.append(sum(map(len, got.values()))))  # late in backward
    lm_loss_sum(flex(idx), idx).backward()
    assert fake_async.calls == 3 and flex._runtime.pending == [] and fake_async.unfinished_in(got) == []
    assert during == [0], during  # deferred until the end of the backward pass, then all there
    check_capture_dict(got, seen)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref.get_parameter(name).grad)
    flex.restore()


def _captures(rank: int, fake: bool) -> Dict[str, List[torch.Tensor]]:
    """DDP TinyGPT on 2 gloo ranks: an edit and captures, global and replica scope, store "all"; the
    captures this rank holds."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    copies = FakeCopies()
    firing.ASYNC_DEVICES, firing._host_copy = (("cpu",), copies) if fake else (("cuda",), REAL_HOST_COPY)
    a = fixed(32, 32, seed=3)
    mine = tokens()[rank * 2:(rank + 1) * 2]
    out: Dict[str, List[torch.Tensor]] = {}
    for scope in ("global", "replica"):
        got: Dict[str, List[torch.Tensor]] = {}
        flex = FlexModel(DDP(tiny_gpt()), got, scope=scope, store="all")
        register(flex, [HookSpec("forward", "layers.0.mlp", lambda x: x @ a), HookSpec("forward", "layers.1.ln2"),
                        HookSpec("full_backward", "layers.1.attn")])
        lm_loss_sum(flex(mine), mine).backward()
        assert flex._runtime.pending == [] and copies.unfinished_in(got) == []
        out.update({f"{scope}:{k}": v for k, v in got.items()})
        flex.restore()
    assert copies.calls == (6 if fake else 0), copies.calls  # 3 captures per scope, each deferred
    return out


def _two_ranks_body(rank: int, world_size: int) -> None:
    want, got = _captures(rank, False), _captures(rank, True)
    assert sorted(got) == sorted(want)
    for name in want:
        assert len(got[name]) == len(want[name]) and all(torch.equal(g, w) for g, w in zip(got[name], want[name]))


REAL_HOST_COPY = firing._host_copy


def test_two_gloo_ranks_capture_the_same_with_and_without_deferred_copies():
    run_ranks(_two_ranks_body, 2, timeout=120)
