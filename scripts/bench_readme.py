"""Write the README's benchmark tables from the benchmarks' JSON (never by hand).

- Speed: reads `bench-results/ceiling.json` (`microtune bench ceiling`) and the end-to-end run
  (`microtune bench nats --backlog ...`, default `bench-results/nats.json`), and replaces what
  stands between `<!-- bench:ceilings -->` and `<!-- /bench:ceilings -->` in README.md with
  each figure beside its ceiling measured on the same machine, the ratio and the target.
- Learning quality: reads `bench-results/quality.json` (`microtune bench quality`) and
  replaces the `<!-- bench:quality -->` block with each learner's best configuration and what
  each part of microtune's defaults buys.

- Drift: reads `bench-results/drift.json` (`microtune bench drift`) and replaces the
  `<!-- bench:drift -->` block with its table.
- Fleet: reads `bench-results/fleet.json` and `fleet-postgresql.json` (`microtune bench
  fleet`, on SQLite and on PostgreSQL) and replaces the `<!-- bench:fleet -->` block with one
  row per setup and store: ingest, its ratio to one worker, the CPU it costs per event and
  the share of the machine's cores that is, query latency, failover.
- Capacity: reads `bench-results/fleet-capacity.json` (`microtune bench fleet --store
  postgresql://... --workers 1 --out bench-results/fleet-capacity.json`) and replaces the
  `<!-- bench:capacity -->` block with what 100 workers at one worker's measured rate ask of
  the parts they share.

A block whose JSON is missing is left as it is.

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


QBEGIN, QEND = "<!-- bench:quality -->", "<!-- /bench:quality -->"
_QUALITY_COLUMNS = (("log_loss_first_half", "log loss, first half"), ("auc", "AUC"),
                    ("auc_last_half", "AUC, last half"), ("log_loss", "log loss"),
                    ("log_loss_last_half", "log loss, last half"),
                    ("auc_cold", "AUC, a user's first 10"), ("events_per_s", "ratings/s"))


def quality_table(results: list[dict], measured: str) -> str:
    """Each learner family's best configuration (by AUC), then microtune's variants."""
    def row(r: dict, bold: bool = False) -> str:
        cells = [r["learner"], r["config"].replace("|", "\\|")] + [
            f"{r[k]:,.0f}" if k == "events_per_s" else f"{r[k]:.4f}"
            for k, _ in _QUALITY_COLUMNS]
        if bold:
            cells = [f"**{c}**" for c in cells]
        return "| " + " | ".join(cells) + " |"

    head = ["| learner | configuration | " + " | ".join(n for _, n in _QUALITY_COLUMNS) + " |",
            "|" + "---|" * (len(_QUALITY_COLUMNS) + 2)]
    default = next(r for r in results if r["learner"] == "microtune"
                   and r["config"] == "defaults")
    families: dict[tuple[str, bool], dict] = {}
    for r in results:
        if r["learner"] == "microtune":
            continue
        key = (r["learner"], "|i item" in r["config"])
        if key not in families or r["auc"] > families[key]["auc"]:
            families[key] = r
    lines = [f"Measured {measured.rstrip('.')}; the best configuration of each peer by AUC "
             "(the report has every configuration).", "", *head, row(default, bold=True)]
    lines += [row(r) for r in sorted(families.values(), key=lambda r: -r["auc"])]
    peers = [r for r in results if r["learner"] == "vowpal wabbit"]
    verdict = []
    for key, higher in (("auc", True), ("auc_last_half", True), ("log_loss", False),
                        ("log_loss_last_half", False), ("auc_cold", True)):
        best = (max if higher else min)(peers, key=lambda r, k=key: r[k])
        ahead = default[key] > best[key] if higher else default[key] < best[key]
        verdict.append(f"- {key.replace('_', ' ')}: microtune {default[key]:.4f}, VW's best "
                       f"{best[key]:.4f} (`{best['config']}`): "
                       f"{'ahead' if ahead else 'behind'} by {abs(default[key] - best[key]):.4f}")
    rival = max(peers, key=lambda r: r["auc"])  # the configuration it is compared with
    verdict.append(f"- ratings/s: microtune {default['events_per_s']:,.0f}, VW's best by AUC "
                   f"{rival['events_per_s']:,.0f} (`{rival['config']}`): "
                   + ("ahead" if default["events_per_s"] >= rival["events_per_s"] else
                      f"behind, {rival['events_per_s'] / default['events_per_s']:.1f}x "
                      "slower"))
    for fleet in (r for r in results if r["learner"] == "microtune"
                  and " workers" in r["config"]):
        verdict.append(f"- {fleet['config']}: AUC {fleet['auc']:.4f}, "
                       f"{fleet['auc'] - default['auc']:+.4f} against one process")
    variants = [r for r in results if r["learner"] == "microtune"]
    lines += ["", "microtune's defaults against every Vowpal Wabbit configuration, figure by "
              "figure:", "", *verdict, "", "What each part of the defaults buys (one thing "
              "changed at a time):", "", *head]
    lines += [row(r, bold=r is default) for r in variants]
    return "\n".join(lines)


DBEGIN, DEND = "<!-- bench:drift -->", "<!-- /bench:drift -->"


def drift_table(drift: dict) -> str:
    """Per scenario, time scale and config: excess log loss, delays and wander."""
    rows = drift["rows"]
    lines = [f"Measured {drift['machine']['date'][:10]}, {drift['users']} users x "
             f"{drift['events_per_user']} events per stream.", "",
             "| scenario | a user's events apart | config | excess log loss, first half | "
             "excess log loss, second half | delay, events | cold-start delay | wander |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["cold"]:
            continue
        cold = next((c["delay"] for c in rows if c["cold"] and c["scenario"] == r["scenario"]
                     and c["gap"] == r["gap"] and c["config"] == r["config"]), None)
        cells = [r["scenario"], r["gap"], r["config"], f"{r['excess_before']:.4f}",
                 f"{r['excess_after']:.4f}", "-" if r["delay"] is None else f"{r['delay']:g}",
                 "-" if cold is None else f"{cold:g}", f"{r['wander']:.3f}"]
        if r["config"] == "defaults":
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CBEGIN, CEND = "<!-- bench:capacity -->", "<!-- /bench:capacity -->"
NODES = 100  # the fleet the capacity model is for


def capacity_table(data: dict, nodes: int = NODES) -> str:
    """A capacity model for `nodes` workers from one worker's measured CPU per event by
    component (`bench fleet` on PostgreSQL): what each shared part must do if every worker
    ingests at the measured rate."""
    one = data["runs"]["1 worker"]
    cpu, rate = one["cpu_us_per_event"], one["events_per_s"]
    total = nodes * rate
    m = data["machine"]
    lines = [f"Measured {m['date'][:10]}, {m['arch']}, {m['cores']} cores "
             f"(`bench fleet --store postgresql://...`, one worker, {data['events']:,} "
             f"events): one worker ingests {rate:,.0f} events/s. At {nodes} workers, each on "
             f"a core of its own at that rate, the fleet takes {total:,.0f} events/s, and "
             "each shared part must spend:", "",
             "| part | CPU µs per event (measured) | scales with | cores needed at "
             f"{nodes} workers |", "|---|---|---|---|"]
    shared = {"serve": "each worker's own core", "query processes": "each worker's node",
              "nats-server": "one events stream: its leader sees every event",
              "postgresql": "one store: every event's row and its commit"}
    for part, us in cpu.items():
        where = shared.get(part, "-")
        need = (f"{total * us / 1e6:,.1f} on one server" if part in (
            "nats-server", "postgresql") else f"{rate * us / 1e6:.2f} per node")
        lines.append(f"| {part} | {us:.1f} | {where} | {need} |")
    return "\n".join(lines)


FBEGIN, FEND = "<!-- bench:fleet -->", "<!-- /bench:fleet -->"


def fleet_table(runs: list[dict]) -> str:
    """One row per (store, setup) of `bench fleet`'s JSON files."""
    m = runs[0]["machine"]
    lines = [f"Measured {m['date'][:10]}, {m['arch']}, {m['cores']} cores, Python "
             f"{m['python']}: a backlog of {runs[0]['events']:,} events for "
             f"{runs[0]['users']:,} users drained by each setup in turn; ingest alone from 10% "
             "to 50% of it, then with 1k queries/s to 90% (10 candidates each, from a process "
             "of their own, every user asked about once before: answers from the query "
             "processes' replicas, not first loads from the store). CPU: microseconds of CPU "
             "per event in the first window, all processes summed (serve, query processes, "
             "nats-server, PostgreSQL), and the cores that takes at that rate. Each setup "
             f"ran {runs[0].get('rounds', 1)} time(s), in rounds of every setup in turn: "
             "its row is its median round, and the ratio to one worker is also given round "
             "by round.", "",
             "| store | setup | events/s | x one worker | x one worker, each round | events/s "
             "while queried | CPU µs per event | cores busy | query p50 / p99 ms, idle | "
             "query p50 / p99 ms, ingesting | failed queries |", "|" + "---|" * 11]
    for data in runs:
        for name, r in data["runs"].items():
            cpu = r.get("cpu_us_per_event") or {}
            total = sum(cpu.values())
            rate = r["events_per_s"] or 0
            q = r["queries"]
            cells = [data["store"], name, f"{rate:,.0f}",
                     f"{r['vs_one_worker']:.2f}" if r.get("vs_one_worker") else "-",
                     ", ".join(f"{v:.2f}" for v in r.get("vs_one_worker_runs") or [] if v)
                     or "-",
                     f"{r['events_per_s_under_queries']:,.0f}"
                     if r.get("events_per_s_under_queries") else "-",
                     f"{total:.0f}" if cpu else "-",
                     f"{total * rate / 1e6:.2f} of {m['cores']}" if cpu else "-",
                     f"{q['idle']['p50_ms']} / {q['idle']['p99_ms']}",
                     f"{q['ingest']['p50_ms']} / {q['ingest']['p99_ms']}",
                     str(q["idle"]["failed"] + q["ingest"]["failed"])]
            lines.append("| " + " | ".join(cells) + " |")
    failovers = [f"{d['store']} {d['failover']['seconds']} s" for d in runs
                 if d.get("failover")]
    if failovers:
        lead = runs[0]["failover"]
        lines += ["", f"Failover, `kill -9` of a worker to the first event applied in one of "
                  f"its {lead['partitions_moved']} partitions by another (lease TTL "
                  f"{lead['lease_ttl']:g} s): " + ", ".join(failovers) + "."]
    return "\n".join(lines)


def _per_event(seconds, rows):
    return None if not seconds or not rows else round(seconds / rows * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", default="bench-results/nats.json", type=Path)
    parser.add_argument("--ceiling", default="bench-results/ceiling.json", type=Path)
    parser.add_argument("--readme", default="README.md", type=Path)
    parser.add_argument("--quality", default="bench-results/quality.json", type=Path)
    parser.add_argument("--drift", default="bench-results/drift.json", type=Path)
    parser.add_argument("--fleet", nargs="+", type=Path, default=[
        Path("bench-results/fleet.json"), Path("bench-results/fleet-postgresql.json")])
    parser.add_argument("--capacity", default="bench-results/fleet-capacity.json", type=Path,
                        help="bench fleet --store postgresql://... with one worker")
    args = parser.parse_args()
    text = args.readme.read_text()
    if args.nats.exists() and args.ceiling.exists():
        nats = json.loads(args.nats.read_text())
        text = _replace(text, BEGIN, END, table(nats, args.ceiling), args.readme)
        print(f"{args.readme}: benchmark table written from {args.nats} and {args.ceiling}")
    if args.quality.exists():
        results = json.loads(args.quality.read_text())
        measured = args.quality.with_suffix(".md").read_text().splitlines()[2] \
            if args.quality.with_suffix(".md").exists() else "?"
        text = _replace(text, QBEGIN, QEND, quality_table(results, measured), args.readme)
        print(f"{args.readme}: learning-quality tables written from {args.quality}")
    if args.drift.exists():
        text = _replace(text, DBEGIN, DEND, drift_table(json.loads(args.drift.read_text())),
                        args.readme)
        print(f"{args.readme}: drift table written from {args.drift}")
    if args.capacity.exists():
        text = _replace(text, CBEGIN, CEND,
                        capacity_table(json.loads(args.capacity.read_text())), args.readme)
        print(f"{args.readme}: capacity model written from {args.capacity}")
    fleet = [json.loads(f.read_text()) for f in args.fleet if f.exists()]
    if fleet:
        text = _replace(text, FBEGIN, FEND, fleet_table(fleet), args.readme)
        print(f"{args.readme}: fleet table written from {', '.join(map(str, args.fleet))}")
    args.readme.write_text(text)


def _replace(text: str, begin: str, end: str, body: str, readme: Path) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} block")
    block = f"{begin}\n{body}\n{end}"
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, text,
                  flags=re.S)


if __name__ == "__main__":
    main()
