"""Writing a run down: the console table, the JSON files, and `bench compare`.

Files a run writes into its output folder:
- `report.json`: `loadgen.stats.summarize`'s report;
- `requests.jsonl`: one line per request record (warm-up included, flagged);
- `latency_cdf.png`: `loadgen.plots.plot_cdfs`.
A sweep writes one such folder per rate (`rate_<r>/`) plus `sweep.json` (`sweep_summary`)
and `sweep.png`.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.record import RequestRecord
from loadgen.stats import PHASES, SERVER_PHASES, STATS


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The console table: one row per phase, then throughput, goodput and errors."""
    c = report["counts"]
    cfg = report.get("config", {})
    lines = []
    label = cfg.get("label") or ""
    arrival = cfg.get("arrival", {})
    lines.append(f"{label + ': ' if label else ''}{_describe_arrival(arrival)}, "
                 f"workload {cfg.get('workload', {}).get('kind', '?')}, seed {cfg.get('seed')}")
    lines.append(f"requests: {c['sent']} sent, {c['succeeded']} succeeded, {c['errored']} "
                 f"errored ({c['warmup']} warm-up excluded)")
    head = f"{'phase (ms)':<12}" + "".join(f"{s:>10}" for s in STATS)
    lines += [head, "-" * len(head)]
    for p in PHASES:
        if p in report["phases"]:
            row = report["phases"][p]
            lines.append(f"{p:<12}" + "".join(f"{_fmt(row[s]):>10}" for s in STATS))
    if not _server_phases_reported(report):
        lines.append(_NOT_REPORTED)
    t = report["throughput"]
    g = report["goodput"]
    a = report["slo_attainment"]
    lines.append(f"throughput: {t['requests_per_s']:.2f} req/s, "
                 f"{t['input_tokens_per_s']:.1f} input tok/s, "
                 f"{t['output_tokens_per_s']:.1f} output tok/s over {t['window_s']:.2f} s")
    attain = ("-" if a["both"] is None else
              f"{100 * a['both']:.1f}% (TTFT {100 * a['ttft']:.1f}%, "
              f"TPOT {100 * a['tpot']:.1f}%)")
    lines.append(f"goodput: {g['requests_per_s']:.2f} req/s meeting their SLO; "
                 f"SLO attainment {attain}")
    if len(report.get("classes", {})) > 1:
        for name, body in report["classes"].items():
            slo = body["slo"]
            ttft = body["phases"]["ttft"]
            lines.append(f"  class {name} (TTFT SLO {slo['ttft_ms']:g} ms, TPOT SLO "
                         f"{slo['tpot_ms']:g} ms, priority {slo['priority']}): "
                         f"{body['counts']['sent']} sent, goodput "
                         f"{body['goodput']['requests_per_s']:.2f} req/s, TTFT p50/p99 "
                         f"{_fmt(ttft['p50'])}/{_fmt(ttft['p99'])} ms")
    errors = report["errors"]
    lines.append("errors: " + (", ".join(f"{k} {v}" for k, v in errors.items())
                               if errors else "none"))
    return "\n".join(lines)


_NOT_REPORTED = (f"server-side phases ({', '.join(SERVER_PHASES)}): not reported by this "
                 "server (only pdserve sends them); the client-side phases are the comparable "
                 "ones")


def _server_phases_reported(report: dict[str, Any]) -> bool:
    return bool(report.get("server_phases", {}).get("reported", True))


def _describe_arrival(a: dict[str, Any]) -> str:
    kind = a.get("kind")
    if kind == "poisson":
        return f"poisson {a['rate']:g} req/s"
    if kind == "burst":
        return f"bursts of {a['burst_size']} every {a['burst_interval_s']:g} s"
    if kind == "concurrency":
        return f"concurrency {a['concurrency']}"
    return str(kind)


def machine() -> str:
    """The host, as benchmark records name it."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def write_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return path


def write_records(records: Sequence[RequestRecord], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    return path


def load_report(path: str | Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(report, dict) or "phases" not in report:
        hint = " (a sweep summary: compare the rate_*/report.json files)" \
            if isinstance(report, dict) and "runs" in report else ""
        raise ValueError(f"{path}: not a loadgen report{hint}")
    return report


def sweep_summary(config: dict[str, Any], runs: Sequence[tuple[float, dict[str, Any], str]]
                  ) -> dict[str, Any]:
    """`sweep.json`: per offered rate, the figures the sweep plot shows and the report path."""
    rows = []
    for rate, report, path in runs:
        rows.append({
            "rate": rate,
            "report": path,
            "ttft_p99_ms": report["phases"]["ttft"]["p99"],
            "tpot_p99_ms": report["phases"]["tpot"]["p99"],
            "ttft_p50_ms": report["phases"]["ttft"]["p50"],
            "tpot_p50_ms": report["phases"]["tpot"]["p50"],
            "goodput_rps": report["goodput"]["requests_per_s"],
            "throughput_rps": report["throughput"]["requests_per_s"],
            "slo_attainment": report["slo_attainment"]["both"],
            "sent": report["counts"]["sent"],
            "errored": report["counts"]["errored"],
        })
    return {"config": config, "runs": rows}


def format_sweep(summary: dict[str, Any]) -> str:
    head = (f"{'rate':>8}{'sent':>7}{'errors':>8}{'TTFT p99':>11}{'TPOT p99':>11}"
            f"{'thru req/s':>12}{'goodput':>10}{'SLO met':>9}")
    lines = [head, "-" * len(head)]
    for r in summary["runs"]:
        attain = "-" if r["slo_attainment"] is None else f"{100 * r['slo_attainment']:.1f}%"
        lines.append(f"{r['rate']:>8g}{r['sent']:>7}{r['errored']:>8}"
                     f"{_fmt(r['ttft_p99_ms']):>11}{_fmt(r['tpot_p99_ms']):>11}"
                     f"{r['throughput_rps']:>12.2f}{r['goodput_rps']:>10.2f}{attain:>9}")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if a == 0:
        return "-" if b == 0 else "inf"
    return f"{b / a:.2f}x"


def format_compare(a: dict[str, Any], b: dict[str, Any], name_a: str = "A",
                   name_b: str = "B") -> str:
    """Two reports side by side, every figure with its ratio B/A."""
    name_a = a.get("config", {}).get("label") or name_a
    name_b = b.get("config", {}).get("label") or name_b
    w = max(12, len(name_a) + 2, len(name_b) + 2)
    head = f"{'metric':<26}{name_a:>{w}}{name_b:>{w}}{'B/A':>10}"
    lines = [f"A = {name_a}: {_describe_arrival(a.get('config', {}).get('arrival', {}))}",
             f"B = {name_b}: {_describe_arrival(b.get('config', {}).get('arrival', {}))}",
             head, "-" * len(head)]

    def row(label: str, x: float | None, y: float | None, digits: int = 1) -> None:
        lines.append(f"{label:<26}{_fmt(x, digits):>{w}}{_fmt(y, digits):>{w}}{_ratio(x, y):>10}")

    for name, report in ((name_a, a), (name_b, b)):
        if not _server_phases_reported(report):
            lines.append(f"{name} does not report server-side phases "
                         f"({', '.join(SERVER_PHASES)}): shown as -")
    for p in PHASES:
        pa, pb = a["phases"].get(p), b["phases"].get(p)
        if pa is None and pb is None:
            continue
        for s in STATS:
            row(f"{p} {s} (ms)", pa[s] if pa else None, pb[s] if pb else None)
    for key, label in (("requests_per_s", "req/s"), ("input_tokens_per_s", "input tok/s"),
                       ("output_tokens_per_s", "output tok/s")):
        row(f"throughput {label}", a["throughput"][key], b["throughput"][key], 2)
    row("goodput req/s", a["goodput"]["requests_per_s"], b["goodput"]["requests_per_s"], 2)
    row("SLO attainment", a["slo_attainment"]["both"], b["slo_attainment"]["both"], 3)
    for key in ("sent", "succeeded", "errored"):
        row(f"{key}", a["counts"][key], b["counts"][key], 0)
    codes = sorted(set(a["errors"]) | set(b["errors"]))
    for code in codes:
        row(f"error {code}", a["errors"].get(code, 0), b["errors"].get(code, 0), 0)
    return "\n".join(lines)
