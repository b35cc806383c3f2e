"""Word-level tokenizers built in-process with `tokenizers`, for built-in data, examples and tests (no downloads)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
# OpenFlamingo's end of an (image, text) chunk in interleaved sequences: "<image>caption<|endofchunk|><image>...".
END_OF_CHUNK_TOKEN = "<|endofchunk|>"


def build_word_tokenizer(
    words: list[str],
    padding_side: str = "right",
    add_bos: bool = True,
    image_token: bool = True,
    end_of_chunk_token: bool = False,
) -> PreTrainedTokenizerFast:
    """
    A word-level tokenizer: ids 0-4 are `<pad>`, `<unk>`, `<s>`, `</s>`, `<image>`, then `words` in order (then
    `<|endofchunk|>` when asked for).

    Args:
        words (`list[str]`):
            The vocabulary (duplicates are dropped); text splits on whitespace and punctuation.
        padding_side (`str`, *optional*, defaults to `"right"`):
            `"left"` for batched generation.
        add_bos (`bool`, *optional*, defaults to `True`):
            Prepend `<s>` when encoding with special tokens, as Llama / OPT tokenizers do.
        image_token (`bool`, *optional*, defaults to `True`):
            Include `<image>` as a special token (exposed as `tokenizer.image_token`).
        end_of_chunk_token (`bool`, *optional*, defaults to `False`):
            Add OpenFlamingo's `<|endofchunk|>` (`END_OF_CHUNK_TOKEN`), which ends each (image, text) chunk of an
            interleaved sequence, as a special token (`tokenizer.end_of_chunk_token` / `end_of_chunk_token_id`). It
            takes the id after the last word, so every other id is the same as without it.

    Example:

    ```python
    >>> from vlbridge.data.tokenizer import build_word_tokenizer
    >>> tokenizer = build_word_tokenizer(["a", "red", "circle"])
    >>> tokenizer("<image> a red circle").input_ids
    [2, 4, 5, 6, 7]
    >>> tokenizer = build_word_tokenizer(["a", "red", "circle"], end_of_chunk_token=True)
    >>> tokenizer("<image>a red circle<|endofchunk|>").input_ids, tokenizer.end_of_chunk_token_id
    ([2, 4, 5, 6, 7, 8], 8)
    ```
    """
    specials = list(SPECIAL_TOKENS if image_token else SPECIAL_TOKENS[:-1])
    tokens = specials + [w for w in dict.fromkeys(words) if w not in specials]
    if end_of_chunk_token:
        tokens = [token for token in tokens if token != END_OF_CHUNK_TOKEN] + [END_OF_CHUNK_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        bos_id = vocab["<s>"]
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
        )
    # Named special tokens are matched whole, before the whitespace / punctuation split.
    extra = {"image_token": "<image>"} if image_token else {}
    if end_of_chunk_token:
        extra["end_of_chunk_token"] = END_OF_CHUNK_TOKEN
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
        extra_special_tokens=extra,
    )
