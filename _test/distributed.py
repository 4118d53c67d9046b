"""Real multi-process test harness for distributed tests (no mocks), and the helpers the cases share.

Owns:
  * ``run_ranks``      -- fork ``world_size`` processes, give each a real
                          ``torch.distributed`` process group, run a function
                          on every rank and return the per-rank results.
  * ``multi_process``  -- decorator turning ``def test_x(rank, world_size)``
                          into a zero-argument pytest test that uses
                          ``run_ranks``; the multi-GPU runner in
                          ``_test/multi_gpu`` reuses ``.body``/``.world_size``.
  * ``device_for_rank`` -- the device a rank should put its tensors on.
  * the cases' hooks and checks (below the harness): ``HookSpec`` (one hook:
    type, unwrapped name, optional edit of the full value), ``register`` (on
    a FlexModel), ``reference_hooks`` / ``reference_run`` (the same hooks as
    plain torch hooks on one process, full batch), ``flex_backward`` /
    ``flex_step`` (a rank's share of the global mean loss), and the
    comparisons ``check_captures``, ``check_capture_dict``, ``check_grads``,
    ``check_shard_grads``. Models live in ``_test/models.py``.

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

import contextlib
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from _test.models import shard

if TYPE_CHECKING:
    from flex_model import FlexModel

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


# == The cases' hooks, their single-process reference, and the comparisons ==================================
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class HookSpec:
    """One hook: its type, the dotted name in the unwrapped model, and an optional edit of the full value."""

    kind: str  # forward | forward_pre | full_backward | full_backward_pre | tensor
    name: str
    fn: Optional[Edit] = None
    expected_shape: Optional[tuple] = None


def fixed(*shape: int, seed: int = 7) -> torch.Tensor:
    """A seeded random tensor scaled by ``1/sqrt(shape[-1])`` (a mixing matrix for edits)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5


def tokens(n: int = 4, t: int = 8, vocab: int = 61, seed: int = 1) -> torch.Tensor:
    """``(n, t)`` seeded token ids (the default batch of the TinyGPT cases)."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def row_slices(sizes: Sequence[int]) -> List[slice]:
    """Consecutive slices of ``sizes[r]`` rows: rank r's part of the batch."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def mix_hidden(a: torch.Tensor) -> Edit:
    """A non-elementwise edit: every hidden unit becomes a mix of all of them (the sharded dim)."""
    return lambda x: x @ a


def mix_rows(a: torch.Tensor) -> Edit:
    """A non-elementwise edit of a column-parallel weight's gradient: mixes its (split) rows."""
    return lambda g: a @ g


def five_hook_types() -> List[HookSpec]:
    """Edits on TinyGPT that are not elementwise (x @ A, rows mixed across the batch) on every hook type."""
    a, a2 = fixed(32, 32, seed=7), fixed(32, 32, seed=8)
    return [
        HookSpec("forward", "layers.0.mlp", lambda x: x @ a + x.flip(0)),
        HookSpec("forward", "layers.1.attn", lambda x: x * 2),
        HookSpec("forward_pre", "layers.1.mlp", lambda x: x @ a2),
        HookSpec("full_backward", "layers.0.attn", lambda g: g @ a + g.roll(1, 0)),
        HookSpec("full_backward_pre", "ln_f", lambda g: g * 3 - g.mean(0, keepdim=True)),
        HookSpec("tensor", "layers.1.mlp.up.weight", lambda g: g * 2 + g.flip(1)),
        HookSpec("forward", "layers.1.ln2"),  # capture only
    ]


@contextlib.contextmanager
def reference_hooks(model: nn.Module, specs: Sequence[HookSpec],
                    seen: Optional[Dict[str, List[torch.Tensor]]] = None) -> Iterator[Dict[str, List[torch.Tensor]]]:
    """While open, plain torch hooks on ``model`` do what each spec asks on the first tensor of the value;
    yields ``seen`` (a new dict unless given), where the captures go (before the edit)."""
    seen = {} if seen is None else seen
    handles = []
    for s in specs:
        def keep(x: torch.Tensor, s: HookSpec = s) -> torch.Tensor:
            seen.setdefault(s.name, []).append(x.detach().clone())
            return x if s.fn is None else s.fn(x)
        if s.kind == "tensor":
            handles.append(model.get_parameter(s.name).register_hook(keep))
            continue
        m = model.get_submodule(s.name)
        if s.kind == "forward":
            handles.append(m.register_forward_hook(lambda mod, a, out, keep=keep: (keep(out[0]),) + out[1:]
                                                   if isinstance(out, tuple) else keep(out)))
        elif s.kind == "forward_pre":
            handles.append(m.register_forward_pre_hook(lambda mod, a, keep=keep: (keep(a[0]),) + a[1:]))
        elif s.kind == "full_backward":
            handles.append(m.register_full_backward_hook(lambda mod, gi, go, keep=keep: (keep(gi[0]),) + gi[1:]))
        elif s.kind == "full_backward_pre":
            handles.append(m.register_full_backward_pre_hook(lambda mod, go, keep=keep: (keep(go[0]),) + go[1:]))
        else:
            raise ValueError(f"unknown hook kind {s.kind!r}")
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def register(flex: "FlexModel", specs: Sequence[HookSpec]) -> None:
    """Register each spec on ``flex``; its edit, if any, gets the full tensor."""
    from flex_model import HookFunction

    for s in specs:
        fn = None if s.fn is None else (lambda module, x, ctx, mods, f=s.fn: f(x))
        hook = HookFunction(s.name, expected_shape=s.expected_shape, editing_function=fn)
        getattr(flex, {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
                       "full_backward": "register_full_backward_hook",
                       "full_backward_pre": "register_full_backward_pre_hook",
                       "tensor": "register_hook"}[s.kind])(hook)


def lm_loss_sum(logits: torch.Tensor, idx: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """Next-token cross-entropy summed over the tokens (``idx`` is batch-first)."""
    if batch_dim == 1:
        logits = logits.transpose(0, 1)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1),
                                       reduction="sum")


@dataclass
class Result:
    """What the single-process reference run gave: output, captures by name, parameter gradients by name."""

    out: torch.Tensor
    seen: Dict[str, List[torch.Tensor]]
    grads: Dict[str, torch.Tensor]


def reference_run(model: nn.Module, idx: torch.Tensor, specs: Sequence[HookSpec], *, batch_dim: int = 0,
                  forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
                  backward: bool = True) -> Result:
    """One process, full batch, plain torch hooks; loss = mean token loss over the full batch."""
    forward = forward or (lambda m, x: m(x))
    with reference_hooks(model, specs) as seen:
        out = forward(model, idx)
        if backward:
            (lm_loss_sum(out, idx, batch_dim) / (idx.numel() - idx.shape[0])).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return Result(out.detach(), seen, grads)


def flex_backward(out: torch.Tensor, idx_local: torch.Tensor, n_tokens_total: int, world_size: int,
                  batch_dim: int = 0) -> None:
    """Backward of this rank's share of the global mean loss, scaled by the world size because DDP and
    FSDP average gradients over ranks: mean over ranks of the local losses = the full-batch mean loss,
    also for uneven slices."""
    (lm_loss_sum(out, idx_local, batch_dim) * world_size / n_tokens_total).backward()


def flex_step(flex: nn.Module, idx: torch.Tensor, rows: slice, ref: Result, world_size: int, *,
              forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """This rank's step on ``idx[rows]`` of a data-parallel case: the output must be the reference's rows;
    then the backward of the rank's share of the global mean loss (``flex_backward``). Returns the output."""
    forward = forward or (lambda m, x: m(x))
    out = forward(flex, idx[rows])
    torch.testing.assert_close(out.detach(), ref.out[rows])
    flex_backward(out, idx[rows], idx.numel() - idx.shape[0], world_size)
    return out


def check_capture_dict(got: Dict[str, List[torch.Tensor]], want: Dict[str, List[torch.Tensor]]) -> None:
    """The same names, as many captures each, every capture close to the reference's."""
    assert sorted(got) == sorted(want), f"captured {sorted(got)}, reference {sorted(want)}"
    for name in want:
        assert len(got[name]) == len(want[name]), f"{name}: {len(got[name])} captures, expected {len(want[name])}"
        for g, w in zip(got[name], want[name]):
            torch.testing.assert_close(g, w, msg=lambda m, name=name: f"capture {name}: {m}")


def check_captures(rank: int, output_dict: Dict[str, List[torch.Tensor]], ref: Result, specs: Sequence[HookSpec],
                   store: str = "root") -> None:
    """The owner (rank 0) — every rank with ``store="all"``, none with "none" — holds each full capture."""
    if store == "none" or (rank != 0 and store == "root"):
        assert output_dict == {}, f"rank {rank} stored {sorted(output_dict)} with store={store!r}"
        return
    assert sorted(output_dict) == sorted({s.name for s in specs})
    check_capture_dict(output_dict, ref.seen)


def check_grads(got: Dict[str, torch.Tensor], ref: Result) -> None:
    """Every gradient by name, close to the reference's."""
    assert sorted(got) == sorted(ref.grads)
    for name, g in got.items():
        torch.testing.assert_close(g, ref.grads[name], msg=lambda m, n=name: f"grad of {n}: {m}")


def check_shard_grads(par: nn.Module, ref: nn.Module, dims: Dict[str, Optional[int]], tp_rank: int,
                      tp: int) -> None:
    """Each parameter's gradient of the tensor-parallel ``par`` against its slice of ``ref``'s (``dims``:
    the split dim of each parameter, None when replicated)."""
    names = [n for n, _ in par.named_parameters()]
    assert sorted(names) == sorted(dims), names
    for name, p in par.named_parameters():
        want = shard(ref.get_parameter(name).grad, dims[name], tp_rank, tp)
        assert p.grad is not None, f"no grad on {name}"
        torch.testing.assert_close(p.grad, want, msg=lambda m, name=name: f"grad {name}: {m}")


def ddp_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The gradients of a DDP-wrapped model's parameters, by unwrapped name."""
    return {n: p.grad.detach().clone() for n, p in model.module.named_parameters() if p.grad is not None}


HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def module_state(model: nn.Module) -> dict:
    """Every torch hook dict of every module and parameter, each module's replaced ``forward`` (a framework's
    parallel plan installs one per sharded module) and plain attributes: what ``restore()`` must leave as
    found."""
    hooks = {(n, d): dict(getattr(m, d)) for n, m in model.named_modules() for d in HOOK_DICTS}
    params = {n: dict(p._backward_hooks or {}) for n, p in model.named_parameters()}
    attrs = {n: {k: v for k, v in vars(m).items() if v is None or isinstance(v, (bool, int, float, str))
                 or k == "forward"} for n, m in model.named_modules()}
    return {"hooks": hooks, "params": params, "attrs": attrs}


def captured_on_one_process(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor],
                            batch_dim: int = 0) -> Dict[str, torch.Tensor]:
    """One process, plain FlexModel captures of ``names`` over every batch, concatenated along ``batch_dim``:
    the rows of a dump in global-sample order."""
    from flex_model import FlexModel, HookFunction

    out: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, out)
    for n in names:
        flex.register_forward_hook(HookFunction(n))
    with torch.no_grad():
        for b in batches:
            flex(b)
    return {n: torch.cat(out[n], batch_dim) for n in names}


def check_framework_step(rank: int, model: nn.Module, got: Dict[str, List[torch.Tensor]], ref: "Result",
                         full: Callable[[torch.Tensor], torch.Tensor], how: str) -> None:
    """After a sharded step: every parameter's full gradient equals the reference's (then dropped), and rank 0
    (only) holds the reference's captures."""
    assert sorted(n for n, _ in model.named_parameters()) == sorted(ref.grads)
    for name, p in model.named_parameters():
        torch.testing.assert_close(full(p.grad), ref.grads[name], msg=lambda m, name=name: f"{how}: grad {name}: {m}")
        p.grad = None
    if rank == 0:
        check_capture_dict(got, ref.seen)
    else:
        assert got == {}, f"rank {rank} stored {sorted(got)}"
