"""Small models the tests wrap: a GPT written here, tiny HuggingFace models with random weights, and the
tensor-parallel tests' models with their fairscale / megatron-core twins built from a full model's slices."""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        y = att.softmax(-1) @ v  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + position embedding, ``n_layers`` pre-LN blocks, final LN, head tied to the embedding."""

    def __init__(self, vocab: int = 61, d_model: int = 32, n_heads: int = 4, n_layers: int = 2,
                 d_hidden: int = 64, max_len: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(Block(d_model, n_heads, d_hidden) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_f(x))


def tiny_gpt(seed: int = 0) -> TinyGPT:
    """The default ``TinyGPT`` (vocab 61, width 32, 2 layers), seeded."""
    torch.manual_seed(seed)
    return TinyGPT()


def lm_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the batch and positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


# -- tensor parallel: full models and their sharded twins (same weights, this rank's slices) ------------
NET_VOCAB, NET_D, NET_H = 16, 8, 12  # Net's vocabulary and width, and the MLPs' hidden width


def shard(full: torch.Tensor, dim: Optional[int], rank: int, size: int) -> torch.Tensor:
    """This rank's piece of ``full`` split in ``size`` along ``dim`` (``None``: replicated, the whole tensor)."""
    return full if dim is None else full.chunk(size, dim)[rank]


class Net(nn.Module):
    """Two embeddings, an MLP: the reference for the fairscale and megatron models."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pemb = nn.Embedding(NET_VOCAB, NET_D), nn.Embedding(NET_VOCAB, NET_D)
        self.up, self.act, self.down = nn.Linear(NET_D, NET_H), nn.GELU(), nn.Linear(NET_H, NET_D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(self.emb(idx) + self.pemb(idx))))


# The dim of each parameter that tensor parallel splits (None: replicated).
FAIRSCALE_DIMS: Dict[str, Optional[int]] = {"emb.weight": 0, "pemb.weight": 1, "up.weight": 0, "up.bias": 0,
                                            "down.weight": 1, "down.bias": None}
MLP_DIMS: Dict[str, Optional[int]] = {"up.weight": 0, "up.bias": 0, "down.weight": 1, "down.bias": None}


def fairscale_net(ref: Net, tp_rank: int, tp: int) -> Net:
    """``ref`` with fairscale's parallel layers holding this rank's slices of its weights."""
    from fairscale.nn.model_parallel import layers as L

    skip = lambda w: None  # noqa: E731  (the weights are copied below)
    net = Net()
    net.emb = L.VocabParallelEmbedding(NET_VOCAB, NET_D, init_method=skip)
    net.pemb = L.ParallelEmbedding(NET_VOCAB, NET_D, init_method=skip)
    net.up = L.ColumnParallelLinear(NET_D, NET_H, gather_output=False, init_method=skip)
    net.down = L.RowParallelLinear(NET_H, NET_D, input_is_parallel=True, init_method=skip)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(shard(ref.get_parameter(name), FAIRSCALE_DIMS[name], tp_rank, tp))
    return net


class MegatronMlp(nn.Module):
    """``MLP(NET_D, NET_H)`` with megatron-core's parallel linears, which return ``(output, bias)``."""

    def __init__(self, ref: MLP, tp_rank: int, tp: int) -> None:
        super().__init__()
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
        init = nn.init.normal_  # overwritten below; running it makes megatron tag partition dims
        self.up = ColumnParallelLinear(NET_D, NET_H, config=cfg, init_method=init, bias=True, gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(NET_H, NET_D, config=cfg, init_method=init, bias=True,
                                      input_is_parallel=True, skip_bias_add=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(shard(ref.get_parameter(name), MLP_DIMS[name], tp_rank, tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.up(x)
        y, _ = self.down(self.act(h))
        return y


def fairscale_tp_gpt(model: TinyGPT, rank: int) -> TinyGPT:
    """A copy of ``model`` whose MLPs are fairscale Column/RowParallelLinear holding this rank's slices
    (tensor parallel 2)."""
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

    tp = copy.deepcopy(model)
    for block, src in zip(tp.layers, model.layers):
        d_model, d_hidden = src.mlp.up.in_features, src.mlp.up.out_features
        part = slice(rank * d_hidden // 2, (rank + 1) * d_hidden // 2)
        up = ColumnParallelLinear(d_model, d_hidden, gather_output=False)
        down = RowParallelLinear(d_hidden, d_model, input_is_parallel=True)
        with torch.no_grad():
            up.weight.copy_(src.mlp.up.weight[part])
            up.bias.copy_(src.mlp.up.bias[part])
            down.weight.copy_(src.mlp.down.weight[:, part])
            down.bias.copy_(src.mlp.down.bias)
        block.mlp.up, block.mlp.down = up, down
    return tp
