"""Where a build's passes run: in this process (the default) or on a Dask cluster.

Each pass of the joint/share build over the adapters is a map from a shard of
adapters (a slice of an :class:`~engine.subspace.common.AdapterSource`: paths, or
adapters in memory) to sufficient statistics, an associative combine of two
partial results of neighbouring shards, and a finalize on the caller's side. An
:class:`Executor` runs the map and the combine; the build does the rest.

:class:`InProcessExecutor` maps the shards one after the other here (one shard:
today's build, step for step). :class:`DaskExecutor` submits one task per shard
to a ``dask.distributed`` cluster (a ``LocalCluster`` by default, or a running
scheduler's address), as one chain of consecutive shards per worker (each link
combines its shard into the chain's running result, so that a worker holds one
partial result); workers read their shard's tensors from the paths themselves,
the chains' results are combined on the workers in a tree (neighbours only, so
that per-task lists keep the task order) and only the final, small result comes
back. A combine may reuse its left input (each partial is read by one combine).
``dask`` is imported only when a Dask executor is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from .errors import JobCancelled, VloraError
from .memory import return_freed_memory, trim

#: Names accepted for ``executor=``.
EXECUTORS = ("inprocess", "dask")
#: The extra that brings Dask in.
DASK_HINT = "pip install 'vlora-tui[dask]'"

#: ``fn(shard, shared, tick)``: the map. ``tick`` is the per-adapter progress/cancel ticker, or ``None`` off-process.
MapFn = Callable[[Any, Any, Any], Any]
#: ``combine(left, right)``: two partial results of neighbouring shards, left first.
CombineFn = Callable[[Any, Any], Any]


class MissingDependencyError(VloraError, ValueError):
    """An optional dependency (an extra) is not installed: a request the installation cannot serve (exit 2)."""

    title = "missing dependency"


@runtime_checkable
class Executor(Protocol):
    """Runs the map of a pass over shards and combines the partial results.

    ``map_reduce`` returns ``combine`` folded over ``fn(shard_j, shared, tick)`` in
    shard order (any bracketing: ``combine`` is associative). ``on_done(j)`` is
    called once shard ``j`` is mapped where ``tick`` is not handed to ``fn``;
    ``cancel.is_set()`` stops the work and raises :class:`~engine.errors.JobCancelled`.
    """

    name: str

    def shard_count(self, n: int) -> int:
        """How many shards to cut ``n`` adapters into."""
        ...

    def map_reduce(self, fn: MapFn, shards: Sequence[Any], combine: CombineFn, *, shared: Any = None,
                   tick: Any = None, on_done: Callable[[int], None] | None = None, cancel: Any = None) -> Any:
        ...

    def close(self) -> None:
        ...


class InProcessExecutor:
    """The shards one after the other in this process; ``tick`` reaches the map (progress per adapter)."""

    name = "inprocess"

    def __init__(self, shards: int = 1) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.shards = shards

    def shard_count(self, n: int) -> int:
        return max(1, min(n, self.shards))

    def map_reduce(self, fn: MapFn, shards: Sequence[Any], combine: CombineFn, *, shared: Any = None,
                   tick: Any = None, on_done: Callable[[int], None] | None = None, cancel: Any = None) -> Any:
        acc: Any = None
        for j, s in enumerate(shards):
            if cancel is not None and cancel.is_set():
                raise JobCancelled("cancelled")
            part = fn(s, shared, tick)
            acc = part if j == 0 else combine(acc, part)
        return acc

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"InProcessExecutor(shards={self.shards})"


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise MissingDependencyError(f"executor 'dask' needs dask.distributed, which is not installed: {DASK_HINT}") from exc
    return distributed


class DaskExecutor:
    """The shards as tasks on a ``dask.distributed`` cluster.

    Args:
        scheduler: ``tcp://HOST:PORT`` of a running scheduler; ``None`` starts a
            ``LocalCluster`` (closed with the executor).
        n_workers: Workers of the ``LocalCluster`` (default: the CPU cores), one thread each.
        client: An existing ``distributed.Client`` to use (left open by :meth:`close`).
        shards_per_worker: Shards per worker and pass: the links of its chain (more: finer progress; a worker
            holds one partial result however many).
        processes: ``LocalCluster(processes=…)``; threads in this process with ``False``.
    """

    name = "dask"

    def __init__(self, scheduler: str | None = None, *, n_workers: int | None = None, client: Any = None,
                 shards_per_worker: int = 4, processes: bool = True, poll_s: float = 0.1) -> None:
        distributed = _import_distributed()
        self._distributed = distributed
        self._cluster = None
        self._own_client = client is None
        self.poll_s = poll_s
        self.shards_per_worker = max(1, int(shards_per_worker))
        if client is not None:
            self.client = client
        elif scheduler:
            try:
                self.client = distributed.Client(scheduler, timeout="10s")
            except OSError as exc:
                raise VloraError(f"scheduler {scheduler}: cannot connect ({exc})", title="dask scheduler") from exc
        else:
            import multiprocessing

            workers = n_workers or os.cpu_count() or 1
            # a daemonic process (the TUI's job process) may not start worker processes: threads then
            processes = processes and not multiprocessing.current_process().daemon
            self._cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                                                     dashboard_address=None)
            self.client = distributed.Client(self._cluster)

    def _addresses(self) -> list[str]:
        """Every worker's address (some dask releases list 5 by default: ask for all)."""
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:  # releases without the argument list every worker
            info = self.client.scheduler_info()
        return sorted(info.get("workers", {}))

    def workers(self) -> int:
        return max(1, len(self._addresses()))

    def shard_count(self, n: int) -> int:
        return max(1, min(n, self.workers() * self.shards_per_worker))

    def map_reduce(self, fn: MapFn, shards: Sequence[Any], combine: CombineFn, *, shared: Any = None,
                   tick: Any = None, on_done: Callable[[int], None] | None = None, cancel: Any = None) -> Any:
        """Map every shard on the cluster, a chain of consecutive shards per worker; combine the chains; gather one result.

        A chain's links run one after the other where its running result lives: each
        link maps one shard and combines it into that result, so a worker holds one
        partial result and the shard it reads, not one partial per shard (for the range
        sketch, a d×K matrix per module). The chains' results are combined in a tree of
        neighbours (task order kept) on the cluster; only the last one travels here.
        """
        if not shards:
            return None
        dist = self._distributed
        client = self.client
        # sent once to every worker (not with each task): the bases, spaces and parameters of the pass
        shared_f = client.scatter([shared], broadcast=True, hash=False)[0] if shared is not None else None
        n = len(shards)
        addrs = self._addresses()
        live: dict[Any, tuple[int, int, bool]] = {}  # future → (first shard, end shard, is a chain's last link)
        links: dict[Any, int] = {}  # every link → its shard (progress, and the adapter a failure names)
        for c, (lo, hi) in enumerate(_chains(n, len(addrs))):
            where = {"workers": [addrs[c % len(addrs)]], "allow_other_workers": True} if addrs else {}
            acc = None
            for j in range(lo, hi):
                acc = (client.submit(_first_link, fn, shards[j], shared_f, pure=False, **where) if acc is None else
                       client.submit(_next_link, fn, combine, acc, shards[j], shared_f, pure=False, **where))
                links[acc] = j
            live[acc] = (lo, hi, True)
        by_start: dict[int, tuple[int, Any]] = {}  # finished partials: first shard → (end shard, future)
        by_end: dict[int, int] = {}
        inputs: dict[Any, tuple[Any, Any]] = {}  # combine → the partials it reads
        pending = set(links)
        try:
            while pending or not (0 in by_start and by_start[0][0] == n):
                if cancel is not None and cancel.is_set():
                    raise JobCancelled("cancelled")
                try:  # poll, so that cancel is seen while the shards run
                    done, pending = dist.wait(list(pending), timeout=self.poll_s, return_when="FIRST_COMPLETED")
                except TimeoutError:  # nothing finished in poll_s
                    continue
                # in shard order: a failed link fails the later links of its chain with the same error
                for f in sorted(done, key=lambda f: links.get(f, n)):
                    j = links.pop(f, None)
                    if f.status != "finished":
                        raise _worker_error(f, shards[j] if j is not None else None)
                    if j is not None and on_done is not None:
                        on_done(j)
                    if f not in live:  # a link within a chain: the next link holds it
                        continue
                    lo, hi, _ = live[f]
                    for consumed in inputs.pop(f, ()):
                        del live[consumed]
                    # a finished neighbour on either side: combine with it on the cluster, in order
                    if hi in by_start:
                        hi2, g = by_start.pop(hi)
                        del by_end[hi2]
                        c = client.submit(combine, f, g, pure=False)
                        live[c] = (lo, hi2, False)
                        pending.add(c)
                        inputs[c] = (f, g)  # held until the combine ran, then dropped from the cluster
                    elif lo in by_end:
                        lo0 = by_end.pop(lo)
                        _, g = by_start.pop(lo0)
                        c = client.submit(combine, g, f, pure=False)
                        live[c] = (lo0, hi, False)
                        pending.add(c)
                        inputs[c] = (g, f)
                    else:
                        by_start[lo] = (hi, f)
                        by_end[hi] = lo
            return by_start[0][1].result()
        except BaseException:
            client.cancel(list(live) + list(links))
            raise
        finally:
            live.clear()
            links.clear()
            inputs.clear()

    def close(self) -> None:
        if self._own_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DaskExecutor({self.client.scheduler.address if self.client.scheduler else '?'})"


def _chains(n: int, workers: int) -> list[tuple[int, int]]:
    """``n`` shards cut into at most ``workers`` runs of consecutive shards, as even as can be."""
    c = max(1, min(n, workers))
    return [(n * i // c, n * (i + 1) // c) for i in range(c)]


def _first_link(fn: MapFn, shard: Any, shared: Any) -> Any:
    """A chain's first link on a worker: the map of its shard."""
    return_freed_memory()
    try:
        return fn(shard, shared, None)
    finally:
        trim()


def _next_link(fn: MapFn, combine: CombineFn, acc: Any, shard: Any, shared: Any) -> Any:
    """A later link: the map of its shard, combined into the chain's running result (read by this link only)."""
    return_freed_memory()
    try:
        return combine(acc, fn(shard, shared, None))
    finally:
        trim()


def _worker_error(future: Any, shard: Any) -> BaseException:
    """The worker's exception as raised (engine errors name the adapter), else one naming the shard's adapters."""
    try:
        exc = future.exception()
    except BaseException as e:  # cancelled, or the worker died
        exc = e
    if isinstance(exc, (VloraError, ValueError)):
        return exc
    where = ""
    if shard is not None and len(shard):
        where = f" on {shard.label(0)}" + (f" … {shard.label(len(shard) - 1)}" if len(shard) > 1 else "")
    return VloraError(f"dask worker failed{where}: {type(exc).__name__}: {exc}", title="dask worker failed")


def make_executor(executor: str | Executor | None = None, scheduler: str | None = None, *,
                  n_workers: int | None = None) -> tuple[Executor, bool]:
    """``(executor, owned)`` for ``executor=`` ``"inprocess"``/``"dask"``/an :class:`Executor`; ``owned``: close it after.

    Raises:
        ValueError: an unknown name, or ``scheduler`` without ``"dask"``.
        MissingDependencyError: ``"dask"`` without ``dask.distributed`` installed.
    """
    if executor is None or executor == "inprocess":
        if scheduler:
            raise ValueError(f"scheduler={scheduler!r} needs executor='dask'")
        return InProcessExecutor(), True
    if executor == "dask":
        return DaskExecutor(scheduler, n_workers=n_workers), True
    if isinstance(executor, str):
        raise ValueError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if not isinstance(executor, Executor):
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)} or an Executor, got {type(executor).__name__}")
    return executor, False
