"""Configuration of the composite vision encoder -> bridge -> language model. Imports no torch."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# Tokens a vision tower puts before its patch tokens (CLS and the like), by model type. Only the MLP projector
# needs this count (one output token per feature); an unknown tower must state it in `vision_num_prefix_tokens`.
VISION_PREFIX_TOKENS = {
    "clip_vision_model": 1,
    "siglip_vision_model": 0,
    "blip_2_vision_model": 1,
    "instructblip_vision_model": 1,
    "vit": 1,
    "deit": 2,
    "dinov2": 1,
}


IMAGE_FUSIONS = ("tokens", "gated_cross_attention")


def _as_pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def check_vision_feature_layer(vision_feature_layer: int | None, vision_config: PreTrainedConfig) -> None:
    """
    Raises a `ValueError` when `vision_feature_layer` does not index the vision tower's `hidden_states`.

    A tower with `num_hidden_layers` layers returns `num_hidden_layers + 1` hidden states (the embeddings first), so
    the valid indices are `-(num_hidden_layers + 1)` to `num_hidden_layers`. A tower that does not state its depth
    is not checked.
    """
    num_layers = getattr(vision_config, "num_hidden_layers", None)
    if vision_feature_layer is None or not isinstance(num_layers, int):
        return
    if not -(num_layers + 1) <= vision_feature_layer <= num_layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} does not index the hidden states of vision tower "
            f"'{vision_config.model_type}', which has {num_layers} layers, hence {num_layers + 1} hidden states: use "
            f"an index from {-(num_layers + 1)} to {num_layers} (LLaVA uses -2), or None for its last_hidden_state."
        )


@strict
class BridgeVLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`BridgeVLMModel`] / [`BridgeVLMForConditionalGeneration`]: any HF vision tower, a bridge
    ([`QFormerConfig`], [`PerceiverResamplerConfig`] or [`MLPProjectorConfig`]) and any HF language model,
    decoder-only or encoder-decoder. Saved and loaded as one `config.json`.

    Derived fields are filled in here, so the three sub-configs never disagree: the bridge's input width is the
    vision hidden size, and `num_image_tokens` (how many `<image>` placeholders one image takes) comes from the
    bridge.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision tower config (any `AutoModel` vision config; CLIP's by default).
        bridge_config (`dict` or `PreTrainedConfig`, *optional*):
            Bridge config; a `dict` picks the bridge by its `model_type` (`vlbridge_qformer` by default).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Language model config (any `AutoModelForCausalLM` or `AutoModelForSeq2SeqLM` config; OPT's by default).
        image_token_id (`int`, *optional*):
            Id of the `<image>` placeholder token in the language model's vocabulary, so within
            `[0, text_config.vocab_size)`. Needed by a forward with images.
        vision_feature_layer (`int`, *optional*):
            Hidden state of the vision tower fed to the bridge: `None` takes its `last_hidden_state` (BLIP-2), an
            integer indexes `hidden_states` (LLaVA uses -2), from `-(num_hidden_layers + 1)` to `num_hidden_layers`.
        vision_feature_select (`str`, *optional*, defaults to `"full"`):
            Which of the tower's tokens the bridge reads: `"full"` all of them, `"patches"` all but the
            `vision_num_prefix_tokens` CLS-like tokens (OpenFlamingo reads open_clip's patch tokens).
        vision_feature_post_layernorm (`bool`, *optional*, defaults to `False`):
            Apply the tower's final layer norm (CLIP / SigLIP `post_layernorm`, which transformers applies to the
            pooled token only) to every token first, as open_clip >= 2.23 does for its `visual(x)[1]` tokens. The
            released OpenFlamingo models were trained before that (patch tokens without `ln_post`): keep it False
            for them.
        vision_num_prefix_tokens (`int`, *optional*):
            CLS-like tokens the vision tower puts before its patches; filled in for known towers.
        use_qformer_text_input (`bool`, *optional*, defaults to `False`):
            InstructBLIP mode: the instruction (`qformer_input_ids`) also enters the Q-Former. A Q-Former bridge's
            `use_text_input` follows it, so without it the Q-Former has no text branch (BLIP-2's stage-2 layout).
        num_image_tokens (`int`, *optional*):
            Derived: placeholder tokens per image (per tile with any-res).
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            Turns on any-res (BLIP-3 / LLaVA-NeXT): the candidate canvases `[height, width]` of
            [`BridgeAnyResImageProcessor`], the same list (multiples of the vision tower's `image_size`). Each image
            then arrives as `(max_tiles, C, H, W)` tiles plus its `image_sizes`; the model counts its real tiles (the
            base view and `rows x columns` tiles of its best-fit canvas), runs each one through the vision tower and
            the bridge on its own, and puts the `num_image_tokens` tokens of each tile, in order, into the image's
            placeholders. Padding tiles never reach the text. None (default) is single-view processing.
        anyres_mask_padding (`bool`, *optional*, defaults to `True`):
            With any-res, hide from the bridge the image features whose patch lies wholly in the black padding of the
            canvas (BLIP-3's "anyres patch sampling" mask), for bridges that take a feature mask (Q-Former,
            Perceiver); a tile that is all padding stays unmasked. The MLP projector ignores feature masks.
        tie_word_embeddings (`bool`, *optional*):
            Tie the LM head to the input embeddings; defaults to the text config's choice.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the language projection.
        use_language_projection (`bool`, *optional*, defaults to `True`):
            Put a `language_projection` Linear(bridge hidden size -> language model embedding width) after the
            bridge. `False` feeds the bridge's tokens to the language model as they are (LLaVA-1.5, whose MLP
            projector already ends at the LM's width): the model then has no `language_projection` module and its
            checkpoints no `language_projection.*` keys, and the bridge's `hidden_size` must equal the LM's embedding
            width. Not used with gated cross-attention, whose blocks read the bridge's tokens at its own width.
        image_fusion (`str`, *optional*, defaults to `"tokens"`):
            How images enter the language model. `"tokens"` (BLIP-2, LLaVA, BLIP-3): the bridge's tokens replace
            `num_image_tokens` `<image>` placeholders in the input embeddings. `"gated_cross_attention"` (Flamingo,
            OpenFlamingo): each image stays one `<image>` marker token in the text, and tanh-gated cross-attention
            blocks, run before every `cross_attention_every_n_layers`-th decoder layer of the language model, let
            the text read the bridge's tokens. The gates start at 0, so the model starts as the plain language model.
            Needs a decoder-only language model and single-view images (no any-res).
        cross_attention_every_n_layers (`int`, *optional*, defaults to 4):
            Gated cross-attention: a block before decoder layers `n - 1, 2n - 1, ...` (OpenFlamingo's placement);
            must divide the language model's depth (OpenFlamingo-3B uses 1, -4B 2, -9B 4).
        only_attend_immediate_media (`bool`, *optional*, defaults to `True`):
            Gated cross-attention: a text token reads only the last image before it (Flamingo's choice, better in its
            ablation); `False` lets it read every earlier image. Text before the first image reads nothing visual.
        cross_attention_num_heads (`int`, *optional*, defaults to 8):
            Heads of each gated cross-attention block.
        cross_attention_head_dim (`int`, *optional*, defaults to 64):
            Width of each head of the gated cross-attention blocks.
        cross_attention_ff_mult (`int`, *optional*, defaults to 4):
            The blocks' feed-forward layer is `hidden_size -> ff_mult * hidden_size -> hidden_size`.

    Example:

    ```python
    >>> from vlbridge import BridgeVLMConfig
    >>> config = BridgeVLMConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "num_attention_heads": 4,
    ...                    "image_size": 32, "patch_size": 8},
    ...     bridge_config={"model_type": "vlbridge_mlp", "hidden_size": 32, "drop_cls_token": True},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 100},
    ...     image_token_id=99,
    ... )
    >>> config.bridge_config.encoder_hidden_size, config.num_image_tokens
    (32, 16)
    ```"""

    model_type = "vlbridge"
    attribute_map = {"image_token_index": "image_token_id", "image_seq_length": "num_image_tokens"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "bridge_config": SubConfigSpec(config_class=AutoConfig, model_type="vlbridge_qformer"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="opt"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    bridge_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    vision_feature_layer: int | None = None
    vision_num_prefix_tokens: int | None = None
    vision_feature_select: str = "full"
    vision_feature_post_layernorm: bool = False
    use_qformer_text_input: bool = False
    num_image_tokens: int | None = None
    image_grid_pinpoints: list[list[int]] | None = None
    anyres_mask_padding: bool = True
    tie_word_embeddings: bool | None = None
    initializer_range: float = 0.02
    use_language_projection: bool = True
    image_fusion: str = "tokens"
    cross_attention_every_n_layers: int = 4
    only_attend_immediate_media: bool = True
    cross_attention_num_heads: int = 8
    cross_attention_head_dim: int = 64
    cross_attention_ff_mult: int = 4

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.bridge_config.encoder_hidden_size = self.vision_config.hidden_size
        self.is_encoder_decoder = bool(getattr(self.text_config, "is_encoder_decoder", False))
        self.use_decoder_only_language_model = self.text_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", True))
        if self.vision_num_prefix_tokens is None:
            self.vision_num_prefix_tokens = VISION_PREFIX_TOKENS.get(self.vision_config.model_type)
        if hasattr(self.bridge_config, "use_text_input"):
            # Inside a VLM the Q-Former's text branch is fed only in InstructBLIP mode. Kept otherwise, it would be
            # dead weight (80M of CLIP-L's 182M Q-Former parameters) that gets no gradient yet counts as trainable
            # and is saved in every checkpoint. Following the VLM flag here also lets old checkpoints saved with
            # the text branch load into the smaller bridge (their extra weights are ignored).
            self.bridge_config.use_text_input = self.use_qformer_text_input
        elif self.use_qformer_text_input:
            raise ValueError(
                f"use_qformer_text_input=True (InstructBLIP mode) needs a Q-Former bridge, whose text branch "
                f"(use_text_input=True) reads the instruction; this bridge is '{self.bridge_config.model_type}' "
                "(set bridge_config={'model_type': 'vlbridge_qformer', ...}, or use_qformer_text_input=False)."
            )
        self._check_feature_select()
        if getattr(self.bridge_config, "drop_cls_token", False) and self.vision_num_prefix_tokens == 0:
            raise ValueError(
                f"The MLP projector drops a CLS token, but vision tower '{self.vision_config.model_type}' has none: "
                "set bridge_config drop_cls_token=False."
            )
        if self.image_fusion not in IMAGE_FUSIONS:
            raise ValueError(f"image_fusion={self.image_fusion!r} is not one of {IMAGE_FUSIONS}.")
        self.num_image_tokens = self.num_media_tokens
        if self.uses_cross_attention:
            self._check_cross_attention()
            # One marker per image in the text: the bridge's tokens reach the LM through the gated blocks instead.
            self.num_image_tokens = 1
        elif self.num_image_tokens < 1:
            raise ValueError(
                f"The bridge gives {self.num_image_tokens} tokens per image: an image needs at least one. Give the "
                "bridge more outputs (num_query_tokens, num_latents) or the vision tower more patches."
            )
        if self.image_grid_pinpoints is not None:
            self._check_grid_pinpoints()
        self._check_image_token_id()
        check_vision_feature_layer(self.vision_feature_layer, self.vision_config)
        if not self.use_language_projection and not self.uses_cross_attention:
            self._check_bridge_width()

    def _check_feature_select(self) -> None:
        if self.vision_feature_select not in ("full", "patches"):
            raise ValueError(
                f"vision_feature_select={self.vision_feature_select!r} is not one of ('full', 'patches')."
            )
        if self.vision_feature_select == "patches":
            if self.vision_num_prefix_tokens is None:
                raise ValueError(
                    f"vision_feature_select='patches' drops the CLS-like tokens of vision tower "
                    f"'{self.vision_config.model_type}', whose count is unknown: pass vision_num_prefix_tokens."
                )
            if getattr(self.bridge_config, "drop_cls_token", False):
                raise ValueError(
                    "vision_feature_select='patches' already drops the CLS token: set the MLP projector's "
                    "drop_cls_token=False (or keep vision_feature_select='full')."
                )

    @property
    def uses_cross_attention(self) -> bool:
        """Whether images enter the language model through gated cross-attention (Flamingo) rather than tokens."""
        return self.image_fusion == "gated_cross_attention"

    @property
    def num_media_tokens(self) -> int:
        """Tokens the bridge gives per image (per tile with any-res, per video with frames): what the `<image>`
        placeholders take with token fusion, and what the gated blocks read with cross-attention."""
        return self.bridge_config.num_output_tokens(self._num_vision_tokens())

    @property
    def text_num_layers(self) -> int | None:
        """Depth of the language model (decoder layers), or None if its config does not say."""
        depth = getattr(self.text_config, "num_hidden_layers", None)
        return depth if isinstance(depth, int) else None

    def cross_attention_layers(self) -> list[int]:
        """Indices of the decoder layers preceded by a gated cross-attention block (empty with token fusion)."""
        if not self.uses_cross_attention or self.text_num_layers is None:
            return []
        every = self.cross_attention_every_n_layers
        return [index for index in range(self.text_num_layers) if (index + 1) % every == 0]

    def _check_cross_attention(self) -> None:
        if self.is_encoder_decoder:
            raise ValueError(
                f"image_fusion='gated_cross_attention' puts blocks before the decoder layers of a decoder-only "
                f"language model; '{self.text_config.model_type}' is an encoder-decoder: use image_fusion='tokens'."
            )
        if self.image_grid_pinpoints is not None:
            raise ValueError(
                "image_fusion='gated_cross_attention' reads one set of bridge tokens per image; any-res tiles "
                "(image_grid_pinpoints) are not supported there: set image_grid_pinpoints=None, or give the Perceiver "
                "the crops as frames (bridge_config num_frames) through the processor's videos=."
            )
        depth, every = self.text_num_layers, self.cross_attention_every_n_layers
        if every < 1 or (depth is not None and (every > depth or depth % every)):
            divisors = [n for n in range(1, (depth or 0) + 1) if depth % n == 0] if depth else "a positive integer"
            raise ValueError(
                f"cross_attention_every_n_layers={every} must divide the language model's depth "
                f"(text_config num_hidden_layers={depth}) and be at most that depth, so that the blocks sit evenly: "
                f"use one of {divisors}."
            )

    @property
    def text_embed_width(self) -> int | None:
        """Width of the language model's input embeddings, which the image tokens take (None if unknown).

        OPT embeds at `word_embed_proj_dim`, which may differ from its `hidden_size`; T5's `hidden_size` is its
        `d_model`."""
        text_config = self.text_config
        width = getattr(text_config, "word_embed_proj_dim", None) or getattr(text_config, "hidden_size", None)
        return width if isinstance(width, int) else None

    def _check_bridge_width(self) -> None:
        # Without the projection nothing adapts the widths: a mismatch would only fail later, inside the scatter.
        bridge_width, text_width = self.bridge_config.hidden_size, self.text_embed_width
        if text_width is not None and bridge_width != text_width:
            raise ValueError(
                f"use_language_projection=False feeds the bridge's tokens straight to the language model, but the "
                f"bridge's hidden_size is {bridge_width} and the language model ('{self.text_config.model_type}') "
                f"embeds at width {text_width}: set bridge_config hidden_size={text_width}, or keep "
                "use_language_projection=True to map one width to the other."
            )

    def _check_image_token_id(self) -> None:
        # None stays buildable: transformers builds `BridgeVLMConfig()` itself (e.g. in `to_diff_dict`); a forward
        # with images then refuses it. An id past the vocabulary would only fail later, deep inside `forward`.
        if self.image_token_id is None:
            return
        vocab_size = getattr(self.text_config, "vocab_size", None)
        if vocab_size is not None and not 0 <= self.image_token_id < vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the language model's vocabulary [0, {vocab_size}). "
                "If <image> was added to the tokenizer, the embeddings must grow to len(tokenizer): build the "
                "config with text_config vocab_size >= len(tokenizer), or on a built model call "
                "`model.resize_token_embeddings(len(tokenizer))` first; then set image_token_id to the processor's "
                "`image_token_id`."
            )

    def _check_grid_pinpoints(self) -> None:
        image_size = getattr(self.vision_config, "image_size", None)
        if image_size is None or _as_pair(image_size)[0] != _as_pair(image_size)[1]:
            raise ValueError(
                f"Any-res (image_grid_pinpoints) cuts square tiles at the vision tower's input size, but vision tower "
                f"'{self.vision_config.model_type}' has image_size={image_size!r}: use a tower with a square "
                "`image_size`, or set image_grid_pinpoints=None."
            )
        tile = _as_pair(image_size)[0]
        pinpoints = [[int(value) for value in pinpoint] for pinpoint in self.image_grid_pinpoints]
        bad = [pinpoint for pinpoint in pinpoints if len(pinpoint) != 2 or pinpoint[0] % tile or pinpoint[1] % tile]
        if not pinpoints or bad:
            raise ValueError(
                f"image_grid_pinpoints must be a non-empty list of [height, width] multiples of the vision tower's "
                f"image_size {tile}, got {self.image_grid_pinpoints!r}: build them with "
                f"vlbridge.processing.grid_pinpoints_from_grids({tile})."
            )
        self.image_grid_pinpoints = pinpoints

    @property
    def anyres_tile_size(self) -> int | None:
        """Side of an any-res tile in pixels (the vision tower's `image_size`), or None without any-res."""
        if self.image_grid_pinpoints is None:
            return None
        return _as_pair(self.vision_config.image_size)[0]

    @property
    def vision_hidden_size(self) -> int:
        return self.vision_config.hidden_size

    def _num_vision_tokens(self) -> int | None:
        """Image features the vision tower gives for one image at its configured size, or None if unknown."""
        image_size = getattr(self.vision_config, "image_size", None)
        patch_size = getattr(self.vision_config, "patch_size", None)
        if image_size is None or patch_size is None or self.vision_num_prefix_tokens is None:
            if self.bridge_config.model_type == "vlbridge_mlp":
                raise ValueError(
                    f"Cannot count the image features of vision tower '{self.vision_config.model_type}', which the "
                    "MLP projector needs: pass vision_num_prefix_tokens=<number of CLS-like tokens> to "
                    "BridgeVLMConfig."
                )
            return None
        (height, width), (patch_h, patch_w) = _as_pair(image_size), _as_pair(patch_size)
        prefix = 0 if self.vision_feature_select == "patches" else self.vision_num_prefix_tokens
        return (height // patch_h) * (width // patch_w) + prefix


__all__ = ["IMAGE_FUSIONS", "BridgeVLMConfig"]
