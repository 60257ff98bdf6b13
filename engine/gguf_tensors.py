"""Dequantize a llama GGUF's tensors into fp32 numpy arrays under Hugging Face Llama names.

Weights are dequantized with `gguf.quants.dequantize` (numpy) and llama.cpp's rotary
permutation of the Q/K projections is undone, so the result equals what transformers' own
GGUF loader produces. Unknown or missing tensors and shapes that disagree with the metadata
raise `ValueError`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm.auto import tqdm

from engine.gguf_metadata import LlamaHParams

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
