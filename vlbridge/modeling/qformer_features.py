"""Feature extraction from a trained Q-Former: LAVIS' `Blip2Qformer.extract_features` on the stage-1 model, and
transformers' `Blip2ForConditionalGeneration.get_qformer_features` on the VLM.

[`QFormerFeaturesMixin`] holds the one implementation of the stage-1 model's query, text and multimodal passes:
`extract_features`, `get_image_features`, `get_text_features` and `compute_itm_logits` (the ITM path of training
and retrieval) all run these helpers, so their numbers agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.utils import ModelOutput

from .bridge_utils import check_pixel_values
from .modeling_qformer import ImageKeyValues
from .outputs import BridgeModelOutput


FEATURE_MODES = ("image", "text", "multimodal")


@dataclass
class QFormerFeaturesOutput(ModelOutput):
    """
    Output of [`~QFormerForImageTextPretraining.extract_features`] (LAVIS' `BlipOutputFeatures`). Only the fields of
    the requested mode are set.

    Args:
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, hidden_size)`, *optional*):
            `mode="image"`: the query outputs of a queries-only pass (the tokens a stage-2 bridge hands on).
        image_embeds_proj (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, embed_dim)`, *optional*):
            `mode="image"`: L2-normalised `vision_proj` of `image_embeds`, the ITC image features.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, text_length, hidden_size)`, *optional*):
            `mode="text"`: the last hidden state of a text-only pass, `[CLS]` first.
        text_embeds_proj (`torch.FloatTensor` of shape `(batch_size, embed_dim)`, *optional*):
            `mode="text"`: L2-normalised `text_proj` of the `[CLS]` output, the ITC text feature.
        multimodal_embeds (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, hidden_size)`, *optional*):
            `mode="multimodal"`: the query outputs of a queries+text pass through the bidirectional mask, which the
            ITM head reads (`itm_head(multimodal_embeds).mean(1)` are the ITM logits).
    """

    image_embeds: torch.FloatTensor | None = None
    image_embeds_proj: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    text_embeds_proj: torch.FloatTensor | None = None
    multimodal_embeds: torch.FloatTensor | None = None


class QFormerFeaturesMixin:
    """
    The stage-1 model's feature passes ([`QFormerForImageTextPretraining`] inherits them). Needs `qformer`,
    `vision_proj`, `text_proj`, `itm_head` and `get_vision_features` on the model.
    """

    def _query_features(self, image_embeds: torch.FloatTensor) -> tuple[torch.FloatTensor, torch.FloatTensor]:
        """Queries-only pass: the query outputs `(B, Q, H)` and their ITC features `(B, Q, E)`."""
        query_output = self.qformer(image_embeds=image_embeds).image_tokens  # (B, Q, H)
        return query_output, F.normalize(self.vision_proj(query_output), dim=-1)

    def _text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.FloatTensor, torch.FloatTensor]:
        """Text-only pass: the hidden states `(B, T, H)` and the ITC feature of `[CLS]` `(B, E)`."""
        hidden = self.qformer(input_ids=input_ids, attention_mask=attention_mask, use_queries=False).last_hidden_state
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def _multimodal_query_output(
        self,
        image_embeds: torch.FloatTensor | None,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        image_key_values: ImageKeyValues | None = None,
    ) -> torch.FloatTensor:
        """Queries and text through the bidirectional mask (ITM); the query outputs `(B, Q, H)`."""
        return self.qformer(
            image_embeds=image_embeds,
            input_ids=input_ids,
            attention_mask=attention_mask,
            attention_mode="bidirectional",
            image_key_values=image_key_values,
        ).image_tokens

    def _vision_embeds(self, pixel_values, image_embeds, caller: str) -> torch.FloatTensor:
        """The vision tower's features `(B, P, Dv)`: `image_embeds` as given, or computed from `pixel_values`."""
        if image_embeds is not None:
            return image_embeds
        if pixel_values is None:
            raise ValueError(
                f"{caller} needs the images: pass pixel_values (from the image processor) or image_embeds (from "
                "get_vision_features)."
            )
        return self.get_vision_features(check_pixel_values(pixel_values))  # (B, P, Dv)

    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, image_embeds: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """
        ITC image embeddings: L2-normalised `vision_proj` of the query outputs, `(B, num_query_tokens, embed_dim)`;
        `extract_features(mode="image").image_embeds_proj`. Pass `pixel_values`, or the vision features
        `image_embeds` from [`get_vision_features`].
        """
        return self._query_features(self._vision_embeds(pixel_values, image_embeds, "get_image_features"))[1]

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """ITC text embeddings: L2-normalised `text_proj` of the text-only pass's `[CLS]` output, `(B, embed_dim)`;
        `extract_features(mode="text").text_embeds_proj`."""
        return self._text_features(input_ids, attention_mask)[1]

    def compute_itm_logits(
        self,
        image_embeds: torch.FloatTensor | None,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_key_values: ImageKeyValues | None = None,
    ) -> torch.FloatTensor:
        """ITM logits `(B, 2)` of the pairs (image `i`, text `i`): `itm_head` on the query outputs of a bidirectional
        queries+text pass (`extract_features(mode="multimodal").multimodal_embeds`), averaged over queries. Index 1
        is "match" (LAVIS' `compute_itm` score). The images are the vision features `image_embeds` `(B, P, Dv)`, or,
        with `image_embeds=None`, their cross-attention keys / values `image_key_values` (stage-1 training's reuse,
        from `qformer.image_key_values`)."""
        query_output = self._multimodal_query_output(image_embeds, input_ids, attention_mask, image_key_values)
        return self.itm_head(query_output).mean(dim=1)

    def extract_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "multimodal",
        image_embeds: torch.FloatTensor | None = None,
    ) -> QFormerFeaturesOutput:
        """
        Unimodal or multimodal features, as LAVIS' `Blip2Qformer.extract_features`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`, *optional*):
                The images; needed by `"image"` and `"multimodal"` (or pass `image_embeds`).
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                The texts tokenized for the Q-Former, `[CLS]` / BOS first; needed by `"text"` and `"multimodal"`.
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                Text padding mask (default: no padding).
            mode (`str`, *optional*, defaults to `"multimodal"`):
                `"image"`: `image_embeds (B, Q, H)` and `image_embeds_proj (B, Q, E)`; `"text"`: `text_embeds
                (B, T, H)` and `text_embeds_proj (B, E)`; `"multimodal"`: `multimodal_embeds (B, Q, H)`.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden_size)`, *optional*):
                The vision tower's features from [`get_vision_features`], instead of `pixel_values`.

        Returns:
            [`QFormerFeaturesOutput`]: the fields of `mode`, the others `None`.

        Example:

        ```python
        >>> import torch
        >>> from vlbridge import QFormerForImageTextPretraining, QFormerPretrainingConfig
        >>> config = QFormerPretrainingConfig(
        ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
        ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...                     "intermediate_size": 64, "num_query_tokens": 4, "vocab_size": 100},
        ...     embed_dim=16, decoder_start_token_id=1, eos_token_id=3, pad_token_id=0,
        ... )
        >>> model = QFormerForImageTextPretraining(config).eval()
        >>> pixel_values, input_ids = torch.randn(2, 3, 32, 32), torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
        >>> image = model.extract_features(pixel_values, mode="image")
        >>> image.image_embeds.shape, image.image_embeds_proj.shape
        (torch.Size([2, 4, 32]), torch.Size([2, 4, 16]))
        >>> text = model.extract_features(input_ids=input_ids, attention_mask=input_ids != 0, mode="text")
        >>> text.text_embeds.shape, text.text_embeds_proj.shape
        (torch.Size([2, 4, 32]), torch.Size([2, 16]))
        >>> model.extract_features(pixel_values, input_ids, input_ids != 0).multimodal_embeds.shape
        torch.Size([2, 4, 32])
        ```
        """
        if mode not in FEATURE_MODES:
            raise ValueError(f"mode must be one of {FEATURE_MODES}, got {mode!r}.")
        if mode != "image" and input_ids is None:
            raise ValueError(
                f'extract_features(mode="{mode}") needs the text: pass input_ids (and attention_mask) from the '
                "tokenizer."
            )
        if mode == "text":
            text_embeds, text_embeds_proj = self._text_features(input_ids, attention_mask)
            return QFormerFeaturesOutput(text_embeds=text_embeds, text_embeds_proj=text_embeds_proj)
        caller = f'extract_features(mode="{mode}")'
        vision_embeds = self._vision_embeds(pixel_values, image_embeds, caller)  # (B, P, Dv)
        if mode == "image":
            query_output, image_embeds_proj = self._query_features(vision_embeds)
            return QFormerFeaturesOutput(image_embeds=query_output, image_embeds_proj=image_embeds_proj)
        if vision_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f'extract_features(mode="multimodal") pairs image i with text i: got {vision_embeds.shape[0]} images '
                f"and {input_ids.shape[0]} texts; repeat the images (or texts) to pair them."
            )
        return QFormerFeaturesOutput(
            multimodal_embeds=self._multimodal_query_output(vision_embeds, input_ids, attention_mask)
        )


class BridgeFeaturesMixin:
    """`get_qformer_features` for [`BridgeVLMForConditionalGeneration`] (transformers' BLIP-2 has it)."""

    def get_qformer_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BridgeModelOutput:
        """
        The bridge's outputs before the language projection, as transformers'
        `Blip2ForConditionalGeneration.get_qformer_features`: for a Q-Former, `image_tokens` are the query outputs
        `(num_images, num_query_tokens, bridge_hidden_size)` (a Perceiver's latents, an MLP's tokens for the other
        bridges); `language_projection(image_tokens)` is [`get_image_features`].

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`):
                Images, as the processor returns them (any-res too, with `image_sizes`).
            kwargs:
                What [`~BridgeVLMModel.get_image_features`] takes besides: `image_attention_mask`,
                `qformer_input_ids` / `qformer_attention_mask` (InstructBLIP mode), `image_sizes`.

        Returns:
            [`BridgeModelOutput`]: `image_tokens` and the bridge's `last_hidden_state`.

        Example:

        ```python
        >>> import torch
        >>> from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
        >>> config = BridgeVLMConfig(
        ...     vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
        ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        ...     bridge_config={"model_type": "vlbridge_qformer", "hidden_size": 48, "num_hidden_layers": 2,
        ...                    "num_attention_heads": 4, "intermediate_size": 64, "num_query_tokens": 4},
        ...     text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        ...                  "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100},
        ...     image_token_id=99,
        ... )
        >>> model = BridgeVLMForConditionalGeneration(config)
        >>> model.get_qformer_features(torch.randn(2, 3, 32, 32)).image_tokens.shape
        torch.Size([2, 4, 48])
        ```
        """
        return self.model.get_bridge_outputs(pixel_values, **kwargs)


__all__ = ["BridgeFeaturesMixin", "FEATURE_MODES", "QFormerFeaturesMixin", "QFormerFeaturesOutput"]
