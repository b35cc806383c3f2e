"""Built-in data, local image-text loaders and in-process tokenizers (no downloads)."""

from .feature_cache import MissingImageFeatures, VisionFeatureCache, image_key, write_feature_cache
from .local import LoadReport, load_image_text_folder, load_image_text_jsonl, normalize_messages
from .shards import SkippedImagesCallback, load_image_text_shards
from .synthetic import (
    Scene,
    caption_vocabulary,
    explode_captions,
    group_captions,
    make_synthetic_image_text,
    render_scene,
    sample_scene,
)
from .synthetic_grounding import GroundingReport, make_synthetic_grounding
from .synthetic_interleaved import interleave_pairs, make_synthetic_interleaved
from .synthetic_multi import make_synthetic_multi_image, make_synthetic_small_objects, multi_image_vocabulary
from .synthetic_noisy import add_caption_noise
from .synthetic_preference import make_synthetic_preference, make_synthetic_safety_chat, preference_vocabulary
from .synthetic_vqa import (
    chat_vocabulary,
    make_synthetic_chat,
    make_synthetic_vqa,
    to_messages,
    vqa_vocabulary,
    write_questions,
)
from .tokenizer import END_OF_CHUNK_TOKEN, SPECIAL_TOKENS, build_word_tokenizer


__all__ = [
    "END_OF_CHUNK_TOKEN",
    "SPECIAL_TOKENS",
    "GroundingReport",
    "LoadReport",
    "MissingImageFeatures",
    "Scene",
    "SkippedImagesCallback",
    "VisionFeatureCache",
    "add_caption_noise",
    "build_word_tokenizer",
    "caption_vocabulary",
    "chat_vocabulary",
    "explode_captions",
    "group_captions",
    "image_key",
    "interleave_pairs",
    "load_image_text_folder",
    "load_image_text_jsonl",
    "load_image_text_shards",
    "make_synthetic_chat",
    "make_synthetic_grounding",
    "make_synthetic_image_text",
    "make_synthetic_interleaved",
    "make_synthetic_multi_image",
    "make_synthetic_preference",
    "make_synthetic_safety_chat",
    "make_synthetic_small_objects",
    "make_synthetic_vqa",
    "multi_image_vocabulary",
    "normalize_messages",
    "preference_vocabulary",
    "render_scene",
    "sample_scene",
    "to_messages",
    "vqa_vocabulary",
    "write_feature_cache",
    "write_questions",
]
