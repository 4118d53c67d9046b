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


# -- models parallelised by the frameworks themselves: torchtitan 0.3.0's Llama-3, HuggingFace tp_plan ------------
TITAN_DIM, TITAN_HEADS, TITAN_KV_HEADS, TITAN_HIDDEN, TITAN_VOCAB = 32, 4, 2, 64, 64
# torchtitan.distributed.minimal_async_ep imports this module, which imports triton, at import time (through
# torchtitan.models.common's MoE token dispatcher); dense Llama-3 never calls its kernels.
TITAN_TRITON_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"
_TITAN_KERNEL_NAMES = ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel", "expand_topk_grad_kernel",
                       "fill_combine_metadata_kernel", "fill_dispatch_metadata_kernel", "invert_flat_indices_kernel",
                       "reduce_topk_slots_kernel", "topk_scores_grad_kernel")


def import_torchtitan():
    """``torchtitan.models.llama3``, importable on a CPU machine without triton.

    Two stand-ins, both for what a dense model on CPU never uses: a stub for ``TITAN_TRITON_KERNELS`` put into
    ``sys.modules`` first (its names raise if called), and ``parallel_dims.device_type = "cpu"`` (torchtitan
    picks "cuda" when no accelerator is found, and builds its meshes on that device type). Takes ~8 s the first
    time (torch's inductor and dynamo come with it): call it before forking ranks so they share it."""
    import sys
    import types

    if TITAN_TRITON_KERNELS not in sys.modules:
        stub = types.ModuleType(TITAN_TRITON_KERNELS)
        stub.__doc__ = "stand-in for torchtitan's triton kernels (flex_model tests, CPU only)"

        def missing(name):
            def kernel(*args, **kwargs):
                raise RuntimeError(f"{name}: torchtitan's triton kernels are stubbed out in these tests")
            return kernel

        for name in _TITAN_KERNEL_NAMES:
            setattr(stub, name, missing(name))
        sys.modules[TITAN_TRITON_KERNELS] = stub
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.models.llama3 as llama3

    parallel_dims.device_type = "cpu"
    return llama3


def titan_llama_config(*, sharded: bool = False, sequence_parallel: bool = False):
    """A tiny torchtitan ``Llama3Model.Config`` (2 layers, dim 32, 4 heads / 2 kv heads, fused qkv, vocab 64),
    built from torchtitan's own config classes and helpers, with SDPA attention (causal; its flex and varlen
    backends need compile / CUDA). ``sharded``: with torchtitan's Llama-3 sharding declarations filled in, as
    ``Llama3Model.Config.update_from_config`` does (called here directly: that method imports the trainer
    and its data-loading dependencies)."""
    llama3 = import_torchtitan()
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
    from torchtitan.models.llama3.model import Llama3TransformerBlock
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    dim = TITAN_DIM
    linear = {"weight": lambda w: nn.init.normal_(w, std=0.3), "bias": nn.init.zeros_}  # large: edits show
    norm = {"weight": nn.init.ones_}
    rope = ComplexRoPE.Config(dim=dim // TITAN_HEADS, max_seq_len=64, theta=10000.0)
    layers = [Llama3TransformerBlock.Config(
        attention_norm=RMSNorm.Config(normalized_shape=dim, param_init=norm),
        ffn_norm=RMSNorm.Config(normalized_shape=dim, param_init=norm),
        attention=make_gqa_config(dim=dim, n_heads=TITAN_HEADS, n_kv_heads=TITAN_KV_HEADS, fuse_qkv=True,
                                  wqkv_param_init=linear, wo_param_init=linear, rope=rope,
                                  inner_attention=ScaledDotProductAttention.Config()),
        feed_forward=make_ffn_config(dim=dim, hidden_dim=TITAN_HIDDEN, w1_param_init=linear,
                                     w2w3_param_init=linear)) for _ in range(2)]
    config = llama3.Llama3Model.Config(
        dim=dim, vocab_size=TITAN_VOCAB, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=TITAN_VOCAB, embedding_dim=dim,
                                        param_init={"weight": nn.init.normal_}),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=norm),
        lm_head=Linear.Config(in_features=dim, out_features=TITAN_VOCAB, param_init=linear))
    if sharded:
        set_llama3_sharding_config(config, enable_sp=sequence_parallel)
    return config


def titan_llama(seed: int = 0) -> nn.Module:
    """The tiny torchtitan Llama-3, one process, its weights initialised by torchtitan from ``seed``."""
    torch.manual_seed(seed)
    model = titan_llama_config().build()
    model.init_states()
    return model


def titan_parallel_llama(reference: nn.Module, world_size: int, *, tp: int, dp_shard: int,
                         sequence_parallel: bool = False):
    """``(model, parallel_dims)``: the same weights as ``reference``, parallelised by torchtitan's own
    ``parallelize_llama`` (its TP plan, then FSDP2 on every block and the root; ``spmd_backend=
    "partial_dtensor"``: DTensors on the tp mesh only) over ``ParallelDims(dp_shard, tp)``, fp32.

    torchtitan turns off FSDP2's gradient division (it scales the loss by the global token count); FSDP2 would
    still reduce-scatter with PREMUL_SUM, which gloo lacks, so every FSDP module is also set to plain sums
    (``set_force_sum_reduction_for_comms``): the gradients are those of the sum of the ranks' losses."""
    llama3 = import_torchtitan()
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims

    parallelism = ParallelismConfig(tensor_parallel_degree=tp, data_parallel_shard_degree=dp_shard,
                                    enable_sequence_parallel=sequence_parallel, spmd_backend="partial_dtensor")
    model = titan_llama_config(sharded=True, sequence_parallel=sequence_parallel).build()
    model.load_state_dict(reference.state_dict())
    dims = ParallelDims.from_config(parallelism, world_size)
    model = llama3.parallelize_llama(model, parallel_dims=dims, parallelism=parallelism,
                                     training=TrainingConfig(mixed_precision_param="float32"),
                                     compile_config=CompileConfig(), ac_config=None, dump_folder="")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    return model, dims


HF_TP_VOCAB, HF_TP_DIM, HF_TP_HIDDEN = 96, 32, 64


def save_hf_llama(path: str, seed: int = 0) -> str:
    """Save a tiny HuggingFace Llama (2 layers, hidden 32, 4 heads / 2 kv heads, vocab 96) with random
    weights to ``path`` (``save_pretrained``), to be loaded with and without ``tp_plan="auto"``. Returns
    ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=HF_TP_VOCAB, hidden_size=HF_TP_DIM, intermediate_size=HF_TP_HIDDEN,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)  # large weights: the edits show in the logits
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path
