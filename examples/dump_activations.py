"""Dump activations of a sharded Llama to disk, resume the dump, read rows back lazily.

    python examples/dump_activations.py --smoke          # spawns 2 CPU ranks (gloo) itself
    torchrun --nproc_per_node 2 examples/dump_activations.py --out /tmp/acts

With ``--out DIR`` the dump is written to DIR and kept. Without it, rank 0
creates a fresh temp folder, tells the other ranks its path, and removes it at
the end (about 16 MB for the full run, 0.1 MB with ``--smoke``); rank 0 prints
where it wrote either way.

A ``LlamaForCausalLM`` with random weights (small config, no download) is
wrapped by FSDP1 on 2 ranks; each rank feeds its own slice of every batch.
``dump_activations`` captures three modules, by their unwrapped names, and
rank 0 (the owner) writes them as safetensors shards plus ``index.json``. The
first call stops half-way (as if the job had been killed after writing its
shards); the second call skips those batches on both ranks and finishes.
Rank 0 then reads a row range of one module lazily and checks it against
the same model run on one process.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from flex_model import FlexModel
from flex_model.activations import ActivationReader, dump_activations
from flex_model.launch import launch

NAMES = ["model.layers.0.mlp", "model.layers.1.self_attn.o_proj", "model.norm"]


def build_llama(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2) if smoke \
        else dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64,
                                        **size)).eval()


def dataset(n_batches: int, batch: int, seq: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (batch, seq), generator=g) for _ in range(n_batches)]


def main(out: Optional[str], smoke: bool) -> None:
    """Runs on every rank. ``out`` None: rank 0 makes a temp folder (the only rank that writes) and removes it."""
    rank = dist.get_rank()
    # One folder for the whole job: rank 0 creates it, every rank gets its path (no folder per rank).
    agreed = [out if out is not None else (tempfile.mkdtemp(prefix="flex_acts_") if rank == 0 else None)]
    dist.broadcast_object_list(agreed, src=0)
    out_dir = agreed[0]
    try:
        dump_and_check(out_dir, smoke)
    finally:
        if rank == 0:  # the owner: the only rank that writes or reads the folder
            if out is None:
                shutil.rmtree(out_dir, ignore_errors=True)
                print(f"removed the temp folder {out_dir} (pass --out DIR to keep the dump)")
            else:
                print(f"the dump is in {out_dir}")


def dump_and_check(out_dir: str, smoke: bool) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n_batches, batch, seq = (6, 4, 8) if smoke else (40, 8, 32)
    data = dataset(n_batches, batch, seq)
    loader = [{"input_ids": b.chunk(world)[rank]} for b in data]  # this rank's slice of every batch

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    sharded = FSDP(build_llama(smoke), auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
    flex = FlexModel(sharded, {}, data_parallel_size=world)

    half = n_batches // 2
    dump_activations(flex, loader[:half], out_dir, NAMES, batches_per_shard=half // 2 or 1, progress=not smoke)
    dump_activations(flex, loader, out_dir, NAMES, batches_per_shard=half // 2 or 1, progress=not smoke)
    flex.restore()
    if rank != 0:
        return

    reader = ActivationReader(out_dir)
    reader.verify()
    print(f"wrote {out_dir}: {len(reader.index['shards'])} shards, {len(reader)} rows")
    for name in reader.names:
        print(f"  {name:<34} {reader.dtype(name)} {tuple(reader.shape(name))}")
    lo, hi = batch + 1, 3 * batch - 1  # crosses a batch boundary
    rows = reader.read("model.layers.0.mlp", lo, hi)

    seen: list = []
    reference = build_llama(smoke)
    reference.get_submodule("model.layers.0.mlp").register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        for b in data:
            reference(b)
    torch.testing.assert_close(rows, torch.cat(seen)[lo:hi], rtol=1e-4, atol=1e-5)
    print(f"rows [{lo}, {hi}) of model.layers.0.mlp match a single process: True")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small model and data (CI)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory, kept (default: a temp folder made by rank 0, removed at the end)")
    args = parser.parse_args()
    launch(main, nprocs=2, args=(args.out, args.smoke))
    sys.exit(0)
