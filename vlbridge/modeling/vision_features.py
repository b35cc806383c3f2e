"""The composite VLM's vision side: what the vision tower gives the bridge, computed from pixels or passed in as
`vision_features` that were computed before (a frozen tower's features, cached once by `vlbridge cache-features`).

Both ways end in the same `(num_images, P, Dv)` tensor (any-res: `(num_real_tiles, P, Dv)`), so the bridge, the
any-res tile bookkeeping and the language model cannot tell them apart: an fp32 cache gives bit-identical losses.
"""

from __future__ import annotations

import torch
from torch import nn

from .anyres import AnyResTiles
from .bridge_utils import check_pixel_values, vision_tower_features


class VisionFeaturesMixin:
    """
    [`BridgeVLMModel`]'s vision features: `get_vision_features` and the checks on `vision_features` given instead of
    `pixel_values`. Needs `config` ([`BridgeVLMConfig`]) and `vision_tower` on the model.
    """

    def get_vision_features(
        self, pixel_values: torch.FloatTensor, image_sizes: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        r"""
        Exactly what the bridge reads from the vision tower: its hidden state at `config.vision_feature_layer`, with
        `config.vision_feature_post_layernorm` and `config.vision_feature_select` applied. Pass the result as
        `vision_features` to `forward`, `get_image_features` or `generate` in place of `pixel_values`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`):
                Images, as the processor returns them. Any-res: `(num_images, max_tiles, num_channels, height,
                width)` with `image_sizes`.
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
                Any-res only: each image's original `(height, width)`.

        Returns:
            `torch.FloatTensor` of shape `(num_images, P, Dv)` in the tower's dtype; any-res: `(num_real_tiles, P,
            Dv)`, each image's real tiles (base view first), image after image.

        Example:

        ```python
        >>> import torch
        >>> from vlbridge import BridgeVLMConfig, BridgeVLMModel
        >>> config = BridgeVLMConfig(
        ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
        ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        ...     bridge_config={"model_type": "vlbridge_mlp", "hidden_size": 32, "drop_cls_token": True},
        ...     text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        ...                  "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100},
        ...     image_token_id=99,
        ... )
        >>> model = BridgeVLMModel(config).eval()
        >>> _ = model.freeze("stage2")  # a frozen tower: features computed once stay valid
        >>> pixel_values = torch.randn(1, 3, 32, 32)
        >>> features = model.get_vision_features(pixel_values)  # 16 patches + CLS, width 32
        >>> features.shape
        torch.Size([1, 17, 32])
        >>> input_ids = torch.tensor([[1] + [99] * config.num_image_tokens + [5, 6]])
        >>> torch.equal(
        ...     model(input_ids=input_ids, vision_features=features).last_hidden_state,
        ...     model(input_ids=input_ids, pixel_values=pixel_values).last_hidden_state,
        ... )
        True
        ```
        """
        return self._encode_images(pixel_values, None, image_sizes)[0]

    def _encode_images(
        self,
        pixel_values: torch.FloatTensor | None,
        vision_features: torch.FloatTensor | None,
        image_sizes: torch.Tensor | None,
        image_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.FloatTensor, AnyResTiles | None]:
        """The bridge's input `(num_images or num_real_tiles, P, Dv)` and the any-res tiles (None without any-res),
        from `pixel_values` or from `vision_features` (exactly one)."""
        if (pixel_values is None) == (vision_features is None):
            raise ValueError(
                "Pass exactly one of pixel_values and vision_features: vision_features (from get_vision_features, or "
                "a VisionFeatureCache) stand for the images that pixel_values would give."
            )
        if vision_features is not None:
            return self._checked_vision_features(vision_features, image_sizes, image_attention_mask)
        pixel_values = check_pixel_values(pixel_values, check_finite=False)
        tiles = None
        if pixel_values.dim() == 5:
            if image_attention_mask is not None:
                raise ValueError(
                    "image_attention_mask is not taken with any-res pixel_values: the model masks padding tiles and "
                    "padded features itself from image_sizes (config.anyres_mask_padding)."
                )
            tiles = AnyResTiles.from_inputs(self.config, pixel_values, image_sizes)
            pixel_values = tiles.select(pixel_values)  # (num_real_tiles, C, H, W)
        elif image_sizes is not None:
            raise ValueError(
                "image_sizes goes with any-res pixel_values of shape (num_images, max_tiles, C, H, W), got "
                f"{tuple(pixel_values.shape)}: drop image_sizes, or use BridgeAnyResImageProcessor."
            )
        # After tile selection: padding tiles are never encoded, so only the real ones must be finite.
        pixel_values = check_pixel_values(pixel_values)  # (num_images or num_real_tiles, C, H, W)
        return self._vision_features(pixel_values), tiles

    def _checked_vision_features(
        self, vision_features: torch.FloatTensor, image_sizes: torch.Tensor | None, image_attention_mask
    ) -> tuple[torch.FloatTensor, AnyResTiles | None]:
        """`vision_features` checked against the model, on the tower's device and in its dtype (so an fp32 cache of an
        fp32 tower is bit-identical to running it)."""
        tower = self.vision_tower
        # Under no_grad (evaluation, generate) nothing trains, so a tower that could train does no harm there.
        if torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters()):
            raise ValueError(
                "vision_features were given, but the vision tower trains (its parameters require grad): features "
                "computed before would go stale as it learns, and it would get no gradient. Freeze the tower "
                "(model.freeze('stage2'), or a stage that keeps it frozen), or pass pixel_values."
            )
        if not isinstance(vision_features, torch.Tensor) or not vision_features.is_floating_point():
            raise TypeError(
                f"vision_features must be a floating-point tensor (num_images, P, Dv), got "
                f"{getattr(vision_features, 'dtype', type(vision_features).__name__)}: make them with "
                "get_vision_features(pixel_values)."
            )
        self._check_vision_feature_shape(vision_features)
        tiles = None
        if image_sizes is not None:
            if image_attention_mask is not None:
                raise ValueError(
                    "image_attention_mask is not taken with any-res vision_features: the model masks padded features "
                    "itself from image_sizes (config.anyres_mask_padding)."
                )
            tiles = AnyResTiles.from_image_sizes(self.config, image_sizes, vision_features.shape[0])
        parameter = next(tower.parameters(), None)
        if parameter is not None:
            vision_features = vision_features.to(device=parameter.device, dtype=tower.dtype)
        return vision_features, tiles

    def _check_vision_feature_shape(self, vision_features: torch.Tensor) -> None:
        """`(N, P, Dv)` with the width the bridge reads and, when the config can count them, the tower's P."""
        config = self.config
        width = config.vision_config.hidden_size
        try:
            num_features = config._num_vision_tokens()  # None when the tower's layout is unknown
        except ValueError:
            num_features = None
        shape = tuple(vision_features.shape)
        if len(shape) == 3 and shape[2] == width and num_features in (None, shape[1]):
            return
        expected = f"(num_images, {num_features if num_features is not None else 'P'}, {width})"
        raise ValueError(
            f"vision_features must have shape {expected}, what this model's vision tower gives the bridge "
            f"(vision_feature_layer={config.vision_feature_layer}, vision_feature_select="
            f"{config.vision_feature_select!r}), got {shape}: make them with this model's get_vision_features("
            "pixel_values), or a VisionFeatureCache written for its tower (vlbridge cache-features)."
        )

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Runs the vision tower; (num_images, C, H, W) -> (num_images, P, Dv), with the configured selection."""
        features = vision_tower_features(self.vision_tower, pixel_values, self.config.vision_feature_layer)
        if self.config.vision_feature_post_layernorm:
            features = self._tower_post_layernorm()(features)  # open_clip's ln_post on every token
        if self.config.vision_feature_select == "patches":
            features = features[:, self.config.vision_num_prefix_tokens :]  # (num_images, P - prefix, Dv)
        return features

    def _tower_post_layernorm(self) -> nn.Module:
        tower = self.vision_tower
        layernorm = getattr(getattr(tower, "vision_model", tower), "post_layernorm", None)
        if layernorm is None:
            raise ValueError(
                f"vision_feature_post_layernorm=True applies the vision tower's `post_layernorm`, which "
                f"{type(tower).__name__} does not have: set vision_feature_post_layernorm=False."
            )
        return layernorm


__all__ = ["VisionFeaturesMixin"]
