"""Steering generation: add a vector to one block's residual stream on every decoding step of a DDP-sharded GPT-2.

    python examples/steering.py               # spawns 2 CPU ranks (gloo) itself
    torchrun --nproc_per_node 2 examples/steering.py
    python examples/steering.py --smoke       # a few training steps, 2 scales (CI)
    python examples/steering.py --out plots/  # keep the figure in plots/

A tiny ``GPT2LMHeadModel`` (random init from a config) is trained under DDP on
the 2 ranks on sequences of two "topics": each sequence draws its tokens from
topic A (ids 1-31) or topic B, the target topic (ids 32-63); the model learns to
continue in the prompt's topic. The steering vector is the difference of the
mean ``blocks.1.resid_post`` over topic-B prompts and over topic-A prompts,
both read with ``flex.run_with_cache`` (each rank passes its rows). Then
``flex.generate(topic-A prompts, hooks=HookFunction("blocks.1.resid_post",
editing_function=steer), steps=range(n))`` adds ``scale * vector`` on every
decoding step (greedy decoding); the script prints an unsteered and a steered
generation and the frequency of target-topic tokens among the generated ones
per scale: ~0 unsteered, rising with the scale. Rank 0 runs the same
generations on one process (the unwrapped model, every prompt) and prints
whether every generated token matches. Figure: target-token frequency vs
steering scale (``steering.png``) in ``--out DIR``; without it, in a temp folder
removed at the end.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from _figure_cli import run, save_figure
from flex_model import FlexModel, HookFunction, ParallelLayout

VOCAB, SEQ, PROMPT, NEW = 64, 16, 6, 10
LAYER = "blocks.1.resid_post"


def build_gpt2(n_layer: int, n_embd: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ + NEW, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def topic(batch: int, length: int, b: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rows of ``length`` tokens, from topic A (1..31) where ``b`` is False, topic B (32..63) where True."""
    x = torch.randint(1, 32, (batch, length), generator=generator)
    return x + 31 * b.long()[:, None]


def is_target(ids: torch.Tensor) -> torch.Tensor:
    return ids >= 32


def main(smoke: bool, out: str | None) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n_layer, n_embd, steps, batch = (2, 32, 5, 16) if smoke else (2, 64, 150, 32)
    scales = [0.0, 1.0] if smoke else [0.0, 0.2, 0.4, 0.44, 0.46, 0.47, 0.48, 0.49, 0.5, 0.6, 1.0]
    model = build_gpt2(n_layer, n_embd)

    ddp = DDP(model)  # train: each rank its own rows, gradients averaged
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(100 + rank)
    t0 = time.time()
    for step in range(steps):
        x = topic(batch, SEQ, torch.rand(batch, generator=gen) < 0.5, gen)
        logits = ddp(x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 100 == 0 or step == steps - 1):
            print(f"step {step}: loss {loss.item():.3f} (within-topic chance {torch.log(torch.tensor(31.0)):.3f})")
    model.eval()
    if rank == 0:
        print(f"trained {steps} steps under DDP on {world} ranks in {time.time() - t0:.1f} s")
    reference = copy.deepcopy(model) if rank == 0 else None

    # Every rank builds the same prompts and passes its rows.
    g = torch.Generator().manual_seed(7)
    n = 8
    prompts_a = topic(n, PROMPT, torch.zeros(n, dtype=torch.bool), g)
    prompts_b = topic(n, PROMPT, torch.ones(n, dtype=torch.bool), g)
    rows = slice(rank * n // world, (rank + 1) * n // world)
    flex = FlexModel(ddp, {})  # data parallel, read off DDP
    with torch.no_grad():
        _, cache_a = flex.run_with_cache(prompts_a[rows], names_filter=LAYER)
        _, cache_b = flex.run_with_cache(prompts_b[rows], names_filter=LAYER)
    vector = torch.zeros(n_embd)
    if rank == 0:  # the cache lives on the owner
        vector = cache_b[LAYER].mean((0, 1)) - cache_a[LAYER].mean((0, 1))
    dist.broadcast(vector, 0)  # the edit runs on rank 0 only; every rank has it anyway
    if rank == 0:
        print(f"steering vector at {LAYER}: difference of means over {n} topic-B and {n} topic-A prompts, "
              f"norm {vector.norm():.2f}")

    def steer_by(scale: float):
        def steer(module, x, save_ctx, modules):  # x: the full (batch, positions of this step, d_model)
            return x + scale * vector
        return steer

    def generate(f: FlexModel, prompts: torch.Tensor, scale: float, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            ids, _ = f.generate(prompts, attention_mask=torch.ones_like(prompts),
                                hooks=HookFunction(LAYER, editing_function=steer_by(scale)), steps=range(NEW),
                                max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)
        return ids[:, PROMPT:]

    t0 = time.time()
    generated = {}
    for scale in scales:
        new = generate(flex, prompts_a[rows], scale)
        parts = [torch.empty_like(new) for _ in range(world)]
        dist.all_gather(parts, new)
        generated[scale] = torch.cat(parts)
    flex.restore()
    if rank != 0:
        return
    print(f"{len(scales)} generations of {NEW} tokens for {n} prompts in {time.time() - t0:.1f} s")
    top = scales[-1]
    print(f"prompt (topic A):       {prompts_a[0].tolist()}")
    print(f"unsteered continuation: {generated[0.0][0].tolist()}")
    print(f"steered (scale {top:g}):    {generated[top][0].tolist()}")
    freq = [is_target(generated[s]).float().mean().item() for s in scales]
    for s, f in zip(scales, freq):
        print(f"scale {s:4.2f}: target-topic token frequency {f:.2f}")
    print(f"generation shifted toward the target topic: {freq[-1] > freq[0] + 0.5}")

    alone = FlexModel(reference, {}, layout=ParallelLayout.single())  # one process, every prompt
    with torch.no_grad():
        _, want_a = alone.run_with_cache(prompts_a, names_filter=LAYER)
        _, want_b = alone.run_with_cache(prompts_b, names_filter=LAYER)
    want_vector = want_b[LAYER].mean((0, 1)) - want_a[LAYER].mean((0, 1))
    same_vector = torch.allclose(vector, want_vector, atol=1e-5)
    vector.copy_(want_vector)
    # synced_gpus=False: flex.generate passes True whenever the default group has 2 ranks, but this
    # one-process model runs on rank 0 alone.
    matches = same_vector and all(torch.equal(generate(alone, prompts_a, s, synced_gpus=False), generated[s])
                                  for s in scales)
    alone.restore()
    print(f"matches one process: {matches}")
    if smoke:
        assert matches

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(scales, freq, marker="o")
    ax.set_xlabel(f"steering scale (vector added at {LAYER})")
    ax.set_ylabel("target-topic token frequency")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("steering topic-A prompts toward topic B")
    fig.tight_layout()
    save_figure(fig, out, "steering.png")


if __name__ == "__main__":
    run(main, __doc__, "a few training steps, 2 scales (CI)")
