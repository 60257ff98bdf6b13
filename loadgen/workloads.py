"""What to send: an endless, seeded stream of `RequestSpec`s.

Kinds (`WorkloadConfig.kind`):
- `random`: input and output lengths drawn from `LengthDist`s; prompts are random token ids
  (exact lengths, any tokenizer) or random words (`prompt_format="text"`, about one token a
  word).
- `shared-prefix`: `num_groups` fixed random prefixes of `prefix_len` tokens, each request one
  group's prefix plus a fresh random suffix of `suffix_len` tokens: the case prefix caching
  is for.
- `sharegpt`: a ShareGPT-format JSON file (a list of `{"conversations": [{"from": "human" |
  "gpt" | "system", "value": ...}]}`): each conversation's first user turn (with any system
  turn before it) becomes chat messages; the output length is the reply's length estimated at
  4 characters a token, capped at `output_cap`. Conversations are shuffled with the seed and
  cycled.

Every request belongs to a `TrafficClass` drawn by weight; a class carries its SLO, priority
and, optionally, its own input/output lengths. Contract: the same config and seed give the
same sequence of specs, whatever the timing of the run that consumes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadgen.distributions import LengthDist

WORKLOAD_KINDS = ("random", "shared-prefix", "sharegpt")
PROMPT_FORMATS = ("tokens", "text")
GROUP_ORDERS = ("random", "round-robin")
CHARS_PER_TOKEN = 4  # ShareGPT reply length -> output tokens, without a tokenizer
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                   "bard": "assistant", "bing": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}
# Common short English words: each is about one token in a BPE vocabulary.
_WORDS = ("the", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on",
          "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or",
          "had", "by", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all",
          "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do",
          "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would",
          "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has",
          "look", "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most",
          "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down",
          "side", "been", "now", "find")


@dataclass
class TrafficClass:
    """A share of the traffic with its own SLO (0 = no target) and priority (higher first)."""

    name: str = "default"
    weight: float = 1.0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    priority: int = 0
    input_len: str | None = None  # a LengthDist spec; None: the workload's
    output_len: str | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ":,= "):
            raise ValueError(f"traffic class name {self.name!r}: must be non-empty, without "
                             "':', ',', '=' or spaces")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"traffic class {self.name}: weight must be > 0, got {self.weight}")
        if self.ttft_ms < 0 or self.tpot_ms < 0:
            raise ValueError(f"traffic class {self.name}: SLOs must be >= 0 (0 = no target)")
        for spec in (self.input_len, self.output_len):
            if spec is not None:
                LengthDist.parse(spec)

    @classmethod
    def parse(cls, spec: str) -> TrafficClass:
        """`NAME[:key=value,...]`, keys: weight, ttft_ms, tpot_ms, priority, input_len,
        output_len, e.g. `chat:weight=3,ttft_ms=500,tpot_ms=100,priority=1,output_len=fixed:32`."""
        name, _, rest = spec.partition(":")
        kwargs: dict[str, object] = {"name": name}
        types = {"weight": float, "ttft_ms": float, "tpot_ms": float, "priority": int,
                 "input_len": str, "output_len": str}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in types:
                raise ValueError(f"traffic class {spec!r}: {item!r} is not KEY=VALUE with KEY "
                                 f"one of {', '.join(types)}")
            try:
                kwargs[key] = types[key](value)
            except ValueError:
                raise ValueError(f"traffic class {spec!r}: {key}={value!r} is not a "
                                 f"{types[key].__name__}") from None
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass
class WorkloadConfig:
    kind: str = "random"  # one of WORKLOAD_KINDS
    input_len: str = "uniform:32:256"  # LengthDist specs (random)
    output_len: str = "uniform:8:64"  # (random, shared-prefix; sharegpt when set per class)
    prompt_format: str = "tokens"  # random: token ids or words
    token_id_low: int = 16  # random token ids are drawn from [low, high): keep high <= vocab
    token_id_high: int = 300
    num_groups: int = 4  # shared-prefix
    prefix_len: int = 256
    suffix_len: int = 32
    group_order: str = "random"  # random | round-robin (request i uses group i % num_groups)
    dataset: str | None = None  # sharegpt: path to the JSON file
    output_cap: int = 256  # sharegpt: most output tokens a request asks for
    max_prompt_chars: int | None = None  # sharegpt: skip longer prompts
    classes: list[TrafficClass] = field(default_factory=lambda: [TrafficClass()])
    temperature: float = 0.0
    ignore_eos: bool = True  # so that requests produce the lengths asked for

    def __post_init__(self) -> None:
        self.classes = [c if isinstance(c, TrafficClass) else TrafficClass(**c)
                        for c in self.classes]
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"workload {self.kind!r}: must be one of {', '.join(WORKLOAD_KINDS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format {self.prompt_format!r}: must be one of "
                             f"{', '.join(PROMPT_FORMATS)}")
        if self.prompt_format == "text" and self.kind != "random":
            raise ValueError(f"prompt format text: only the random workload makes text prompts "
                             f"({self.kind} prompts are token ids or chat)")
        if self.group_order not in GROUP_ORDERS:
            raise ValueError(f"group order {self.group_order!r}: must be one of "
                             f"{', '.join(GROUP_ORDERS)}")
        LengthDist.parse(self.input_len)
        LengthDist.parse(self.output_len)
        if not 0 <= self.token_id_low < self.token_id_high:
            raise ValueError(f"token id range [{self.token_id_low}, {self.token_id_high}): "
                             "need 0 <= low < high")
        if self.num_groups < 1 or self.prefix_len < 0 or self.suffix_len < 0 or \
                self.prefix_len + self.suffix_len < 1:
            raise ValueError(f"shared prefix: need num_groups >= 1 and prefix_len + suffix_len "
                             f">= 1, got {self.num_groups} x {self.prefix_len} + "
                             f"{self.suffix_len}")
        if self.kind == "sharegpt" and not self.dataset:
            raise ValueError("the sharegpt workload needs a dataset path (--dataset FILE)")
        if self.output_cap < 1:
            raise ValueError(f"output cap must be >= 1, got {self.output_cap}")
        if not self.classes:
            raise ValueError("at least one traffic class is needed")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"traffic class names must be unique, got {names}")


@dataclass(slots=True)
class RequestSpec:
    """One request to send; exactly one of token_ids / text / chat is set."""

    index: int  # position in the workload's sequence
    traffic_class: str
    max_tokens: int
    token_ids: list[int] | None = None
    text: str | None = None
    chat: list[dict[str, str]] | None = None
    ttft_ms: float = 0.0  # SLO; 0 = no target
    tpot_ms: float = 0.0
    priority: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True


@dataclass(slots=True)
class _Prompt:
    token_ids: list[int] | None = None
    text: str | None = None
    chat: list[dict[str, str]] | None = None
    max_tokens: int | None = None  # None: from the output length distribution


class Workload:
    """Iterate for `RequestSpec`s; endless. Built by `make_workload`."""

    def __init__(self, config: WorkloadConfig, seed: int):
        self.config = config
        self.rng = np.random.default_rng(seed)
        self._classes = config.classes
        weights = np.array([c.weight for c in self._classes], dtype=float)
        self._p = weights / weights.sum()
        self._input = {c.name: LengthDist.parse(c.input_len or config.input_len)
                       for c in self._classes}
        self._output = {c.name: LengthDist.parse(c.output_len or config.output_len)
                        for c in self._classes}
        self._overrides_output = {c.name: c.output_len is not None for c in self._classes}
        self._prefixes: list[list[int]] = []
        self._conversations: list[tuple[list[dict[str, str]], int]] = []
        if config.kind == "shared-prefix":
            self._prefixes = [self._random_ids(config.prefix_len)
                              for _ in range(config.num_groups)]
        elif config.kind == "sharegpt":
            convs = load_sharegpt(config.dataset, config.max_prompt_chars)  # type: ignore[arg-type]
            order = self.rng.permutation(len(convs))
            self._conversations = [convs[i] for i in order]

    def __iter__(self) -> Iterator[RequestSpec]:
        index = 0
        while True:
            cls = self._classes[int(self.rng.choice(len(self._classes), p=self._p))]
            prompt = self._prompt(index, cls)
            max_tokens = prompt.max_tokens
            if max_tokens is None or self._overrides_output[cls.name]:
                max_tokens = self._output[cls.name].sample(self.rng)
            yield RequestSpec(index=index, traffic_class=cls.name, max_tokens=max_tokens,
                              token_ids=prompt.token_ids, text=prompt.text, chat=prompt.chat,
                              ttft_ms=cls.ttft_ms, tpot_ms=cls.tpot_ms, priority=cls.priority,
                              temperature=self.config.temperature,
                              ignore_eos=self.config.ignore_eos)
            index += 1

    def _prompt(self, index: int, cls: TrafficClass) -> _Prompt:
        cfg = self.config
        if cfg.kind == "random":
            n = self._input[cls.name].sample(self.rng)
            if cfg.prompt_format == "text":
                return _Prompt(text=" ".join(self.rng.choice(_WORDS, n)))
            return _Prompt(token_ids=self._random_ids(n))
        if cfg.kind == "shared-prefix":
            group = (index % cfg.num_groups if cfg.group_order == "round-robin"
                     else int(self.rng.integers(cfg.num_groups)))
            return _Prompt(token_ids=self._prefixes[group] + self._random_ids(cfg.suffix_len))
        chat, reply_tokens = self._conversations[index % len(self._conversations)]
        return _Prompt(chat=chat, max_tokens=min(cfg.output_cap, reply_tokens))

    def _random_ids(self, n: int) -> list[int]:
        return self.rng.integers(self.config.token_id_low, self.config.token_id_high,
                                 n).tolist()


def make_workload(config: WorkloadConfig, seed: int) -> Workload:
    return Workload(config, seed)


def load_sharegpt(path: str | Path, max_prompt_chars: int | None = None
                  ) -> list[tuple[list[dict[str, str]], int]]:
    """(chat messages up to the first user turn, estimated reply tokens) per usable
    conversation; raises ValueError when the file has none."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"ShareGPT dataset {path}: {e}") from None
    if isinstance(data, dict):  # some dumps wrap the list
        data = data.get("data") or data.get("conversations") or []
    if not isinstance(data, list):
        raise ValueError(  # noqa: TRY004 - a bad file, reported like the other file errors
            f"ShareGPT dataset {path}: expected a JSON list of conversations")
    out = []
    for conv in data:
        if not isinstance(conv, dict):
            continue
        turns = conv.get("conversations") or conv.get("conversation") or []
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                break
            role = _SHAREGPT_ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            value = turn.get("value", turn.get("content"))
            if role is None or not isinstance(value, str) or not value.strip():
                break
            messages.append({"role": role, "content": value})
        for i, m in enumerate(messages[:-1]):
            if m["role"] == "user" and messages[i + 1]["role"] == "assistant":
                prompt = messages[:i + 1]
                if max_prompt_chars is None or \
                        sum(len(p["content"]) for p in prompt) <= max_prompt_chars:
                    reply = messages[i + 1]["content"]
                    out.append((prompt, max(1, math.ceil(len(reply) / CHARS_PER_TOKEN))))
                break
    if not out:
        raise ValueError(f"ShareGPT dataset {path}: no conversation has a user turn followed "
                         "by a reply" + (f" within {max_prompt_chars} prompt characters"
                                         if max_prompt_chars else ""))
    return out
