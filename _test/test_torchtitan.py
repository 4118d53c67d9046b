"""flex_model on torchtitan 0.3.0's own Llama-3, parallelised by torchtitan's own ``parallelize_llama``.

A tiny Llama-3 built from torchtitan's config classes (``_test.models.titan_llama_config``) runs once in
one process with plain torch hooks (the reference, computed on every rank); the same weights are then
parallelised by torchtitan on real gloo ranks: TP=2 (2 ranks), FSDP2 dp_shard=2 (2 ranks), and 2-D
dp_shard=2 x tp=2 (4 ranks), with and without sequence parallelism. ``FlexModel`` wraps the result and
must give rank 0 the full captures, apply edits of the full value (that mix hidden units across tp shards
and rows across dp ranks), give every parameter the single-process gradient, and ``restore()`` must leave
the model as it was (hooks, attributes, forward).

How the layout reaches FlexModel (one run wraps the parallelised model once per way, each after the previous
wrap's ``restore()``): ``"sizes"`` passes ``tensor_parallel_size`` / ``data_parallel_size``;
``"nothing"`` passes nothing (read off the FSDP2 / DTensor meshes); ``"mesh"`` passes torchtitan's own mesh
(``parallel_dims.get_mesh([...])``, dims named ``fsdp`` / ``tp``).

torchtitan on CPU: see ``_test.models.import_torchtitan`` (a stub for its triton kernels module, meshes on
"cpu") and ``titan_parallel_llama`` (fp32, ``spmd_backend="partial_dtensor"``, FSDP2 reducing by sum: gloo
has no PREMUL_SUM / AVG). FSDP2 sums the ranks' gradients, so each rank's loss is its token-loss sum over the
global token count, and flex_model follows FSDP2's convention (gradient divide factor 1: ``dp_grad_mean``
False, the raw gradient of the summed loss).
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch.testing import assert_close

from _test.distributed import (HookSpec, check_framework_step, fixed, lm_loss_sum, module_state, reference_run, register,
                               run_ranks)
from _test.models import (TITAN_DIM, TITAN_HEADS, TITAN_HIDDEN, TITAN_KV_HEADS, TITAN_VOCAB, import_torchtitan,
                          titan_llama, titan_parallel_llama)
from flex_model import FlexModel

B, T = 4, 8  # global batch, sequence
QKV = TITAN_KV_HEADS * (TITAN_HEADS // TITAN_KV_HEADS + 2) * (TITAN_DIM // TITAN_HEADS)  # fused wqkv's width, 64

def specs() -> List[HookSpec]:
    """Hooks on every kind of value torchtitan's TP plan leaves: a colwise output (fused qkv, Shard(-1)), a
    rowwise input, a block's output (Replicate, or Shard(1) on the sequence with SP), the loss-parallel
    lm_head output (Shard(-1)), gradients of a rowwise input and a colwise output. Edits that are not
    elementwise: hidden units mixed (across tp shards), rows mixed (across dp ranks)."""
    a, b = fixed(QKV, QKV, seed=3), fixed(TITAN_DIM, TITAN_DIM, seed=4)
    return [
        HookSpec("forward", "layers.0.attention.qkv_linear.wqkv", lambda x: x @ a + x.flip(0)),
        HookSpec("forward_pre", "layers.0.attention.wo"),
        HookSpec("forward", "layers.0.feed_forward", lambda x: x @ b),
        HookSpec("forward", "layers.1.ffn_norm"),
        HookSpec("forward", "lm_head"),
        HookSpec("full_backward", "layers.1.attention.wo", lambda g: g * 2 + g.roll(1, 0)),
        HookSpec("full_backward_pre", "layers.1.feed_forward.w1", lambda g: g * 3 - g.mean(0, keepdim=True)),
    ]


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _titan_body(rank: int, world_size: int, tp: int, dp: int, sequence_parallel: bool, hows: tuple) -> None:
    """Parallelise once; then, for each way of giving the layout in ``hows``: wrap, hook, one step, check,
    ``restore()`` (the next wrap finds the model as it was)."""
    torch.set_num_threads(1)
    idx = torch.randint(0, TITAN_VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    ref_model = titan_llama(seed=0)
    plain = ref_model(idx).detach()  # no hooks: what the model gives unedited, and again after restore()
    hooks = specs()
    ref = reference_run(ref_model, idx, hooks)

    model, dims = titan_parallel_llama(ref_model, world_size, tp=tp, dp_shard=dp,
                                       sequence_parallel=sequence_parallel)
    dp_rank = dims.get_mesh("fsdp").get_local_rank() if dp > 1 else 0
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    before = module_state(model)
    for how in hows:
        got: Dict[str, List[torch.Tensor]] = {}
        if how == "sizes":
            flex = FlexModel(model, got, tensor_parallel_size=tp, data_parallel_size=dp)
        elif how == "nothing":
            flex = FlexModel(model, got)
        else:  # torchtitan's own mesh over the data and tensor parallel ranks ("fsdp" even of size 1)
            flex = FlexModel(model, got, device_mesh=dims.get_mesh(["fsdp", "tp"] if tp > 1 else ["fsdp"]))
        assert (flex.layout.dp, flex.layout.tp, flex.layout.pp) == (dp, tp, 1), (how, flex.layout)
        register(flex, hooks)

        out = flex(idx[rows])
        assert_close(full(out).detach(), ref.out[rows])
        assert not torch.allclose(full(out).detach(), plain[rows]), "the edits did not change the output"
        (lm_loss_sum(full(out), idx[rows]) / (idx.numel() - B)).backward()  # FSDP2 sums over dp: the global mean
        check_framework_step(rank, model, got, ref, full, how)
        weight = flex.get_module_parameter("layers.0.feed_forward.w1.weight")  # collective: the full weight
        assert weight.shape == (TITAN_HIDDEN, TITAN_DIM)
        assert_close(weight, ref_model.get_parameter("layers.0.feed_forward.w1.weight"))

        assert flex.restore() is model
        assert module_state(model) == before, how
        with torch.no_grad():
            assert_close(full(model(idx[rows])), plain[rows])


# (tp, dp_shard, sequence parallel, how the layout is given); the ranks are tp * dp_shard
CASES = {
    "tp2": (2, 1, False, ("sizes", "nothing", "mesh")),
    "tp2_sp": (2, 1, True, ("nothing",)),  # torchtitan's default: values between blocks split on the sequence
    "fsdp2": (1, 2, False, ("sizes", "nothing", "mesh")),
    "fsdp2_tp2": (2, 2, False, ("sizes", "nothing", "mesh")),
    "fsdp2_tp2_sp": (2, 2, True, ("nothing",)),
}


try:  # at collection, in the pytest process (~8 s): every forked rank shares it, the docs' torchtitan block too
    import_torchtitan()
    IMPORT_ERROR = None
except ImportError as e:
    IMPORT_ERROR = e


@pytest.fixture(scope="module", autouse=True)
def torchtitan_imported():
    if IMPORT_ERROR is not None:
        pytest.fail(f"torchtitan 0.3.0 does not import ({IMPORT_ERROR}); install it as the README's test command "
                    "does: pip install --no-deps torchtitan==0.3.0 (its light deps are in the test extra)")


@pytest.mark.parametrize("case", list(CASES))
def test_torchtitan_llama3(case):
    tp, dp, sp, hows = CASES[case]
    run_ranks(_titan_body, tp * dp, tp, dp, sp, hows, timeout=120)
