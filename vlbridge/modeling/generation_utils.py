"""Generation with images: the image inputs are encoded once, follow their sample through beam search, and the
`<image>` token is never generated."""

from __future__ import annotations

import torch

from .anyres import AnyResTiles, expand_images_for_generation, expand_tiles_for_generation, images_per_sample
from .video import video_bridge_tokens


# Keyword arguments that carry images; they are consumed when the prompt is encoded and never re-sent while decoding.
IMAGE_INPUT_KEYS = (
    "pixel_values",
    "image_sizes",
    "image_attention_mask",
    "qformer_input_ids",
    "qformer_attention_mask",
    "pixel_values_videos",
    "video_num_frames",
    "vision_features",
)
# The image inputs a prompt's images come in: pixels, the frozen vision tower's cached features, or video frames.
MEDIA_KEYS = ("pixel_values", "vision_features", "pixel_values_videos")


class BridgeGenerationMixin:
    """The composite VLM's overrides of [`~GenerationMixin`] hooks; mixed in before `GenerationMixin`."""

    def generate(self, *args, **kwargs):
        """[`~GenerationMixin.generate`], with the image placeholder token suppressed: it is input only, and a
        generated one would ask for an image at the next step (an untrained model can emit it)."""
        image_token_id = self.config.image_token_id
        if image_token_id is not None and "suppress_tokens" not in kwargs:
            config = kwargs.get("generation_config") or self.generation_config
            suppressed = list(getattr(config, "suppress_tokens", None) or [])
            if image_token_id not in suppressed:
                kwargs["suppress_tokens"] = [*suppressed, image_token_id]
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # Images are encoded once, at prefill; afterwards the KV cache already holds them.
        if not is_first_iteration and model_inputs.get("use_cache", kwargs.get("use_cache", True)):
            for key in IMAGE_INPUT_KEYS:
                model_inputs.pop(key, None)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beam search / num_return_sequences repeat each sample; its images must follow it as a group (the generic
        # per-row repeat_interleave would give a two-image sample's copies the images [a, a] and [b, b]).
        media = next((model_kwargs[key] for key in MEDIA_KEYS if model_kwargs.get(key) is not None), None)
        if expand_size == 1 or media is None or input_ids is None:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        tiles = self._anyres_tiles(model_kwargs)
        # Cached any-res features hold one row per tile, not per image: expanded by tiles below.
        tile_rows = None
        if tiles is not None and model_kwargs.get("vision_features") is not None:
            tile_rows = model_kwargs.pop("vision_features")  # (num_real_tiles, P, Dv)
        num_images = len(tiles.num_tiles) if tiles is not None else media.shape[0]
        per_image = {
            key: model_kwargs.pop(key)
            for key in IMAGE_INPUT_KEYS
            if isinstance(model_kwargs.get(key), torch.Tensor) and model_kwargs[key].shape[0] == num_images
        }
        per_tile = self.config.num_image_tokens
        tokens_per_image = [count * per_tile for count in tiles.num_tiles] if tiles else [per_tile] * num_images
        counts = images_per_sample(input_ids, self.config.image_token_id, tokens_per_image)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(expand_images_for_generation(per_image, counts, expand_size))
        if tile_rows is not None:
            expanded = expand_tiles_for_generation(tile_rows, tiles.num_tiles, counts, expand_size)
            model_kwargs["vision_features"] = expanded  # (num_real_tiles * expand_size, P, Dv)
        return input_ids, model_kwargs

    def _anyres_tiles(self, model_kwargs: dict) -> AnyResTiles | None:
        """The any-res tiles of `generate`'s image inputs (pixels or cached features), None without any-res (a
        video is one medium)."""
        pixel_values, features = model_kwargs.get("pixel_values"), model_kwargs.get("vision_features")
        image_sizes = model_kwargs.get("image_sizes")
        if pixel_values is not None and pixel_values.dim() == 5:
            return AnyResTiles.from_inputs(self.config, pixel_values, image_sizes)
        if features is not None and image_sizes is not None:
            return AnyResTiles.from_image_sizes(self.config, image_sizes, features.shape[0])
        return None

    def _prepare_text_encoder_decoder_kwargs_for_generation(
        self, inputs_tensor, model_kwargs, model_input_name, generation_config
    ):
        # Encoder-decoder LM: the images must be in the encoder's input embeddings before the encoder runs once.
        image_kwargs = {key: model_kwargs.pop(key, None) for key in IMAGE_INPUT_KEYS}
        videos, num_frames = image_kwargs.pop("pixel_values_videos"), image_kwargs.pop("video_num_frames")
        if videos is not None:
            image_kwargs["bridge_tokens"] = video_bridge_tokens(self.model, videos, num_frames)  # (V, N, Db)
        input_ids = inputs_tensor if model_input_name == "input_ids" else None
        inputs_embeds = inputs_tensor if model_input_name == "inputs_embeds" else None
        inputs_embeds, _ = self.model.merge_image_tokens(input_ids, inputs_embeds, **image_kwargs)
        return super()._prepare_text_encoder_decoder_kwargs_for_generation(
            inputs_embeds, model_kwargs, "inputs_embeds", generation_config
        )
