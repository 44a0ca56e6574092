"""structlog set-up for the command line: JSON lines (default) or a console renderer."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


_nats_log = structlog.get_logger("nats")


async def _nats_error(exc: Exception) -> None:
    _nats_log.warning("nats.error", error=repr(exc))


async def _nats_disconnected() -> None:
    _nats_log.warning("nats.disconnected")


async def _nats_reconnected() -> None:
    _nats_log.info("nats.reconnected")


def nats_callbacks() -> dict:
    """nats.connect callbacks that log a structured line per event. Without an error
    callback nats-py logs a traceback on every reconnect attempt while a server is down."""
    return {"error_cb": _nats_error, "disconnected_cb": _nats_disconnected,
            "reconnected_cb": _nats_reconnected}
