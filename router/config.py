"""The router's settings (`RouterConfig`, part of the launcher's ClusterConfig) and what it
knows of the served model (`ModelInfo`, from the workers' `ready` replies)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.tokenizer import Tokenizer


@dataclass
class RouterConfig:
    slots_per_prefill_worker: int = 4  # prompts in flight per prefill worker (it batches them)
    max_queue: int = 256  # requests waiting for a prefill slot before new ones are refused
    decode_wait_s: float = 30.0  # wait for decode KV space this long without a TTFT SLO
    kv_timeout_s: float = 30.0  # decode reservation lifetime without its KV
    stats_interval_s: float = 0.25  # worker stats / in-process index feed period
    index_ttl_s: float = 5.0  # in-process index: worker registration lifetime
    heartbeat_timeout_s: float = 10.0  # a worker's stats call slower than this is logged
    # Limits, enforced before any work is done (INVALID_ARGUMENT beyond them).
    max_prompt_tokens: int | None = None  # None: max_model_len - 1
    max_prompt_chars: int = 1_000_000  # text/chat checked before tokenizing
    max_output_tokens: int = 8192  # sampling.max_tokens
    max_stop_strings: int = 16
    max_message_bytes: int = 4 * 2**20  # one gRPC message / one HTTP body
    api_keys_file: str | None = None  # router/auth.py; None = no authentication
    tls_cert_file: str | None = None  # PEM; with tls_key_file: TLS on gRPC and HTTP
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # PEM CA: require client certificates (mTLS)
    restart_wait_s: float = 600.0  # how long a dead worker may take to be restarted by Ray


@dataclass
class ModelInfo:
    name: str  # what clients may put in GenerateRequest.model
    tokenizer: Tokenizer | None
    vocab_size: int
    max_model_len: int  # the smallest any worker accepts
    block_size: int
