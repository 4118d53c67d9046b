"""``patching_sweep``: layers x positions against the same sweep written with plain torch hooks on one process;
batched over positions; DDP (global and replica scope) and fairscale TP=2 on 2 ranks against one process."""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from _test.distributed import multi_process, tokens
from _test.models import tiny_gpt
from flex_model import FlexModel, Sweep, patching_sweep

B, T = 4, 6


def inputs(b: int = B):
    clean = tokens(b, T, seed=3)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 11) % 61  # one token differs
    return clean, corrupted


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def plain_sweep(model: nn.Module, clean, corrupted, metric: Callable, names: Sequence[str], positions,
                run: Callable = lambda m, x: m(x)) -> torch.Tensor:
    """The same sweep with plain torch hooks: cache the clean run, then one patched run per (name, position)."""
    acts = {}
    with torch.no_grad():
        handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, o))
                   for n in names]
        run(model, clean)
        for h in handles:
            h.remove()
        out = torch.zeros(len(names), len(positions))
        for i, n in enumerate(names):
            for j, p in enumerate(positions):
                def patch(m, a, o, n=n, p=p):
                    o = o.clone()
                    o[:, p] = acts[n][:, p]
                    return o
                h = model.get_submodule(n).register_forward_hook(patch)
                out[i, j] = metric(run(model, corrupted))
                h.remove()
    return out


def test_layers_by_positions_against_plain_hooks_batched_and_plotted():
    import matplotlib

    matplotlib.use("Agg")
    model = tiny_gpt()
    clean, corrupted = inputs()
    flex = FlexModel(model, {})
    sweep = patching_sweep(flex, clean, corrupted, logit_diff, names="layers.{i}", positions=range(T))
    want = plain_sweep(model, clean, corrupted, logit_diff, ["layers.0", "layers.1"], range(T))
    assert isinstance(sweep, Sweep) and sweep.names == ["layers.0", "layers.1"] and sweep.positions == list(range(T))
    assert_close(sweep.values, want)
    with torch.no_grad():
        assert sweep.clean == pytest.approx(float(logit_diff(model(clean))))
        assert sweep.corrupted == pytest.approx(float(logit_diff(model(corrupted))))
    assert_close(sweep.values[:, :2], torch.full((2, 2), sweep.corrupted))  # before the corrupted token: no effect
    assert_close(sweep.values[1, -1], torch.tensor(sweep.clean))  # the last block's last position: all of it
    batched = patching_sweep(flex, clean, corrupted, logit_diff, names=["layers.0", "layers.1"],
                             positions=range(T), batched=True)
    assert_close(batched.values, sweep.values)
    whole = patching_sweep(flex, clean, corrupted, logit_diff, names=["layers.0.mlp", "ln_f"])
    assert whole.positions == [None] and whole.values[1, 0] == pytest.approx(sweep.clean, abs=1e-5)
    ax = sweep.plot(normalize=True)
    assert len(ax.images) == 1 and [t.get_text() for t in ax.get_yticklabels()] == sweep.names
    assert flex.registrations() == [] and flex.output_dict == {}
    with pytest.raises(ZeroDivisionError):
        patching_sweep(flex, clean, corrupted, lambda logits: 1 / 0, names="layers.0")
    assert flex.registrations() == []
    flex.restore()


def test_hf_inputs_as_keywords_and_the_output_selected():
    from _test.models import tiny_gpt2

    model = tiny_gpt2()
    clean, corrupted = inputs(2)
    flex = FlexModel(model, {})
    sweep = patching_sweep(flex, {"input_ids": clean, "use_cache": False}, {"input_ids": corrupted, "use_cache": False},
                           logit_diff, names="transformer.h.{i}", positions=[2, 5], output=lambda out: out.logits)
    want = plain_sweep(model, clean, corrupted, logit_diff, ["transformer.h.0", "transformer.h.1"], [2, 5],
                       run=lambda m, x: m(x, use_cache=False).logits)
    assert_close(sweep.values, want)
    flex.restore()


# -- several ranks ---------------------------------------------------------------------------------------------
@multi_process(world_size=2, timeout=120)
def test_sweep_ddp_against_one_process(rank, world_size):
    """Each rank patches its own rows; the edits run on the gathered batch (global scope) or on each replica's
    rows (replica scope); the metric sees the full batch: the one-process sweep, on every rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    clean, corrupted = inputs()
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    want = patching_sweep(_one_process(), clean, corrupted, logit_diff, names="layers.{i}", positions=range(1, T))
    flex = FlexModel(DDP(tiny_gpt()), {})
    for kwargs in ({}, {"batched": True}, {"scope": "replica"}, {"scope": "replica", "batched": True}):
        got = patching_sweep(flex, clean[rows], corrupted[rows], logit_diff, names="layers.{i}",
                             positions=range(1, T), **kwargs)
        assert_close(got.values, want.values, msg=lambda m, k=kwargs: f"{k}: {m}")
        assert got.clean == pytest.approx(want.clean) and got.corrupted == pytest.approx(want.corrupted)
    assert flex.registrations() == [] and flex.output_dict == {}
    flex.restore()


def _one_process() -> FlexModel:
    """A FlexModel over this rank alone (a one-rank layout), for the reference inside a multi-rank test."""
    from flex_model import ParallelLayout

    return FlexModel(tiny_gpt(), {}, layout=ParallelLayout.single())


@multi_process(world_size=2, timeout=120)
def test_sweep_fairscale_tp2_against_one_process(rank, world_size):
    from fairscale.nn.model_parallel import initialize as fs

    from _test.models import fairscale_tp_gpt

    torch.set_num_threads(1)
    fs.initialize_model_parallel(2)
    clean, corrupted = inputs()
    names = ["layers.0.mlp", "layers.1.mlp.up", "layers.1"]  # "up": split over tp, patched whole
    want = patching_sweep(_one_process(), clean, corrupted, logit_diff, names=names, positions=range(2, T))
    flex = FlexModel(fairscale_tp_gpt(tiny_gpt(), rank), {})
    got = patching_sweep(flex, clean, corrupted, logit_diff, names=names, positions=range(2, T))
    assert_close(got.values, want.values)
    assert_close(patching_sweep(flex, clean, corrupted, logit_diff, names=names, positions=range(2, T),
                                batched=True).values, want.values)
    flex.restore()
    fs.destroy_model_parallel()
