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
  * Weights are dequantized with `gguf.quants.dequantize` (numpy) and llama.cpp's rotary
    permutation of the Q/K projections is undone, so the result equals what transformers'
    own GGUF loader produces. No transformers or accelerate is needed.
  * The tokenizer is rebuilt with the `tokenizers` library from the GGUF vocabulary, merges and
    token types (byte-level BPE only), following the pre-tokenizer the file names in
    `tokenizer.ggml.pre` (see `_PRE_TOKENIZERS`). For "smollm" that is digits split one by one
    before the GPT-2 regex, as llama.cpp and SmolLM2's own tokenizer.json do. transformers'
    GGUF loader ignores that name and splits like plain GPT-2, so it differs from us (and
    from the model's training) where whitespace directly precedes a digit.
  * Anything unsupported (architecture, tokenizer model, pre-tokenizer, RoPE scaling, MoE,
    unknown tensors) or missing (a required key or tensor) raises `ValueError` naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tqdm.auto import tqdm

IMPORT_MARKER = "pdserve_import.json"
# Bump when the output layout changes, so caches written by an older importer get rebuilt.
IMPORT_FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp token types (llama_token_type): only these two change how text is split.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


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


def import_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert `gguf_path` into a Hugging Face-style directory at `out_dir`; return `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    reader = _open(gguf_path)
    _check_architecture(reader, gguf_path)
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


# ----------------------------------------------------------------------------- metadata


def _open(path: Path) -> GGUFReader:
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


def _check_architecture(reader: GGUFReader, source: Path) -> None:
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


# ----------------------------------------------------------------------------- tensors


def reverse_rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of a Q or K projection ([rows, in]).

    llama.cpp reorders each head's rows from HF's "rotate half" layout into interleaved pairs
    (reshape(n_head, 2, d/2).swapaxes(1, 2)); this is the inverse, as in transformers'
    `LlamaTensorProcessor._reverse_permute_weights`. For K, `n_head` is the KV head count.
    """
    half = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weight.shape))


def _hf_name(gguf_name: str, num_layers: int) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if m and int(m.group(1)) < num_layers and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
    return None


def _expected_shapes(h: LlamaHParams) -> dict[str, tuple[int, ...]]:
    q_dim, kv_dim = h.num_attention_heads * h.head_dim, h.num_key_value_heads * h.head_dim
    per_layer = {
        "input_layernorm": (h.hidden_size,),
        "self_attn.q_proj": (q_dim, h.hidden_size),
        "self_attn.k_proj": (kv_dim, h.hidden_size),
        "self_attn.v_proj": (kv_dim, h.hidden_size),
        "self_attn.o_proj": (h.hidden_size, q_dim),
        "post_attention_layernorm": (h.hidden_size,),
        "mlp.gate_proj": (h.intermediate_size, h.hidden_size),
        "mlp.up_proj": (h.intermediate_size, h.hidden_size),
        "mlp.down_proj": (h.hidden_size, h.intermediate_size),
    }
    shapes = {
        "model.embed_tokens.weight": (h.vocab_size, h.hidden_size),
        "model.norm.weight": (h.hidden_size,),
    }
    if not h.tie_word_embeddings:
        shapes["lm_head.weight"] = (h.vocab_size, h.hidden_size)
    for i in range(h.num_hidden_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def convert_tensors(
    reader: GGUFReader, h: LlamaHParams, source: Path, progress: bool = True
) -> dict[str, np.ndarray]:
    """All weights as fp32 numpy arrays under Hugging Face Llama names."""
    unknown = [t.name for t in reader.tensors if _hf_name(t.name, h.num_hidden_layers) is None]
    if unknown:
        raise ValueError(f"{source}: unsupported GGUF tensors for llama: {', '.join(unknown[:8])}")
    expected = _expected_shapes(h)
    out: dict[str, np.ndarray] = {}
    bar = tqdm(reader.tensors, desc=f"Importing {source.name}", unit="tensor", disable=not progress)
    for tensor in bar:
        name = _hf_name(tensor.name, h.num_hidden_layers)
        assert name is not None
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if weight.shape != expected[name]:
            raise ValueError(
                f"{source}: tensor {tensor.name} has shape {weight.shape}, "
                f"expected {expected[name]} from the metadata"
            )
        if ".attn_q." in tensor.name:
            weight = reverse_rope_permute(weight, h.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = reverse_rope_permute(weight, h.num_key_value_heads)
        out[name] = np.ascontiguousarray(weight)
    missing = [name for name in expected if name not in out]
    if missing:
        raise ValueError(f"{source}: GGUF is missing tensors: {', '.join(missing[:8])}")
    return out


# ----------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's "smollm"/"starcoder" split: every \p{N} char alone, then the GPT-2 regex. This
    # is what the original SmolLM2/StarCoder tokenizer.json does (Digits + ByteLevel).
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_pre_tokenizer()]
    )


# tokenizer.ggml.pre -> pre-tokenizer. Deliberately short: an unknown name is refused rather
# than guessed, because a wrong split silently changes token ids.
_PRE_TOKENIZERS = {
    "default": _gpt2_pre_tokenizer,
    "gpt2": _gpt2_pre_tokenizer,
    "gpt-2": _gpt2_pre_tokenizer,
    "smollm": _digits_then_gpt2_pre_tokenizer,
    "starcoder": _digits_then_gpt2_pre_tokenizer,
}


def build_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """A `tokenizers.Tokenizer` equivalent to the GGUF's byte-level BPE tokenizer.

    Mirrors transformers' GGUF converter (vocabulary respelled into the byte alphabet where a
    token is stored as raw text, control tokens added as special, user-defined ones as plain
    added tokens) except for the pre-tokenizer, which follows `tokenizer.ggml.pre`.
    """
    if vocab.model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {vocab.model!r} is not supported; only byte-level BPE ('gpt2')"
        )
    if vocab.pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {vocab.pre!r} is not supported; "
            f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        if set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    bpe_vocab = {spelled(token): i for i, token in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    tok = HFTokenizer(
        BPE(
            vocab=bpe_vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = _PRE_TOKENIZERS[vocab.pre]()
    tok.decoder = decoders.ByteLevel()
    types = vocab.token_types
    # A "control" token outside the byte alphabet is a llama.cpp mislabel; adding it would
    # make an unreachable id reachable from text (transformers skips it too).
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(vocab.tokens, types)
        if kind == _TOKEN_TYPE_CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(vocab.tokens, types)
        if kind == _TOKEN_TYPE_USER_DEFINED and t in bpe_vocab
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    tok.post_processor = _post_processor(vocab)
    return tok


def _post_processor(vocab: GGUFVocab) -> processors.TemplateProcessing:
    # Same shape transformers builds from add_bos_token/add_eos_token, so both agree.
    bos, eos = vocab.token(vocab.bos_token_id), vocab.token(vocab.eos_token_id)
    add_bos = vocab.add_bos_token and bos is not None
    add_eos = vocab.add_eos_token and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair_bos = f" {bos}:1" if add_bos else ""
    pair_eos = f" {eos}:1" if add_eos else ""
    pair = f"{single}{pair_bos} $B:1{pair_eos}"
    special: list[tuple[str, int]] = []
    if add_bos:
        special.append((bos, vocab.bos_token_id))
    if add_eos:
        special.append((eos, vocab.eos_token_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# ----------------------------------------------------------------------------- output files


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
