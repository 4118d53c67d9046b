"""Run the ``@multi_process`` tests as one submitit job (slurm GPUs or local CPUs).

Owns the multi-GPU test runner: every task of the job is one rank of an
already-initialised process group (``flex_model.launch.submit``); in it,
``run_tests_in_task`` imports the test modules, runs each ``multi_process``
test whose ``world_size`` equals the number of tasks, and returns one line
per test: ``PASS <module>::<name> rank=<r>`` or
``FAIL <module>::<name> rank=<r>: <ExcType: msg>``.

Usage (from the repository root):
    python _test/multi_gpu/run_multi_gpu_tests.py --partition gpu --gpus-per-node 2
    python _test/multi_gpu/run_multi_gpu_tests.py -k layout          # local, CPU, gloo
Exit status: 0 when every test passed on every rank, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def discover_modules(root: Path = REPO_ROOT) -> list[str]:
    """Dotted names of every ``_test/**/test_*.py`` under ``root``."""
    files = sorted((root / "_test").rglob("test_*.py"))
    return [".".join(f.relative_to(root).with_suffix("").parts) for f in files]


def module_name(spec: str) -> str:
    """``_test/foo/test_x.py`` (relative to the cwd) or ``_test.foo.test_x`` -> ``_test.foo.test_x``."""
    if not spec.endswith(".py"):
        return spec
    path = Path(spec).resolve()
    if REPO_ROOT not in path.parents:
        raise ValueError(f"{spec} is not inside the repository {REPO_ROOT}; "
                         "pass a file under it or a dotted module name")
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


def run_tests_in_task(
    modules: Sequence[str], keyword: Optional[str] = None, collective_timeout_s: float = 300.0
) -> list[str]:
    """Run the matching ``multi_process`` test bodies on this rank; return result lines.

    Call inside an initialised default process group (one rank per task);
    every rank must pass the same arguments. Each test runs in a fresh
    default group (same backend, ``collective_timeout_s``), destroyed after
    the test: a test that fails on one rank mid-collective then fails its
    peers quickly instead of hanging or desynchronising the following tests.
    The default group is re-created before returning.
    """
    import torch.distributed as dist

    rank, world_size, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    store = _shared_store(rank, world_size)
    timeout = timedelta(seconds=collective_timeout_s)

    def fresh_group(name: str) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(backend, store=dist.PrefixStore(name, store), rank=rank,
                                world_size=world_size, timeout=timeout)

    lines = []
    for index, (test_id, body) in enumerate(_find_tests(modules, keyword, world_size, rank, lines)):
        fresh_group(f"test{index}")
        lines.append(_run_one(test_id, body, rank, world_size))
        print(lines[-1], flush=True)
    fresh_group("end")
    return lines


def _shared_store(rank: int, world_size: int) -> Any:
    """A TCPStore served by rank 0 that outlives the default group."""
    import torch.distributed as dist

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False)
        port = [store.port]
    else:
        port = [None]
    dist.broadcast_object_list(port, src=0)
    if rank != 0:
        store = dist.TCPStore(host, port[0], world_size, is_master=False)
    return store


def _find_tests(
    modules: Sequence[str], keyword: Optional[str], world_size: int, rank: int, lines: list
) -> Iterator[tuple[str, Callable[[int, int], Any]]]:
    """Yield ``(module::name, body)`` of the matching tests; import errors go to ``lines``."""
    for module in modules:
        try:
            mod = importlib.import_module(module)
        except Exception as error:
            lines.append(f"FAIL {module} rank={rank}: import failed: "
                         f"{type(error).__name__}: {error}")
            print(lines[-1], flush=True)
            continue
        for name, obj in list(vars(mod).items()):
            body = getattr(obj, "body", None)
            test_id = f"{module}::{name}"
            if (callable(body) and getattr(obj, "world_size", None) == world_size
                    and (not keyword or keyword in test_id)):
                yield test_id, body


def _run_one(test_id: str, body: Callable[[int, int], Any], rank: int, world_size: int) -> str:
    """Run one body in the current group; return its PASS/FAIL line."""
    import torch.distributed as dist

    try:
        body(rank, world_size)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        # Drop the failing frames' locals (tensors, meshes holding the group).
        traceback.clear_frames(error.__traceback__)
        return f"FAIL {test_id} rank={rank}: {type(error).__name__}: {first_line}"
    try:
        dist.barrier()  # leave together; raises at once if a peer already failed
    except Exception:
        pass  # the peer reports its own failure; this rank's body passed
    return f"PASS {test_id} rank={rank}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition", default=None,
                        help="slurm partition (default: slurm if sbatch exists, else local)")
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--tasks-per-node", type=int, default=2,
                        help="ranks; runs the tests whose world_size equals this")
    parser.add_argument("--time", type=int, default=30, help="job time limit in minutes")
    parser.add_argument("--tests", nargs="*", default=None,
                        help="test modules (dotted or file paths); default: _test/**/test_*.py")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="only tests whose <module>::<name> contains this")
    parser.add_argument("--collective-timeout", type=float, default=300.0,
                        help="seconds before a stuck collective fails the test")
    parser.add_argument("--folder", default=str(REPO_ROOT / "submitit_logs"),
                        help="where submitit writes job logs")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Submit the tests, print every task's lines, return the exit status."""
    from flex_model.launch import submit

    args = parse_args(argv)
    try:
        modules = [module_name(m) for m in args.tests] if args.tests else discover_modules()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The tasks unpickle functions from this repo: make sure they can import it.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    job = submit(
        run_tests_in_task, tasks_per_node=args.tasks_per_node, folder=args.folder,
        slurm_partition=args.partition, gpus_per_node=args.gpus_per_node,
        timeout_min=args.time, modules=modules, keyword=args.keyword,
        collective_timeout_s=args.collective_timeout,
    )
    print(f"submitted job {job.job_id}; logs in {args.folder}", flush=True)
    try:
        per_task = job.results()
    except KeyboardInterrupt:
        job.cancel()  # a local job would otherwise outlive this process
        raise
    except Exception as error:  # a task crashed (not a test failure): show why
        print(f"job {job.job_id} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    lines = [line for task_lines in per_task for line in task_lines]
    for line in lines:
        print(line)
    failed = sum(line.startswith("FAIL") for line in lines)
    passed = sum(line.startswith("PASS") for line in lines)
    print(f"{passed} passed, {failed} failed (test x rank) on {len(per_task)} tasks")
    if not lines:
        print(f"no multi_process tests with world_size={args.tasks_per_node} matched")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    # Import ourselves by module name so submitit pickles functions by reference.
    sys.path.insert(0, str(REPO_ROOT))
    from _test.multi_gpu.run_multi_gpu_tests import main as _main

    sys.exit(_main())
