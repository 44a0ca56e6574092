"""The embedded nats-server's lifetime: it dies with the process that started it from the
main thread (tests/test_fleet.py kills `serve` with -9), and outlives a helper thread that
started it (a restart from `asyncio.to_thread`, as tests/test_kill_loop.py does)."""

from __future__ import annotations

import threading
import time

from adapters.embedded import EmbeddedNats


def test_a_server_started_from_a_thread_outlives_the_thread(tmp_path):
    server = EmbeddedNats(tmp_path / "nats")
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()
    try:
        time.sleep(0.5)  # a parent-death signal would have arrived by now
        assert server.process is not None and server.process.poll() is None
    finally:
        server.stop()
