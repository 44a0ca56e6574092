"""The pooled runtime: per-actor order, nothing lost under concurrent senders, a clean stop."""

from __future__ import annotations

import threading
import time

import pykka
import pytest

from actors.runtime import Dispatcher, PooledActor


class Recorder(PooledActor):
    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher)
        self.seen: list = []
        self.threads: set[str] = set()
        self.active = 0
        self.max_active = 0
        self.started = False

    def on_start(self) -> None:
        self.started = True

    def on_receive(self, message):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        assert self.started, "on_start runs before any message"
        self.seen.append(message)
        self.threads.add(threading.current_thread().name)
        self.active -= 1
        return len(self.seen)

    def count(self) -> int:
        return len(self.seen)


@pytest.fixture
def dispatcher():
    d = Dispatcher(workers=2, throughput=8)
    yield d
    d.shutdown()


def test_concurrent_senders_lose_nothing_and_keep_per_sender_order(dispatcher):
    actors = [Recorder.start(dispatcher) for _ in range(50)]
    senders, per_sender = 4, 2000

    def send(sender: int) -> None:
        for i in range(per_sender):
            actors[i % len(actors)].tell((sender, i))

    threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(ref.ask("count-marker") - 1 for ref in actors)
    assert total == senders * per_sender
    for ref in actors:
        actor = ref._actor_weakref()
        messages = [m for m in actor.seen if m != "count-marker"]
        for sender in range(senders):
            mine = [i for s, i in messages if s == sender]
            assert mine == sorted(mine), "a sender's messages arrive in the order sent"
        assert actor.max_active == 1, "an actor never runs on two threads at once"


def test_busy_actor_does_not_starve_others(dispatcher):
    busy = Recorder.start(dispatcher)
    other = Recorder.start(dispatcher)
    for i in range(20_000):
        busy.tell(i)
    assert other.ask("ping", timeout=5) == 1
    assert busy.ask("last", timeout=30) == 20_001


def test_pykka_api_works_on_pooled_actors(dispatcher):
    ref = Recorder.start(dispatcher)
    proxy = ref.proxy()
    ref.tell("a")
    assert proxy.count().get(timeout=5) == 1
    future = ref.ask("b", block=False)
    assert future.get(timeout=5) == 2


def test_clean_stop_answers_late_asks_with_actor_dead(dispatcher):
    ref = Recorder.start(dispatcher)
    for i in range(100):
        ref.tell(i)
    assert ref.stop(timeout=5) is True
    assert not ref.is_alive()
    assert len(ref._actor_weakref().seen) == 100, "messages sent before stop are handled"
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("late", timeout=5)


def test_many_actors_share_two_threads(dispatcher):
    before = threading.active_count()
    refs = [Recorder.start(dispatcher) for _ in range(5000)]
    for ref in refs:
        ref.tell("x")
    deadline = time.monotonic() + 10
    while sum(r._actor_weakref().count() for r in refs) < 5000:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert threading.active_count() == before
    names = set().union(*(r._actor_weakref().threads for r in refs))
    assert names <= {"microtune-worker-0", "microtune-worker-1"}
