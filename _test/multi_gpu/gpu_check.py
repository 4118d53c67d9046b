"""GPU / NCCL checks, run by hand on a machine with CUDA (CI has none).

    python _test/multi_gpu/gpu_check.py

1. One process on ``cuda:0``: FlexModel edits on TinyGPT equal plain torch hooks
   bit for bit (outputs and every gradient); captures land on CPU by default
   and stay on the GPU with ``offload_to_cpu=False``.
2. NCCL with ``world_size`` ranks (default: one per GPU): DDP TinyGPT with a
   forward edit and a backward capture through FlexModel, checked against
   one process. On a one-GPU machine it also tries two ranks sharing the GPU
   and prints what NCCL says.
Prints one ``PASS``/``FAIL`` line per check; exits 1 if any failed.
"""
from __future__ import annotations

import copy
import sys
import traceback
from pathlib import Path

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


def main() -> int:
    failed = 0
    checks = [("single process on cuda:0", single_process_cuda)]
    n = torch.cuda.device_count()
    checks.append((f"NCCL DDP, {max(n, 1)} rank(s), one GPU each",
                   lambda: print(run_ranks(ddp_body, max(n, 1), backend="nccl", timeout=180))))
    if n == 1:
        checks.append(("NCCL DDP, 2 ranks sharing one GPU",
                       lambda: print(run_ranks(ddp_body, 2, backend="nccl", timeout=120))))
    for name, check in checks:
        try:
            check()
            print(f"PASS {name}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}:\n{traceback.format_exc()[-3000:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
