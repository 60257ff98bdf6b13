"""Import a llama-architecture GGUF file as a Hugging Face-style model directory.

Role: pdserve's default model ships as a GGUF (see `engine.default_model`); the engine only reads
Hugging Face directories. `import_gguf` converts once, and everything downstream (model loader,
tokenizer, transformers in tests) reads the result like any local checkpoint.

Contract of `import_gguf(gguf_path, out_dir)`:
  * `out_dir` ends up holding `config.json` (LlamaForCausalLM), `generation_config.json`,
    `model.safetensors` (fp32, HF tensor names, `lm_head.weight` only when the GGUF has its own
    `output.weight`), `tokenizer.json`, `tokenizer_config.json` (with the chat template),
    `special_tokens_map.json` and, written last, the marker `pdserve_import.json`.
  * It is all-or-nothing: files are written to a temporary sibling directory that is renamed
    into place, so an interrupted import never leaves a half-written `out_dir`. An existing
    `out_dir` is replaced.
  * Weights are dequantized and the Q/K rotary permutation undone (`gguf_tensors.py`), so the
    result equals what transformers' own GGUF loader produces. No transformers or accelerate
    is needed.
  * The tokenizer is rebuilt with the `tokenizers` library (`gguf_tokenizer.py`, byte-level
    BPE only, following the pre-tokenizer the file names); the metadata is read by
    `gguf_metadata.py`. This module writes the checkpoint directory.
  * Anything unsupported (architecture, tokenizer model, pre-tokenizer, RoPE scaling, MoE,
    unknown tensors) or missing (a required key or tensor) raises `ValueError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

from engine.gguf_metadata import (
    GGUFVocab,
    LlamaHParams,
    check_architecture,
    open_gguf,
    read_hparams,
    read_vocab,
)
from engine.gguf_tensors import convert_tensors
from engine.gguf_tokenizer import build_tokenizer

IMPORT_MARKER = "pdserve_import.json"
# Bump when the output layout changes, so caches written by an older importer get rebuilt.
IMPORT_FORMAT_VERSION = 1


def import_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert `gguf_path` into a Hugging Face-style directory at `out_dir`; return `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    reader = open_gguf(gguf_path)
    check_architecture(reader, gguf_path)
    vocab = read_vocab(reader, gguf_path)
    hparams = read_hparams(reader, gguf_path)
    if len(vocab.tokens) > hparams.vocab_size:
        raise ValueError(f"{gguf_path}: {len(vocab.tokens)} tokens but only "
                         f"{hparams.vocab_size} embedding rows")
    try:  # before the slow tensor pass, so an unsupported tokenizer fails fast
        tokenizer = build_tokenizer(vocab)
    except ValueError as exc:
        raise ValueError(f"{gguf_path}: {exc}") from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = convert_tensors(reader, hparams, gguf_path, progress)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", _hf_config(hparams, vocab))
        _write_json(tmp / "generation_config.json", _generation_config(vocab))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(vocab))
        _write_json(tmp / "special_tokens_map.json", _special_tokens_map(vocab))
        _fsync_files(tmp)  # data on disk before the marker, so a crash cannot fake "complete"
        marker = {
            "format_version": IMPORT_FORMAT_VERSION,
            "source": gguf_path.name,
            "source_size": gguf_path.stat().st_size,
        }
        _write_json(tmp / IMPORT_MARKER, marker)  # last: its presence means "complete"
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_imported(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete import written by this importer version."""
    try:
        marker = json.loads((Path(model_dir) / IMPORT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == IMPORT_FORMAT_VERSION


def _hf_config(h: LlamaHParams, vocab: GGUFVocab) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h.hidden_size,
        "intermediate_size": h.intermediate_size,
        "num_hidden_layers": h.num_hidden_layers,
        "num_attention_heads": h.num_attention_heads,
        "num_key_value_heads": h.num_key_value_heads,
        "head_dim": h.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": h.rms_norm_eps,
        "rope_theta": h.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": h.rope_theta},  # >= 5
        "max_position_embeddings": h.max_position_embeddings,
        "vocab_size": h.vocab_size,
        "tie_word_embeddings": h.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
        "pad_token_id": vocab.pad_token_id,
        "torch_dtype": "float32",
    }


def _stop_ids(vocab: GGUFVocab) -> list[int]:
    # llama.cpp also ends generation at the end-of-turn token when the file names one.
    ids = [i for i in (vocab.eos_token_id, vocab.eot_token_id) if i is not None]
    return list(dict.fromkeys(ids))


def _generation_config(vocab: GGUFVocab) -> dict[str, Any]:
    stop = _stop_ids(vocab)
    config: dict[str, Any] = {
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": stop[0] if len(stop) == 1 else (stop or None),
    }
    if vocab.pad_token_id is not None:
        config["pad_token_id"] = vocab.pad_token_id
    return config


def _special_tokens_map(vocab: GGUFVocab) -> dict[str, Any]:
    names = {
        "bos_token": vocab.token(vocab.bos_token_id),
        "eos_token": vocab.token(vocab.eos_token_id),
        "unk_token": vocab.token(vocab.unk_token_id),
        "pad_token": vocab.token(vocab.pad_token_id),
    }
    return {k: v for k, v in names.items() if v is not None}


def _tokenizer_config(vocab: GGUFVocab) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_tokens_map(vocab),
        "add_bos_token": vocab.add_bos_token,
        "add_eos_token": vocab.add_eos_token,
        "clean_up_tokenization_spaces": False,
    }
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` directory to `out_dir`, replacing an old one."""
    # mkdtemp makes the directory 0700 and safetensors writes 0600; a cache may be shared.
    os.chmod(tmp, 0o755)
    for path in tmp.iterdir():
        os.chmod(path, 0o644)
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "dir")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
