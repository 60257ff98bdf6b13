"""Tiny random-init checkpoints of each supported family, written with transformers (the
oracle) so that pdserve loads exactly what transformers runs."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    # name: (config class name, extra config)
    "llama": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "llama_tied_mha": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}

# Head layouts that only tensor parallelism cares about: name -> (family, config overrides).
# kv1: TP=2 exceeds the KV heads (one KV head, replicated on both ranks).
# kv3_uneven: 3 KV heads over TP=2 (SmolLM2-135M's shape: 9 heads, 3 KV heads), 2 + 1 per rank.
TP_HEAD_LAYOUTS = {
    "llama_gqa_kv1": ("llama", {"num_key_value_heads": 1}),
    "llama_kv3_uneven": ("llama", {"hidden_size": 96, "num_attention_heads": 6,
                                   "num_key_value_heads": 3}),
}


def make_tiny_checkpoint(family: str, out: Path, seed: int = 0, dtype=torch.float32,
                         **overrides) -> Path:
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg_cls = getattr(transformers, cls_name)
    kwargs = {
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    }
    kwargs.update(extra)
    kwargs.update(overrides)
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # Default init (std 0.02) makes near-uniform logits; widen so greedy choices are decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(out)
    return out


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Über naïve café, 東京 and emoji 🙂 too.",
    "def add(a, b):\n    return a + b  # 12345 67890",
    "Hello world! How are you today? I am fine, thanks for asking.",
] * 20


def add_tiny_tokenizer(model_dir: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE tokenizer trained on a small corpus, with ChatML special tokens and a
    chat template: enough to exercise text paths (stop strings, streaming, chat) quickly."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }))
    return model_dir
