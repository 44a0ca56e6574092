"""Test helpers that do not go through the code under test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from actors.hygiene import Hygiene


def canonical(value: Any) -> Any:
    """A structure that compares equal exactly when two states are bit-identical, built
    without the snapshot codec (so that a field the codec loses cannot hide a difference)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, Hygiene):
        return ("Hygiene", *(canonical(getattr(value, n)) for n in Hygiene.__slots__))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple: UserState, Event
        return (type(value).__name__, *(canonical(v) for v in value))
    if isinstance(value, tuple | list):
        return tuple(canonical(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, canonical(v)) for k, v in value.items()))
    return value


async def until(predicate: Callable[[], bool], timeout: float = 20.0,
                what: str = "condition") -> None:
    """Wait (in an event loop) until `predicate()` holds; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def fold(events, cfg, state=None):
    """`apply` over events from an empty state (or `state`): the state and the trace."""
    from actors.learning import Step, apply
    from actors.state import UserState

    state = state or UserState("u")
    trace: list[Step] = []
    for e in events:
        state = apply(state, e, cfg, trace)
    return state, trace


async def start_service(tmp_path, url: str, config, **service_kw):
    """A real service on a fresh SQLite store in `tmp_path`, consuming from `url`."""
    from actors import Microtune
    from adapters.nats_service import Service, ServiceConfig

    system = Microtune.open(tmp_path / "mt.db", config)
    service = Service(system, ServiceConfig(**service_kw))
    await service.start(url)
    return system, service
