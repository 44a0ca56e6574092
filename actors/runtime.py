"""A pooled actor runtime on pykka's own Actor hooks.

pykka's `ThreadingActor` gives every actor a thread; one process cannot hold 100k users that
way (DESIGN.md section 5). `PooledActor` keeps pykka's `Actor` (refs, proxies, `on_start`,
`on_receive`, `on_stop`, futures), and replaces the three hooks:

- `_create_actor_inbox`: a `Mailbox` (a lock-free queue and a try-lock "scheduled" flag);
- `_create_future`: pykka's `ThreadingFuture` (asks block the asking thread only);
- `_start_actor_loop`: schedule the actor on a `Dispatcher` instead of starting a thread.

A `Dispatcher` runs scheduled actors on a few worker threads. An actor is scheduled at most once
at a time, so its messages are handled one after another, in order, by one thread at a time:
the actor model's guarantee, without a thread per actor. Each turn handles at most `throughput`
messages (as in Akka's dispatchers) so that a busy actor cannot starve the others.

These hooks are internal to pykka: the version is pinned in pyproject.toml.
"""

from __future__ import annotations

import gc
import itertools
import queue
import sys
import threading
from typing import Any, Self

import pykka
import structlog
from pykka import ActorDeadError, ActorRef, messages
from pykka._envelope import Envelope
from pykka._threading import ThreadingFuture

log = structlog.get_logger(__name__)


class Mailbox:
    """pykka's ActorInbox protocol (put/get/empty), safe for many senders and no lock.

    Messages go to a `queue.SimpleQueue` (its `put` is atomic and never blocks). Whether the
    actor is scheduled is a non-blocking try-lock: acquiring it is the compare-and-set that
    Akka's mailboxes do on their status word. A contended `threading.Lock` would release the
    GIL while it waits, and getting the GIL back can take a whole switch interval: measured,
    that convoy cost a third of the ingest path.
    """

    __slots__ = ("_queue", "_scheduled", "actor", "dispatcher", "touched")

    def __init__(self, dispatcher: Dispatcher, actor: PooledActor) -> None:
        self.dispatcher = dispatcher
        self.actor = actor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._scheduled = threading.Lock()  # held while the actor is in the ready queue or running
        self.touched = 0.0  # monotonic time of the last message, for idle passivation

    def put(self, envelope: Envelope[Any], /) -> None:
        self._queue.put(envelope)
        if self._scheduled.acquire(False):
            self.dispatcher._ready.put(self)

    def get(self) -> Envelope[Any]:
        return self._queue.get_nowait()

    def empty(self) -> bool:
        return self._queue.empty()


class Dispatcher:
    """Worker threads that run scheduled actors' mailboxes."""

    def __init__(self, workers: int = 1, throughput: int = 64, name: str = "microtune") -> None:
        self.throughput = throughput
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        ready = self._ready
        while True:
            mailbox = ready.get()
            if mailbox is None:
                return
            try:
                mailbox.actor._run_turn(self.throughput)
            except BaseException:  # never lose a worker thread
                log.exception("dispatcher.turn_failed", actor=str(mailbox.actor))
            # Unschedule, then look again: a message put after the turn's last look but
            # before the release found the flag taken and left the scheduling to us.
            mailbox._scheduled.release()
            if not mailbox._queue.empty() and mailbox._scheduled.acquire(False):
                ready.put(mailbox)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers once the actors scheduled before this call have run."""
        for _ in self.threads:
            self._ready.put(None)
        for thread in self.threads:
            thread.join(timeout)


class StopFlag:
    """The part of `threading.Event` that pykka uses for `actor_stopped`, in 48 bytes."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True


class PooledActor(pykka.Actor):
    """A pykka actor that runs on a `Dispatcher`'s threads instead of its own.

    Start it with `MyActor.start(dispatcher, ...)`: the dispatcher is the first argument.
    It is not put in pykka's global `ActorRegistry` (a list: removing one of 100k actors
    costs milliseconds); the `Directory` keeps track of user actors.
    """

    _dispatcher: Dispatcher
    _started: bool

    def __init__(self, dispatcher: Dispatcher, *_args: Any, **_kwargs: Any) -> None:
        self._dispatcher = dispatcher
        self._started = False
        # pykka.Actor.__init__'s fields, without its per-actor costs (activating a user was
        # 17% of ingest): a counter instead of a uuid4 for the urn, and a `StopFlag` instead
        # of a threading.Event (pykka only calls is_set()/set() on it; the Event costs 1.2 KB
        # and a lock)
        self.actor_urn = f"urn:microtune:actor:{next(_URNS)}"
        self.actor_inbox = self._create_actor_inbox()
        self.actor_stopped = StopFlag()  # type: ignore[assignment]
        self._actor_ref = ActorRef(self)

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> ActorRef[Self]:
        obj = cls(*args, **kwargs)
        obj._start_actor_loop()
        return obj.actor_ref

    def _create_actor_inbox(self) -> Mailbox:  # type: ignore[override]
        return Mailbox(self._dispatcher, self)

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return ThreadingFuture()

    def _start_actor_loop(self) -> None:
        # on_start must run before any message: a turn runs it first. Scheduling happens by
        # putting a no-op wake-up in the mailbox if nothing else has been sent yet.
        self.actor_inbox.put(Envelope(_WAKE))

    @property
    def mailbox(self) -> Mailbox:
        return self.actor_inbox  # type: ignore[return-value]

    def _run_turn(self, limit: int) -> None:
        """Handle up to `limit` messages; called by one dispatcher thread at a time."""
        if not self._started:
            self._started = True
            self._actor_loop_setup()
        inbox = self.actor_inbox
        for _ in range(limit):
            if self.actor_stopped.is_set():
                self._actor_loop_teardown()
                return
            if inbox.empty():
                return
            envelope = inbox.get()
            if envelope.message is _WAKE:
                continue
            self._handle_envelope(envelope)
        if self.actor_stopped.is_set():
            self._actor_loop_teardown()

    def _handle_envelope(self, envelope: Envelope[Any]) -> None:
        # As pykka's _actor_loop_running does for one envelope.
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())

    def _actor_loop_teardown(self) -> None:
        inbox = self.actor_inbox
        while not inbox.empty():
            envelope = inbox.get()
            if envelope.reply_to is None:
                continue
            if isinstance(envelope.message, messages._ActorStop):
                envelope.reply_to.set(None)
            else:
                envelope.reply_to.set_exception(
                    exc_info=(
                        ActorDeadError,
                        ActorDeadError(f"{self.actor_ref} stopped before handling the message"),
                        None,
                    )
                )


_WAKE = object()
_URNS = itertools.count(1)  # next() on a count is atomic under the GIL


GC_THRESHOLD0 = 50_000  # allocations between young collections (CPython's default: 700)


def tune_gc(threshold0: int = GC_THRESHOLD0) -> None:
    """Collect garbage less often in a process that hosts many actors.

    Every live user holds a few long-lived containers (its state, hygiene buffers), and
    CPython's default thresholds make the collector re-scan them again and again: measured
    (scripts/bench_core.py, 100k users) 35-50% of ingest CPU. Collections still happen, so
    cycles are still freed; only less often. Process-wide: `Microtune(tune_gc=False)` leaves
    the host application's settings alone.
    """
    _, gen1, gen2 = gc.get_threshold()
    if gc.get_threshold()[0] < threshold0:
        gc.set_threshold(threshold0, max(gen1, 20), max(gen2, 100))
        log.debug("gc.tuned", threshold=gc.get_threshold())
