"""Write the README's benchmark table from the benchmarks' JSON (never by hand).

Reads `bench-results/ceiling.json` (`microtune bench ceiling`) and the end-to-end run (`microtune
bench nats --backlog ...`, default `bench-results/nats.json`), and replaces what stands between
`<!-- bench:ceilings -->` and `<!-- /bench:ceilings -->` in README.md with each figure beside
its ceiling measured on the same machine, the ratio and the target.

    microtune bench readme [--nats bench-results/nats.json] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BEGIN, END = "<!-- bench:ceilings -->", "<!-- /bench:ceilings -->"


def fmt(value) -> str:
    if isinstance(value, float) and value >= 100:
        value = round(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def table(nats: dict, ceiling_path: Path) -> str:
    from bench_nats import beside_ceiling

    beside = beside_ceiling(nats, ceiling_path)  # against the ceilings on file now
    m = nats.get("machine", {})
    lines = [
        f"Measured {m.get('date', '?')[:10]}, {m.get('arch', '?')}, {m.get('cores', '?')} cores, "
        f"Python {m.get('python', '?')}, {nats.get('store', '?')}: "
        f"{nats['events']:,} events pre-published for {nats['users']:,} users "
        f"({nats.get('ingest_from', '')}), queries of 100 candidates open loop; ceilings "
        f"from `bench ceiling` on the same machine, {str(beside.get('measured'))[:16]}.",
        "",
        "| figure | microtune | ceiling | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for name, row in beside["figures"].items():
        target = row.get("target", "-")
        if "met" in row:
            target = f"{target}: {'met' if row['met'] else 'missed'}"
        lines.append(f"| {name} | {fmt(row['microtune'])} | {fmt(row['ceiling'])} | "
                     f"{row['ratio']:.2f}x | {target} |")
    extra = [("query process CPU µs per event it applied (each event applied again there)",
              _per_event(nats.get("query_process_cpu_s"), nats.get("query_process_rows_applied"))),
             ("longest GC pause in a query process, ms CPU (over 10 ms: count)",
              f"{nats.get('gc_longest_pause_ms')} ({nats.get('gc_pauses_over_10ms')})"),
             ("query p50 ms at 1k q/s while ingesting",
              nats.get("query_1000qps_ingesting_p50_ms")),
             ("ingest events/s while serving 1k q/s", nats.get("ingest_events_per_s_with_1000qps"))]
    lines += ["", "| also measured | value |", "|---|---|"]
    lines += [f"| {name} | {fmt(value) if isinstance(value, int | float) else value} |"
              for name, value in extra if value is not None]
    return "\n".join(lines)


def _per_event(seconds, rows):
    return None if not seconds or not rows else round(seconds / rows * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", default="bench-results/nats.json", type=Path)
    parser.add_argument("--ceiling", default="bench-results/ceiling.json", type=Path)
    parser.add_argument("--readme", default="README.md", type=Path)
    args = parser.parse_args()
    nats = json.loads(args.nats.read_text())
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {BEGIN} ... {END} block")
    block = f"{BEGIN}\n{table(nats, args.ceiling)}\n{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _m: block, text,
                  flags=re.S)
    args.readme.write_text(text)
    print(f"{args.readme}: benchmark table written from {args.nats} and {args.ceiling}")


if __name__ == "__main__":
    main()
