"""Built-in data, local image-text loaders and in-process tokenizers (no downloads)."""

from .local import LoadReport, load_image_text_folder, load_image_text_jsonl
from .synthetic import (
    Scene,
    caption_vocabulary,
    explode_captions,
    group_captions,
    make_synthetic_image_text,
    render_scene,
    sample_scene,
)
from .tokenizer import SPECIAL_TOKENS, build_word_tokenizer


__all__ = [
    "SPECIAL_TOKENS",
    "LoadReport",
    "Scene",
    "build_word_tokenizer",
    "caption_vocabulary",
    "explode_captions",
    "group_captions",
    "load_image_text_folder",
    "load_image_text_jsonl",
    "make_synthetic_image_text",
    "render_scene",
    "sample_scene",
]
