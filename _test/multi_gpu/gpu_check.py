"""GPU / NCCL checks, run by hand on a machine with CUDA (CI has none).

    python _test/multi_gpu/gpu_check.py

1. One process on ``cuda:0``: FlexModel edits on TinyGPT equal plain torch hooks
   bit for bit (outputs and every gradient); captures land on CPU by default
   and stay on the GPU with ``offload_to_cpu=False``; captures with many hooks (forward and backward,
   one overwritten by an in-place ReLU) copied on a side stream equal synchronous copies.
2. NCCL with ``world_size`` ranks (default: one per GPU): DDP TinyGPT with a
   forward edit and a backward capture through FlexModel, checked against
   one process. On a one-GPU machine it also tries two ranks sharing the GPU
   and prints what NCCL says.
3. On 2+ ranks (NCCL, one GPU each), each against one process: FSDP2
   (``fully_shard``) with an edit and a gradient capture; DTensor tensor
   parallel (colwise / rowwise) with an edit; two pipeline stages with a
   capture shipped to the owner, hook groups resolved across stages (pp > 1
   name resolution); routing (``RouteActivation``) and mean-ablation
   statistics (``RunningMean.all_reduce``, CPU statistics under NCCL); an
   activation dump read back.

``python _test/multi_gpu/gpu_check.py --backend gloo`` runs checks 2-3 on CPU
ranks, to try the script itself on a machine without a GPU.
Prints one ``PASS``/``FAIL``/``SKIP`` line per check; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import traceback
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _test.distributed import run_ranks  # noqa: E402
from _test.models import TinyGPT, lm_loss  # noqa: E402
from flex_model import FlexModel, HookFunction  # noqa: E402


def single_process_cuda() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model = TinyGPT().to(dev)
    ref = copy.deepcopy(model)
    A = torch.randn(32, 32, device=dev)
    idx = torch.randint(0, 61, (4, 16), device=dev)
    ref.layers[0].mlp.register_forward_hook(lambda m, a, o: o @ A)
    ref.layers[1].attn.register_full_backward_pre_hook(lambda m, g: (g[0] * 2,))
    lm_loss(ref(idx), idx).backward()
    for offload in (True, False):
        model.zero_grad()
        out = {}
        flex = FlexModel(model, out, offload_to_cpu=offload)
        flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, s, ms: x @ A))
        flex.register_full_backward_pre_hook(HookFunction("layers.1.attn", editing_function=lambda m, g, s, ms: g * 2))
        logits = flex(idx)
        lm_loss(logits, idx).backward()
        assert torch.equal(logits, ref(idx)), "outputs differ"
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.equal(p.grad, q.grad), f"grad of {n} differs"
        want = "cpu" if offload else "cuda"
        assert all(t.device.type == want for v in out.values() for t in v), {k: v[0].device for k, v in out.items()}
        flex.restore()


def async_capture_cuda() -> str:
    """Captures on every module of TinyGPT and of an MLP whose first output an in-place ReLU overwrites,
    forward and backward: copied to pinned memory on a side stream, equal to synchronous copies."""
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    gpt = TinyGPT().to(dev)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.ReLU(inplace=True),
                              torch.nn.Linear(4096, 256)).to(dev)  # 256 MB captures: a race would show
    idx, x = torch.randint(0, 61, (8, 64), device=dev), torch.randn(32, 512, 256, device=dev)
    runs = []
    for deferred in (False, True):
        runs.append(out := {})
        for model, inp in ((gpt, idx), (mlp, x)):
            flex = FlexModel(model, out)
            flex._runtime.async_copies = deferred
            for name, _ in model.named_modules():
                if name and name != "layers":
                    flex.register_forward_hook(HookFunction(name))
            flex.register_full_backward_hook(HookFunction(name))
            flex(inp).float().square().mean().backward()
            assert flex._runtime.pending == [], "captures left pending after backward"
            flex.restore()
        pinned = {t.is_pinned() for v in out.values() for t in v}
        assert pinned == {deferred}, f"deferred={deferred}: pinned {pinned}"
    assert sorted(runs[0]) == sorted(runs[1])
    for name, want in runs[0].items():
        assert len(want) == len(runs[1][name]) and all(torch.equal(a, b) for a, b in zip(runs[1][name], want)), name
    return f"{sum(map(len, runs[1].values()))} captures equal to synchronous copies"


def ddp_body(rank: int, world_size: int) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    torch.manual_seed(0)
    model = TinyGPT().to(dev)
    ref = copy.deepcopy(model)
    A = torch.randn(32, 32, device=dev)
    idx = torch.randint(0, 61, (4 * world_size, 16), device=dev)
    ref.layers[0].mlp.register_forward_hook(lambda m, a, o: o @ A + o.flip(0))
    lm_loss(ref(idx), idx).backward()
    out = {}
    ddp = DDP(model, device_ids=[dev.index])
    flex = FlexModel(ddp, out, data_parallel_size=world_size)
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, s, ms: x @ A + x.flip(0)))
    flex.register_full_backward_hook(HookFunction("layers.1.mlp"))
    mine = idx.chunk(world_size)[rank]
    lm_loss(flex(mine), mine).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=n: f"grad of {n}: {m}")
    if rank == 0:
        assert out["layers.0.mlp"][0].shape == (4 * world_size, 16, 32)
    flex.restore()
    return f"{dist.get_backend()} on {dev}"


def _device(rank: int) -> torch.device:
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def fsdp2_body(rank: int, world_size: int) -> str:
    """FSDP2 on every block and the root: an edit forward, a gradient capture, gradients vs one process."""
    from torch.distributed.fsdp import fully_shard

    dev = _device(rank)
    torch.manual_seed(0)
    model = TinyGPT().to(dev)
    ref = copy.deepcopy(model)
    A = torch.randn(32, 32, device=dev)
    idx = torch.randint(0, 61, (2 * world_size, 16), device=dev)
    ref.layers[0].mlp.register_forward_hook(lambda m, a, o: o @ A)
    seen = []
    ref.layers[1].mlp.register_full_backward_pre_hook(lambda m, g: seen.append(g[0].detach()))
    lm_loss(ref(idx), idx).backward()
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    out = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction("layers.0.mlp", editing_function=lambda m, x, s, ms: x @ A))
    flex.register_full_backward_pre_hook(HookFunction("layers.1.mlp"))
    mine = idx.chunk(world_size)[rank]
    lm_loss(flex(mine), mine).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m, n=n: f"grad of {n}: {m}")
    if rank == 0:
        torch.testing.assert_close(out["layers.1.mlp"][0].to(dev), seen[0])
    flex.restore()
    return f"fsdp2 {flex.layout.describe()}"


def dtensor_tp_body(rank: int, world_size: int) -> str:
    """A colwise / rowwise MLP on a 1-D tp mesh: the colwise output (split) edited, vs one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dev = _device(rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8 * world_size), torch.nn.GELU(),
                                torch.nn.Linear(8 * world_size, 16)).to(dev)
    ref = copy.deepcopy(model)
    A = torch.randn(8 * world_size, 8 * world_size, device=dev)
    x = torch.randn(4, 16, device=dev)
    ref[0].register_forward_hook(lambda m, a, o: o @ A)
    want = ref(x)
    mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    out = {}
    flex = FlexModel(model, out)
    flex.register_forward_hook(HookFunction("0", editing_function=lambda m, h, s, ms: h @ A))
    got = flex(x)
    torch.testing.assert_close(got, want)
    if rank == 0:
        assert out["0"][0].shape == (4, 8 * world_size), out["0"][0].shape
    flex.restore()
    return f"dtensor tp {flex.layout.describe()}"


class _Stage(torch.nn.ModuleDict):
    """A pipeline stage: its blocks in order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.values():
            x = block(x)
        return x


def pipeline_body(rank: int, world_size: int) -> str:
    """Two stages (ranks split in halves, dp = world_size / 2): hook groups resolved across stages, a
    capture on stage 1 shipped to the owner, routing and mean-ablation statistics, a dump."""
    from flex_model import Ablation, RouteActivation, Router, RunningMean, dump_activations

    dev = _device(rank)
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(8, 8).to(dev) for _ in range(4)]
    stage = rank * 2 // world_size
    mine = _Stage({f"b{i}": blocks[i] for i in ((0, 1) if stage == 0 else (2, 3))})
    dp = world_size // 2
    flex = FlexModel(mine, out := {}, pipeline_parallel_size=2, data_parallel_size=dp)
    hooks = flex.create_hook_group("late", "b3")  # on stage 1 only: resolved by one collective
    assert [h.module_name for h in hooks] == ["b3"]
    x = torch.randn(2, 3, 8, device=dev)
    if stage == 1:
        flex(x)
    flex.gather_pipeline_outputs()
    if rank == 0:
        torch.testing.assert_close(out["b3"][0].to(dev), blocks[3](blocks[2](x)))
    flex.restore()

    # routing and mean-ablation statistics under data parallelism over the whole job
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).to(dev)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    flex = FlexModel(ddp, {})
    router = Router(16, [(0, 8)], {0: [0.0], 1: [1.0]})
    flex.create_hook_group("route", "1", editing_function=RouteActivation(router))
    stats = RunningMean()
    flex.create_hook_group("stats", "1", editing_function=stats)
    h = torch.randn(2, 3, 8, device=dev) + rank
    with router.masks(torch.ones(2, 3, dtype=torch.long, device=dev)):
        flex(h, groups="route").sum().backward()
    flex(h, groups="stats")
    stats.all_reduce()
    assert stats.count == 6 * world_size, stats.count
    flex.create_hook_group("ablate", "1", editing_function=Ablation([(0, 4)], mode="mean", mean=stats))
    got = flex(h, groups="ablate")
    everyone = [torch.empty_like(h) for _ in range(world_size)]
    dist.all_gather(everyone, h)
    with torch.no_grad():  # one process: the mean over every rank's tokens, units 0-3 replaced by it
        act = model[1](model[0](torch.cat(everyone)))
        mean = act.reshape(-1, 16).mean(0)
        mine = model[1](model[0](h))
        mine[..., :4] = mean[:4]
        torch.testing.assert_close(got, model[2](mine), rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as d:
        flex2 = FlexModel(torch.nn.parallel.DistributedDataParallel(
            copy.deepcopy(model), device_ids=[dev.index] if dev.type == "cuda" else None), {})
        reader = dump_activations(flex2, [h, h + 1], d, ["1"], progress=False)
        if rank == 0:
            assert tuple(reader.read("1").shape) == (2 * world_size * 2, 3, 16), reader.read("1").shape
            torch.testing.assert_close(reader.read("1", 0, 2).to(dev), model[1](model[0](h)))
    return f"pipeline, routing, mean ablation, dump on {dev}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    args = parser.parse_args(argv)
    failed = 0
    n = torch.cuda.device_count()
    checks = []
    if args.backend == "nccl":
        checks.append(("single process on cuda:0", single_process_cuda))
        checks.append(("single process: side-stream captures vs synchronous copies",
                       lambda: print(async_capture_cuda())))
        checks.append((f"NCCL DDP, {max(n, 1)} rank(s), one GPU each",
                       lambda: print(run_ranks(ddp_body, max(n, 1), backend="nccl", timeout=180))))
        if n == 1:
            checks.append(("NCCL DDP, 2 ranks sharing one GPU",
                           lambda: print(run_ranks(ddp_body, 2, backend="nccl", timeout=120))))
    ranks = (n if n >= 2 else 0) if args.backend == "nccl" else 2
    ranks -= ranks % 2  # the pipeline check splits the ranks into two stages
    for name, body in [("FSDP2", fsdp2_body), ("DTensor TP", dtensor_tp_body),
                       ("pipeline stages, pp>1 names, routing, mean ablation, dump", pipeline_body)]:
        if ranks < 2:
            checks.append((f"{name}: SKIP, needs 2+ GPUs (NCCL runs one rank per GPU)", None))
        else:
            checks.append((f"{args.backend} {name}, {ranks} ranks",
                           lambda body=body: print(run_ranks(body, ranks, backend=args.backend, timeout=240))))
    for name, check in checks:
        if check is None:
            print(name, flush=True)
            continue
        try:
            check()
            print(f"PASS {name}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}:\n{traceback.format_exc()[-3000:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
