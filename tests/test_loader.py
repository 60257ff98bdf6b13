"""Checkpoint loading: sharded safetensors, half-precision checkpoints, and clear errors for
malformed ones."""

from __future__ import annotations

import json

import pytest
import torch
from hf_oracle import hf_greedy
from tiny_models import make_tiny_checkpoint

from engine.config import EngineConfig
from engine.engine import LLMEngine
from pdserve_api.errors import ConfigError
from pdserve_api.sampling import SamplingParams

PROMPT = list(range(5, 40))


def greedy_tokens(path, n=24, **kw) -> list[int]:
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=32, **kw))
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return engine.generate([PROMPT], sp)[0].new_token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_checkpoint(tmp_path, dtype):
    import transformers

    path = make_tiny_checkpoint("qwen2", tmp_path / "m", seed=3, dtype=dtype)
    # Re-save sharded: transformers writes model.safetensors.index.json + shards.
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    # fp32 engine on a half checkpoint == transformers upcasting the same weights.
    assert greedy_tokens(sharded) == hf_greedy(sharded, PROMPT, 24)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_checkpoint("llama", tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        greedy_tokens(path)


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_checkpoint("llama", tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ConfigError, match="model.norm.weight"):
        greedy_tokens(path)
    weights["model.norm.weight"] = torch.ones(64)
    weights["model.layers.0.mystery.weight"] = torch.ones(3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ConfigError, match="mystery"):
        greedy_tokens(path)


def test_truncated_file_and_bad_config(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="safetensors"):
        greedy_tokens(path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        greedy_tokens(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        greedy_tokens(path)


def test_unsupported_rope_scaling(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="yarn"):
        greedy_tokens(path)
