"""The bridge between asyncio request handlers and the Engine, which runs `step()` on its own thread.

One thread owns the model. Handlers `submit` a request and read its `StepOutput`s from an asyncio
queue; the engine thread steps while there is work and sleeps on an event when there is none.
`submit` never waits for a step: it checks the request (Engine.check_request), puts it in an inbox and
returns; the engine thread moves the inbox into the engine between steps, so requests that arrive
during a step join the next one together. (Taking the step's lock in `submit` blocked the event loop
for a step per request, and threading.Lock is not fair: under load the engine thread re-took it
first, and 16 clients waited ~20 s for their first token.) A lock serialises the step with `abort`,
so `abort` returns with the request's blocks already free (after at most the step in flight).
Overload is refused at `submit`, at once, instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading

from qwen2.engine.engine import Engine, StepOutput

log = logging.getLogger("qwen2.serve")


class Overloaded(Exception):
    pass


class AsyncEngine:
    """Runs `engine.step()` on a background thread; `max_pending` bounds the requests held at once."""

    def __init__(self, engine: Engine, *, max_pending: int = 256):
        self.engine, self.max_pending = engine, max_pending
        self._lock = threading.Lock()  # held by a step; abort takes it
        self._inbox: list[tuple[str, list[int], dict]] = []  # checked requests not yet in the engine
        self._inbox_lock = threading.Lock()  # guards _inbox; never held across a step
        self._ids = itertools.count()
        self._work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="qwen2-engine", daemon=True)
        self._thread.start()

    def submit(
        self, prompt: list[int], queue: asyncio.Queue | None = None, **kwargs
    ) -> tuple[str, asyncio.Queue]:
        """Queue one request (Engine.add_request's arguments); returns its id and the queue its outputs
        go to (`queue`, which several requests may share, or a new one). Raises Overloaded when
        `max_pending` requests are in flight, ValueError for a request the engine refuses."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        prompt, params = self.engine.check_request(prompt, kwargs.pop("params", None))
        with self._inbox_lock:
            if self.pending() >= self.max_pending:
                raise Overloaded(f"the server holds {self.max_pending} requests already; retry later")
            rid = f"srv-{next(self._ids)}"
            self._queues[rid] = (loop, q)
            self._inbox.append((rid, prompt, dict(kwargs, params=params)))
            self._work.set()
        return rid, q

    def abort(self, request_id: str) -> None:
        """Stop a request and free its cache blocks (a no-op when it has finished)."""
        with self._inbox_lock:
            self._queues.pop(request_id, None)
            self._inbox = [r for r in self._inbox if r[0] != request_id]
        with self._lock:  # if the engine thread took it from the inbox, it is in the engine now
            self.engine.abort(request_id)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> int:
        return len(self.engine.seqs) + len(self._inbox)

    def close(self) -> None:
        self._stop = True
        self._work.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            self._work.wait()
            if self._stop:
                return
            with self._lock:
                with self._inbox_lock:
                    arrived, self._inbox = self._inbox, []
                for rid, prompt, kwargs in arrived:  # checked at submit: this does not fail on the request
                    self.engine.add_request(prompt, request_id=rid, **kwargs)
                try:
                    outs = self.engine.step()
                except BaseException as e:  # a bug, not bad input: fail every request in flight, keep serving
                    log.exception("engine step failed")
                    self.error = e
                    outs = [
                        StepOutput(rid, [], finished=True, finish_reason="error")
                        for rid in list(self.engine.seqs)
                    ]
                    for o in outs:
                        self.engine.abort(o.request_id)
                for o in outs:
                    entry = self._queues.get(o.request_id)
                    if entry is not None:
                        if o.finished:
                            del self._queues[o.request_id]
                        try:
                            entry[0].call_soon_threadsafe(entry[1].put_nowait, o)
                        except RuntimeError:  # its event loop has closed: nobody is listening
                            self.engine.abort(o.request_id)
                with self._inbox_lock:  # with submit's set() under the same lock, no wake-up is lost
                    if not self._inbox and not self.engine.has_unfinished():
                        self._work.clear()
