"""Built-in data and in-process tokenizers (no downloads)."""

from .tokenizer import SPECIAL_TOKENS, build_word_tokenizer


__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer"]
