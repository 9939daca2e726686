"""Process-group lifetime: start from torchrun's environment, agree on the request, fail fast.

``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts one process per
GPU. :func:`init_distributed` joins them through ``env://`` rendezvous into
an NCCL group (one GPU per ``LOCAL_RANK``) or a gloo group on CPU, with the
configured collective timeout.

Failure handling. A collective waits for every rank, so one rank that raises
would leave the others blocked until the timeout. The rendezvous store is
therefore also an error board: a rank that fails posts its message there
(:meth:`DistributedContext.report_failure`), and a watchdog thread on every
rank polls the board and ends its own process with exit status 1 as soon as
it sees a message, or when the store itself goes away (the host rank died).
So a failure anywhere ends the whole job within a fraction of a second
instead of ``timeout_s``.

A rank that hangs without raising (stopped, swapping, stuck in a driver) is
caught by heartbeats: every rank's watchdog bumps a counter of its own on the
store and watches the others' counters; one that has not moved for
``timeout_s`` seconds (by the watcher's own clock, so clocks need not agree)
fails the job with a message naming that rank, within ``timeout_s`` plus a
heartbeat interval. The watcher also kills the stalled process when it runs
on the same host: a stopped process ignores the launcher's SIGTERM, and
torchrun would otherwise wait out its own grace period before giving up.
Collectives get a timeout a little longer than ``timeout_s``, as the last
resort for a hang in which every rank is still alive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Protocol

import torch
import torch.distributed as dist


logger = logging.getLogger(__name__)

_ERROR_KEY = "supergen/error"
_LEFT_KEY = "supergen/left"
_ALIVE_KEY = "supergen/alive/{}"
_WHERE_KEY = "supergen/where/{}"
# Collectives wait this much longer than the heartbeat limit, so a stalled rank is reported by name first.
COLLECTIVE_MARGIN_S = 10.0
#: Seconds a collective (or a silent rank) may take before the job fails (``ParallelConfig.timeout_s``).
DEFAULT_TIMEOUT_S = 300.0
_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class AgreedError(ValueError):
    """A refusal every rank reaches together (so no rank needs to tell the others)."""


def launched_distributed() -> bool:
    """True when a launcher (torchrun, ``mp.spawn`` with env vars) asked for more than one process."""
    return all(k in os.environ for k in _ENV_KEYS) and int(os.environ["WORLD_SIZE"]) > 1


@dataclass
class DistributedContext:
    """This process's place in the job; ``world_size == 1`` is the plain single-process case."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 300.0
    store: dist.Store | None = None
    #: A sub-group of the job (one dimension of a parallel plan's mesh): ``rank`` and ``world_size``
    #: are then this process's place in ``group``, ``group_ranks`` the members' ranks in the job.
    group: dist.ProcessGroup | None = None
    group_ranks: tuple[int, ...] | None = None
    _watchdog: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    #: rank -> (last heartbeat count seen, monotonic time it changed), kept by the watchdog.
    _seen: dict = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the whole job (of a sub-group too: it is the one that logs)."""
        return self.global_rank == 0

    @property
    def global_rank(self) -> int:
        return self.rank if self.group_ranks is None else self.group_ranks[self.rank]

    def peer(self, rank: int) -> int:
        """The job rank of member ``rank`` of this context's group (point-to-point calls take job ranks)."""
        return rank if self.group_ranks is None else self.group_ranks[rank]

    def subgroup(self, group: dist.ProcessGroup) -> "DistributedContext":
        """A context for one sub-group of this job (no watchdog or store of its own: the job's serve it)."""
        ranks = tuple(dist.get_process_group_ranks(group))
        return DistributedContext(rank=ranks.index(self.rank), world_size=len(ranks), local_rank=self.local_rank,
                                  backend=self.backend, device=self.device, timeout_s=self.timeout_s, group=group,
                                  group_ranks=ranks)

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank}, {self.backend}, {self.device})"

    # --- agreement across ranks ----------------------------------------------
    def ensure_same(self, what: str, payload: dict) -> None:
        """Refuse to go on unless every rank was given the same ``payload``.

        Every rank all-gathers a digest of ``payload`` and raises the same
        ``ValueError`` when they differ, so all ranks stop together before
        any model work instead of deadlocking or producing a mixed video.
        """
        if not self.enabled:
            return
        text = json.dumps(payload, sort_keys=True, default=str)
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        digests = [int(t.item()) for t in gathered]
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise AgreedError(
                f"{what} differ across ranks (ranks {differ} do not match rank 0); every rank must get the same "
                "arguments: launch all processes with the same command line"
            )

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (same length on every rank), on every rank; for metrics."""
        if not self.enabled:
            return [list(values)]
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        return [[int(v) for v in part.tolist()] for part in parts]

    def reduce_ints(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``values`` (int64) summed (``op='sum'``) or maxed (``'max'``) over all ranks, on every rank.

        Integer sums do not depend on the order their terms arrive in, so a
        statistic totalled this way is bit-identical for any world size (the
        region cache's decisions rely on it).
        """
        if not self.enabled:
            return values
        total = values.to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return total.to(values.device)

    # --- failure propagation ---------------------------------------------------
    def report_failure(self, message: str) -> None:
        """Post this rank's failure so that every other rank exits at once (see the module docstring)."""
        if self.store is None:
            return
        with contextlib.suppress(Exception):
            self.store.set(_ERROR_KEY, f"rank {self.rank}: {message}")

    @property
    def heartbeat_s(self) -> float:
        """How often ranks bump and read heartbeats: often enough to report a stall soon after
        ``timeout_s``, rarely enough that many ranks do not flood the store."""
        return min(2.0, max(0.2, self.timeout_s / 20))

    def _stalled_rank(self, now: float) -> tuple[int, float] | None:
        """Bump our heartbeat, read the others'; the rank silent for longest, if over ``timeout_s``."""
        self.store.add(_ALIVE_KEY.format(self.rank), 1)
        worst = None
        for r in range(self.world_size):
            if r == self.rank:
                continue
            count = self.store.add(_ALIVE_KEY.format(r), 0)
            last = self._seen.get(r)
            if last is None or last[0] != count:
                self._seen[r] = (count, now)
            elif now - last[1] > self.timeout_s and (worst is None or now - last[1] > worst[1]):
                worst = (r, now - last[1])
        return worst

    def _kill_if_local(self, rank: int) -> None:
        """SIGKILL a stalled rank on this host (a stopped process ignores SIGTERM; see the module docstring)."""
        with contextlib.suppress(Exception):
            host, pid = self.store.get(_WHERE_KEY.format(rank)).decode().rsplit(":", 1)
            if host == socket.gethostname() and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)

    def _watch(self, poll_s: float) -> None:
        next_beat = 0.0
        while not self._stop.wait(poll_s):
            try:
                failed = self.store.check([_ERROR_KEY])
                message = self.store.get(_ERROR_KEY).decode() if failed else None
                now = time.monotonic()
                if message is None and now >= next_beat:
                    next_beat = now + self.heartbeat_s
                    stalled = self._stalled_rank(now)
                    if stalled is not None and not self._stop.is_set():
                        rank, silent = stalled
                        message = (
                            f"rank {rank} stopped responding: no heartbeat for {silent:.0f} s (timeout {self.timeout_s:g} s); "
                            "it may be stopped, out of memory or stuck; the job is ended"
                        )
                        self.report_failure(message)
                        self._kill_if_local(rank)
            except Exception as err:  # the store's host is gone: its rank died or stopped
                if self._stop.is_set():
                    return
                message = (
                    f"lost the rendezvous store ({type(err).__name__}): the process hosting it (rank 0, or "
                    "torchrun's agent) died or stopped responding"
                )
            if message is None or self._stop.is_set():
                continue
            if message.startswith(f"rank {self.rank}:"):
                return  # our own failure: the main thread is already unwinding
            sys.stderr.write(f"supergen rank {self.rank}: stopping because {message}\n")
            sys.stderr.flush()
            # The main thread may be blocked inside a collective that only the
            # timeout would end; nothing of ours needs cleaning up (outputs are
            # written by rank 0 after the last collective, atomically).
            os._exit(1)

    def start_watchdog(self, poll_s: float = 0.2) -> None:
        if self.store is None or self._watchdog is not None:
            return
        with contextlib.suppress(Exception):
            self.store.set(_WHERE_KEY.format(self.rank), f"{socket.gethostname()}:{os.getpid()}")
        self._watchdog = threading.Thread(target=self._watch, args=(poll_s,), name="supergen-watchdog", daemon=True)
        self._watchdog.start()

    def close(self, ok: bool = True) -> None:
        """Leave the job: after a successful run, wait for every rank first so no rank mistakes an exit for a failure."""
        if not self.enabled:
            return
        if ok:
            dist.barrier()
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        if ok:
            dist.destroy_process_group()
            self._leave_together()

    def _leave_together(self, timeout_s: float = 10.0) -> None:
        """Stay until every rank has left its process group (bounded by ``timeout_s``).

        A rank that exits while a peer is still tearing down gloo's connections
        can abort that peer after a successful run (seen once in CI: rank 1 of
        3 died with SIGABRT after the job had finished); counting departures in
        the rendezvous store keeps every process alive until all have left.
        """
        if self.store is None:
            return
        with contextlib.suppress(Exception):
            self.store.add(_LEFT_KEY, 1)
            deadline = time.monotonic() + timeout_s
            while self.store.add(_LEFT_KEY, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(0.02)


class RuntimeSettings(Protocol):
    """What joining a job reads from its config (``supergen.ParallelConfig`` has both)."""

    backend: str
    timeout_s: float


@dataclass(frozen=True)
class _Defaults:
    backend: str = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S


def _pick_backend(config: RuntimeSettings) -> str:
    if config.backend != "auto":
        if config.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA, which this process does not see; use --backend gloo")
        return config.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(config: RuntimeSettings | None = None) -> DistributedContext:
    """Join the job described by the launcher's environment, or return a single-process context.

    NCCL binds one GPU per ``LOCAL_RANK``; gloo runs on CPU. Collectives time
    out after ``config.timeout_s`` seconds (``backend``: auto, nccl or gloo).
    """
    config = config or _Defaults()
    if not launched_distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistributedContext(device=device, timeout_s=config.timeout_s)
    backend = _pick_backend(config)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; start at most "
                "one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=config.timeout_s)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout + timedelta(seconds=COLLECTIVE_MARGIN_S))
    ctx = DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=device,
        timeout_s=config.timeout_s,
        store=store,
    )
    ctx.start_watchdog()
    logger.info("joined %s, collective timeout %.0fs", ctx.describe(), config.timeout_s)
    return ctx


@contextlib.contextmanager
def distributed_session(config: RuntimeSettings | None = None) -> Iterator[DistributedContext]:
    """``with distributed_session(cfg) as ctx:`` joins the job and leaves it cleanly, or fails every rank fast."""
    ctx = init_distributed(config)
    try:
        yield ctx
    except BaseException as err:
        if not isinstance(err, AgreedError):
            ctx.report_failure(f"{type(err).__name__}: {err}")
        ctx.close(ok=False)
        raise
    ctx.close(ok=True)
