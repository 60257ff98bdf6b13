"""Read a llama GGUF's metadata: hyper-parameters and the tokenizer's vocabulary.

`open_gguf` opens a file; `check_architecture` refuses what the importer cannot convert
(another architecture, mixture of experts, RoPE scaling); `read_hparams` and `read_vocab`
return the llama.cpp metadata as dataclasses named like their Hugging Face counterparts.
A missing required key or an out-of-range id raises `ValueError` naming it and the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LlamaHParams:
    """Model hyper-parameters read from the GGUF metadata (HF config names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer as llama.cpp stores it: vocabulary, merges, token types, special ids."""

    model: str  # tokenizer.ggml.model, e.g. "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre, e.g. "smollm"
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    eot_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:  # bad magic, truncated file
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc


def _field(reader: GGUFReader, key: str, source: Path, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{source}: GGUF metadata key {key!r} is missing")
        return default
    if field.types and field.types[0] == GGUFValueType.ARRAY and not field.data:
        return []  # contents() chokes on empty arrays in some gguf versions
    return field.contents()


def check_architecture(reader: GGUFReader, source: Path) -> None:
    arch = _field(reader, "general.architecture", source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if _field(reader, "llama.expert_count", source, 0):
        raise ValueError(f"{source}: mixture-of-experts llama GGUFs are not supported")
    scaling = _field(reader, "llama.rope.scaling.type", source, "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        # Llama 3.1-style rope_freqs and linear/yarn scaling would silently change outputs.
        raise ValueError(f"{source}: GGUF RoPE scaling ({scaling!r}) is not supported")


def _f32(value: float) -> float:
    # GGUF stores these as float32 (1e-5 arrives as 9.99999974e-06); the shortest decimal
    # that round-trips through float32 is the value the original config.json had.
    return float(str(np.float32(value)))


def read_hparams(reader: GGUFReader, source: Path) -> LlamaHParams:
    """Hyper-parameters of a llama GGUF, named as in a Hugging Face `LlamaConfig`."""

    def get(key: str, default: Any = ...) -> Any:
        return _field(reader, f"llama.{key}", source, default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{source}: GGUF tensor 'token_embd.weight' is missing")
    # key_length is explicit; rope.dimension_count equals head_dim for llama (full rotary).
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // heads)))
    return LlamaHParams(
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        # The embedding's row count is what the model computes logits over.
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        # transformers' rule too: no separate output projection means tied embeddings.
        tie_word_embeddings="output.weight" not in tensors,
    )


def read_vocab(reader: GGUFReader, source: Path) -> GGUFVocab:
    """The tokenizer metadata of a GGUF (llama.cpp's `tokenizer.ggml.*` keys)."""

    def get(key: str, default: Any = ...) -> Any:
        return _field(reader, f"tokenizer.{key}", source, default)

    tokens = list(get("ggml.tokens"))

    def token_id(key: str) -> int | None:
        value = get(f"ggml.{key}", None)
        if value is not None and not 0 <= int(value) < len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.{key} {value} is outside the vocabulary")
        return None if value is None else int(value)

    return GGUFVocab(
        model=get("ggml.model"),
        pre=get("ggml.pre", "default"),
        tokens=tokens,
        token_types=[int(t) for t in get("ggml.token_type", [1] * len(tokens))],
        merges=list(get("ggml.merges", [])),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        unk_token_id=token_id("unknown_token_id"),
        pad_token_id=token_id("padding_token_id"),
        eot_token_id=token_id("eot_token_id"),
        # transformers' GGUF loader also defaults both to False for byte-level vocabularies.
        add_bos_token=bool(get("ggml.add_bos_token", False)),
        add_eos_token=bool(get("ggml.add_eos_token", False)),
        chat_template=get("chat_template", None),
    )
