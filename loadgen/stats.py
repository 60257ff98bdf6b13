"""From request records to the report: percentiles per phase, throughput, SLO attainment,
goodput, errors.

Only measured requests count (warm-up ones are counted in `counts.warmup` and nothing else).
Latency phases take the requests that succeeded: client-side `ttft`, `tpot`, `itl` (every
inter-token latency of every request, pooled) and `e2e`; server-side `queue`, `prefill`,
`transfer`, `decode` from each final message. Each phase gets exactly
`{mean, p50, p90, p95, p99, max}` in milliseconds (numpy's default linear percentiles; all
None when there is no sample). Server-side phases are in `phases` only when the server
reported them (pdserve does; other OpenAI servers do not): `server_phases.reported` says which,
so that no comparison sets pdserve's figures against zeros.

The measured window runs from the first measured send to the last measured request's end;
throughput and goodput are per second of it. A request meets its SLO when it succeeded and met
both its TTFT and TPOT targets (no target: met); `slo_attainment` is the share of sent
requests that did, errors included as misses. Invariant: succeeded + errored = sent.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from loadgen.record import RequestRecord

SERVER_PHASES = ("queue", "prefill", "transfer", "decode")
CLIENT_PHASES = ("ttft", "tpot", "itl", "e2e")
PHASES = SERVER_PHASES + CLIENT_PHASES
STATS = ("mean", "p50", "p90", "p95", "p99", "max")
PERCENTILES = (50, 90, 95, 99)
REPORT_VERSION = 1


def summarize_values(values: Sequence[float]) -> dict[str, float | None]:
    """{mean, p50, p90, p95, p99, max}; all None for no values."""
    if len(values) == 0:
        return dict.fromkeys(STATS)
    a = np.asarray(values, dtype=float)
    p = np.percentile(a, PERCENTILES)
    return {"mean": float(a.mean()), "p50": float(p[0]), "p90": float(p[1]),
            "p95": float(p[2]), "p99": float(p[3]), "max": float(a.max())}


def phase_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Every phase's values (ms) over the succeeded, measured records."""
    out: dict[str, list[float]] = {p: [] for p in PHASES}
    for r in records:
        if r.warmup or not r.ok:
            continue
        if r.server is not None:
            for phase, ms in zip(SERVER_PHASES, (r.server.queue_ms, r.server.prefill_ms,
                                                 r.server.transfer_ms, r.server.decode_ms)):
                if ms is not None:
                    out[phase].append(ms)
        if r.ttft_ms is not None:
            out["ttft"].append(r.ttft_ms)
        if r.tpot_ms is not None:
            out["tpot"].append(r.tpot_ms)
        out["itl"].extend(r.itl_ms)
        if r.e2e_ms is not None:
            out["e2e"].append(r.e2e_ms)
    return out


def measured_window_s(records: Sequence[RequestRecord]) -> float:
    measured = [r for r in records if not r.warmup]
    if not measured:
        return 0.0
    return max(r.end_s for r in measured) - min(r.send_s for r in measured)


def _per_s(n: float, window_s: float) -> float:
    return n / window_s if window_s > 0 else 0.0


def _summary(records: Sequence[RequestRecord], window_s: float) -> dict[str, Any]:
    """The report body for `records` (all or one traffic class) over `window_s`."""
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    samples = phase_samples(records)
    sent = len(measured)
    met = sum(r.met_slo for r in measured)
    reported = any(samples[p] for p in SERVER_PHASES)
    return {
        "phases": {p: summarize_values(samples[p]) for p in PHASES
                   if reported or p not in SERVER_PHASES},
        "server_phases": {"reported": reported, "phases": list(SERVER_PHASES)},
        "throughput": {
            "requests_per_s": _per_s(len(ok), window_s),
            "input_tokens_per_s": _per_s(sum(r.prompt_tokens for r in ok), window_s),
            "output_tokens_per_s": _per_s(sum(r.output_tokens for r in ok), window_s),
            "window_s": window_s,
        },
        "goodput": {"requests_per_s": _per_s(met, window_s), "requests": met},
        "slo_attainment": {
            "both": met / sent if sent else None,
            "ttft": sum(r.met_ttft for r in measured) / sent if sent else None,
            "tpot": sum(r.met_tpot for r in measured) / sent if sent else None,
        },
        "errors": dict(sorted(Counter(r.status for r in measured if not r.ok).items())),
        "counts": {
            "sent": sent,
            "succeeded": len(ok),
            "errored": sent - len(ok),
            "warmup": sum(r.warmup for r in records),
            "warmup_errored": sum(r.warmup and not r.ok for r in records),
        },
        "tokens": {
            "input": sum(r.prompt_tokens for r in ok),
            "cached": sum(r.server.cached_tokens for r in ok if r.server is not None),
            "output": sum(r.output_tokens for r in ok),
        },
    }


def summarize(records: Sequence[RequestRecord], config: dict[str, Any],
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report of one run: the overall summary, one per traffic class (each over the
    same window, so class goodputs add up to the total), the config and run metadata."""
    window = measured_window_s(records)
    report = _summary(records, window)
    classes: dict[str, list[RequestRecord]] = {}
    for r in records:
        classes.setdefault(r.traffic_class, []).append(r)
    slos = {c["name"]: c for c in config.get("workload", {}).get("classes", [])}
    report["classes"] = {}
    for name, recs in sorted(classes.items()):
        body = _summary(recs, window)
        cls = slos.get(name, {})
        body["slo"] = {k: cls.get(k, 0) for k in ("ttft_ms", "tpot_ms", "priority")}
        report["classes"][name] = body
    report["config"] = config
    report["meta"] = {"report_version": REPORT_VERSION, "host": platform.node(),
                      "python": platform.python_version(), **(meta or {})}
    return report
