"""Tokenization, chat templates and streaming detokenization, without transformers.

Role: the router tokenizes prompts and renders chat messages; workers turn sampled ids back into
text as they stream. Both read a Hugging Face-style directory (`tokenizer.json`,
`tokenizer_config.json`, optionally `generation_config.json` / `chat_template.jinja`), such as
the one `engine.gguf_import` writes.

Contract: `Tokenizer` produces the same ids, text and rendered chat as transformers'
`AutoTokenizer` on the same directory:
  * `encode(text)` adds special tokens with tokenizer.json's post-processor, except that
    `add_bos_token` / `add_eos_token`, when tokenizer_config states them, decide BOS/EOS
    (see `_apply_bos_eos_flags` for how this relates to transformers 4 and 5).
  * `apply_chat_template` renders with the same sandboxed jinja environment and globals as
    transformers; `encode_chat` encodes the result with `add_special_tokens=False`, because
    the template already writes any BOS it wants.
`IncrementalDetokenizer` streams text deltas whose concatenation equals
`tokenizer.decode(output_ids)` whenever that decodes to valid UTF-8 at its end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or the template rejected the messages."""


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores special tokens as a plain string or a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _chat_template_from(config: dict[str, Any], model_dir: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = model_dir / "chat_template.jinja"  # where transformers >= 4.51 saves it
    return jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant tokens
    for training masks; for rendering, its body is output as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(
            self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile like transformers' `_compile_jinja_template` (same env options and globals)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """A Hugging Face fast tokenizer plus its tokenizer_config, usable without transformers."""

    def __init__(
        self,
        backend: HFTokenizer,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._config = dict(config or {})
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self.special_tokens: dict[str, str] = {
            name: text for name in _NAMED_SPECIAL
            if (text := _token_text(self._config.get(name))) is not None
        }
        self._apply_bos_eos_flags()
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_ids = self._stop_ids(generation_config or {})
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids: list[int] = self._special_ids()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ generation config, template)."""
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{model_dir}: no tokenizer.json (pdserve needs a fast tokenizer file; "
                "a .gguf model can be imported with engine.gguf_import)"
            )
        config = _read_json(model_dir / "tokenizer_config.json")
        return cls(
            HFTokenizer.from_file(str(tokenizer_file)),
            config=config,
            generation_config=_read_json(model_dir / "generation_config.json"),
            chat_template=_chat_template_from(config, model_dir),
        )

    # ------------------------------------------------------------------ set-up

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _apply_bos_eos_flags(self) -> None:
        """Make `add_bos_token` / `add_eos_token` from tokenizer_config win over tokenizer.json.

        Without the flags, tokenizer.json's post-processor decides (as in transformers). With
        them, BOS/EOS is added or removed accordingly: transformers 4's Llama-family tokenizers
        did this; transformers 5 ignores the flags when tokenizer.json exists. The two agree on
        every checkpoint whose files agree with each other, including our GGUF imports.
        """
        flags = {k: bool(self._config[k]) for k in ("add_bos_token", "add_eos_token")
                 if k in self._config}
        if not flags:
            return
        # What the current post-processor adds around one sequence.
        plain = self._backend.encode("a", add_special_tokens=False).ids
        full = self._backend.encode("a", add_special_tokens=True).ids
        if not plain:  # cannot tell added tokens from content; leave tokenizer.json alone
            return
        start = next(i for i in range(len(full) - len(plain) + 1)
                     if full[i:i + len(plain)] == plain)
        prefix, suffix = full[:start], full[start + len(plain):]
        bos_id = self._id_of(self.special_tokens.get("bos_token"))
        eos_id = self._id_of(self.special_tokens.get("eos_token"))
        if "add_bos_token" in flags:
            prefix = [i for i in prefix if i != bos_id]
            prefix = [bos_id] + prefix if flags["add_bos_token"] and bos_id is not None else prefix
        if "add_eos_token" in flags:
            suffix = [i for i in suffix if i != eos_id]
            suffix = suffix + [eos_id] if flags["add_eos_token"] and eos_id is not None else suffix

        def template(ids: list[int], type_id: int) -> list[str]:
            return [f"{self._backend.id_to_token(i)}:{type_id}" for i in ids]

        single = [*template(prefix, 0), "$A:0", *template(suffix, 0)]
        pair = [*single, *template(prefix, 1), "$B:1", *template(suffix, 1)]
        self._backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair),
            special_tokens=[(self._backend.id_to_token(i), i) for i in set(prefix + suffix)],
        )

    def _stop_ids(self, generation_config: dict[str, Any]) -> set[int]:
        ids: set[int] = set()
        eos_id = self._id_of(self.special_tokens.get("eos_token"))
        if eos_id is not None:
            ids.add(eos_id)
        gen_eos = generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(int(i) for i in gen_eos)
        return ids

    def _special_ids(self) -> list[int]:
        ids = {i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special}
        ids.update(i for name in self.special_tokens
                   if (i := self._id_of(self.special_tokens[name])) is not None)
        return sorted(ids)

    # ------------------------------------------------------------------ text <-> ids

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (shared; do not mutate)."""
        return self._backend

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers does."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model's tokenizer has no chat template; send a plain prompt or token ids "
                "instead of chat messages"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("chat messages must be a list of {'role', 'content'} dicts")
        if not messages:  # transformers refuses these too
            raise ChatTemplateError("cannot apply the chat template to an empty message list")
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens}
        variables.update(template_vars)
        try:
            if self._compiled_template is None:
                self._compiled_template = _compile_chat_template(self.chat_template)
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template rejected the messages: {exc}") from exc

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


# Tokens of context decoded before the first new one (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION
# _OFFSET): enough for a byte-level or sentencepiece token to see its neighbours.
_INITIAL_CONTEXT = 5


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas (vLLM's prefix/read offset method).

    Keeps two offsets into the id list: text up to `read_offset` has been emitted, and decoding
    starts at `prefix_offset` a few tokens earlier so that merges and leading spaces come out as
    they would in a full decode. Only `ids[prefix_offset:]` is decoded per token. A delta is held
    back while the decoded tail ends in U+FFFD (a UTF-8 character split across tokens);
    `flush()` releases whatever is still held at the end of the stream.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._prefix_offset = max(len(self._ids) - _INITIAL_CONTEXT, 0)
        self._read_offset = len(self._ids)
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._text_parts)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the newly complete text (maybe "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text_parts.append(delta)
        return delta

    def flush(self) -> str:
        """At end of stream: emit held-back text (an incomplete character decodes to U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        delta = new_text[len(prefix_text):]
        if delta:
            self._text_parts.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)
