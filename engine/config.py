"""Typed configuration: the model's architecture (read from a checkpoint's config.json) and the
engine's runtime settings. Validation happens here, at construction, with messages that say
what is wrong and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from engine.parallel import TPGroup
from pdserve_api.errors import ConfigError

# Architectures this engine implements, as named in config.json's "architectures".
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path} is not a Hugging Face checkpoint: no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from e
        return cls.from_dict(raw, source=str(cfg_file))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"pdserve supports {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return raw[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = raw.get("sliding_window")
        if family == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window they do not use
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_rope_from_dict(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Per layer, per token bytes of K and V together in fp32; scale by dtype size / 4."""
        return 2 * self.num_kv_heads * self.head_dim * 4


def _rope_from_dict(raw: dict, source: str) -> RopeConfig:
    # transformers <5 writes rope_theta + rope_scaling; >=5 writes rope_parameters.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: unsupported RoPE scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


class EngineMode(str, Enum):
    COLOCATED = "colocated"  # prefill and decode in one engine (the built-in baseline)
    PREFILL = "prefill"  # compute the prompt's KV, sample the first token, hand blocks out
    DECODE = "decode"  # take in a prompt's KV blocks and continue


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    model: str | None = None  # local HF dir or .gguf; None = the default model
    mode: EngineMode = EngineMode.COLOCATED
    dtype: str = "float32"
    device: str = "cpu"
    attention_backend: str | None = None  # None: triton on CUDA, torch elsewhere
    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 2**20
    num_kv_blocks: int | None = None  # overrides the memory budget (tests)
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget
    long_prefill_token_threshold: int | None = None  # chunk size cap per request per step
    enable_prefix_caching: bool = True
    seed: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mode = EngineMode(self.mode)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} not one of {sorted(DTYPES)}")
        if self.attention_backend is None:
            self.attention_backend = "triton" if self.device.startswith("cuda") else "torch"
        if self.attention_backend not in ("torch", "triton"):
            raise ConfigError(
                f"attention_backend {self.attention_backend!r} not one of 'torch', 'triton'"
            )
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ConfigError("long_prefill_token_threshold must be >= 1")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def resolve_max_model_len(model_config: ModelConfig, config: EngineConfig) -> int:
    """The context limit before the KV pool is sized (every TP rank computes the same)."""
    limit = model_config.max_position_embeddings
    if model_config.sliding_window:
        # Sliding-window attention is not implemented: within the window it is identical.
        limit = min(limit, model_config.sliding_window)
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's "
                          f"limit {limit}")
    return config.max_model_len


def check_tp_config(config: EngineConfig, tp: TPGroup | None) -> None:
    """EngineConfig's tp_rank/tp_size (read by KV transfer) must describe the group used."""
    rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
    if (config.tp_rank, config.tp_size) != (rank, size):
        raise ConfigError(
            f"EngineConfig says tp_rank={config.tp_rank} tp_size={config.tp_size} but the "
            f"TPGroup is rank {rank} of {size}"
            + ("; create it with engine.tp_engine.init_tp_group and pass it as tp"
               if tp is None else ""))
