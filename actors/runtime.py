"""A pooled actor runtime on pykka's own Actor hooks.

pykka's `ThreadingActor` gives every actor a thread; one process cannot hold 100k users that
way (DESIGN.md section 5). `PooledActor` keeps pykka's `Actor` (refs, proxies, `on_start`,
`on_receive`, `on_stop`, futures), and replaces the three hooks:

- `_create_actor_inbox`: a `Mailbox`, a deque created only while messages wait, so an idle
  actor costs no queue;
- `_create_future`: pykka's `ThreadingFuture` (asks block the asking thread only);
- `_start_actor_loop`: schedule the actor on a `Dispatcher` instead of starting a thread.

A `Dispatcher` runs scheduled actors on a few worker threads. An actor is scheduled at most once
at a time, so its messages are handled one after another, in order, by one thread at a time:
the actor model's guarantee, without a thread per actor. Each turn handles at most `throughput`
messages (as in Akka's dispatchers) so that a busy actor cannot starve the others.

These hooks are internal to pykka: the version is pinned in pyproject.toml.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from typing import Any, Self

import pykka
import structlog
from pykka import ActorDeadError, ActorRef, messages
from pykka._envelope import Envelope
from pykka._threading import ThreadingFuture

log = structlog.get_logger(__name__)


class Mailbox:
    """pykka's ActorInbox protocol (put/get/empty) over a lazily created deque."""

    __slots__ = ("_queue", "actor", "dispatcher", "scheduled", "touched")

    def __init__(self, dispatcher: Dispatcher, actor: PooledActor) -> None:
        self.dispatcher = dispatcher
        self.actor = actor
        self._queue: deque | None = None
        self.scheduled = False
        self.touched = 0.0  # monotonic time of the last message, for idle passivation

    def put(self, envelope: Envelope[Any], /) -> None:
        self.dispatcher._enqueue(self, envelope)

    def get(self) -> Envelope[Any]:
        assert self._queue is not None
        return self._queue.popleft()

    def empty(self) -> bool:
        return not self._queue


class Dispatcher:
    """Worker threads that run scheduled actors' mailboxes."""

    def __init__(self, workers: int = 2, throughput: int = 64, name: str = "microtune") -> None:
        self.throughput = throughput
        self._lock = threading.Lock()
        self._ready: deque[Mailbox] = deque()
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _enqueue(self, mailbox: Mailbox, envelope: Envelope[Any]) -> None:
        with self._lock:
            if mailbox._queue is None:
                mailbox._queue = deque()
            mailbox._queue.append(envelope)
            if not mailbox.scheduled:
                mailbox.scheduled = True
                self._ready.append(mailbox)
                self._wakeup.notify()

    def _work(self) -> None:
        ready = self._ready
        while True:
            with self._lock:
                while not ready:
                    if self._stopping:
                        return
                    self._wakeup.wait()
                mailbox = ready.popleft()
            try:
                mailbox.actor._run_turn(self.throughput)
            except BaseException:  # never lose a worker thread
                log.exception("dispatcher.turn_failed", actor=str(mailbox.actor))
            with self._lock:
                if mailbox._queue:
                    ready.append(mailbox)
                    self._wakeup.notify()
                else:
                    mailbox.scheduled = False
                    mailbox._queue = None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers once the ready queue is empty."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        for thread in self._threads:
            thread.join(timeout)


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
        super().__init__()

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
