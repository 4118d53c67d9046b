"""Run by ``_test/test_distributed_accelerate.py`` under torchrun with 2 processes.

A TinyGPT prepared by ``accelerate.Accelerator(cpu=True)`` (DDP over gloo)
wrapped by FlexModel, hooks named as in the unwrapped model, checked on every
rank against the same model run in this process on the full batch. Each rank
prints one line: ``RESULT rank=<r> ok ...`` or ``RESULT rank=<r> FAIL <error>``.
"""
import traceback

import torch


def main() -> str:
    from accelerate import Accelerator

    from _test.distributed import (check_captures, check_grads, ddp_grads, five_hook_types, reference_run, register,
                                   row_slices, tokens)
    from _test.models import tiny_gpt
    from flex_model import FlexModel

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    assert world_size == 2, f"run with 2 processes, got {world_size}"
    specs = five_hook_types()
    idx = tokens(4)
    rows = row_slices([2, 2])[rank]
    ref = reference_run(tiny_gpt(), idx, specs)
    model = accelerator.prepare(tiny_gpt())
    assert type(model).__name__ == "DistributedDataParallel", type(model).__name__
    output_dict = {}
    flex = FlexModel(model, output_dict)  # layout read off the DDP module
    register(flex, specs)
    out = flex(idx[rows])
    torch.testing.assert_close(out.detach(), ref.out[rows])
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), idx[rows, 1:].reshape(-1))
    accelerator.backward(loss)  # mean over the local slice; DDP averages the two equal slices
    check_captures(rank, output_dict, ref, specs)
    check_grads(ddp_grads(model), ref)
    flex.restore()
    return f"rank={rank} ok captures={sorted(output_dict)}"


if __name__ == "__main__":
    import os

    rank = os.environ.get("RANK", "?")
    try:
        line = f"RESULT {main()}"
    except Exception:
        line = f"RESULT rank={rank} FAIL " + traceback.format_exc().replace("\n", " | ")
    # One write with its own newlines: both ranks share torchrun's stdout, and print() may interleave them
    # on one line. A pipe write of at most PIPE_BUF bytes is atomic.
    os.write(1, f"\n{line[:3500]}\n".encode())
