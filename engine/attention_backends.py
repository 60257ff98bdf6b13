"""Attention backend by config name (`EngineConfig.attention_backend`): "torch" is the
reference in `attention.py`, "triton" the kernels in `triton_attention.py`."""

from __future__ import annotations

from engine.attention import AttentionBackend, TorchAttentionBackend


def get_attention_backend(name: str) -> AttentionBackend:
    """A new backend of that name; ValueError for an unknown name."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        # Lazy: triton is an optional dependency (the gpu extra) that CPU-only installs lack,
        # and its first import fixes TRITON_INTERPRET for the process.
        from engine.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose 'torch' or 'triton'")
