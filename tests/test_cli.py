"""Settings precedence (flags > MICROTUNE_* > TOML file > defaults) and the tuning table."""

from __future__ import annotations

import asyncio

import pytest

from actors.configs import ConfigRegistry
from adapters.cli import SERVE_SETTINGS, _file_values, _settings_parser, _tuning
from events.config import TuningConfig
from events.errors import Rejected
from store.recorder import open_recorder

TOML = """
dim = 32
max_ack_pending = 500
prefix = "from-file"
[tuning.segments.default]
optimizer = "adagrad"
lr_max = 0.2
[tuning.segments.responsive]
lr_min = 0.01
lr_max = 0.1
"""


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path, monkeypatch):
    path = tmp_path / "microtune.toml"
    path.write_text(TOML)
    monkeypatch.setenv("MICROTUNE_PREFIX", "from-env")
    argv = ["--config-file", str(path), "--max-ack-pending", "700"]
    values = _file_values(argv)
    args = _settings_parser("serve", SERVE_SETTINGS, values).parse_args(argv)
    assert args.max_ack_pending == 700  # flag
    assert args.prefix == "from-env"  # environment over file
    assert args.dim == 32  # file over default
    assert args.embedded_port == 4223  # default
    tuning = _tuning(values, args.dim)
    assert tuning.dim == 32
    assert tuning.segment("default").optimizer == "adagrad"
    assert tuning.segment("responsive").lr_max == 0.1
    assert tuning.segment("nobody").lr_max == 0.2  # unknown segments use default


def test_a_changed_tuning_table_becomes_a_new_config_version(tmp_path):
    """An existing store's history wins at start, but `serve` then adopts the file's [tuning]
    table: a new version when it changed, nothing when it did not (no silent ignoring)."""
    path = tmp_path / "microtune.toml"
    path.write_text(TOML)
    values = _file_values(["--config-file", str(path)])
    assert _tuning({}, 32) is None  # no table: the store's current config stays
    recorder = open_recorder(tmp_path / "mt.db")
    registry = ConfigRegistry(recorder, TuningConfig(version=1, dim=32))
    tuning = _tuning(values, 32)
    assert registry.adopt(tuning).version == 2
    assert registry.current.segment("default").optimizer == "adagrad"
    again = ConfigRegistry(recorder, TuningConfig(version=1, dim=32))
    assert again.adopt(tuning).version == 2  # unchanged file, unchanged store
    with pytest.raises(Rejected, match="dimension"):
        again.adopt(_tuning(values, 16))
    recorder.close()


def test_each_benchmark_is_one_command(tmp_path, capsys):
    """`microtune bench <name>` runs the script of that name (here at toy sizes) and writes its
    figures; an unknown name gets the usage."""
    import json

    from adapters.cli import main

    assert main(["bench"]) == 2 and main(["bench", "nonsense"]) == 2
    out = tmp_path / "core.json"
    assert main(["bench", "core", "--users", "300", "--events", "1500", "--out", str(out)]) == 0
    core = json.loads(out.read_text())
    assert core["users"] == 300 and core["warm_events_per_s"] > 0
    assert core["replay_events"] == 1800 and core["query_in_process_p99_ms"] > 0
    out = tmp_path / "hygiene.json"
    assert main(["bench", "hygiene", "--humans", "8", "--bots", "2", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["humans"] == 8 and figures["bots marked (of bots)"].startswith("2 /")
    out = tmp_path / "ceiling.json"
    assert main(["bench", "ceiling", "--users", "100", "--events", "300", "--rates", "100",
                 "--query-seconds", "0.3", "--out", str(out)]) == 0
    ceiling = json.loads(out.read_text())
    assert ceiling["events"] == 300 and ceiling["first_event_share"] == 0.333
    assert ceiling["null_pipeline_events_per_s"] > 0
    assert ceiling["null_pipeline_cpu_us_per_event"] > 0
    assert ceiling["responder_100qps_p99_ms"] > 0 and ceiling["responder_100qps_errors"] == 0
    assert ceiling["replay_rows"] == 300 and ceiling["replay_rows_per_s"] > 0
    assert ceiling["machine"]["cores"] >= 1


def test_commands_without_a_terminal_end_with_a_line_and_an_exit_code(tmp_path):
    """forget without --yes and with nobody to ask erases nothing and says why; a second
    serve on a taken port says so in one line; neither prints a traceback."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import numpy as np

    from actors import Microtune
    from events import Event

    store = str(tmp_path / "mt.db")
    with Microtune.open(store, TuningConfig(version=1, dim=2)) as mt:
        mt.track_many([Event(id="e1", user="alice", t=1.0, kind="click", item="a",
                             x=np.ones(2))])
    forget = subprocess.run([sys.executable, "-m", "adapters.cli", "forget", "--user", "alice",
                             "--store", store], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=60)
    assert forget.returncode == 2 and "--yes" in forget.stdout + forget.stderr
    assert "Traceback" not in forget.stdout + forget.stderr
    with Microtune.open(store, TuningConfig(version=1, dim=2)) as mt:
        assert len(list(mt.recorder.read("alice"))) == 1  # nothing erased
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = subprocess.run([sys.executable, "-m", "adapters.cli", "serve",
                                "--embedded-port", str(port), "--data-dir",
                                str(tmp_path / "data")], capture_output=True, text=True,
                               timeout=60)
    assert serve.returncode == 2 and f"port {port} is in use" in serve.stderr
    assert "Traceback" not in serve.stderr
    # Ctrl-C in the demo: a line and 130, not a KeyboardInterrupt traceback
    demo = subprocess.Popen([sys.executable, "-m", "adapters.cli", "demo", "--users", "2",
                             "--rounds", "50", "--pace", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # started its own server and service, into its rounds
    demo.send_signal(signal.SIGINT)
    out, err = demo.communicate(timeout=60)
    assert demo.returncode == 130, err[-500:]
    assert "interrupted" in out + err and "Traceback" not in out + err


def test_a_hung_stop_is_logged_with_where_each_task_waits():
    """serve's stop timeout logs every task's chain of awaits (`_waiting_tasks`): the
    innermost coroutine a hung stop waits in is named."""
    from adapters.cli import _waiting_tasks

    async def held_by(gate: asyncio.Event) -> None:
        await gate.wait()

    async def stopping(gate: asyncio.Event) -> None:
        await held_by(gate)

    async def main() -> dict[str, str]:
        gate = asyncio.Event()
        task = asyncio.create_task(stopping(gate), name="the-stop")
        await asyncio.sleep(0.01)
        waiting = _waiting_tasks()
        gate.set()
        await task
        return waiting

    waiting = asyncio.run(main())
    assert waiting["the-stop"].startswith("stopping (test_cli.py:")
    assert "> held_by (test_cli.py:" in waiting["the-stop"]
    assert "> wait (locks.py:" in waiting["the-stop"]
