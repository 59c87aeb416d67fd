"""Tokenizers for the driver.

Real checkpoints bring their own tokenizers (BERT for the M-Hub, the LLM's for the LLM). The
embedded data and tiny random-weight models use a word-level tokenizer whose vocabulary is
built from the run's own texts, saved next to the checkpoint so evaluation sees the same ids.
"""

from __future__ import annotations

import os
import re

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<s>", "</s>"
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """How the word tokenizer splits (lower-cased words and single punctuation marks)."""
    return _WORD.findall(text.lower())


def build_word_tokenizer(texts, extra_special: list[str] = ()) -> PreTrainedTokenizerFast:
    """A deterministic word-level tokenizer over every word in ``texts`` (sorted, so stable)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    specials = [PAD, UNK, BOS, EOS, *extra_special]
    vocab_words = sorted({w for t in texts for w in words(t)} - set(specials))
    vocab = {tok: i for i, tok in enumerate(specials + vocab_words)}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tok


def load_tokenizer(path: str, what: str = "tokenizer") -> PreTrainedTokenizerBase:
    """A local tokenizer folder; ``what`` names the config key in errors."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: tokenizer folder not found: {path}")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # OPT/Llama tokenizers may lack one; padding never reaches the loss
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


class TruncationCount:
    """Texts cut at the token cap (``data.max_text_tokens``), counted once per distinct text.

    ``count``: texts cut; ``longest``: the longest uncut length seen (tokens); ``message()``: one
    line for the run's log, or None when nothing was cut.
    """

    def __init__(self, cap: int, key: str = "data.max_text_tokens"):
        self.cap, self.key = cap, key
        self.count, self.longest = 0, 0
        self.by_part: dict[str, int] = {}

    def add(self, part: str, length: int) -> None:
        """One text of ``length`` tokens (uncut) was cut to the cap; ``part`` says which ("LLM target", ...)."""
        self.count += 1
        self.longest = max(self.longest, length)
        self.by_part[part] = self.by_part.get(part, 0) + 1

    def message(self) -> str | None:
        if not self.count:
            return None
        parts = ", ".join(f"{n} {part}" for part, n in sorted(self.by_part.items()))
        return (
            f"{self.count} distinct texts were cut at {self.key}={self.cap} tokens ({parts}); the longest had "
            f"{self.longest} tokens. Raise {self.key} to keep them whole"
        )
