"""The bridge between asyncio request handlers and the Engine, which runs `step()` on its own thread.

One thread owns the engine: it alone calls add_request, abort and step. Handlers `submit` a request's
choices (already checked by Engine.check_request, off the event loop) and read their `StepOutput`s from
an asyncio queue; `submit` and `abort` only put work in a box under a short lock and never wait for a
step (waiting for the step's lock blocked the event loop for a step per call, and threading.Lock is not
fair). Between steps the engine thread applies the aborts and feeds the engine.

Fairness: `max_pending` counts HTTP requests, not choices, so a request with many prompts takes one
slot; and the thread feeds the engine at most max_num_seqs choices at a time, one from each request in
turn (round robin), so a request that arrives behind a 400-choice one gets the next free sequence slot
instead of waiting for all 400.

Faults: a step that raises fails the requests in it (the scheduler's running ones), with a
StepOutput whose `error` says why, logs one line, and the thread goes on serving. `healthy()` is false
only while the thread is dead or the last few steps all failed.

Threads: torch's intra-op thread count is per calling thread under OpenMP; the engine thread sets it to
the process's count (torch.get_num_threads() where the AsyncEngine is built) before its first step. Each
thread that runs a parallel region also gets its own OpenMP team, and once libgomp manages more threads
than there are CPUs it throttles every barrier's spin-wait to ~100 iterations before sleeping on a futex
(its env.c: gomp_throttled_spin_count_var). The loading thread's idle team plus the engine thread's made
3 threads on a 2-core machine, so each of the ~200 parallel regions of a decode step paid a sleep and a
wake-up (engine B=1 step 85 vs 74 ms, engine thread 95% busy vs 100%). So the thread that builds the
AsyncEngine hands its idle team back (omp_pause_resource_all) before the engine thread starts; other
threads that run parallel torch ops later re-create a team and bring the throttling back (the server's
worker threads should keep torch.set_num_threads(1)).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import threading
from collections import OrderedDict, deque

import torch

from qwen2.engine.engine import Engine, StepOutput

log = logging.getLogger("qwen2.serve")

FAILED_STEPS_UNHEALTHY = 3  # consecutive failed steps after which /health says 503


class Overloaded(Exception):
    pass


def release_openmp_team() -> bool:
    """Hand the calling thread's idle OpenMP worker threads back to libgomp (omp_pause_resource_all, OpenMP
    5.0), so that they no longer count against the CPUs (see the module docstring). Only the libgomp
    already loaded (torch's) is used; False where there is none or it fails. The team is re-created if
    this thread runs a parallel region again."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and line.rstrip().endswith(".so.1")}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(1) == 0  # omp_pause_soft
    return False


class AsyncEngine:
    """Runs `engine.step()` on a background thread; `max_pending` bounds the HTTP requests held at once."""

    def __init__(self, engine: Engine, *, max_pending: int = 256):
        self.engine, self.max_pending = engine, max_pending
        self.feed = engine.scheduler.max_num_seqs  # choices in the engine at once; the rest wait here
        self.num_threads = torch.get_num_threads()
        self._lock = threading.Lock()  # guards everything below; never held across a step
        self._waiting: OrderedDict[int, deque] = OrderedDict()  # request -> its choices not yet fed
        self._groups: dict[int, set[str]] = {}  # open requests -> their unfinished choice ids
        self._group_of: dict[str, int] = {}
        self._aborts: list[str] = []
        self._abort_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids, self._gids = itertools.count(), itertools.count()
        self._work = threading.Event()
        self._stop = False
        self.failed_steps = 0  # consecutive
        self.last_error: str | None = None
        release_openmp_team()  # this thread's team (loading the model) would halve the engine's spin-waits
        self._thread = threading.Thread(target=self._loop, name="qwen2-engine", daemon=True)
        self._thread.start()

    def check(self, prompt: list[int], params) -> tuple[list[int], object]:
        """Engine.check_request (thread-safe: it reads only what never changes)."""
        return self.engine.check_request(prompt, params)

    def submit(
        self, items: list[tuple[list[int], dict]], queue: asyncio.Queue, loop: asyncio.AbstractEventLoop
    ) -> list[str]:
        """Queue one HTTP request's choices, each (prompt, Engine.add_request kwargs) already checked;
        their outputs go to `queue` on `loop`. Returns their ids. Raises Overloaded when `max_pending`
        requests are held."""
        with self._lock:
            if len(self._groups) >= self.max_pending:
                raise Overloaded(f"the server holds {self.max_pending} requests already; retry later")
            gid = next(self._gids)
            rids = [f"srv-{next(self._ids)}" for _ in items]
            self._waiting[gid] = deque((rid, p, kw) for rid, (p, kw) in zip(rids, items))
            self._groups[gid] = set(rids)
            for rid in rids:
                self._group_of[rid] = gid
                self._queues[rid] = (loop, queue)
            self._work.set()
        return rids

    def abort(self, request_ids: list[str]) -> asyncio.Future | None:
        """Stop requests (finished ones: a no-op); the engine thread frees their blocks before its next
        step, so the event loop never waits for a step. Called from a running loop, returns a future that
        is done once they are free (await it to answer only after)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        done = loop.create_future() if loop is not None else None
        with self._lock:
            for rid in request_ids:
                if self._forget(rid):
                    self._aborts.append(rid)
            if done is not None:
                self._abort_waiters.append((loop, done))
            self._work.set()
        return done

    def _forget(self, rid: str) -> bool:
        """Drop a choice from the books (lock held); False when it was not there."""
        self._queues.pop(rid, None)
        gid = self._group_of.pop(rid, None)
        if gid is None:
            return False
        left = self._groups[gid]
        left.discard(rid)
        waiting = self._waiting.get(gid)
        if waiting is not None:
            waiting_ids = [r for r in waiting if r[0] != rid]
            if len(waiting_ids) != len(waiting):
                self._waiting[gid] = deque(waiting_ids)
            if not self._waiting[gid]:
                del self._waiting[gid]
        if not left:
            del self._groups[gid]
        return True

    def alive(self) -> bool:
        return self._thread.is_alive()

    def healthy(self) -> bool:
        return self.alive() and self.failed_steps < FAILED_STEPS_UNHEALTHY

    def pending(self) -> int:
        """HTTP requests held (queued or generating)."""
        return len(self._groups)

    def close(self) -> None:
        self._stop = True
        self._work.set()
        self._thread.join(timeout=10)

    def _take(self) -> list[tuple[str, list[int], dict]]:
        """Choices to feed the engine now, round robin over requests (lock held)."""
        room, out = self.feed - len(self.engine.seqs), []
        while room > 0 and self._waiting:
            gid, waiting = next(iter(self._waiting.items()))
            out.append(waiting.popleft())
            room -= 1
            if waiting:
                self._waiting.move_to_end(gid)
            else:
                del self._waiting[gid]
        return out

    def _step(self) -> list[StepOutput]:
        try:
            outs = self.engine.step()
        except Exception as e:  # a bug or a fault, not bad input: fail the requests in the step, go on
            self.failed_steps += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            # The step's batch came from the running list; if it failed before admitting any, fail all
            # (a step that fails with nothing to drop would fail again at once, for ever).
            failed = [s.request_id for s in self.engine.scheduler.running] or list(self.engine.seqs)
            log.error("engine step failed (%s); failing the %d requests in it", self.last_error, len(failed))
            log.debug("engine step failure", exc_info=True)
            for rid in failed:
                self.engine.abort(rid)
            return [
                StepOutput(rid, [], finished=True, finish_reason="error", error=self.last_error)
                for rid in failed
            ]
        if outs:
            self.failed_steps = 0
        return outs

    def _loop(self) -> None:
        torch.set_num_threads(self.num_threads)  # per thread under OpenMP: this one had the default
        while True:
            self._work.wait()
            if self._stop:
                return
            with self._lock:
                aborts, self._aborts = self._aborts, []
                waiters, self._abort_waiters = self._abort_waiters, []
                arrived = self._take()
            for rid in aborts:
                self.engine.abort(rid)
            for loop, fut in waiters:
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # its loop has closed
                    pass
            for rid, prompt, kwargs in arrived:  # checked at submit: this does not fail on the request
                self.engine.add_request(prompt, request_id=rid, **kwargs)
            outs = self._step()
            with self._lock:
                for o in outs:
                    entry = self._queues.get(o.request_id)
                    if o.finished:
                        self._forget(o.request_id)
                    if entry is None:
                        continue
                    try:
                        entry[0].call_soon_threadsafe(entry[1].put_nowait, o)
                    except RuntimeError:  # its event loop has closed: nobody is listening
                        if not o.finished:
                            self._forget(o.request_id)
                            self._aborts.append(o.request_id)
                # With submit's set() under the same lock, no wake-up is lost.
                idle = not (self._waiting or self._aborts or self._abort_waiters)
                if idle and not self.engine.has_unfinished():
                    self._work.clear()


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
