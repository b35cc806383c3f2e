"""The Flamingo / BLIP-3 Perceiver Resampler bridge: learned latents that compress any number of image features to a
fixed number of tokens.

The design follows OpenFlamingo's and xGen-MM's (BLIP-3) `PerceiverResampler`: per layer, LayerNorm on the image
features and on the latents, queries from the latents, keys and values over concat(image features, latents), bias-free
projections, then a bias-free LayerNorm -> Linear -> act -> Linear feed-forward block, both with residuals, and a final
LayerNorm. It is the same block as transformers' `IdeficsPerceiverResampler` (Idefics v1), which the tests check
number for number, with three additions: a padding mask over the image features, an input projection when the
feature width differs from `hidden_size`, and attention through transformers' attention interface (eager / sdpa).

Videos and multi-crop images (`config.num_frames`): as in OpenFlamingo, each frame's features get that frame's row of
a learned media-time table added (at the vision width, before `input_proj`), then the frames are flattened into one
sequence of features that one set of latents reads, so a medium of any number of frames still gives `num_latents`
tokens. OpenFlamingo's second table, `media_time_embs` (over the index of a medium among the media of a sample), is
not built: each medium is resampled on its own here, and its position among the others is given by where its tokens
sit in the text.

Checkpoint keys (fixed: LoRA regexes and conversion scripts anchor on them):

```
latents                                   (num_latents, hidden_size)
media_time_embeddings                     (num_frames, encoder_hidden_size), only when num_frames is set;
                                          OpenFlamingo `frame_embs` (not its `media_time_embs`)
input_proj.{weight,bias}                  only when encoder_hidden_size != hidden_size
layers.{i}.image_layernorm                OpenFlamingo `norm_media`,   Idefics `context_layer_norm`
layers.{i}.latents_layernorm              OpenFlamingo `norm_latents`, Idefics `latents_layer_norm`
layers.{i}.attention.{q,k,v,o}_proj       OpenFlamingo `to_q`, `to_kv` (split in two), `to_out`
layers.{i}.post_attention_layernorm       OpenFlamingo `ff.0`, Idefics `ln`
layers.{i}.mlp.{fc1,fc2}                  OpenFlamingo `ff.1` / `ff.3`, Idefics `fc` / `c_proj`
layernorm                                 final LayerNorm (OpenFlamingo `norm`)
```
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging

from ..configuration.configuration_perceiver import PerceiverResamplerConfig
from .bridge_utils import check_image_features, eager_attention_forward
from .outputs import BridgeModelOutput


logger = logging.get_logger(__name__)


class PerceiverResamplerAttention(nn.Module):
    """Multi-head attention of the latents (queries) over concat(image features, latents) (keys and values).

    The projections carry no bias, as in Perceiver / Flamingo; the inputs arrive already layer-normed.
    """

    def __init__(self, config: PerceiverResamplerConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        inner_dim = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner_dim, bias=False)
        self.o_proj = nn.Linear(inner_dim, config.hidden_size, bias=False)

    def forward(
        self,
        latents: torch.Tensor,
        image_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_latents, _ = latents.shape
        # Flamingo: the latents also attend to themselves, which "performs slightly better" than image features only.
        kv_input = torch.cat([image_embeds, latents], dim=1)  # (B, P + N, D)
        kv_length = kv_input.shape[1]

        query = self.q_proj(latents).view(batch_size, num_latents, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(kv_input).view(batch_size, kv_length, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(kv_input).view(batch_size, kv_length, self.num_heads, self.head_dim).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,  # (B, heads, N, head_dim)
            key,  # (B, heads, P + N, head_dim)
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, num_latents, -1).contiguous()  # (B, N, heads * head_dim)
        return self.o_proj(attn_output), attn_weights


class PerceiverResamplerMLP(nn.Module):
    """`Linear(hidden, ff_mult * hidden) -> act -> Linear(ff_mult * hidden, hidden)`, no biases (Flamingo)."""

    def __init__(self, config: PerceiverResamplerConfig):
        super().__init__()
        intermediate_size = config.ff_mult * config.hidden_size
        self.fc1 = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class PerceiverResamplerLayer(GradientCheckpointingLayer):
    """One pre-norm resampler block: attention of the latents over (image features, latents), then feed-forward."""

    def __init__(self, config: PerceiverResamplerConfig):
        super().__init__()
        # Each layer normalises the (shared) image features itself, as OpenFlamingo's `norm_media` does.
        self.image_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.latents_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = PerceiverResamplerAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PerceiverResamplerMLP(config)

    def forward(
        self,
        latents: torch.Tensor,
        image_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # `latents` and `image_embeds` stay positional: reentrant checkpointing only propagates gradients to them.
        attn_output, attn_weights = self.attention(
            self.latents_layernorm(latents),
            self.image_layernorm(image_embeds),
            attention_mask=attention_mask,
            **kwargs,
        )
        latents = latents + attn_output  # (B, N, D)
        latents = latents + self.mlp(self.post_attention_layernorm(latents))
        return latents, attn_weights


class PerceiverResamplerPreTrainedModel(PreTrainedModel):
    config: PerceiverResamplerConfig
    config_class = PerceiverResamplerConfig
    base_model_prefix = "perceiver"
    main_input_name = "image_embeds"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerceiverResamplerLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Linear layers: normal(0, initializer_range), zero bias; LayerNorms: ones / zeros.
        super()._init_weights(module)
        if isinstance(module, PerceiverResamplerModel):
            # Unit normal, as OpenFlamingo / BLIP-3 / Idefics (`torch.randn`): the latents are layer-normed before
            # every attention, so only their direction matters there, while the residual stream starts at unit scale.
            init.normal_(module.latents, mean=0.0, std=1.0)
            if module.media_time_embeddings is not None:
                # Unit normal too, as OpenFlamingo's `frame_embs` (`torch.randn`): added to features that every
                # layer layer-norms, so a frame's embedding is a shift on the scale of the features themselves.
                init.normal_(module.media_time_embeddings, mean=0.0, std=1.0)


class PerceiverResamplerModel(PerceiverResamplerPreTrainedModel):
    r"""
    The Flamingo / BLIP-3 Perceiver Resampler bridge: `num_latents` learned latents attend, layer after layer, to the
    image features (and to themselves), so each image gives exactly `num_latents` tokens whatever its number of
    features.

    Args:
        config ([`PerceiverResamplerConfig`]):
            The bridge configuration. `encoder_hidden_size` is the width of the incoming image features; when it
            differs from `hidden_size`, an `input_proj` linear layer maps the features to `hidden_size` first.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import PerceiverResamplerConfig
    >>> from vlbridge.modeling.modeling_perceiver import PerceiverResamplerModel
    >>> config = PerceiverResamplerConfig(
    ...     hidden_size=32, encoder_hidden_size=48, num_latents=8, num_hidden_layers=2, num_attention_heads=4,
    ...     head_dim=8,
    ... )
    >>> model = PerceiverResamplerModel(config)
    >>> image_embeds = torch.randn(2, 17, 48)  # (batch, image features, encoder width)
    >>> image_attention_mask = torch.ones(2, 17, dtype=torch.long)
    >>> image_attention_mask[1, 10:] = 0  # the second image has 7 padding features
    >>> model(image_embeds, image_attention_mask=image_attention_mask).image_tokens.shape
    torch.Size([2, 8, 32])

    With `num_frames`, a video's frames (or an image's crops) are resampled together, still into `num_latents` tokens:

    >>> video_config = PerceiverResamplerConfig(
    ...     hidden_size=32, encoder_hidden_size=48, num_latents=8, num_hidden_layers=2, num_attention_heads=4,
    ...     head_dim=8, num_frames=4,  # at most 4 frames per video
    ... )
    >>> video_model = PerceiverResamplerModel(video_config)
    >>> video_embeds = torch.randn(2, 4, 17, 48)  # (videos, frames, image features per frame, encoder width)
    >>> frame_mask = torch.ones(2, 4, 17, dtype=torch.long)
    >>> frame_mask[1, 3] = 0  # the second video has 3 frames, padded to 4
    >>> video_model(video_embeds, image_attention_mask=frame_mask).image_tokens.shape
    torch.Size([2, 8, 32])

    ```"""

    def __init__(self, config: PerceiverResamplerConfig):
        super().__init__(config)
        self.latents = nn.Parameter(torch.empty(config.num_latents, config.hidden_size))
        # At the vision width, added before `input_proj`, as OpenFlamingo adds `frame_embs` to the raw features.
        if config.num_frames is not None:
            self.media_time_embeddings = nn.Parameter(torch.empty(config.num_frames, config.encoder_hidden_size))
        else:
            self.media_time_embeddings = None
        # No projection when the widths agree, so a checkpoint carries no identity-like layer that would only drift.
        if config.encoder_hidden_size != config.hidden_size:
            self.input_proj = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        else:
            self.input_proj = None
        self.layers = nn.ModuleList([PerceiverResamplerLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def _embed_frames(
        self, image_embeds: torch.Tensor, image_attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Cast the features to the bridge's dtype, add the media-time (frame) embeddings when the table exists, and
        flatten 4-D (video) features and their mask to 3-D / 2-D: `(B, F, P, Dv) -> (B, F * P, Dv)`.
        """
        table = self.media_time_embeddings
        if image_embeds.dim() != 4:
            # 3-D: one frame, which gets row 0 as an OpenFlamingo image (F = 1) does; other ranks are reported by
            # `check_image_features`.
            image_embeds = image_embeds.to(self.latents.dtype)
            if table is not None and image_embeds.dim() == 3 and image_embeds.shape[-1] == table.shape[-1]:
                image_embeds = image_embeds + table[0]  # (B, P, Dv)
            return image_embeds, image_attention_mask
        self._check_frames(image_embeds, image_attention_mask)
        batch_size, num_frames, num_features, width = image_embeds.shape
        if image_attention_mask is not None and image_attention_mask.dim() == 2:
            image_attention_mask = image_attention_mask[:, None, :].expand(-1, num_frames, -1)  # (B, F, P)
        image_embeds = image_embeds.to(self.latents.dtype) + table[:num_frames, None, :]  # (B, F, P, Dv)
        image_embeds = image_embeds.reshape(batch_size, num_frames * num_features, width)  # (B, F * P, Dv)
        if image_attention_mask is not None:
            image_attention_mask = image_attention_mask.reshape(batch_size, num_frames * num_features)  # (B, F * P)
        return image_embeds, image_attention_mask

    def _check_frames(self, image_embeds: torch.Tensor, image_attention_mask: torch.Tensor | None) -> None:
        """Raise a `ValueError` naming the fix for 4-D (video) features the bridge cannot take."""
        batch_size, num_frames, num_features, width = image_embeds.shape
        max_frames = self.config.num_frames
        if max_frames is None:
            raise ValueError(
                f"`image_embeds` of shape {tuple(image_embeds.shape)} hold {num_frames} frames per medium, but this "
                "Perceiver has no media-time (frame) embeddings: set bridge_config num_frames=<max frames> "
                "(`PerceiverResamplerConfig(num_frames=...)`), or pass one frame per row, (batch_size, num_features, "
                f"{self.config.encoder_hidden_size})."
            )
        if num_frames > max_frames:
            raise ValueError(
                f"The video has {num_frames} frames but the Perceiver's media-time table holds num_frames="
                f"{max_frames}: sample at most {max_frames} frames, or build the bridge with num_frames>={num_frames}."
            )
        if width != self.config.encoder_hidden_size:
            raise ValueError(
                f"`image_embeds` must have shape (batch_size, num_frames, num_features, "
                f"{self.config.encoder_hidden_size}) (the config's `encoder_hidden_size`), got "
                f"{tuple(image_embeds.shape)}. Set `encoder_hidden_size` to the vision tower's hidden size."
            )
        if image_attention_mask is not None and tuple(image_attention_mask.shape) not in (
            (batch_size, num_features),
            (batch_size, num_frames, num_features),
        ):
            raise ValueError(
                f"With video features of shape {tuple(image_embeds.shape)}, `image_attention_mask` must have shape "
                f"(batch_size, num_frames, num_features) = {(batch_size, num_frames, num_features)} (a padded frame "
                f"is all 0) or (batch_size, num_features) = {(batch_size, num_features)} (the same for every frame), "
                f"got {tuple(image_attention_mask.shape)}."
            )

    def forward(
        self,
        image_embeds: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BridgeModelOutput | tuple:
        r"""
        Args:
            image_embeds (`torch.Tensor` of shape `(batch_size, num_features, encoder_hidden_size)`, or `(batch_size,
                num_frames, num_features, encoder_hidden_size)`):
                Image features from the vision tower: one row per image (or per tile with any-res), or, with
                `config.num_frames` set, one row per video (or multi-crop image) of `num_frames` frames (crops),
                all of which one set of latents reads. Each frame `t` gets `media_time_embeddings[t]` added, a
                single image `media_time_embeddings[0]` (as in OpenFlamingo); then the frames are flattened to
                `(batch_size, num_frames * num_features, encoder_hidden_size)`. Cast to the bridge's parameter dtype
                on entry, so a bf16 tower can feed an fp32 bridge.
            image_attention_mask (`torch.Tensor` of shape `(batch_size, num_features)` or `(batch_size, num_frames,
                num_features)`, *optional*):
                1 for real features, 0 for padding (padded tiles, frames or features). Padding is invisible to the
                latents: its values never reach the output, even when they are not finite, so a video padded with
                masked frames gives the tokens of the same video without them. The latents themselves are always
                attended to, so a fully masked image still gives finite tokens. With 4-D `image_embeds`, a
                `(batch_size, num_features)` mask applies to every frame.
            output_attentions (`bool`, *optional*):
                Return each layer's attention weights, `(batch_size, num_heads, num_latents, num_features +
                num_latents)`. Needs `attn_implementation="eager"`; other implementations return `None` per layer.
            output_hidden_states (`bool`, *optional*):
                Return the latents before the first layer and after each layer (before the final LayerNorm).
            return_dict (`bool`, *optional*):
                Return a [`BridgeModelOutput`] rather than a plain tuple.

        Returns:
            [`BridgeModelOutput`]: `image_tokens` and `last_hidden_state` are the same `(batch_size, num_latents,
            hidden_size)` tensor, in the bridge's dtype.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"`output_attentions=True` needs `attn_implementation='eager'`; with "
                f"'{self.config._attn_implementation}' the attention weights come back as `None`."
            )
        # The bridge stays in its own (fp32) dtype even when the vision tower runs in bf16 / fp16.
        image_embeds, image_attention_mask = self._embed_frames(image_embeds, image_attention_mask)  # (B, P, Dv)
        check_image_features(image_embeds, image_attention_mask, self.config.encoder_hidden_size)
        batch_size = image_embeds.shape[0]
        latents = self.latents.unsqueeze(0).expand(batch_size, -1, -1)  # (B, N, D)

        attention_mask = None
        if image_attention_mask is not None:
            image_attention_mask = image_attention_mask.to(device=image_embeds.device, dtype=torch.bool)
            # Zero the padding so that garbage there (NaN, inf from uninitialised tile buffers) cannot leak through
            # `0 * value` in the attention product; the mask below then hides it from the softmax.
            image_embeds = image_embeds.masked_fill(~image_attention_mask[..., None], 0.0)
            # Keys are concat(image features, latents): the latent keys are always valid, so no softmax row is empty.
            latents_mask = image_attention_mask.new_ones(batch_size, self.config.num_latents)
            kv_mask = torch.cat([image_attention_mask, latents_mask], dim=1)  # (B, P + N)
            # (B, 1, N, P + N), in the form the attention implementation wants (additive for eager, bool for sdpa).
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=latents, attention_mask=kv_mask
            )

        if self.input_proj is not None:
            image_embeds = self.input_proj(image_embeds)  # (B, P, D)

        all_hidden_states = (latents,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            latents, attn_weights = layer(latents, image_embeds, attention_mask=attention_mask, **kwargs)
            if output_hidden_states:
                all_hidden_states += (latents,)
            if output_attentions:
                all_attentions += (attn_weights,)

        image_tokens = self.layernorm(latents)  # (B, N, D)
        output = BridgeModelOutput(
            image_tokens=image_tokens,
            last_hidden_state=image_tokens,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["PerceiverResamplerPreTrainedModel", "PerceiverResamplerModel"]
