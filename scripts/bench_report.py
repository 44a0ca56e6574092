"""Shared output of the benchmark scripts: a rich table on the console and a JSON file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sqlite3
from pathlib import Path

from rich.console import Console
from rich.table import Table


def machine() -> dict:
    """What the figures were measured on (written with every benchmark's figures)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),  # what nproc says
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def report(title: str, results: dict, out: str | Path, console: Console) -> None:
    """Print the figures (nested maps only go to the file) and write them, with the machine,
    as JSON."""
    results = {**results, "machine": results.get("machine") or machine()}
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if isinstance(value, dict):
            continue
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    m = results["machine"]
    console.print(f"{m['date']}, {m['arch']}, {m['cores']} cores ({m['cpu']}), "
                  f"Python {m['python']}, SQLite {m['sqlite']}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {out}")
