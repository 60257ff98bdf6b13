"""`pdserve profile`: the command-line layer over planner/profile.py and a live router's
`GET /v1/timing_profile` (router/openai_http.py)."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

from engine.config import EngineConfig
from planner.profile import SweepGrid, run_sweep
from router.timing_profile import LinearModel, Profile


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this hardware's prefill, decode, mixed-step "
                                       "and KV transfer times; write a profile JSON")
    p.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-mib", type=int, default=None,
                   help="KV pool memory per worker (sets the profile's pool size)")
    p.add_argument("--out", default="profile.json", help="where to write the profile")
    p.add_argument("--from-cluster", default=None, metavar="HTTP_ADDRESS",
                   help="take the profile from a running router's learnt timing models "
                        "(its OpenAI-compatible HTTP address, e.g. 127.0.0.1:8000; API key: "
                        "$PDSERVE_API_KEY) instead of a sweep")
    defaults = SweepGrid()
    for name, help_ in (("prefill_tokens", "uncached prompt tokens"),
                        ("cached_tokens", "cached prefix lengths"),
                        ("batch_sizes", "decode batch sizes"),
                        ("contexts", "context per decoding sequence"),
                        ("mixed_chunks", "prefill chunks riding with decodes"),
                        ("transfer_blocks", "KV blocks per timed transfer")):
        p.add_argument("--" + name.replace("_", "-"), type=_ints, default=getattr(defaults, name),
                       help=f"{help_} (default {','.join(map(str, getattr(defaults, name)))})")
    p.add_argument("--repeats", type=int, default=defaults.repeats)
    p.add_argument("--transports", default=None,
                   help="comma-separated KV transports to time (default: every available)")
    p.set_defaults(func=cmd_profile)


def fetch_cluster_profile(address: str, api_key: str | None = None,
                          timeout_s: float = 10.0) -> Profile:
    url = address if "://" in address else f"http://{address}"
    req = urllib.request.Request(url.rstrip("/") + "/v1/timing_profile")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return Profile.from_json(resp.read().decode())


def cmd_profile(args: argparse.Namespace) -> int:
    if args.from_cluster:
        profile = fetch_cluster_profile(args.from_cluster, os.environ.get("PDSERVE_API_KEY"))
    else:
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              block_size=args.block_size)
        if args.kv_cache_mib:
            config.kv_cache_memory_bytes = args.kv_cache_mib * 2**20
        grid = SweepGrid(prefill_tokens=args.prefill_tokens, cached_tokens=args.cached_tokens,
                         batch_sizes=args.batch_sizes, contexts=args.contexts,
                         mixed_chunks=args.mixed_chunks, transfer_blocks=args.transfer_blocks,
                         repeats=args.repeats,
                         transports=tuple(args.transports.split(",")) if args.transports
                         else None)
        profile = run_sweep(config, grid,
                            progress=lambda msg: print(f"pdserve: {msg}", file=sys.stderr))
    Path(args.out).write_text(profile.to_json())
    print(summary(profile))
    print(f"pdserve: profile written to {args.out}", file=sys.stderr)
    return 0


def summary(profile: Profile) -> str:
    """One line per fitted model: its terms, and its fit error."""
    models: dict[str, LinearModel | None] = {
        "prefill": profile.prefill, "decode": profile.decode, "mixed": profile.mixed,
        **{f"transfer:{k}": m for k, m in profile.transfer.items()}}
    lines = [f"profile of {profile.model} ({profile.source}; {profile.hardware or 'unknown'}); "
             f"KV pool {profile.kv_pool_blocks} blocks of {profile.block_size} tokens"]
    for name, m in models.items():
        if m is None:
            continue
        terms = " + ".join(f"{c:.3g}" + ("" if f == "1" else f"*{f}")
                           for f, c in zip(m.features, m.coef))
        worst = "" if m.max_rel_error is None else f", max {m.max_rel_error:.1%}"
        lines.append(f"  {name:<14} s = {terms}   (held-out error {m.rel_rmse:.1%}{worst}, "
                     f"{m.n_points} points)")
    return "\n".join(lines)
