"""Quickstart: hooks on a Llama sharded by FSDP over 2 CPU ranks, named as in the unwrapped model.

    python examples/quickstart.py            # spawns 2 CPU ranks (gloo) itself
    torchrun --nproc_per_node 2 examples/quickstart.py
    python examples/quickstart.py --smoke    # smaller and faster (CI)

A ``LlamaForCausalLM`` with random weights (built from a small config, no
download) is wrapped by FSDP1, one unit per decoder layer. ``FlexModel``
retrieves the full (both ranks' batch slices) activations of
``model.layers.0.mlp`` and ``model.layers.1.self_attn.o_proj``, then, in a
second pass, adds a second hook on ``o_proj`` that zeroes it (an edit that runs
once, on rank 0, on the full tensor). Each hook stores the value it sees before
its edit, so ``o_proj`` is stored 3 times (once in pass 1, by both its hooks in
pass 2) and the mlp twice. Rank 0 checks every capture and the logits against
the same model run on one process. Writes no files.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from flex_model import FlexModel, HookFunction
from flex_model.launch import launch

CAPTURED = ["model.layers.0.mlp", "model.layers.1.self_attn.o_proj"]
EDITED = "model.layers.1.self_attn.o_proj"


def build_llama(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2) if smoke \
        else dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
    cfg = LlamaConfig(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64, **size)
    return LlamaForCausalLM(cfg).eval()


def zero_attention(current_module, inputs, save_ctx, modules):
    """Editing function: gets the full (batch, seq, hidden) tensor; returns the edited one."""
    save_ctx.edited_shape = tuple(inputs.shape)
    return torch.zeros_like(inputs)


def main(smoke: bool = False) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_llama(smoke)
    reference = build_llama(smoke)  # the same weights, run on one process for the check below
    batch, seq = (4, 8) if smoke else (8, 32)
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq))
    local = tokens.chunk(world)[rank]  # data parallel: each rank gets its batch slice

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    sharded = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)

    output_dict: dict = {}
    flex = FlexModel(sharded, output_dict, data_parallel_size=world)
    for name in CAPTURED:
        flex.register_forward_hook(HookFunction(name))
    with torch.no_grad():
        logits = flex(local).logits
    # A second pass with an edit. Every hook stores the value it sees *before* its edit, so in this
    # pass both hooks on o_proj (the capture hook above and the edit hook) store one entry each:
    # output_dict[EDITED] ends with 3 entries (1 from pass 1, 2 from pass 2), the mlp with 2.
    edit = flex.register_forward_hook(HookFunction(EDITED, editing_function=zero_attention))
    description = flex.describe()
    with torch.no_grad():
        edited_logits = flex(local).logits
    edit.remove()

    # Gather the logits so rank 0 can compare them to one process.
    all_logits = [torch.empty_like(logits) for _ in range(world)]
    all_edited = [torch.empty_like(edited_logits) for _ in range(world)]
    dist.all_gather(all_logits, logits)
    dist.all_gather(all_edited, edited_logits)
    if rank != 0:
        flex.restore()
        return

    print(description)
    print(f"2 passes: {CAPTURED[0]} was stored once per pass; {EDITED} 3 times, once in pass 1 and twice in "
          "pass 2, where its capture hook and its edit hook each store the output before the edit")
    for name, values in output_dict.items():
        for i, v in enumerate(values):
            print(f"retrieved {name} [firing {i}]: shape {tuple(v.shape)} checksum {v.double().sum().item():.6f}")
    full_logits, full_edited = torch.cat(all_logits), torch.cat(all_edited)
    changed = (full_logits - full_edited).abs().max().item()
    print(f"edit changed the logits: {changed > 1e-4} (max |delta| {changed:.4f}); "
          f"edit saw shape {flex.save_ctx.edited_shape}")

    # Reference: the unsharded model on one process, plain torch hooks, registered in the same order
    # as above; the zeroing hook records the output it replaces, as the edit hook stored it.
    seen: dict = {}
    hooks = [reference.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.setdefault(n, []).append(out.detach())) for n in CAPTURED]

    def record_then_zero(m, a, out):
        seen[EDITED].append(out.detach())
        return torch.zeros_like(out)

    with torch.no_grad():
        ref_logits = reference(tokens).logits
        zero = reference.get_submodule(EDITED).register_forward_hook(record_then_zero)
        ref_edited = reference(tokens).logits
    zero.remove()
    for h in hooks:
        h.remove()
    for name in CAPTURED:
        got, want = output_dict[name], seen[name]
        assert len(got) == len(want), f"{name}: {len(got)} captures, one process had {len(want)}"
        for got_i, want_i in zip(got, want):
            torch.testing.assert_close(got_i, want_i, rtol=1e-4, atol=1e-5)
    print("every capture compared: " + ", ".join(f"{n} {len(output_dict[n])}" for n in CAPTURED))
    torch.testing.assert_close(full_logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full_edited, ref_edited, rtol=1e-4, atol=1e-5)
    print("matches single process: True")
    flex.restore()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="smaller model and batch (CI)")
    launch(main, nprocs=2, args=(parser.parse_args().smoke,))
    sys.exit(0)
