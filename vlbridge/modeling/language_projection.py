"""The VLM's optional language projection: Linear(bridge hidden size -> LM embedding width), or nothing.

BLIP-2's Q-Former and the Perceiver output their own width, so a projection maps it to the language model's.
LLaVA-1.5's MLP projector already ends at the language model's width: with `use_language_projection=False` the VLM
has no `language_projection` module (and no checkpoint keys for it), and the bridge's tokens enter the LM as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configuration import BridgeVLMConfig


def build_language_projection(config: BridgeVLMConfig, embed_dim: int) -> nn.Linear | None:
    """
    The projection of a VLM whose language model embeds at `embed_dim`, or `None` with
    `config.use_language_projection=False` or gated cross-attention fusion.

    The config already compares the widths from the sub-configs; this compares them against the built embeddings,
    which also covers language models whose config names its width otherwise.

    Args:
        config ([`BridgeVLMConfig`]): The VLM's config.
        embed_dim (`int`): Width of the built language model's input embeddings.

    Raises:
        `ValueError`: without a projection, when the bridge's `hidden_size` is not `embed_dim`.

    Example:

    ```python
    >>> from vlbridge import BridgeVLMConfig
    >>> from vlbridge.modeling.language_projection import build_language_projection
    >>> config = BridgeVLMConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "num_attention_heads": 4,
    ...                    "image_size": 32, "patch_size": 8},
    ...     bridge_config={"model_type": "vlbridge_mlp", "hidden_size": 64, "drop_cls_token": True},
    ...     text_config={"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100},
    ...     image_token_id=99,
    ...     use_language_projection=False,
    ... )
    >>> build_language_projection(config, 64) is None
    True
    ```
    """
    bridge_width = config.bridge_config.hidden_size
    if config.uses_cross_attention:
        return None  # the gated blocks read the bridge's tokens at the bridge's width
    if config.use_language_projection:
        return nn.Linear(bridge_width, embed_dim)
    if bridge_width != embed_dim:
        raise ValueError(
            f"use_language_projection=False feeds the bridge's tokens straight to the language model, but the "
            f"bridge's hidden_size is {bridge_width} and the language model's input embeddings have width "
            f"{embed_dim}: set bridge_config hidden_size={embed_dim}, or keep use_language_projection=True."
        )
    return None


def project_image_tokens(
    projection: nn.Linear | None, image_tokens: torch.Tensor, text_dtype: torch.dtype
) -> torch.Tensor:
    """
    The bridge's tokens as the language model takes them: `(num_images, N, Db) -> (num_images, N, Dt)`.

    The bridge runs in fp32 while the rest may be bf16 / fp16, so the cast happens here, at the module boundary: to
    the projection's dtype before it, or to the language model's `text_dtype` when there is no projection.

    Args:
        projection (`nn.Linear` or `None`): The VLM's `language_projection`.
        image_tokens (`torch.Tensor` of shape `(num_images, num_image_tokens, bridge_hidden_size)`): Bridge output.
        text_dtype (`torch.dtype`): Dtype of the language model's input embeddings.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.modeling.language_projection import project_image_tokens
    >>> project_image_tokens(None, torch.randn(2, 4, 8), torch.bfloat16).dtype
    torch.bfloat16
    ```
    """
    if projection is None:
        return image_tokens.to(text_dtype)  # (num_images, N, Dt), Db == Dt
    return projection(image_tokens.to(projection.weight.dtype))  # (num_images, N, Dt)


__all__ = ["build_language_projection", "project_image_tokens"]
