"""Pieces the bridges and models share: the eager attention kernel, the image-feature check, the vision-tower run."""

from __future__ import annotations

import torch
from torch import nn


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention, the fallback of `ALL_ATTENTION_FUNCTIONS` and the only one returning the weights."""
    # query: (B, heads, L, d); key / value: (B, heads, S, d); attention_mask: additive (B, 1, L, S)
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, heads, L, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # Softmax in fp32 so that fully masked rows and bf16 (autocast, or a bridge loaded in bf16) stay finite.
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)  # (B, L, heads, d)
    return attn_output, attn_weights


def check_image_features(
    image_embeds: torch.Tensor, image_attention_mask: torch.Tensor | None, encoder_hidden_size: int
) -> None:
    """Raises a `ValueError` naming the fix when image features or their mask have the wrong shape."""
    if image_embeds.dim() != 3 or image_embeds.shape[-1] != encoder_hidden_size:
        raise ValueError(
            f"`image_embeds` must have shape (batch_size, num_features, {encoder_hidden_size}) (the config's "
            f"`encoder_hidden_size`), got {tuple(image_embeds.shape)}. Set `encoder_hidden_size` to the vision "
            "tower's hidden size."
        )
    if image_attention_mask is not None and tuple(image_attention_mask.shape) != tuple(image_embeds.shape[:2]):
        raise ValueError(
            f"`image_attention_mask` must have shape (batch_size, num_features) = {tuple(image_embeds.shape[:2])} "
            f"to match `image_embeds`, got {tuple(image_attention_mask.shape)}."
        )


def vision_tower_features(
    tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int | None, trainable: bool | None = None
) -> torch.Tensor:
    """
    Image features for a bridge: `(num_images, C, H, W) -> (num_images, P, Dv)`, in the tower's dtype.

    `feature_layer=None` takes the tower's `last_hidden_state`; an integer indexes its `hidden_states`. A tower that
    does not train (`trainable`, by default: any parameter requires grad) builds no autograd graph, which saves its
    activations' memory, as LAVIS does for its frozen ViT.
    """
    if trainable is None:
        trainable = any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
        outputs = tower(
            pixel_values=pixel_values.to(tower.dtype), output_hidden_states=feature_layer is not None, return_dict=True
        )
    return outputs.last_hidden_state if feature_layer is None else outputs.hidden_states[feature_layer]
