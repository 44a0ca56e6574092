"""The feed's ordering rules (actors/feed.py), through a real pipe: a fleet's PARTITIONS
message goes ahead of waiting rows, and the newest one is what the reader ends with."""

from __future__ import annotations

import multiprocessing

from actors.feed import GAP, PARTITIONS, ROWS, Feed, decode_frame
from actors.segment_model import SegmentModels
from store.recorder import StoredEvent


def _messages(conn, quiet: float = 0.2) -> list:
    out = []
    while conn.poll(quiet):
        out += decode_frame(conn.recv_bytes())
    return out


def test_the_newest_partitions_message_is_the_last_the_reader_gets():
    """A worker that hands off several partitions at once tells its query processes after
    each one; if two of those messages wait together, the reader must not end with the
    older (it would keep answering a partition handed off, and the hand-off would wait for
    it until the query process's serve TTL: 15 s seen in tests/test_fleet.py)."""
    feed = Feed(SegmentModels())
    here, there = multiprocessing.Pipe(duplex=False)
    feed.attach(there)
    try:
        for round_ in range(8):
            held = list(range(8))
            feed.rows([StoredEvent("u", round_ + 1, f"e{round_}", b"")])
            while held:  # one message per hand-off, in quick succession
                held = held[:-1]
                feed.partitions(16, held)
            told = [p for kind, p in _messages(here) if kind == PARTITIONS]
            assert told and told[-1] == [16, []], (round_, told)
    finally:
        feed.close()


def test_a_dropped_backlog_keeps_the_partitions_message():
    """A backlog dropped for a slow reader (a GAP) must not take the worker's partitions
    with it: the reader would stop answering them at its serve TTL, for nothing."""
    feed = Feed(SegmentModels())
    here, there = multiprocessing.Pipe(duplex=False)
    feed.attach(there, max_rows=10)
    try:
        for round_ in range(8):
            feed.partitions(16, [round_ % 16])
            feed.rows([StoredEvent("u", n, f"e{n}", b"") for n in range(11)])  # past max_rows
            messages = _messages(here)
            told = [p for kind, p in messages if kind == PARTITIONS]
            assert told and told[-1] == [16, [round_ % 16]], (round_, messages)
            assert GAP in [kind for kind, _ in messages]
            assert ROWS not in [kind for kind, _ in messages]
    finally:
        feed.close()
