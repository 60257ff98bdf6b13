"""Load a local Hugging Face checkpoint (single or sharded safetensors) into LlamaModel.

Each rank reads only its slices (safetensors slices are lazy), converts to the engine dtype,
and every parameter must be filled exactly once: a missing, unexpected or mis-shaped tensor
is a ConfigError naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ConfigError
from engine.model import LlamaModel

# HF name fragment -> (our fused parameter fragment, shard id)
_FUSED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{index} is malformed: {e}") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{path}: shards listed in the index are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors weights found")
    return files


def _target(name: str) -> tuple[str, object]:
    name = name.removeprefix("model.") if not name.startswith("lm_head") else name
    for hf, (ours, shard) in _FUSED.items():
        if hf in name:
            return name.replace(hf, ours), shard
    return name, None


def load_weights(model: LlamaModel, path: str | Path, dtype: torch.dtype) -> None:
    path = Path(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected_loads: dict[str, int] = {}
    for pname in params:
        shards = 3 if ".qkv_proj.weight" in pname or ".qkv_proj.bias" in pname else 1
        shards = 2 if ".gate_up_proj." in pname else shards
        expected_loads[pname] = shards
    tied = model.cfg.tie_word_embeddings
    if tied:
        expected_loads.pop("lm_head.weight", None)
    done: dict[str, int] = {}
    for file in safetensors_files(path):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"{file}: cannot read safetensors: {e}") from e
        with handle as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open handle, not a dict)
                if hf_name.endswith(_IGNORED_SUFFIXES):
                    continue
                if tied and hf_name == "lm_head.weight":
                    continue  # some tied checkpoints still store a copy
                pname, shard = _target(hf_name)
                param = params.get(pname)
                if param is None:
                    raise ConfigError(f"{file.name}: unexpected tensor {hf_name!r}")
                try:
                    param.weight_loader(param, _DtypeSlice(f.get_slice(hf_name), dtype), shard)
                except ValueError as e:
                    raise ConfigError(f"{file.name}: tensor {hf_name!r}: {e}") from e
                done[pname] = done.get(pname, 0) + 1
    missing = [p for p, n in expected_loads.items() if done.get(p, 0) < n]
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks weights for {missing[:8]}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


class _DtypeSlice:
    """A safetensors slice that converts what it reads to the engine dtype."""

    def __init__(self, src, dtype: torch.dtype):
        self.src, self.dtype = src, dtype

    def get_shape(self):
        return self.src.get_shape()

    def __getitem__(self, idx) -> torch.Tensor:
        return self.src[idx].to(self.dtype)
