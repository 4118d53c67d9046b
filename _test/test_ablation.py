"""Ablation hooks on TinyGPT against plain torch hooks on a deep copy; groups switch them per pass."""
from __future__ import annotations

import copy

import pytest
import torch

from _test.distributed import multi_process
from _test.models import TinyGPT, fairscale_tp_gpt, lm_loss
from flex_model import Ablation, FlexModel, RunningMean

BLOCKS = [(0, 8), (20, 24)]
UNITS = torch.cat([torch.arange(0, 8), torch.arange(20, 24)])


def make_model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab=61, d_model=32, n_heads=4, n_layers=2, d_hidden=64, max_len=16)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(seed))


def reference(model: TinyGPT, idx: torch.Tensor, replace) -> torch.Tensor:
    """Run a deep copy with a plain torch forward hook that sets UNITS of layers.0.mlp.act's output."""
    ref = copy.deepcopy(model)

    def hook(module, args, out):
        out = out.clone()
        out[..., UNITS] = replace(out)
        return out

    ref.layers[0].mlp.act.register_forward_hook(hook)
    logits = ref(idx)
    lm_loss(logits, idx).backward()
    return logits, ref


def check(model, flex, idx, groups, replace) -> None:
    logits = flex(idx, groups=groups)
    lm_loss(logits, idx).backward()
    ref_logits, ref = reference(make_model(), idx, replace)
    assert torch.equal(logits, ref_logits)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_zero_ablation_and_groups():
    model, idx = make_model(), tokens()
    flex = FlexModel(model, {})
    flex.create_hook_group("ablate", "layers.0.mlp.act", editing_function=Ablation(BLOCKS, "zero"))
    flex.create_hook_group("capture", "ln_f")
    assert torch.equal(flex(idx, groups="capture"), make_model()(idx))  # ablation off in this pass
    check(model, flex, idx, "ablate", lambda out: 0.0)


def test_mean_ablation_from_recorded_running_mean():
    model, idx = make_model(), tokens()
    store = {}
    flex = FlexModel(model, store)
    mean = RunningMean()
    flex.create_hook_group("record", "layers.0.mlp.act", editing_function=mean)
    flex.create_hook_group("capture", "layers.0.mlp.act")
    flex.create_hook_group("ablate", "layers.0.mlp.act", editing_function=Ablation(BLOCKS, "mean", mean=mean))
    with pytest.raises(ValueError, match="recorded nothing"):
        flex(idx, groups="ablate")
    with torch.no_grad():
        for seed in (2, 3):
            assert torch.equal(flex(tokens(seed), groups=["record", "capture"]), make_model()(tokens(seed)))
    seen = torch.cat([t.reshape(-1, 64) for t in store["layers.0.mlp.act"]]).double()
    torch.testing.assert_close(mean.mean, seen.mean(0).float())
    check(model, flex, idx, "ablate", lambda out: mean.mean[UNITS])  # its value checked just above


def test_resample_ablation_takes_units_from_other_tokens():
    model, idx = make_model(), tokens()
    flex = FlexModel(model, {})
    flex.create_hook_group("ablate", "layers.0.mlp.act", editing_function=Ablation(BLOCKS, "resample", seed=7))
    perm = torch.randperm(4 * 12, generator=torch.Generator().manual_seed(7))
    check(model, flex, idx, "ablate", lambda out: out.detach().reshape(-1, 64)[perm][:, UNITS].view(4, 12, -1))


def test_ablation_errors():
    flex = FlexModel(make_model(), {})
    with pytest.raises(ValueError, match="mode must be one of"):
        Ablation(BLOCKS, "noise")
    with pytest.raises(ValueError, match="needs mean=RunningMean"):
        Ablation(BLOCKS, "mean")
    flex.create_hook_group("wide", "layers.0.mlp.act", editing_function=Ablation([(60, 70)]))
    with pytest.raises(ValueError, match="reach unit 70 but the hooked value has 64 units"):
        flex(tokens(), groups="wide")


@multi_process(2)
def test_zero_ablation_under_fairscale_tp(rank, world_size):
    """Units of a ColumnParallelLinear output split over 2 ranks: each zeroes its own global units."""
    torch.set_num_threads(1)
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    model, idx = make_model(), tokens()
    tp = fairscale_tp_gpt(model, rank)
    flex = FlexModel(tp, {})
    flex.create_hook_group("ablate", "layers.0.mlp.up", editing_function=Ablation([(28, 40)]))
    logits = flex(idx, groups="ablate")
    ref = copy.deepcopy(model)
    ref.layers[0].mlp.up.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.arange(28, 40), 0.0))
    # atol 1e-5: the row-parallel layers sum their shards in another order than one process does
    torch.testing.assert_close(logits, ref(idx), rtol=1e-5, atol=1e-5)
    fs.destroy_model_parallel()
