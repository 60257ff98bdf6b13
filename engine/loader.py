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

from engine.model import LlamaModel
from engine.parallel import weight_loader_of
from pdserve_api.errors import ConfigError

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


def _hf_name(pname: str, shard: object) -> str:
    """The checkpoint tensor name that fills (parameter, shard): the inverse of _target."""
    for hf, (ours, sid) in _FUSED.items():
        if ours in pname and sid == shard:
            pname = pname.replace(ours, hf)
            break
    return pname if pname.startswith("lm_head") else f"model.{pname}"


def _expected_shards(pname: str) -> set:
    if ".qkv_proj." in pname:
        return {"q", "k", "v"}
    if ".gate_up_proj." in pname:
        return {0, 1}
    return {None}


def load_weights(model: LlamaModel, path: str | Path, dtype: torch.dtype) -> None:
    path = Path(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.cfg.tie_word_embeddings
    expected = {p: _expected_shards(p) for p in params if not (tied and p == "lm_head.weight")}
    loaded: dict[str, set] = {p: set() for p in expected}
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
                    load = weight_loader_of(param)
                    load(param, _DtypeSlice(f.get_slice(hf_name), dtype), shard)
                except ValueError as e:
                    raise ConfigError(f"{file.name}: tensor {hf_name!r}: {e}") from e
                loaded[pname].add(shard)
    missing = [_hf_name(p, s) for p, shards in expected.items() for s in shards - loaded[p]]
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks tensors {missing[:8]}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


class _DtypeSlice:
    """A safetensors slice that converts what it reads to the engine dtype."""

    def __init__(self, src, dtype: torch.dtype):
        self.src, self.dtype = src, dtype

    def get_shape(self):
        return self.src.get_shape()

    def __getitem__(self, idx) -> torch.Tensor:
        return self.src[idx].to(self.dtype)
