"""Real multi-process test harness for distributed tests (no mocks).

Owns:
  * ``run_ranks``      -- fork ``world_size`` processes, give each a real
                          ``torch.distributed`` process group, run a function
                          on every rank and return the per-rank results.
  * ``multi_process``  -- decorator turning ``def test_x(rank, world_size)``
                          into a zero-argument pytest test that uses
                          ``run_ranks``; the multi-GPU runner in
                          ``_test/multi_gpu`` reuses ``.body``/``.world_size``.
  * ``device_for_rank`` -- the device a rank should put its tensors on.

Children are *forked* (cheap, ~0.1 s each; the pytest parent never
initialises a process group, so forking is safe) -- except with the nccl
backend, where they are *spawned*: once the parent has called
``torch.cuda.is_available()`` (a skipif does), a forked child cannot use CUDA
("Cannot re-initialize CUDA in forked subprocess"). Spawned bodies and their
arguments must be picklable (module-level functions). Each child reports
``("ok", rank, value)`` or ``("error", rank, traceback)`` through its own
pipe; the parent judges by those reports, never by exit codes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

# After one rank fails, the others are probably stuck in a collective waiting
# for it: give them this long to report before killing them.
_GRACE_AFTER_FAILURE_S = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_for_rank(rank: int) -> torch.device:
    """``cuda:<local device>`` when CUDA is available and the group uses NCCL, else cpu.

    The device index is ``rank % torch.cuda.device_count()``: the local rank
    on a node with one GPU per task, and 0 when a launcher (e.g. submitit)
    narrowed ``CUDA_VISIBLE_DEVICES`` to the task's own GPU.
    """
    backend = dist.get_backend() if dist.is_initialized() else None
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _child_main(
    rank: int,
    world_size: int,
    conn: multiprocessing.connection.Connection,
    master_port: int,
    init_file: str,
    backend: str,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    """Body of one rank: init the group, run ``fn``, report, exit."""
    try:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(master_port),
        )
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        # Without this, a rank that fails at once can exit while gloo is still
        # connecting the others, and they fail with "Connection closed by peer".
        dist.barrier()
        report: tuple = ("ok", rank, fn(rank, world_size, *args, **kwargs))
    except BaseException:  # report everything, including SystemExit/KeyboardInterrupt
        report = ("error", rank, traceback.format_exc())
    try:
        try:
            conn.send(report)
        except Exception:
            report = ("error", rank, "could not send the result to the parent "
                      "(is the return value picklable?)\n" + traceback.format_exc())
            conn.send(report)
        conn.close()
        if dist.is_initialized():
            if report[0] == "ok":
                # Exit together, so no rank closes its sockets while a peer is
                # still reading from them. If a peer failed, this raises or
                # hangs; the parent already has our report and kills us.
                dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip atexit handlers inherited from pytest: they can hang


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    """Terminate a process, then kill it if it is still alive after 2 s."""
    if process.is_alive():
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(2.0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 90.0,
    backend: str = "gloo",
    start_method: Optional[str] = None,
    **kwargs: Any,
) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks.

    Every rank has an initialised default process group (``backend``, file://
    rendezvous in a fresh temp dir). Returns the return values ordered by
    rank. Raises ``AssertionError`` naming every rank's status (and the
    tracebacks) if any rank raised, died without reporting, or did not
    report within ``timeout`` seconds; stragglers are killed.
    ``start_method`` defaults to "spawn" for nccl and "fork" otherwise.
    """
    if start_method is None:
        start_method = "spawn" if backend == "nccl" else "fork"
    ctx = multiprocessing.get_context(start_method)
    tmpdir = tempfile.mkdtemp(prefix="flex_model_dist_")
    init_file = os.path.join(tmpdir, "rendezvous")
    master_port = free_port()
    readers, processes = [], []
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_child_main,
                args=(rank, world_size, writer, master_port, init_file, backend, fn, args, kwargs),
                name=f"rank{rank}",
                daemon=False,  # bodies may start workers; stragglers are killed below
            )
            with warnings.catch_warnings():
                # Python >= 3.12 warns on every fork of a multi-threaded parent
                # (e.g. one that probed CUDA). Forked ranks never use CUDA, and a
                # deadlocked child would still be reported as a timeout.
                warnings.filterwarnings(
                    "ignore", message=r".*multi-threaded, use of fork\(\)", category=DeprecationWarning
                )
                process.start()
            writer.close()  # the child holds its own copy
            readers.append(reader)
            processes.append(process)
        reports = _collect(readers, processes, timeout)
    finally:
        for process in processes:
            process.join(0.5)
            _stop(process)
        for reader in readers:
            reader.close()
        shutil.rmtree(tmpdir, ignore_errors=True)

    if all(status == "ok" for status, _ in reports):
        return [value for _, value in reports]
    lines = []
    for rank, (status, detail) in enumerate(reports):
        if status == "ok":
            lines.append(f"rank {rank}: ok")
        elif status == "error":
            lines.append(f"rank {rank} raised:\n{detail.rstrip()}")
        else:
            lines.append(f"rank {rank}: {detail}")
    raise AssertionError(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(lines))


def _collect(readers: list, processes: list, timeout: float) -> list[tuple[str, Any]]:
    """Wait for one report per rank; return ``[(status, value_or_detail)]`` by rank."""
    start = time.monotonic()
    deadline = start + timeout
    reports: dict[int, tuple[str, Any]] = {}
    first_failure: int | None = None
    while len(reports) < len(readers):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pending = [r for r in range(len(readers)) if r not in reports]
        waitables = [readers[r] for r in pending] + [processes[r].sentinel for r in pending]
        multiprocessing.connection.wait(waitables, remaining)
        for rank in pending:
            if readers[rank].poll():
                try:
                    status, _, value = readers[rank].recv()
                except EOFError:  # closed without a report: handled below once dead
                    continue
                reports[rank] = (status, value)
            elif not processes[rank].is_alive():
                code = processes[rank].exitcode
                reports[rank] = ("died", f"exited (code {code}) without reporting")
            else:
                continue
            if reports[rank][0] != "ok" and first_failure is None:
                first_failure = rank
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    for rank in range(len(readers)):
        if rank not in reports:
            if first_failure is not None and time.monotonic() - start < timeout:
                why = (f"still running {_GRACE_AFTER_FAILURE_S:.0f}s after rank "
                       f"{first_failure} failed, killed")
            else:
                why = f"timed out after {timeout:g}s, killed"
            reports[rank] = ("timeout", why)
    return [reports[rank] for rank in range(len(readers))]


def multi_process(world_size: int, timeout: float = 90.0, backend: str = "gloo") -> Callable:
    """Decorate ``def test_x(rank, world_size)`` into a zero-argument pytest test.

    The test runs the body on ``world_size`` forked ranks via ``run_ranks``.
    The wrapper keeps ``.body`` and ``.world_size`` so other runners (e.g.
    ``_test/multi_gpu/run_multi_gpu_tests.py``) can run the body inside a
    process group they set up themselves.
    """

    def decorate(body: Callable[[int, int], Any]) -> Callable[[], None]:
        def wrapper() -> None:
            run_ranks(body, world_size, timeout=timeout, backend=backend)

        # Copy the identity by hand: functools.wraps would set __wrapped__ and
        # pytest would then see (rank, world_size) and look for fixtures.
        wrapper.__name__ = body.__name__
        wrapper.__qualname__ = body.__qualname__
        wrapper.__doc__ = body.__doc__
        wrapper.__module__ = body.__module__
        wrapper.body = body  # type: ignore[attr-defined]
        wrapper.world_size = world_size  # type: ignore[attr-defined]
        return wrapper

    return decorate
