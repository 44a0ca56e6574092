"""The tuning config's own schema: a stored config never takes defaults newer than it."""

from __future__ import annotations

from dataclasses import fields

import msgpack
import pytest

import events.config as config_module
from actors.configs import ConfigRegistry
from events.config import (
    CONFIG_SCHEMA,
    SEGMENT_DEFAULTS,
    SegmentConfig,
    TuningConfig,
)
from events.errors import Rejected
from store import open_recorder


def test_the_current_schema_records_todays_defaults():
    """Fails when a default changes (or a field is added) without a new schema row."""
    assert SEGMENT_DEFAULTS[CONFIG_SCHEMA] == {f.name: f.default for f in fields(SegmentConfig)}
    for schema, row in SEGMENT_DEFAULTS.items():  # every schema can fill every field
        assert set(row) == {f.name for f in fields(SegmentConfig)}, schema


@pytest.mark.parametrize("config", [
    TuningConfig(version=1, dim=3),
    TuningConfig(version=7, dim=2, segments={
        "default": SegmentConfig(optimizer="adam", lr_max=0.3, prior=(0.5, -1.0, 0.25)),
        "fast": SegmentConfig(half_life=86400, hygiene=False, bot_burst=12.5),
    }),
])
def test_round_trips_are_bit_identical(config):
    raw = config.encode()
    assert msgpack.unpackb(raw)["schema"] == CONFIG_SCHEMA
    decoded = TuningConfig.decode(raw)
    assert decoded == config
    assert decoded.encode() == raw
    assert TuningConfig.from_map(config.to_map(), stored=True).encode() == raw


def _without(config: TuningConfig, field: str, schema: int | None) -> bytes:
    body = config.to_map()
    for seg in body["segments"].values():
        del seg[field]
    if schema is None:
        del body["schema"]  # as written before the key existed
    else:
        body["schema"] = schema
    return msgpack.packb(body, use_bin_type=True)


@pytest.fixture
def defaults_changed(monkeypatch):
    """A future version of the code: its schema changed the default of lr_max to 0.2."""
    future = {**SEGMENT_DEFAULTS, FUTURE: {**SEGMENT_DEFAULTS[CONFIG_SCHEMA], "lr_max": 0.2}}
    monkeypatch.setattr(config_module, "SEGMENT_DEFAULTS", future)
    monkeypatch.setattr(config_module, "CONFIG_SCHEMA", FUTURE)


FUTURE = CONFIG_SCHEMA + 1


def test_a_missing_field_takes_its_schemas_default_not_todays(defaults_changed):
    old = TuningConfig(version=1, dim=3)
    for schema in (1, None):  # schema 1, and a body from before schemas were named
        decoded = TuningConfig.decode(_without(old, "lr_max", schema))
        assert decoded.segment("default").lr_max == 0.12  # schema 1's, not today's 0.2
        again = decoded.encode()  # now written out in full, under today's schema
        assert msgpack.unpackb(again)["schema"] == FUTURE
        assert msgpack.unpackb(again)["segments"]["default"]["lr_max"] == 0.12
        assert TuningConfig.decode(again) == decoded
    # a body of today's schema, and a map someone writes now (a TOML table), mean today's
    assert TuningConfig.decode(_without(old, "lr_max", FUTURE)).segment(
        "default").lr_max == 0.2
    table = TuningConfig.from_map({"version": 1, "dim": 3, "segments": {"default": {}}})
    assert table.segment("default").lr_max == 0.2


def test_a_stored_legacy_config_keeps_its_defaults_in_a_real_store(defaults_changed, tmp_path):
    recorder = open_recorder(tmp_path / "mt.db")
    try:
        assert recorder.save_config(1, _without(TuningConfig(version=1, dim=3), "lr_max", None))
        registry = ConfigRegistry(recorder, TuningConfig(version=1, dim=3))
        assert registry.current.segment("default").lr_max == 0.12
    finally:
        recorder.close()


def test_an_unknown_schema_or_an_unrecorded_default_is_refused(monkeypatch):
    body = TuningConfig(version=1, dim=3).to_map()
    with pytest.raises(Rejected, match="schema 9 is unknown"):
        TuningConfig.from_map({**body, "schema": 9})
    partial = {k: v for k, v in SEGMENT_DEFAULTS[1].items() if k != "segment_lr"}
    monkeypatch.setattr(config_module, "SEGMENT_DEFAULTS", {1: partial})
    raw = _without(TuningConfig(version=1, dim=3), "segment_lr", 1)
    with pytest.raises(Rejected, match="records no default for \\['segment_lr'\\]"):
        TuningConfig.decode(raw)
