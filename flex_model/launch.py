"""Launchers: start a function on every rank of a ``torch.distributed`` job.

Owns:
  * ``launch``  -- what ``examples/*.py`` call. Under torchrun / slurm /
                   submitit (``RANK`` and ``WORLD_SIZE`` already set) it joins
                   the existing job; under plain ``python script.py`` it spawns
                   ``nprocs`` local ranks itself.
  * ``submit`` / ``submit_and_wait`` -- run a function on every task of a
                   submitit job (slurm when available, else local processes).

submitit is an optional extra: it is imported only inside ``submit``.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_from_env(backend: Optional[str]) -> bool:
    """Init the default group from env vars unless already done; True if we did."""
    if dist.is_initialized():
        return False
    backend = backend or _default_backend()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {n_gpus} CUDA device(s) are visible: "
                "start at most one process per GPU, or pass backend='gloo'."
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://")
    return True


def _run_in_group(main: Callable[..., Any], args: Sequence[Any], backend: Optional[str]) -> Any:
    owns_group = _init_from_env(backend)
    try:
        return main(*args)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _spawned_rank(
    rank: int, nprocs: int, port: int, main: Callable[..., Any], args: Sequence[Any],
    backend: Optional[str],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    _run_in_group(main, args, backend)


def launch(
    main: Callable[..., Any],
    nprocs: int = 2,
    backend: Optional[str] = None,
    args: Sequence[Any] = (),
) -> None:
    """Run ``main(*args)`` on every rank with the default process group initialised.

    * Started by torchrun / slurm / submitit (``RANK`` and ``WORLD_SIZE`` in the
      environment): join that job with ``init_method="env://"`` (unless a group
      is already initialised), run ``main`` on this rank, destroy the group.
    * Otherwise: spawn ``nprocs`` local processes (spawn start method) that do
      the same, and wait for them. A rank that raises makes ``launch`` raise
      ``torch.multiprocessing.ProcessRaisedException`` with its traceback.

    ``backend`` defaults to nccl when CUDA is available, else gloo. With
    spawning, ``main`` must be importable (a module-level function) and the
    script must call ``launch`` under ``if __name__ == "__main__":``.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _run_in_group(main, args, backend)
        return
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    torch.multiprocessing.start_processes(
        _spawned_rank,
        args=(nprocs, _free_port(), main, tuple(args), backend),
        nprocs=nprocs,
        join=True,
        start_method="spawn",
    )


def _submitted_task(fn: Callable[..., Any], backend: str, fn_kwargs: dict) -> Any:
    """Runs inside every submitit task: export the torch env vars, init, run ``fn``."""
    import submitit

    # overwrite=True: RANK/MASTER_PORT inherited from the submitting shell are stale
    # here. Keep CUDA_VISIBLE_DEVICES as slurm / the local executor set it.
    env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend='nccl' but this task sees no CUDA device: "
                               "request GPUs (gpus_per_node) or pass backend='gloo'.")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://")
    try:
        return fn(**fn_kwargs)
    finally:
        if dist.is_initialized():  # fn may have destroyed or replaced it
            dist.destroy_process_group()


def submit(
    fn: Callable[..., Any],
    *,
    tasks_per_node: int = 2,
    nodes: int = 1,
    folder: str = "submitit_logs",
    slurm_partition: Optional[str] = None,
    gpus_per_node: int = 0,
    timeout_min: int = 30,
    backend: Optional[str] = None,
    **fn_kwargs: Any,
) -> Any:
    """Submit ``fn(**fn_kwargs)`` to run on every task of a submitit job.

    Each of the ``nodes * tasks_per_node`` tasks is one rank with the default
    process group initialised (``backend``; default nccl when
    ``gpus_per_node > 0``, else gloo). Uses slurm when ``slurm_partition`` is given
    or ``sbatch`` is on PATH, else submitit's local executor (one node).
    Returns the ``submitit.Job``; ``job.results()`` gives each task's return
    value, ordered by rank, and raises if a task failed (logs in ``folder``).
    ``fn`` and its arguments must be picklable and importable by the tasks.
    """
    try:
        import submitit
    except ImportError as error:
        raise ImportError(
            "flex_model.launch.submit needs submitit, in the test extra: `pip install submitit` "
            "(or `pip install -e \".[test]\"` from a checkout)"
        ) from error

    use_slurm = slurm_partition is not None or shutil.which("sbatch") is not None
    if not use_slurm and nodes != 1:
        raise ValueError(
            f"nodes={nodes} needs slurm (no sbatch on PATH); the local executor runs one node"
        )
    executor = submitit.AutoExecutor(folder=folder, cluster=None if use_slurm else "local")
    parameters: dict[str, Any] = dict(
        nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node,
        timeout_min=timeout_min,
    )
    if slurm_partition is not None:
        parameters["slurm_partition"] = slurm_partition
    executor.update_parameters(**parameters)
    if backend is None:
        backend = "nccl" if gpus_per_node > 0 else "gloo"
    return executor.submit(_submitted_task, fn, backend, fn_kwargs)


def submit_and_wait(fn: Callable[..., Any], **submit_kwargs: Any) -> list:
    """``submit(fn, **submit_kwargs)`` and return every task's result, ordered by rank."""
    return submit(fn, **submit_kwargs).results()
