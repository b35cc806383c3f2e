"""Pieces the bridges and models share: the eager attention kernel, the image-feature and pixel checks, the
vision-tower run."""

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


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def check_pixel_values(pixel_values: torch.Tensor | list | tuple, check_finite: bool = True) -> torch.Tensor:
    """
    The `pixel_values` a model takes, checked: a list / tuple of same-shape tensors is stacked, and raw or broken
    pixels raise an error that names the fix instead of training on garbage.

    - An integer dtype (`uint8` / `int64` 0..255) means the images were never rescaled and normalised: `TypeError`.
    - NaN or inf values: `ValueError`. This is one `torch.isfinite(...).all()` (a device sync), skipped while
      compiling or tracing, where a data-dependent branch would break the graph.

    Args:
        pixel_values (`torch.Tensor`, or a list / tuple of tensors of one shape):
            The images, `(num_images, C, H, W)` or any-res `(num_images, max_tiles, C, H, W)`; a list holds one
            `(C, H, W)` (or `(max_tiles, C, H, W)`) tensor per image.
        check_finite (`bool`, *optional*, defaults to `True`):
            Whether to look for NaN / inf. Any-res callers pass `False` for the padded batch and check the real tiles
            once selected: padding tiles are never encoded, so whatever they hold is harmless.

    Returns:
        `torch.Tensor`: `pixel_values` as one tensor.
    """
    fix = "run the images through the processor (BridgeProcessor, or the vision tower's image processor)"
    if isinstance(pixel_values, (list, tuple)):
        if not pixel_values or not all(isinstance(value, torch.Tensor) for value in pixel_values):
            raise TypeError(f"pixel_values must be a tensor or a non-empty list of tensors: {fix}.")
        shapes = sorted({tuple(value.shape) for value in pixel_values})
        if len(shapes) > 1:
            raise ValueError(
                f"pixel_values is a list of tensors of different shapes {shapes[:4]}, which cannot be batched: "
                f"{fix}, which resizes every image to the vision tower's input size (any-res: "
                "BridgeAnyResImageProcessor pads the tiles)."
            )
        pixel_values = torch.stack(list(pixel_values))  # (num_images, ...)
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}: {fix}.")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values have dtype {pixel_values.dtype}, i.e. raw pixels that were never rescaled and normalised: "
            f"{fix} and pass its float `pixel_values`."
        )
    if check_finite and not _is_compiling() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(
            "pixel_values hold NaN or inf values: check the images and the image processor's image_mean / "
            f"image_std (a zero std divides by zero); {fix}."
        )
    return pixel_values
