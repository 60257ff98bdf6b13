"""Rebuild a GGUF's byte-level BPE tokenizer as a `tokenizers.Tokenizer` (tokenizer.json).

Built from the GGUF vocabulary, merges and token types, following the pre-tokenizer the file
names in `tokenizer.ggml.pre` (see `_PRE_TOKENIZERS`). For "smollm" that is digits split one
by one before the GPT-2 regex, as llama.cpp and SmolLM2's own tokenizer.json do.
transformers' GGUF loader ignores that name and splits like plain GPT-2, so it differs from
us (and from the model's training) where whitespace directly precedes a digit. An unsupported
tokenizer model or pre-tokenizer raises `ValueError`.
"""

from __future__ import annotations

from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from engine.gguf_metadata import GGUFVocab

# llama.cpp token types (llama_token_type): only these two change how text is split.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


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
    merges = [_merge_pair(m) for m in vocab.merges]
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


def _merge_pair(merge: str) -> tuple[str, str]:
    left, space, right = merge.partition(" ")
    if not space:
        raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by a space")
    return left, right


def _post_processor(vocab: GGUFVocab) -> processors.TemplateProcessing:
    # Same shape transformers builds from add_bos_token/add_eos_token, so both agree.
    bos = _added(vocab, vocab.bos_token_id, vocab.add_bos_token)
    eos = _added(vocab, vocab.eos_token_id, vocab.add_eos_token)
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair_bos = f" {bos[0]}:1" if bos else ""
    pair_eos = f" {eos[0]}:1" if eos else ""
    pair = f"{single}{pair_bos} $B:1{pair_eos}"
    special = [token for token in (bos, eos) if token is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _added(vocab: GGUFVocab, token_id: int | None, add: bool) -> tuple[str, int] | None:
    """(token, id) of a special token the post-processor adds; None when it adds none."""
    if not add or token_id is None:
        return None
    return vocab.tokens[token_id], token_id
