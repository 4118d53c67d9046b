"""A LLaMA-style model written with fairscale's tensor-parallel layers, hooked at TP=2 on CPU.

    python examples/megatron_fairscale.py            # spawns 2 CPU ranks (gloo) itself
    torchrun --nproc_per_node 2 examples/megatron_fairscale.py
    python examples/megatron_fairscale.py --smoke

``ParallelLlama`` uses ``VocabParallelEmbedding``, ``ColumnParallelLinear``
(q/k/v, w1/w3: each rank holds half the heads / hidden units) and
``RowParallelLinear`` (wo, w2). With ``parallel=False`` the same class builds
plain ``nn.Linear``/``nn.Embedding`` layers: the one-process reference.
Hooks carry no ``expected_shape``: flex_model reads the split dim off the
layer types. Rank 0 prints the full shapes; the captures, the edited logits and
every rank's parameter-gradient shards (backward through the edit) are checked
against the one-process model. ``benchmarks/sharded_overhead.py`` reuses the model.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flex_model import FlexModel, HookFunction
from flex_model.launch import launch


def _layers(parallel: bool):
    """(column, row, embedding) constructors: fairscale's, or plain torch for the reference."""
    if not parallel:
        return (lambda i, o: nn.Linear(i, o, bias=False), lambda i, o: nn.Linear(i, o, bias=False), nn.Embedding)
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    return (lambda i, o: ColumnParallelLinear(i, o, bias=False, gather_output=False),
            lambda i, o: RowParallelLinear(i, o, bias=False, input_is_parallel=True), VocabParallelEmbedding)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, tp: int, parallel: bool) -> None:
        super().__init__()
        column, row, _ = _layers(parallel)
        self.local_heads, self.head_dim = n_heads // tp, dim // n_heads
        self.wq, self.wk, self.wv = column(dim, dim), column(dim, dim), column(dim, dim)
        self.wo = row(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, self.local_heads, self.head_dim).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, parallel: bool) -> None:
        super().__init__()
        column, row, _ = _layers(parallel)
        self.w1, self.w3, self.w2 = column(dim, hidden), column(dim, hidden), row(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int, tp: int, parallel: bool) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attention = Attention(dim, n_heads, tp, parallel)
        self.feed_forward = FeedForward(dim, hidden, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class ParallelLlama(nn.Module):
    """Names as in Meta's LLaMA: tok_embeddings, layers.{i}.attention.wq, ..., norm, output."""

    def __init__(self, vocab: int = 128, dim: int = 64, n_heads: int = 4, hidden: int = 128, n_layers: int = 2,
                 tp: int = 1, parallel: bool = True) -> None:
        super().__init__()
        _, _, embedding = _layers(parallel)
        self.tok_embeddings = embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, hidden, tp, parallel) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        if parallel:
            from fairscale.nn.model_parallel.layers import ColumnParallelLinear

            self.output = ColumnParallelLinear(dim, vocab, bias=False, gather_output=True)
        else:
            self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def shard_from(reference: nn.Module, sharded: nn.Module, tp_rank: int, tp: int) -> None:
    """Copy the reference's full weights into this rank's shards (fairscale layers hold a slice)."""
    from flex_model.placement import PARAM_TP_DIMS

    full = dict(reference.named_parameters())
    with torch.no_grad():
        for module_name, module in sharded.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                value = full[f"{module_name}.{pname}" if module_name else pname]
                dim = PARAM_TP_DIMS.get(type(module).__name__, {}).get(pname)
                p.copy_(value if dim is None else value.chunk(tp, dim)[tp_rank])


def build_pair(tp: int, smoke: bool = False, n_layers: int = 2, dim: int = 64):
    """(tensor-parallel model on this rank, one-process reference) with the same weights."""
    from fairscale.nn.model_parallel import initialize as fs

    if not fs.model_parallel_is_initialized():
        fs.initialize_model_parallel(tp)
    size = dict(dim=32, hidden=64, n_layers=2) if smoke else dict(dim=dim, hidden=2 * dim, n_layers=n_layers)
    torch.manual_seed(0)
    reference = ParallelLlama(parallel=False, **size)
    sharded = ParallelLlama(tp=tp, parallel=True, **size)
    shard_from(reference, sharded, fs.get_model_parallel_rank(), tp)
    return sharded, reference


def halve_hidden(current_module, inputs, save_ctx, modules):
    """Edit the full w1 output (both ranks' hidden units): zero the second half of the units."""
    out = inputs.clone()
    out[..., out.shape[-1] // 2:] = 0
    return out


CAPTURED = ["tok_embeddings", "layers.0.attention.wq", "layers.0.attention.wo", "layers.0.feed_forward.w1",
            "layers.1", "output"]
EDITED = "layers.1.feed_forward.w1"


def main(smoke: bool = False) -> None:
    torch.set_num_threads(1)
    rank, tp = dist.get_rank(), dist.get_world_size()
    model, reference = build_pair(tp, smoke)
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (2, 8) if smoke else (4, 32))  # tensor parallel: every rank sees the batch

    output_dict: dict = {}
    flex = FlexModel(model, output_dict, tensor_parallel_size=tp)
    for name in CAPTURED:
        flex.register_forward_hook(HookFunction(name))  # no expected_shape: the layer types say the split
    flex.register_forward_hook(HookFunction(EDITED, editing_function=halve_hidden))
    logits = flex(tokens)
    logits.logsumexp(-1).mean().backward()  # gradients flow through the edit (run once, on rank 0)
    if rank == 0:
        print(flex.describe())
        print(f"local w1 weight on each rank: {tuple(model.get_submodule(EDITED).weight.shape)} (tp={tp})")
        for name, values in output_dict.items():
            print(f"retrieved {name}: full shape {tuple(values[0].shape)}")

    # The same model on one process, the same edit as a plain torch hook.
    seen: dict = {}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, out.detach().clone())  # returns None: the output stays as it is
        return hook

    for name in CAPTURED + [EDITED]:
        reference.get_submodule(name).register_forward_hook(keep(name))
    reference.get_submodule(EDITED).register_forward_hook(lambda m, a, out: halve_hidden(m, out, None, None))
    want = reference(tokens)
    want.logsumexp(-1).mean().backward()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    if rank == 0:
        for name in CAPTURED + [EDITED]:
            torch.testing.assert_close(output_dict[name][0], seen[name], rtol=1e-4, atol=1e-5)
    full = dict(reference.named_parameters())
    from flex_model.placement import PARAM_TP_DIMS

    for module_name, module in model.named_modules():  # each rank: its gradient shards
        for pname, p in module.named_parameters(recurse=False):
            grad = full[f"{module_name}.{pname}" if module_name else pname].grad
            dim = PARAM_TP_DIMS.get(type(module).__name__, {}).get(pname)
            torch.testing.assert_close(p.grad, grad if dim is None else grad.chunk(tp, dim)[rank],
                                       rtol=1e-4, atol=1e-6)
    dist.barrier()
    if rank == 0:
        print(f"logits {tuple(logits.shape)} with the edit on {EDITED}; matches single process: True")
        print("gradients of every parameter shard through the edit match single process: True")
    flex.restore()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="smaller model and batch (CI)")
    launch(main, nprocs=2, args=(parser.parse_args().smoke,))
