"""Flamingo's gated cross-attention: blocks beside a frozen language model that let its text read the bridge's tokens.

Each block is Flamingo's GATED XATTN-DENSE: a cross-attention from the text to the image tokens and a feed-forward
layer, each added to the residual stream through `tanh(gate)` with the gate initialised at 0, so the language model
starts exactly as it was and vision is blended in as training goes. A block runs before every
`cross_attention_every_n_layers`-th decoder layer (OpenFlamingo's placement).

The blocks live beside the language model, in `BridgeVLMModel.gated_cross_attention`, and reach it through forward
pre-hooks on its decoder layers: the language model keeps its own modules and checkpoint keys, loads from its own
folder and takes a LoRA adapter as it would alone (OpenFlamingo instead wraps each decoder layer in a new module,
which renames every key of the language model).

Which image a text token reads (OpenFlamingo's `MaskedCrossAttention`): the `<image>` markers number the images of
a sample 1, 2, ...; a token's "text time" is the number of markers up to and including it. With
`only_attend_immediate_media` it reads the image whose number equals its text time (the last one before it), else
every image up to it; a token before the first image (text time 0) reads nothing visual. While generating with a KV
cache, the images' keys / values are computed once, at prefill, and kept with the cache.

Checkpoint keys (under `model.gated_cross_attention.`, by the index of the decoder layer the block precedes):

```
{layer}.attention_layernorm          OpenFlamingo `attn.norm`
{layer}.attention.{q,k,v,o}_proj     OpenFlamingo `attn.to_q`, `attn.to_kv` (split in two), `attn.to_out`
{layer}.attention_gate               OpenFlamingo `attn_gate`
{layer}.mlp_layernorm                OpenFlamingo `ff.0`
{layer}.mlp.{fc1,fc2}                OpenFlamingo `ff.1` / `ff.3`
{layer}.mlp_gate                     OpenFlamingo `ff_gate`
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from ..configuration import BridgeVLMConfig
from .bridge_utils import check_pixel_values


# Where known language models keep their decoder layers (under their base `AutoModel`). Any other model is searched
# for the one `nn.ModuleList` holding `num_hidden_layers` modules.
DECODER_LAYER_PATHS = ("layers", "decoder.layers", "h", "blocks", "transformer.h", "model.layers")


def find_decoder_layers(language_model: nn.Module, num_layers: int | None) -> nn.ModuleList:
    """
    The `nn.ModuleList` of a language model's decoder layers: a known path (Llama / Qwen2 / Phi-3 `layers`, OPT
    `decoder.layers`, GPT-2 `h`, MPT `blocks`), else the only module list with `num_layers` entries.

    Raises:
        `ValueError`: naming the fix when no such list is found, or several are.
    """
    for path in DECODER_LAYER_PATHS:
        module = language_model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and (num_layers is None or len(module) == num_layers):
            return module
    candidates = [
        (name, module)
        for name, module in language_model.named_modules()
        if isinstance(module, nn.ModuleList) and num_layers is not None and len(module) == num_layers
    ]
    if len(candidates) == 1:
        return candidates[0][1]
    found = ", ".join(name for name, _ in candidates) or "none"
    raise ValueError(
        f"Cannot find the decoder layers of language model {type(language_model).__name__} for gated "
        f"cross-attention: looked for {DECODER_LAYER_PATHS} and for one nn.ModuleList of {num_layers} layers "
        f"(found: {found}). Add its path to vlbridge.modeling.gated_cross_attention.DECODER_LAYER_PATHS, or use "
        "image_fusion='tokens'."
    )


class GatedCrossAttentionMLP(nn.Module):
    """`Linear(hidden, ff_mult * hidden) -> GELU -> Linear(ff_mult * hidden, hidden)`, no biases (Flamingo)."""

    def __init__(self, hidden_size: int, ff_mult: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ff_mult * hidden_size, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ff_mult * hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class GatedCrossAttentionProjections(nn.Module):
    """Bias-free projections of the cross-attention: queries from the text, keys / values from the image tokens."""

    def __init__(self, hidden_size: int, media_hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner_dim = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner_dim, bias=False)
        self.k_proj = nn.Linear(media_hidden_size, inner_dim, bias=False)
        self.v_proj = nn.Linear(media_hidden_size, inner_dim, bias=False)
        self.o_proj = nn.Linear(inner_dim, hidden_size, bias=False)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)


class GatedCrossAttentionBlock(nn.Module):
    """
    Flamingo's GATED XATTN-DENSE block: `x + tanh(attention_gate) * attn(LN(x), media)`, then
    `x + tanh(mlp_gate) * mlp(LN(x))`. Both gates start at 0, so a new block is the identity.

    Args:
        hidden_size (`int`): Width of the language model's hidden states.
        media_hidden_size (`int`): Width of the bridge's tokens.
        num_heads (`int`): Attention heads.
        head_dim (`int`): Width of each head.
        ff_mult (`int`): Feed-forward expansion.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): Epsilon of the two layer norms.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.modeling.gated_cross_attention import GatedCrossAttentionBlock
    >>> block = GatedCrossAttentionBlock(hidden_size=16, media_hidden_size=8, num_heads=2, head_dim=4, ff_mult=2)
    >>> hidden = torch.randn(1, 5, 16)  # (batch, text length, width)
    >>> media = torch.randn(1, 3, 8)  # 3 image tokens
    >>> allowed = torch.ones(1, 5, 3, dtype=torch.bool)  # every token may read every image token
    >>> torch.equal(block(hidden, media, allowed)[0], hidden)  # gates at 0: the identity
    True
    ```
    """

    def __init__(
        self,
        hidden_size: int,
        media_hidden_size: int,
        num_heads: int,
        head_dim: int,
        ff_mult: int,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.attention_layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attention = GatedCrossAttentionProjections(hidden_size, media_hidden_size, num_heads, head_dim)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.mlp_layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = GatedCrossAttentionMLP(hidden_size, ff_mult)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def media_key_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens `(B, S, Dm)`, each `(B, heads, S, head_dim)`."""
        media = media.to(self.attention.k_proj.weight.dtype)
        key = self.attention.split_heads(self.attention.k_proj(media))
        value = self.attention.split_heads(self.attention.v_proj(media))
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        media: torch.Tensor,
        allowed: torch.Tensor,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, T, hidden_size)`): The text, as the decoder layer gets it.
            media (`torch.Tensor` of shape `(B, S, media_hidden_size)`): The image tokens of each sample, flattened
                over its images.
            allowed (`torch.BoolTensor` of shape `(B, T, S)`): Which image tokens each text token may read.
            key_value (`tuple[torch.Tensor, torch.Tensor]`, *optional*): The images' keys / values from an earlier
                call (decoding with a cache); computed from `media` when None.

        Returns:
            `(hidden_states, key_value)`: the new hidden states, in the dtype they came in, and the keys / values.
        """
        if key_value is None:
            key_value = self.media_key_values(media)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.attention_gate.dtype)  # (B, T, D)
        attended = self._cross_attention(self.attention_layernorm(hidden_states), *key_value, allowed)
        hidden_states = hidden_states + self.attention_gate.tanh() * attended
        hidden_states = hidden_states + self.mlp_gate.tanh() * self.mlp(self.mlp_layernorm(hidden_states))
        return hidden_states.to(input_dtype), key_value

    def _cross_attention(
        self, normed: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        projections = self.attention
        batch_size, length, _ = normed.shape
        if key.shape[2] == 0:  # no image anywhere in the batch: nothing to read
            return torch.zeros_like(normed)
        query = projections.split_heads(projections.q_proj(normed))  # (B, heads, T, d)
        reads_media = allowed.any(-1)  # (B, T)
        # A row with nothing to read would be all -inf (NaN after softmax, and NaN * 0 is NaN): it reads everything
        # here and is zeroed below. A boolean mask, as an additive minimum can overflow to -inf when added.
        mask = (allowed | ~reads_media[..., None])[:, None]  # (B, 1, T, S)
        attended = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask)
        # A token with no image to read (before the first one, or a sample without images) gets nothing visual.
        attended = attended * reads_media[:, None, :, None].to(attended.dtype)  # (B, heads, T, d)
        attended = attended.transpose(1, 2).reshape(batch_size, length, -1)  # (B, T, heads * d)
        return projections.o_proj(attended)


@dataclass
class MediaState:
    """
    What the gated blocks read during one forward, and what a KV cache keeps of it for the next decoding steps.

    Args:
        media (`torch.Tensor` of shape `(B, S, Dm)`): Each sample's image tokens, flattened over its images (padded
            to the batch's most images).
        media_time (`torch.LongTensor` of shape `(B, S)`): Number (1, 2, ...) of the image each image token belongs
            to; 0 for padding (a sample with fewer images than the batch's most).
        num_media (`torch.LongTensor` of shape `(B,)`): Images of each sample.
        key_values (`dict[int, tuple[Tensor, Tensor]]`): Per decoder layer, the images' keys / values, kept only
            with a KV cache (`keep_key_values`), so that decoding computes them once.
        media_seen (`torch.LongTensor` of shape `(B,)`): `<image>` markers read so far (the last token's text time).
        allowed (`torch.BoolTensor` of shape `(B, T, S)`, *optional*): The current tokens' reading mask.
    """

    media: torch.Tensor
    media_time: torch.Tensor
    num_media: torch.Tensor
    key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    keep_key_values: bool = False
    media_seen: torch.Tensor | None = None
    allowed: torch.Tensor | None = None


# The attribute under which a KV cache carries the images' keys / values from the prefill to the decoding steps.
CACHE_MEDIA_ATTRIBUTE = "vlbridge_media_state"


class GatedCrossAttentionLayers(nn.ModuleDict):
    """
    The gated blocks of a VLM, keyed by the index of the decoder layer each precedes, and the hooks that run them.

    Args:
        config ([`BridgeVLMConfig`]): With `image_fusion="gated_cross_attention"`.
        hidden_size (`int`): The language model's hidden size.
    """

    def __init__(self, config: BridgeVLMConfig, hidden_size: int):
        blocks = {
            str(index): GatedCrossAttentionBlock(
                hidden_size,
                config.bridge_config.hidden_size,
                config.cross_attention_num_heads,
                config.cross_attention_head_dim,
                config.cross_attention_ff_mult,
            )
            for index in config.cross_attention_layers()
        }
        super().__init__(blocks)
        self.only_attend_immediate_media = config.only_attend_immediate_media
        self.media_hidden_size = config.bridge_config.hidden_size
        # Set by `BridgeVLMModel` for the duration of each language-model call.
        self.state: MediaState | None = None

    def attach(self, decoder_layers: nn.ModuleList) -> None:
        """Registers a forward pre-hook on each decoder layer that has a block."""
        if len(self) and max(int(index) for index in self.keys()) >= len(decoder_layers):
            raise ValueError(
                f"The gated blocks precede decoder layers {sorted(int(i) for i in self.keys())}, but the language "
                f"model has {len(decoder_layers)}: set cross_attention_every_n_layers to a divisor of its depth."
            )
        for index in self.keys():
            layer = decoder_layers[int(index)]
            # Plain attributes, not submodules (the blocks stay out of the language model's state dict). The hook
            # finds its block through the layer, so a deep copy of the model (TRL's reference model) runs its own
            # blocks rather than the original's.
            object.__setattr__(layer, "_vlbridge_gated_blocks", self)
            object.__setattr__(layer, "_vlbridge_gated_index", int(index))
            layer.register_forward_pre_hook(_run_gated_block, with_kwargs=True)

    def prepare(self, markers: torch.Tensor, media: torch.Tensor | None, cache=None) -> MediaState:
        """
        Builds (prefill, training) or continues (decoding with a cache) the state the blocks read in this forward.

        Args:
            markers (`torch.BoolTensor` of shape `(B, T)`): Where the `<image>` markers are in the current tokens.
            media (`torch.Tensor` of shape `(B, M, N, Dm)`, *optional*): Each sample's image tokens, padded to the
                batch's most images `M` (rows past a sample's count are ignored). None: no new images.
            cache (*optional*): The language model's KV cache, which carries the state of the earlier steps
                (`keep_with_cache`).
        """
        previous = getattr(cache, CACHE_MEDIA_ATTRIBUTE, None) if cache is not None else None
        continuing = previous is not None and cache.get_seq_length() > 0
        seen_before = previous.media_seen if continuing else markers.new_zeros(markers.shape[0], dtype=torch.long)
        counts = markers.sum(-1)  # (B,) markers in the current tokens
        if continuing and media is not None:
            raise ValueError(
                "New images arrived while continuing a cached sequence: gated cross-attention encodes a sequence's "
                "images at its first forward. Pass all images with the prompt, or run without the cache."
            )
        if continuing:
            state = MediaState(previous.media, previous.media_time, previous.num_media, previous.key_values, True)
        else:
            state = self._new_state(counts, media, markers.device)
            state.keep_key_values = cache is not None
        if bool((seen_before + counts > state.num_media).any()):
            raise ValueError(
                f"<image> markers and images differ in number: the text holds {(seen_before + counts).tolist()} "
                f"markers per sample, the images {state.num_media.tolist()}. Give one image per <image> in the text "
                "(BridgeProcessor checks this for you)."
            )
        text_time = seen_before[:, None] + markers.long().cumsum(-1)  # (B, T)
        state.media_seen = text_time[:, -1] if text_time.shape[1] else seen_before
        media_time = state.media_time[:, None, :]  # (B, 1, S)
        if self.only_attend_immediate_media:
            state.allowed = text_time[:, :, None] == media_time
        else:
            state.allowed = text_time[:, :, None] >= media_time
        state.allowed = state.allowed & (media_time > 0)  # (B, T, S); padding images are never read
        self.state = state
        return state

    def keep_with_cache(self, cache) -> None:
        """Keeps the current state on the cache the language model returned (the one `generate` passed in, or one it
        made itself for `use_cache=True`), so that decoding from it reads the same images."""
        if cache is not None and self.state is not None:
            setattr(cache, CACHE_MEDIA_ATTRIBUTE, self.state)

    def _new_state(self, counts: torch.Tensor, media: torch.Tensor | None, device: torch.device) -> MediaState:
        batch_size = counts.shape[0]
        if media is None:
            empty = torch.zeros(batch_size, 0, self.media_hidden_size, device=device)  # (B, 0, Dm)
            return MediaState(empty, counts.new_zeros(batch_size, 0), counts.new_zeros(batch_size))
        _, max_media, tokens_per_image, _ = media.shape
        image_number = torch.arange(1, max_media + 1, device=media.device)  # (M,)
        valid = image_number[None, :] <= counts[:, None]  # (B, M)
        media_time = (image_number[None, :] * valid).repeat_interleave(tokens_per_image, dim=1)  # (B, M * N)
        return MediaState(media.flatten(1, 2), media_time, counts.clone())  # media (B, M * N, Dm)


class CrossAttentionFusionMixin:
    """The composite model's side of gated cross-attention: encode the images, group them by sample, set the state
    the hooks read, and drop it once the language model has run."""

    def prepare_cross_attention(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        pixel_values: torch.FloatTensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        cache=None,
        bridge_tokens: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor | None]:
        """
        Embeds the text (the `<image>` markers keep their own embedding) and makes the gated blocks read the images
        (or `bridge_tokens` `(num_media, N, Db)`, videos already through the bridge; or `vision_features`, the
        frozen vision tower's features given instead of `pixel_values`).

        Returns:
            `(inputs_embeds, image_tokens)`: `(B, T, embed_dim)` and the bridge's tokens `(num_images, N, Db)`
            (None without images).
        """
        has_media = pixel_values is not None or bridge_tokens is not None or vision_features is not None
        inputs_embeds, markers = self._embed_text(input_ids, inputs_embeds, has_media)  # (B, T, Dt), (B, T)
        image_tokens, media = bridge_tokens, None
        if pixel_values is not None or vision_features is not None:
            if pixel_values is not None:
                pixel_values = check_pixel_values(pixel_values, check_finite=False)  # (num_images, C, H, W)
            qformer_input_ids, qformer_attention_mask = self._per_image_qformer_inputs(
                input_ids, qformer_input_ids, qformer_attention_mask
            )
            image_tokens = self._bridge_outputs(
                pixel_values,
                image_attention_mask,
                qformer_input_ids,
                qformer_attention_mask,
                image_sizes,
                vision_features,
            ).image_tokens  # (num_images, N, Db)
        if image_tokens is not None:
            counts = markers.sum(-1)  # (B,)
            if int(counts.sum()) != image_tokens.shape[0]:
                raise ValueError(
                    f"<image> markers and images differ in number: the text holds {int(counts.sum())} <image> "
                    f"markers ({counts.tolist()} per sample), but {image_tokens.shape[0]} images were given. Build "
                    "inputs with BridgeProcessor (one <image> per image) and never truncate them."
                )
            media = pad_media_per_sample(image_tokens, counts)  # (B, M, N, Db)
        self.gated_cross_attention.prepare(markers, media, cache)
        return inputs_embeds, image_tokens

    def finish_cross_attention(self) -> None:
        """Drops the state the hooks read once the language model has run, so that nothing stale is left for a later
        call of the language model alone (a recompute under gradient checkpointing finds its own forward's state on
        the layer's input: see `_run_gated_block`)."""
        blocks = getattr(self, "gated_cross_attention", None)
        if blocks is not None:
            blocks.state = None


# Where a checkpointed decoder layer's input carries the state of its forward, for the recompute during backward.
_RECOMPUTE_STATE_ATTRIBUTE = "_vlbridge_media_state"


def _run_gated_block(layer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a decoder layer: the gated block runs on the hidden states before the layer does."""
    blocks, index = layer._vlbridge_gated_blocks, layer._vlbridge_gated_index
    hidden_states = args[0] if args else kwargs["hidden_states"]
    state = blocks.state
    if state is None:
        # transformers < 5.24 runs module hooks inside the activation checkpoint: the backward's recompute calls this
        # hook again, after the forward has ended, with the same input tensor, which carries that forward's state
        # (a global one would be the latest forward's: TRL's reference forward runs between forward and backward).
        state = getattr(hidden_states, _RECOMPUTE_STATE_ATTRIBUTE, None)
        if state is None:
            return None  # the language model called on its own, outside the VLM
    elif layer.training and getattr(layer, "gradient_checkpointing", False):
        _check_not_reentrant(layer)
        setattr(hidden_states, _RECOMPUTE_STATE_ATTRIBUTE, state)
    # Looked up by key at each call: PEFT's `modules_to_save` swaps the block for a wrapper that runs its trained copy.
    hidden_states, key_value = blocks[str(index)](
        hidden_states, state.media, state.allowed, state.key_values.get(index)
    )
    if state.keep_key_values:
        state.key_values[index] = key_value
    if args:
        return (hidden_states, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden_states}


def _check_not_reentrant(layer: nn.Module) -> None:
    """Reentrant checkpointing re-runs the hook on detached inputs, where the state is lost (transformers < 5.24,
    which checkpoints the whole call, hooks included): refuse it rather than fail deep inside backward."""
    checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
    keywords = getattr(checkpoint, "keywords", None) or {}
    if keywords.get("use_reentrant") and "__call__" in vars(GradientCheckpointingLayer):
        raise ValueError(
            "Gated cross-attention runs inside the language model's decoder layers, which reentrant activation "
            "checkpointing re-runs without the images on this transformers release: use "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (the default)."
        )


def pad_media_per_sample(media: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """
    Groups the images of a batch by sample: `(num_images, N, D)`, in marker order, with `counts[b]` images for sample
    `b`, becomes `(B, max(counts), N, D)`, zero-padded (padding is never read: see `MediaState.media_time`).
    """
    batch_size, max_media = counts.shape[0], int(counts.max()) if counts.numel() else 0
    padded = media.new_zeros(batch_size, max_media, *media.shape[1:])  # (B, M, N, D)
    sample = torch.repeat_interleave(torch.arange(batch_size, device=media.device), counts)  # (num_images,)
    starts = torch.cumsum(counts, 0) - counts  # (B,)
    slot = torch.arange(media.shape[0], device=media.device) - starts[sample]  # (num_images,)
    padded[sample, slot] = media
    return padded


__all__ = [
    "CACHE_MEDIA_ATTRIBUTE",
    "GatedCrossAttentionBlock",
    "GatedCrossAttentionLayers",
    "MediaState",
    "find_decoder_layers",
    "pad_media_per_sample",
]
