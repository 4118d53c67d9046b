"""flex_model on HuggingFace transformers' native tensor parallelism: ``from_pretrained(dir, tp_plan="auto")``.

A tiny Llama with random weights is saved once (``_test.models.save_hf_llama``); every rank loads it twice:
plainly (the single-process reference, run with plain torch hooks) and with ``tp_plan="auto"`` at TP=2
on real gloo ranks started the torchrun way (``_test.distributed`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; without them transformers quietly loads the whole model on every rank, which
the test refuses). transformers shards the weights as DTensors on its mesh, kept as ``model._device_mesh``
(dims ``pp``, ``fsdp``, ``tp``), and replaces each sharded module's ``forward``: q/k/v, gate/up are
colwise (plain local outputs, split on the last dim), o_proj / down_proj rowwise (plain local inputs),
and lm_head is ``colwise_gather_output`` (a colwise weight whose forward gathers the full logits).

``FlexModel`` wraps it with nothing passed, with ``device_mesh=model._device_mesh``, and with
``tensor_parallel_size=2``; rank 0 must get the full captures, edits of the full value must give the
reference's output, every parameter the reference's gradient, and ``restore()`` must leave the model as
it was.
"""
from __future__ import annotations

import warnings
from typing import Dict, List

import accelerate  # noqa: F401  transformers refuses tp_plan loading without it
import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaForCausalLM  # at collection: every forked rank shares it, the docs' HF block too

from _test.distributed import (HookSpec, check_framework_step, fixed, lm_loss_sum, module_state, reference_run, register,
                               run_ranks)
from _test.models import HF_TP_DIM, HF_TP_VOCAB, save_hf_llama
from flex_model import FlexModel

B, T = 4, 8  # global batch, sequence

def specs(fsdp: bool) -> List[HookSpec]:
    """A colwise output (q_proj: each rank's heads), a rowwise input and output (o_proj), a whole MLP's
    output, the gathered lm_head output, the gradient of a rowwise input and of a colwise output, and
    (without FSDP, which refuses tensor hooks) a colwise weight's gradient. Edits mix hidden units across
    the tp shards, and rows."""
    a, b = fixed(HF_TP_DIM, HF_TP_DIM, seed=5), fixed(HF_TP_DIM, HF_TP_DIM, seed=6)
    return [
        HookSpec("forward", "model.layers.0.self_attn.q_proj", lambda x: x @ a),
        HookSpec("forward_pre", "model.layers.0.self_attn.o_proj"),
        HookSpec("forward", "model.layers.0.self_attn.o_proj"),
        HookSpec("forward", "model.layers.1.mlp", lambda x: x @ b + x.flip(0)),
        HookSpec("forward", "lm_head"),
        HookSpec("full_backward", "model.layers.1.self_attn.o_proj", lambda g: g * 2 + g.roll(1, 0)),
        HookSpec("full_backward_pre", "model.layers.0.mlp.up_proj", lambda g: g * 3 - g.mean(0, keepdim=True)),
    ] + ([] if fsdp else [HookSpec("tensor", "model.layers.0.mlp.gate_proj.weight", lambda g: g.flip(0))])


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def load_parallel(path: str, fsdp: int):
    """The checkpoint loaded by transformers at TP=2 (``tp_plan="auto"``), or with ``fsdp`` > 1 at TP=2 x FSDP2
    (``DistributedConfig(tp_size=2, fsdp_size=fsdp)``, FSDP2 set to reduce by plain sums, as gloo needs;
    transformers keeps FSDP2's mean)."""
    from torch.distributed.fsdp import FSDPModule

    if fsdp == 1:
        with warnings.catch_warnings():  # transformers 5 prefers distributed_config=DistributedConfig(tp_plan=...)
            warnings.filterwarnings("ignore", message=".*tp_plan.*deprecated", category=FutureWarning)
            return LlamaForCausalLM.from_pretrained(path, tp_plan="auto")
    from transformers.distributed import DistributedConfig

    with warnings.catch_warnings():  # FSDP2 warns that the embedding returns a view
        warnings.filterwarnings("ignore", message=".*returned a view tensor", category=UserWarning)
        model = LlamaForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2, fsdp_size=fsdp))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    return model


def _hf_tp_body(rank: int, world_size: int, path: str, hows: tuple) -> None:
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dp = world_size // 2
    idx = torch.randint(0, HF_TP_VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    ref_model = LlamaForCausalLM.from_pretrained(path)  # the same weights, one process
    logits = lambda m, x: m(x).logits  # noqa: E731
    with torch.no_grad():
        plain = ref_model(idx).logits
    hooks = specs(fsdp=dp > 1)
    ref = reference_run(ref_model, idx, hooks, forward=logits)

    model = load_parallel(path, dp)
    q = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert isinstance(q, DTensor) and q.to_local().shape[0] < HF_TP_DIM, "not sharded"
    mesh = model._device_mesh
    assert mesh.mesh_dim_names == ("pp", "fsdp", "tp") and tuple(mesh.mesh.shape) == (1, dp, 2), mesh
    dp_rank = mesh.get_local_rank("fsdp")
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    before = module_state(model)
    for how in hows:
        got: Dict[str, List[torch.Tensor]] = {}
        if how == "sizes":
            flex = FlexModel(model, got, tensor_parallel_size=2, data_parallel_size=dp)
        elif how == "nothing":
            flex = FlexModel(model, got)
        else:
            flex = FlexModel(model, got, device_mesh=mesh)
        assert (flex.layout.dp, flex.layout.tp, flex.layout.pp) == (dp, 2, 1), (how, flex.layout)
        register(flex, hooks)

        out = flex(idx[rows]).logits
        assert_close(out.detach(), ref.out[rows], msg=lambda m: f"{how}: logits: {m}")
        assert not torch.allclose(out.detach(), plain[rows]), "the edits did not change the output"
        (lm_loss_sum(out, idx[rows]) * dp / (idx.numel() - B)).backward()  # FSDP2 averages over dp
        check_framework_step(rank, model, got, ref, full, how)
        for name in ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight", "lm_head.weight"]:
            assert_close(flex.get_module_parameter(name), ref_model.get_parameter(name),  # collective
                         msg=lambda m, name=name: f"{how}: {name}: {m}")

        assert flex.restore() is model
        assert module_state(model) == before, how
        with torch.no_grad():
            assert_close(model(idx[rows]).logits, plain[rows])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The tiny Llama saved once, in the pytest process."""
    return save_hf_llama(str(tmp_path_factory.mktemp("hf_llama")))


@pytest.mark.parametrize("how", ["sizes", "nothing", "own_mesh"])
def test_hf_tp_plan_auto_tp2(checkpoint, how):
    """TP=2 on 2 ranks: ``tensor_parallel_size=2``; nothing; ``device_mesh=model._device_mesh``."""
    run_ranks(_hf_tp_body, 2, checkpoint, (how,), timeout=120)


def test_hf_tp2_fsdp2(checkpoint):
    """TP=2 x FSDP2=2 on 4 ranks (transformers' ``DistributedConfig(tp_size=2, fsdp_size=2)``): the sizes,
    nothing, then the model's own mesh, each wrap after the previous one's ``restore()``."""
    run_ranks(_hf_tp_body, 4, checkpoint, ("sizes", "nothing", "own_mesh"), timeout=120)
