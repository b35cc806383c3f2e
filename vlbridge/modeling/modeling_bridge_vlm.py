"""The composite VLM: any vision tower -> bridge -> (language projection) -> any language model.

Images reach the language model through `<image>` tokens, never as prepended embeddings, so logits stay aligned
one-to-one with `input_ids`, which TRL's fused LM head and the DPO loss rely on. With token fusion (the default) the
bridge's tokens are scattered into the placeholder positions of the input embeddings; with gated cross-attention
(Flamingo) each image is one marker token and the text reads the bridge's tokens through gated blocks beside the
language model (`gated_cross_attention.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging

from ..configuration import BridgeVLMConfig
from .attention_support import AttentionSupportMixin
from .bridge_utils import check_pixel_values
from .compat import CACHE_KEY
from .freezing import FreezingMixin
from .from_pretrained_parts import from_vision_text_pretrained
from .gated_cross_attention import (
    CrossAttentionFusionMixin,
    GatedCrossAttentionBlock,
    GatedCrossAttentionLayers,
    find_decoder_layers,
)
from .generation_utils import BridgeGenerationMixin
from .language_projection import build_language_projection, project_image_tokens
from .outputs import BridgeModelOutput, BridgeVLMModelOutput, BridgeVLMOutput
from .qformer_features import BridgeFeaturesMixin
from .saving import SelfDescribingMixin, push_to_hub_with_processor
from .video import video_bridge_tokens
from .vision_features import VisionFeaturesMixin


logger = logging.get_logger(__name__)


class BridgeVLMPreTrainedModel(AttentionSupportMixin, FreezingMixin, PreTrainedModel):
    config: BridgeVLMConfig
    config_class = BridgeVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # `_supports_flash_attn` follows the bridge (AttentionSupportMixin): only the MLP projector can take flash.
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # The bridge is small and numerically delicate (BLIP-2 keeps its Q-Former in fp32 for the same reason): it stays
    # fp32 when the rest is loaded in bf16 / fp16, and activations are cast at its boundaries.
    _keep_in_fp32_modules_strict = ["bridge"]
    # A Q-Former bridge has its text branch only in InstructBLIP mode (`use_qformer_text_input`); checkpoints saved
    # before the bridge followed that flag hold it anyway, and those weights are dropped without a warning.
    _keys_to_ignore_on_load_unexpected = [
        r"bridge\.embeddings\.(word|position)_embeddings\.",
        r"bridge\.encoder\.layer\.\d+\.(intermediate|output)\.",
    ]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, GatedCrossAttentionBlock):
            # Flamingo's tanh gates start at 0: a new block leaves the language model exactly as it was.
            init.zeros_(module.attention_gate)
            init.zeros_(module.mlp_gate)
        elif module is getattr(self, "language_projection", None):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class BridgeVLMModel(VisionFeaturesMixin, CrossAttentionFusionMixin, BridgeVLMPreTrainedModel):
    r"""
    Vision tower, bridge, language projection (unless `config.use_language_projection=False`) and language model,
    without a language-modelling head.

    Args:
        config ([`BridgeVLMConfig`]):
            The composite configuration; each part is built from its sub-config with the Auto classes.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import BridgeVLMConfig, BridgeVLMModel
    >>> config = BridgeVLMConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     bridge_config={"model_type": "vlbridge_mlp", "hidden_size": 32, "drop_cls_token": True},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                  "num_attention_heads": 4, "vocab_size": 100},
    ...     image_token_id=99,
    ... )
    >>> model = BridgeVLMModel(config)
    >>> input_ids = torch.tensor([[1] + [99] * config.num_image_tokens + [5, 6]])
    >>> model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.shape
    torch.Size([1, 19, 32])
    ```
    """

    def __init__(self, config: BridgeVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        # fp32 even when built under a bf16 / fp16 default dtype (`_from_config(..., dtype=...)`): the bridge is fp32.
        self.bridge = AutoModel.from_config(config.bridge_config).float()
        self.language_model = AutoModel.from_config(config.text_config)
        embed_dim = self.language_model.get_input_embeddings().embedding_dim
        # None with `use_language_projection=False` (LLaVA-1.5): no module, no checkpoint keys.
        self.language_projection = build_language_projection(config, embed_dim)
        # Flamingo fusion: the gated blocks sit beside the language model and reach it through hooks on its decoder
        # layers, so the language model's own modules and checkpoint keys stay as they are.
        self.gated_cross_attention = None
        if config.uses_cross_attention:
            self.gated_cross_attention = GatedCrossAttentionLayers(config, config.text_config.hidden_size)
            self.gated_cross_attention.attach(find_decoder_layers(self.language_model, config.text_num_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_encoder(self, modality: str | None = None):
        if not self.config.is_encoder_decoder:
            raise AttributeError("Only an encoder-decoder language model has an encoder.")
        return self.language_model.get_encoder()

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> torch.FloatTensor:
        """
        Encodes images into the tokens that replace their `<image>` placeholders.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`):
                Images, as the processor returns them. Any-res (`config.image_grid_pinpoints`): `(num_images,
                max_tiles, num_channels, height, width)` from [`BridgeAnyResImageProcessor`], with `image_sizes`;
                each real tile (base view first) goes through the vision tower and the bridge on its own, and
                padding tiles are dropped.
            image_attention_mask (`torch.Tensor` of shape `(num_images, num_features)`, *optional*):
                Which image features are real (padded features are masked out in the bridge). Not with any-res,
                where the model builds the tiles' masks itself (`config.anyres_mask_padding`).
            qformer_input_ids (`torch.LongTensor` of shape `(num_images, text_length)`, *optional*):
                InstructBLIP mode: the instruction, tokenized for the Q-Former, one row per image (any-res: per image
                or per tile).
            qformer_attention_mask (`torch.Tensor` of shape `(num_images, text_length)`, *optional*):
                Padding mask of `qformer_input_ids`.
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
                Any-res only: each image's original `(height, width)`, from which its tile count is derived.
            vision_features (`torch.FloatTensor` of shape `(num_images, P, Dv)`, *optional*):
                Instead of `pixel_values`: the vision tower's features from [`get_vision_features`] (or a
                `VisionFeatureCache`), for a frozen tower. Any-res: `(num_real_tiles, P, Dv)` with `image_sizes`.

        Returns:
            `torch.FloatTensor` of shape `(num_images, num_image_tokens, embed_dim)`, in the language projection's
            dtype (the LM's without one); with any-res `(num_real_tiles, num_image_tokens, embed_dim)`, tiles image
            after image, so that an image's tokens are the concatenation of its tiles'.

        Raises:
            `TypeError` / `ValueError`: for pixel values no processor made (integer dtypes, NaN / inf, a list of
            tensors of different shapes; a list of one shape is stacked), see [`check_pixel_values`].
        """
        if pixel_values is not None:
            pixel_values = check_pixel_values(pixel_values, check_finite=False)
        return self._image_features(
            pixel_values,
            image_attention_mask,
            qformer_input_ids,
            qformer_attention_mask,
            image_sizes,
            vision_features=vision_features,
        )

    def get_bridge_outputs(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        vision_features: torch.FloatTensor | None = None,
    ) -> BridgeModelOutput:
        """[`get_image_features`] (same arguments) before the language projection: the bridge's output, whose
        `image_tokens` are `(num_images, num_image_tokens, bridge_hidden_size)`, in the bridge's fp32."""
        if pixel_values is not None:
            pixel_values = check_pixel_values(pixel_values, check_finite=False)
        return self._bridge_outputs(
            pixel_values, image_attention_mask, qformer_input_ids, qformer_attention_mask, image_sizes, vision_features
        )

    def _image_features(self, pixel_values, *args, **kwargs) -> torch.FloatTensor:
        image_tokens = self._bridge_outputs(pixel_values, *args, **kwargs).image_tokens  # (num_images, N, Db), fp32
        text_dtype = self.get_input_embeddings().weight.dtype
        return project_image_tokens(self.language_projection, image_tokens, text_dtype)  # (num_images, N, Dt)

    def _bridge_outputs(
        self,
        pixel_values,
        image_attention_mask,
        qformer_input_ids,
        qformer_attention_mask,
        image_sizes,
        vision_features=None,
    ) -> BridgeModelOutput:
        """`get_bridge_outputs` on pixel values already stacked and type-checked (looks for NaN / inf itself), or on
        `vision_features`."""
        # (num_images or num_real_tiles, P, Dv); tiles: None without any-res
        image_embeds, tiles = self._encode_images(pixel_values, vision_features, image_sizes, image_attention_mask)
        if tiles is not None:
            qformer_input_ids = tiles.per_tile(qformer_input_ids)
            qformer_attention_mask = tiles.per_tile(qformer_attention_mask)
        if tiles is not None and self.config.anyres_mask_padding:
            image_attention_mask = tiles.feature_mask(
                image_embeds.shape[1],
                getattr(self.config.vision_config, "patch_size", None),
                self.config.vision_num_prefix_tokens,
                image_embeds.device,
            )  # (num_real_tiles, P) or None
        bridge_kwargs = {}
        if self.config.use_qformer_text_input:
            if qformer_input_ids is None:
                raise ValueError(
                    "This model feeds the instruction to the Q-Former (use_qformer_text_input=True): pass "
                    "qformer_input_ids, as BridgeProcessor returns them when built with a qformer_tokenizer."
                )
            bridge_kwargs = {"input_ids": qformer_input_ids, "attention_mask": qformer_attention_mask}
        # image_embeds goes first and by position: peft < 0.19 wraps a `modules_to_save` bridge in a module whose
        # forward takes the input as positional `x` (LoRA with `train_bridge=True`).
        return self.bridge(image_embeds, image_attention_mask=image_attention_mask, **bridge_kwargs)

    def _per_image_qformer_inputs(self, input_ids, qformer_input_ids, qformer_attention_mask, num_anyres_images=None):
        """The processor gives one Q-Former text per sample; each of a sample's images gets that sample's text.

        With any-res the unit is the tile (each takes `num_image_tokens` tokens), so per-sample rows become per-tile
        rows here; rows already per image (`num_anyres_images` of them) are spread over tiles in `get_image_features`.
        """
        if qformer_input_ids is None or input_ids is None:
            return qformer_input_ids, qformer_attention_mask
        if num_anyres_images is not None and qformer_input_ids.shape[0] == num_anyres_images:
            return qformer_input_ids, qformer_attention_mask
        images_per_sample = (input_ids == self.config.image_token_id).sum(-1) // self.config.num_image_tokens
        if int(images_per_sample.sum()) == qformer_input_ids.shape[0]:
            return qformer_input_ids, qformer_attention_mask  # already one row per image
        qformer_input_ids = qformer_input_ids.repeat_interleave(images_per_sample, dim=0)
        if qformer_attention_mask is not None:
            qformer_attention_mask = qformer_attention_mask.repeat_interleave(images_per_sample, dim=0)
        return qformer_input_ids, qformer_attention_mask

    def merge_image_tokens(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        pixel_values: torch.FloatTensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        bridge_tokens: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor | None]:
        """
        Embeds `input_ids` and scatters the image tokens into the `<image>` placeholder positions. `bridge_tokens`
        `(num_media, N, Db)` (videos, see `video.py`) or `vision_features` (see [`get_vision_features`]) stand for
        `pixel_values` when given.

        Returns:
            `(inputs_embeds, image_features)`: `(batch_size, sequence_length, embed_dim)` and
            `(num_images, num_image_tokens, embed_dim)` (any-res: `(num_real_tiles, ...)`; None without images).
        """
        has_media = pixel_values is not None or bridge_tokens is not None or vision_features is not None
        inputs_embeds, placeholder_mask = self._embed_text(input_ids, inputs_embeds, has_media)  # (B, T, Dt), (B, T)
        if not has_media:
            if placeholder_mask.any():
                raise ValueError(
                    f"input_ids hold {int(placeholder_mask.sum())} image tokens but no pixel_values were given: "
                    "pass the images to the processor together with the text."
                )
            return inputs_embeds, None
        anyres_images = None
        if bridge_tokens is not None:  # videos, already through the bridge
            text_dtype = self.get_input_embeddings().weight.dtype
            image_features = project_image_tokens(self.language_projection, bridge_tokens, text_dtype)
        else:
            if pixel_values is not None:
                # A list is stacked before `.dim()`; NaN / inf are looked for in `_image_features`, on real tiles.
                pixel_values = check_pixel_values(pixel_values, check_finite=False)  # (num_images, C, H, W) or 5-D
                anyres_images = pixel_values.shape[0] if pixel_values.dim() == 5 else None
            elif image_sizes is not None:  # any-res vision_features: (num_real_tiles, P, Dv) with image_sizes
                anyres_images = len(image_sizes)
            qformer_input_ids, qformer_attention_mask = self._per_image_qformer_inputs(
                input_ids, qformer_input_ids, qformer_attention_mask, anyres_images
            )
            image_features = self._image_features(
                pixel_values,
                image_attention_mask,
                qformer_input_ids,
                qformer_attention_mask,
                image_sizes=image_sizes,
                vision_features=vision_features,
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        num_tokens, num_features = int(placeholder_mask.sum()), image_features.shape[0] * image_features.shape[1]
        if num_tokens != num_features:
            # The wording "Image features and image tokens do not match" is what TRL looks for to add its own hint.
            units = "image(s)" if anyres_images is None else f"tiles of the {anyres_images} any-res image(s)"
            raise ValueError(
                f"Image features and image tokens do not match: the text holds {num_tokens} image tokens, the "
                f"{image_features.shape[0]} {units} give {num_features} ({image_features.shape[1]} each). Build "
                "inputs with BridgeProcessor (one <image> per image, expanded for you) and never truncate them."
            )
        mask = placeholder_mask.unsqueeze(-1).expand_as(inputs_embeds)
        inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)
        return inputs_embeds, image_features

    def _embed_text(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor | None, has_images: bool
    ) -> tuple[torch.FloatTensor, torch.Tensor]:
        """`(inputs_embeds, image_token_mask)`: the text embedded (unless given embedded) and where its `<image>`
        tokens are, `(B, T, Dt)` and `(B, T)`; both fusions start here."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, Dt)
        return inputs_embeds, self._placeholder_mask(input_ids, inputs_embeds, has_images)

    def _placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor, has_images: bool = True
    ) -> torch.Tensor:
        """Boolean `(batch_size, sequence_length)` mask of the `<image>` placeholder positions."""
        if self.config.image_token_id is None:
            # The config allows None (transformers builds `BridgeVLMConfig()` itself), but then no position can hold
            # an image: text alone still runs, images are refused here rather than failing deep in the scatter.
            if has_images:
                raise ValueError(
                    "pixel_values were given but config.image_token_id is None, so no placeholder can take the image "
                    "tokens: set config.image_token_id to the processor's `image_token_id` (after "
                    "`model.resize_token_embeddings(len(processor.tokenizer))` if the processor added <image>)."
                )
            return torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings().weight[self.config.image_token_id]
        return (inputs_embeds == image_embedding.to(inputs_embeds.dtype)).all(-1)

    def _check_sequence_length(self, input_ids, inputs_embeds, encoder_outputs, cache) -> None:
        """
        Raise a `ValueError` naming the fix when the input runs past the language model's
        `max_position_embeddings` (when its config has one): a learned position table (OPT, GPT-2, BART) would
        otherwise fail deep inside with `IndexError: index out of range in self`, or a rotary one silently run on
        positions it never saw. Decoder-only: the input plus the cached tokens; encoder-decoder: the encoder input.
        """
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        tokens = input_ids if input_ids is not None else inputs_embeds
        encoded = self.config.is_encoder_decoder and encoder_outputs is not None  # the encoder input was checked
        if not isinstance(limit, int) or tokens is None or encoded:
            return
        past = 0
        if not self.config.is_encoder_decoder and cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        length = tokens.shape[1] + past
        if length <= limit:
            return
        cached = f" ({tokens.shape[1]} new + {past} cached)" if past else ""
        raise ValueError(
            f"The input is {length} tokens long{cached}, but the language model takes at most {limit} "
            f"(text_config.max_position_embeddings). Truncate the text when building the batch: "
            f"CaptionCollator(processor, max_length={limit}) / ChatCollator(processor, max_length={limit}), or "
            f"processor(..., truncation=True, max_length={limit}) (image tokens count too); when generating, lower "
            "max_new_tokens."
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        video_num_frames: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> BridgeVLMModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids in which every image is a run of `config.num_image_tokens` `<image>` tokens.
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`, *optional*):
                The images, in the order their placeholders appear in the batch; any number per sample (zero
                included). Any-res: `(num_images, max_tiles, num_channels, height, width)`, with `image_sizes`.
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
                Any-res only: each image's original `(height, width)` (see [`BridgeAnyResImageProcessor`]).
            vision_features (`torch.FloatTensor` of shape `(num_images, P, Dv)`, *optional*):
                Instead of `pixel_values`, for a frozen vision tower: what it gives the bridge, from
                [`get_vision_features`] or a `VisionFeatureCache` (any-res: `(num_real_tiles, P, Dv)` with
                `image_sizes`); cast to the tower's dtype, so an fp32 cache gives the same result bit for bit.
            pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, max_frames, C, H, W)`, *optional*):
                Videos (or multi-crop images), each standing where one `<image>` is, instead of `pixel_values`; needs
                a Perceiver bridge with `num_frames`, which resamples each video's frames into `num_latents` tokens.
            video_num_frames (`torch.LongTensor` of shape `(num_videos,)`, *optional*):
                Each video's real frames (the rest is padding, never encoded); all `max_frames` when not given.
            qformer_input_ids, qformer_attention_mask (*optional*):
                InstructBLIP mode only: the instruction tokenized for the Q-Former, one row per sample or per image.
            decoder_input_ids, decoder_attention_mask, encoder_outputs (*optional*):
                Encoder-decoder language models only, as in transformers' T5.
            Other arguments are the language model's, the KV cache among them (`cache` on transformers >= 5.24,
            `past_key_values` before): it is passed on under the name the installed release uses.
        """
        image_features = None
        self._check_sequence_length(input_ids, inputs_embeds, encoder_outputs, kwargs.get(CACHE_KEY))
        video_tokens = None
        if pixel_values_videos is not None:
            if pixel_values is not None or vision_features is not None:
                raise ValueError(
                    "Pass pixel_values or pixel_values_videos, not both (nor vision_features with videos): one batch "
                    "takes images or videos (each video stands where its <image> is)."
                )
            video_tokens = video_bridge_tokens(self, pixel_values_videos, video_num_frames)  # (V, N, Db)
        if self.gated_cross_attention is not None:
            inputs_embeds, image_features = self.prepare_cross_attention(
                input_ids,
                inputs_embeds,
                pixel_values,
                image_attention_mask,
                qformer_input_ids,
                qformer_attention_mask,
                image_sizes,
                cache=kwargs.get(CACHE_KEY),
                bridge_tokens=video_tokens,
                vision_features=vision_features,
            )
        elif encoder_outputs is None or not self.config.is_encoder_decoder:
            if input_ids is not None or inputs_embeds is not None:
                inputs_embeds, image_features = self.merge_image_tokens(
                    input_ids,
                    inputs_embeds,
                    pixel_values,
                    image_attention_mask,
                    qformer_input_ids,
                    qformer_attention_mask,
                    image_sizes,
                    bridge_tokens=video_tokens,
                    vision_features=vision_features,
                )
        lm_kwargs = dict(
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        if self.config.is_encoder_decoder:
            outputs = self.language_model(
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                encoder_outputs=encoder_outputs,
                **lm_kwargs,
            )
            return BridgeVLMModelOutput(
                last_hidden_state=outputs.last_hidden_state,
                **{CACHE_KEY: outputs.get(CACHE_KEY)},
                hidden_states=outputs.decoder_hidden_states,
                attentions=outputs.decoder_attentions,
                encoder_last_hidden_state=outputs.encoder_last_hidden_state,
                image_hidden_states=image_features,
            )
        try:
            outputs = self.language_model(position_ids=position_ids, **lm_kwargs)
            if self.gated_cross_attention is not None:
                self.gated_cross_attention.keep_with_cache(outputs.get(CACHE_KEY))
        finally:
            self.finish_cross_attention()
        return BridgeVLMModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_KEY: outputs.get(CACHE_KEY)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class BridgeVLMForConditionalGeneration(
    SelfDescribingMixin, BridgeFeaturesMixin, BridgeGenerationMixin, BridgeVLMPreTrainedModel, GenerationMixin
):
    r"""
    [`BridgeVLMModel`] with a language-modelling head: trains with `labels` and generates text about images.

    Args:
        config ([`BridgeVLMConfig`]):
            The composite configuration.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
    >>> config = BridgeVLMConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     bridge_config={"model_type": "vlbridge_qformer", "hidden_size": 32, "num_hidden_layers": 2,
    ...                    "num_attention_heads": 4, "intermediate_size": 64, "num_query_tokens": 4},
    ...     text_config={"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1,
    ...                  "num_attention_heads": 4, "vocab_size": 100, "word_embed_proj_dim": 32},
    ...     image_token_id=99,
    ... )
    >>> model = BridgeVLMForConditionalGeneration(config).eval()
    >>> input_ids = torch.tensor([[2] + [99] * 4 + [5, 6]])
    >>> out = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32), labels=input_ids)
    >>> out.logits.shape, out.loss.ndim
    (torch.Size([1, 7, 100]), 0)
    >>> model.generate(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=3).shape
    torch.Size([1, 10])
    ```
    """

    # The Trainer passes `num_items_in_batch`, the label tokens of the whole accumulation window on every process,
    # and forward divides the summed token losses by it: the loss is then the mean over all tokens of the global
    # batch, however they are split over micro-batches and processes (tests/scripts/test_accelerate_launch.py).
    # Without it, each micro-batch / process averaged its own tokens and the means were averaged again, off by up to
    # 1e-2.
    accepts_loss_kwargs = True

    def __init__(self, config: BridgeVLMConfig):
        super().__init__(config)
        self.model = BridgeVLMModel(config)
        embeddings = self.model.get_input_embeddings()
        self.lm_head = nn.Linear(embeddings.embedding_dim, config.text_config.vocab_size, bias=False)
        # The tied source differs per language model (OPT `decoder.embed_tokens`, Llama `embed_tokens`, T5 `shared`).
        source = next(n for n, p in self.model.language_model.named_parameters() if p is embeddings.weight)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{source}"}
        # T5 rescales decoder outputs before a tied head; keep its logits identical to T5ForConditionalGeneration.
        scale_outputs = getattr(config.text_config, "scale_decoder_outputs", False)
        self._lm_head_scale = embeddings.embedding_dim**-0.5 if scale_outputs else 1.0
        self.post_init()

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_path: str,
        text_path: str,
        bridge_config,
        image_token_id: int | None = None,
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> BridgeVLMForConditionalGeneration:
        r"""
        Builds a VLM from two separately saved checkpoints: a vision model (vision-only, or a CLIP / SigLIP dual
        encoder whose image half is kept) and a causal or sequence-to-sequence language model. The bridge and the
        language projection are new (with `use_language_projection=False` there is none, and the bridge's
        `hidden_size` must be the language model's width).

        Args:
            vision_path (`str` or `os.PathLike`):
                Directory or Hub id of the vision checkpoint, e.g. `"openai/clip-vit-large-patch14"`.
            text_path (`str` or `os.PathLike`):
                Directory or Hub id of the language model, e.g. `"facebook/opt-2.7b"`.
            bridge_config (`PreTrainedConfig` or `dict`):
                The bridge, e.g. `QFormerConfig(num_query_tokens=32)` or `{"model_type": "vlbridge_mlp", ...}`.
            image_token_id (`int`, *optional*):
                Id of `<image>`; by default it is looked up in (or added to) the language model's tokenizer.
            dtype (`torch.dtype`, *optional*):
                Dtype of the vision tower and the language model; the bridge stays fp32.
            config_kwargs:
                Further [`BridgeVLMConfig`] fields (e.g. `vision_feature_layer=-2`).

        Example:

        ```python
        >>> from vlbridge import BridgeVLMForConditionalGeneration, QFormerConfig
        >>> model = BridgeVLMForConditionalGeneration.from_vision_text_pretrained(  # doctest: +SKIP
        ...     "openai/clip-vit-large-patch14", "facebook/opt-350m", QFormerConfig(num_query_tokens=32)
        ... )
        ```
        """
        return from_vision_text_pretrained(
            cls, vision_path, text_path, bridge_config, image_token_id, dtype=dtype, **config_kwargs
        )

    def push_to_hub(self, repo_id: str, *, processor=None, card_details: str = "", **kwargs):
        r"""
        Uploads the model, its processor (processor config, tokenizer files, chat template) and a model card to the
        Hub in one commit.

        Args:
            repo_id (`str`):
                The repository, e.g. `"my-org/blip2-opt-captioner"`; created if it does not exist.
            processor ([`BridgeProcessor`], *optional*):
                Saved beside the model, so `AutoProcessor.from_pretrained(repo_id)` works.
            card_details (`str`, *optional*):
                Markdown for the model card (training stage, data, metrics).
            kwargs:
                `commit_message`, `private`, `token`, `revision`, `create_pr`, `tags`, as in transformers.

        Example:

        ```python
        >>> model.push_to_hub("my-org/my-vlm", processor=processor)  # doctest: +SKIP
        ```
        """
        kwargs.pop("max_shard_size", None)
        return push_to_hub_with_processor(self, repo_id, processor=processor, card_details=card_details, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_encoder(self, modality: str | None = None):
        return self.model.get_encoder()

    def get_image_features(self, pixel_values: torch.FloatTensor | None = None, **kwargs) -> torch.FloatTensor:
        """See [`BridgeVLMModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_vision_features(
        self, pixel_values: torch.FloatTensor, image_sizes: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """See [`BridgeVLMModel.get_vision_features`]."""
        return self.model.get_vision_features(pixel_values, image_sizes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        video_num_frames: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> BridgeVLMOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Decoder-only LM: aligned with `input_ids` and shifted inside (-100 = no loss, so image, prompt and
                padding positions are -100). Encoder-decoder LM: the target sequence; `decoder_input_ids` are made
                from it by shifting right when not given.
            logits_to_keep (`int`, *optional*, defaults to 0):
                Compute logits for the last `logits_to_keep` positions only (0 = all).
            Other arguments: see [`BridgeVLMModel.forward`].
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        is_seq2seq = self.config.is_encoder_decoder
        if is_seq2seq and labels is not None and decoder_input_ids is None:
            decoder_input_ids = self._shift_right(labels)
        if is_seq2seq:
            kwargs["decoder_input_ids"] = decoder_input_ids
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            image_attention_mask=image_attention_mask,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            image_sizes=image_sizes,
            pixel_values_videos=pixel_values_videos,
            video_num_frames=video_num_frames,
            vision_features=vision_features,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        if self._lm_head_scale != 1.0:
            hidden_states = hidden_states * self._lm_head_scale
        logits = self.lm_head(hidden_states)  # (B, T, vocab)

        loss = None
        if labels is not None:
            vocab_size = self.config.text_config.vocab_size
            if is_seq2seq:
                loss = _cross_entropy(logits, labels, num_items_in_batch)
            else:
                loss = self.loss_function(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch)
        return BridgeVLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_KEY: outputs.get(CACHE_KEY)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            image_hidden_states=outputs.image_hidden_states,
        )

    def _shift_right(self, labels: torch.LongTensor) -> torch.LongTensor:
        text_config = self.config.text_config
        start = text_config.decoder_start_token_id
        if start is None:
            raise ValueError("The encoder-decoder text_config needs decoder_start_token_id to build decoder inputs.")
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        pad = text_config.pad_token_id if text_config.pad_token_id is not None else 0
        return shifted.masked_fill(shifted == -100, pad)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Token cross-entropy without shift (encoder-decoder targets are already aligned with the logits)."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device), reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


__all__ = [
    "BridgeVLMForConditionalGeneration",
    "BridgeVLMModel",
    "BridgeVLMModelOutput",
    "BridgeVLMOutput",
    "BridgeVLMPreTrainedModel",
]
