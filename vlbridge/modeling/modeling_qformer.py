"""BLIP-2's querying transformer (Q-Former) as a standalone `PreTrainedModel`.

The layer layout and parameter names follow BLIP-2 / BERT (`encoder.layer.N.attention.attention.query`, ...), so a
transformers `Blip2QFormerModel` or `InstructBlipQFormerModel` checkpoint converts with renames only
(`vlbridge.conversion.qformer`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from ..configuration.configuration_qformer import QFormerConfig
from .bridge_utils import eager_attention_forward
from .compat import CACHE_KEY
from .outputs import BridgeModelOutput


ATTENTION_MODES = ("bidirectional", "multimodal_causal", "unimodal")


@dataclass
class ImageKeyValues:
    """
    The cross-attention keys and values of a batch of image features, projected once by
    [`QFormerModel.image_key_values`] so that several passes over the same images (stage 1's ITC, ITM and ITG) share
    them, and one autograd graph, instead of each projecting the features again. Indexing rows gives the keys / values
    of another batch of the same images (ITM's pairs) without projecting anything.

    Args:
        layers (`dict[int, tuple[torch.Tensor, torch.Tensor]]`):
            Index of each cross-attention layer to its `(key, value)`, each of shape
            `(batch_size, num_heads, num_features, head_dim)`.
    """

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def batch_size(self) -> int:
        return self._first_key.shape[0]

    @property
    def num_features(self) -> int:
        """`P`: image features each row's queries attend to."""
        return self._first_key.shape[2]

    @property
    def _first_key(self) -> torch.Tensor:
        return next(iter(self.layers.values()))[0]  # (B, heads, P, head_dim)

    def __len__(self) -> int:
        return self.batch_size

    def index_select(self, rows: torch.LongTensor) -> "ImageKeyValues":
        """The keys / values of the images `rows` `(N,)`, repeats allowed; gradients flow back to these rows."""
        rows = torch.as_tensor(rows, device=self._first_key.device)
        # Advanced indexing rather than `Tensor.index_select`: its backward (a sorted `index_put_`) sums the
        # gradients of repeated rows in a fixed order on CUDA, where `index_select`'s (atomic `index_add_`) does not.
        return ImageKeyValues({i: (k[rows], v[rows]) for i, (k, v) in self.layers.items()})

    def __getitem__(self, rows: torch.LongTensor | slice) -> "ImageKeyValues":
        if isinstance(rows, slice):
            return ImageKeyValues({i: (k[rows], v[rows]) for i, (k, v) in self.layers.items()})
        return self.index_select(rows)

    @classmethod
    def cat(cls, parts: list["ImageKeyValues"]) -> "ImageKeyValues":
        """The rows of every part, one part after the other (the parts come from the same Q-Former)."""
        layers = {}
        for index in parts[0].layers:
            keys, values = zip(*(part.layers[index] for part in parts))
            layers[index] = (torch.cat(keys), torch.cat(values))
        return cls(layers)


class QFormerMultiHeadAttention(nn.Module):
    """Multi-head attention whose keys and values come from the sequence itself or, for cross-attention, from the
    image features (of width `encoder_hidden_size`)."""

    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False  # masks are always explicit: the UniLM mask is not a plain causal one
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def project_key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `states` `(B, S, kv_width)`, each `(B, heads, S, head_dim)`."""
        batch_size, length = states.shape[:2]
        # view + transpose only: SDPA and matmul accept the strided layout, so no copy is made here.
        key = self.key(states).view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.value(states).view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        kv_cache: Cache | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # key_value: cross-attention keys / values projected beforehand (`QFormerModel.image_key_values`), each
        # (B, heads, P, head_dim); they replace the projection of `key_value_states`.
        batch_size, length, hidden_size = hidden_states.shape
        query = self.query(hidden_states).view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        if key_value is not None:
            # Projected under the same autocast as this pass in training; the cast only guards a mixed-up caller.
            key, value = (tensor.to(query.dtype) for tensor in key_value)
        else:
            key, value = self.project_key_value(hidden_states if key_value_states is None else key_value_states)
        if kv_cache is not None and key_value_states is None and key_value is None:
            # Self-attention only: appends this step's keys / values and returns the whole cached sequence's.
            key, value = kv_cache.update(key, value, self.layer_idx)  # (B, heads, S, d)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, length, hidden_size)  # (B, L, H)
        return attn_output, attn_weights


class QFormerSelfOutput(nn.Module):
    """Output projection of an attention block with BERT's post-LN residual."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class QFormerAttention(nn.Module):
    """Attention plus output projection; `self.attention` / `self.output` keep BLIP-2's key names."""

    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False, layer_idx: int = 0):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention=is_cross_attention, layer_idx=layer_idx)
        self.output = QFormerSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(
            hidden_states, attention_mask, key_value_states, key_value=key_value, **kwargs
        )
        return self.output(attn_output, hidden_states), attn_weights


class QFormerIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class QFormerOutput(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class QFormerLayer(GradientCheckpointingLayer):
    """
    One Q-Former layer: self-attention over `[queries; text]`, then, for the query positions only, cross-attention
    to the image features (every `cross_attention_frequency` layers) and the query feed-forward block; the text
    positions take their own feed-forward block. Text therefore reaches the image only through the queries.
    """

    def __init__(self, config: QFormerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = QFormerAttention(config, layer_idx=layer_idx)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        # BLIP-2's stage 2 drops the text branch, so the text feed-forward block is only built when it can be used.
        if config.use_text_input:
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerOutput(config)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        query_length: int = 0,
        kv_cache: Cache | None = None,
        image_key: torch.Tensor | None = None,
        image_value: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # hidden_states: (B, Q + T, H); image_embeds: (B, P, encoder_hidden_size); image_key / image_value: this
        # layer's cross-attention keys / values projected beforehand, (B, heads, P, head_dim), used instead of
        # image_embeds. The tensors that may need a gradient are positional so that reentrant gradient checkpointing
        # sees them (the encoder passes every argument positionally).
        attention_output, self_weights = self.attention(hidden_states, attention_mask, kv_cache=kv_cache, **kwargs)
        cross_weights = None
        if query_length == 0:  # text-only pass
            return self._text_feed_forward(attention_output), self_weights, cross_weights

        has_text = attention_output.shape[1] > query_length
        query_output = attention_output[:, :query_length] if has_text else attention_output  # (B, Q, H)
        if self.has_cross_attention:
            key_value = None if image_key is None else (image_key, image_value)
            query_output, cross_weights = self.crossattention(
                query_output, image_attention_mask, key_value_states=image_embeds, key_value=key_value, **kwargs
            )
        layer_output = self.output_query(self.intermediate_query(query_output), query_output)
        if has_text:
            text_output = self._text_feed_forward(attention_output[:, query_length:])  # (B, T, H)
            layer_output = torch.cat([layer_output, text_output], dim=1)
        return layer_output, self_weights, cross_weights

    def _text_feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden_states), hidden_states)


class QFormerEmbeddings(nn.Module):
    """
    Word and absolute position embeddings of the text (when the text branch exists), placed after the queries; then
    LayerNorm and dropout over the whole `[queries; text]` sequence, as in LAVIS. Queries take no position
    embedding, and text positions start at 0.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        if config.use_text_input:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        parts = [] if query_embeds is None else [query_embeds]  # (B, Q, H)
        if input_ids is not None:
            # `position_offset`: text tokens already in a KV cache, so that a continuation keeps its positions.
            position_ids = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(position_ids))  # (B, T, H)
        embeddings = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, Q + T, H)
        return self.dropout(self.layernorm(embeddings))


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        image_attention_mask: torch.Tensor | None,
        query_length: int,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        kv_cache: Cache | None = None,
        image_key_values: ImageKeyValues | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layer):
            image_key = image_value = None
            if image_key_values is not None and layer.has_cross_attention:
                image_key, image_value = image_key_values.layers[index]  # (B, heads, P, head_dim) each
            # Positional: reentrant gradient checkpointing only sees (and backpropagates into) positional tensors.
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                attention_mask,
                image_embeds,
                image_attention_mask,
                query_length,
                kv_cache,
                image_key,
                image_value,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (self_weights,)
                if layer.has_cross_attention and query_length > 0:
                    all_cross_attentions += (cross_weights,)
        return hidden_states, all_hidden_states, all_attentions, all_cross_attentions


class QFormerPreTrainedModel(PreTrainedModel):
    config: QFormerConfig
    config_class = QFormerConfig
    base_model_prefix = "qformer"
    main_input_name = "image_embeds"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The bridge is kept in fp32 (see `QFormerModel.forward`), which rules out Flash Attention's fp16/bf16 kernels.
    _supports_flash_attn = False
    _no_split_modules = ["QFormerLayer", "QFormerEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Linear / Embedding / LayerNorm get the generic BERT-style init (normal(std=initializer_range), zero bias).
        super()._init_weights(module)
        if isinstance(module, QFormerModel):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)


class QFormerModel(QFormerPreTrainedModel):
    r"""
    BLIP-2's querying transformer: `num_query_tokens` learned queries, and optionally a text (an InstructBLIP
    instruction, or a stage-1 caption), share the self-attention of BERT-style post-LN layers; only the queries
    cross-attend to the image features, every `cross_attention_frequency` layers. Queries and text have separate
    feed-forward blocks. The query outputs are the bridge's image tokens.

    `attention_mode` selects the self-attention mask over `[queries; text]` (padding is always masked):

    - `"bidirectional"`: every position sees every position (ITM, InstructBLIP, the VLM's bridge);
    - `"multimodal_causal"`: UniLM mask for image-grounded text generation (ITG): queries see only queries, text
      sees all queries and the text up to itself;
    - `"unimodal"`: queries and text never see each other (ITC's two uni-modal passes in one).

    Args:
        config ([`QFormerConfig`]):
            Model configuration. `use_text_input=False` builds no text branch (BLIP-2's stage-2 layout).

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import QFormerConfig
    >>> from vlbridge.modeling.modeling_qformer import QFormerModel

    >>> config = QFormerConfig(
    ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    ...     num_query_tokens=4, encoder_hidden_size=16, vocab_size=100,
    ... )
    >>> model = QFormerModel(config).eval()
    >>> image_embeds = torch.randn(2, 10, 16)  # (batch, image features, encoder_hidden_size)
    >>> model(image_embeds=image_embeds).image_tokens.shape
    torch.Size([2, 4, 32])

    >>> input_ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    >>> attention_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    >>> out = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    >>> out.image_tokens.shape, out.last_hidden_state.shape
    (torch.Size([2, 4, 32]), torch.Size([2, 7, 32]))
    ```"""

    def __init__(self, config: QFormerConfig):
        super().__init__(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))  # (1, Q, H)
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = QFormerEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding | None:
        # A Q-Former without text branch has no word embeddings; `None` tells `resize_token_embeddings` so.
        return getattr(self.embeddings, "word_embeddings", None)

    def set_input_embeddings(self, value: nn.Embedding):
        if not self.config.use_text_input:
            raise ValueError("This Q-Former has no text branch (`use_text_input=False`), so no word embeddings.")
        self.embeddings.word_embeddings = value

    def image_key_values(self, image_embeds: torch.Tensor) -> ImageKeyValues:
        r"""
        The keys and values every cross-attention layer computes from `image_embeds`, projected once: pass them as
        `forward(image_key_values=...)` to several passes over the same images (or over rows of them, by indexing:
        [`ImageKeyValues.index_select`]) instead of `image_embeds`, with the same numbers. Under autocast, call it in
        the same autocast context as the passes.

        Args:
            image_embeds (`torch.FloatTensor` of shape `(batch_size, num_features, encoder_hidden_size)`):
                Image features, as `forward` takes them.

        Returns:
            [`ImageKeyValues`]: per cross-attention layer, keys and values of shape
            `(batch_size, num_heads, num_features, head_dim)`.
        """
        self._check_image_embeds(image_embeds)
        dtype = self.embeddings.layernorm.weight.dtype
        image_embeds = image_embeds.to(self._image_embeds_dtype(image_embeds.device.type, dtype))
        return ImageKeyValues(
            {
                index: layer.crossattention.attention.project_key_value(image_embeds)
                for index, layer in enumerate(self.encoder.layer)
                if layer.has_cross_attention
            }
        )

    def forward(
        self,
        image_embeds: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        use_queries: bool = True,
        attention_mode: str = "bidirectional",
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_key_values: ImageKeyValues | None = None,
        **kwargs,
    ) -> BridgeModelOutput | tuple:
        r"""
        Args:
            image_embeds (`torch.FloatTensor` of shape `(batch_size, num_features, encoder_hidden_size)`, *optional*):
                Image features the queries cross-attend to; `use_queries=True` needs them or `image_key_values`.
                Cast to the Q-Former's dtype on entry (the bridge stays fp32 inside a bf16 VLM).
            image_attention_mask (`torch.Tensor` of shape `(batch_size, num_features)`, *optional*):
                1 for valid image features, 0 for padding (e.g. unused any-res tiles).
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                Text placed after the queries (InstructBLIP instruction, stage-1 caption). Needs
                `config.use_text_input=True`.
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                Padding mask of `input_ids` only (the queries are always valid).
            query_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_size)`, *optional*):
                Replaces the learned `query_tokens`.
            use_queries (`bool`, *optional*, defaults to `True`):
                `False` runs the text alone (stage-1 ITC text encoder); no image is read.
            attention_mode (`str`, *optional*, defaults to `"bidirectional"`):
                One of `"bidirectional"`, `"multimodal_causal"`, `"unimodal"` (see the class docstring).
            output_attentions (`bool`, *optional*):
                Return the self- and cross-attention weights. Needs `attn_implementation="eager"`.
            output_hidden_states (`bool`, *optional*):
                Return the hidden states after the embeddings and after each layer.
            return_dict (`bool`, *optional*):
                Return a [`BridgeModelOutput`] instead of a tuple.
            cache (`Cache`, *optional*):
                A KV cache (e.g. `DynamicCache`) for image-grounded generation, `past_key_values` on transformers
                < 5.24; `"multimodal_causal"` only. Empty: a pass with the queries fills it with the self-attention
                keys / values of `[queries; text]`. Filled: pass only the new text with `use_queries=False`; it
                reads the cached queries and text (queries never read text under this mask, so theirs never change)
                and continues the text positions. `attention_mask` then covers the whole text, cached part included.
            image_key_values ([`ImageKeyValues`], *optional*):
                The cross-attention keys / values of the images from [`image_key_values`] (one row per batch row),
                instead of `image_embeds` (give one of the two): the pass projects nothing from the image.

        Returns:
            [`BridgeModelOutput`]: `image_tokens` are the query outputs `(batch_size, num_queries, hidden_size)`
            (`None` without queries), `last_hidden_state` the whole `[queries; text]` sequence.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        self._check_inputs(
            image_embeds, image_attention_mask, input_ids, attention_mask, query_embeds, use_queries, image_key_values
        )
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"Unknown attention_mode {attention_mode!r}; expected one of {ATTENTION_MODES}.")
        kv_cache = kwargs.pop(CACHE_KEY, None)
        past_length = self._check_cache(kv_cache, attention_mode, use_queries, input_ids, query_embeds)
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs eager attention, not {self.config._attn_implementation!r}: load with "
                "`attn_implementation='eager'` or call `model.set_attn_implementation('eager')`."
            )

        dtype = self.embeddings.layernorm.weight.dtype
        query_length = 0
        if use_queries:
            batch_size = image_embeds.shape[0] if image_key_values is None else image_key_values.batch_size
            if query_embeds is None:
                query_embeds = self.query_tokens.expand(batch_size, -1, -1)  # (B, Q, H)
            query_embeds = query_embeds.to(dtype)
            query_length = query_embeds.shape[1]
            if image_embeds is not None:
                image_embeds = image_embeds.to(self._image_embeds_dtype(image_embeds.device.type, dtype))

        text_offset = past_length - self.config.num_query_tokens if past_length else 0  # cached text tokens
        embedding_output = self.embeddings(query_embeds, input_ids, text_offset)  # (B, Q + T, H)
        if past_length:
            self_mask = self._continuation_mask(embedding_output, attention_mask, past_length)
        else:
            self_mask = self._self_attention_mask(embedding_output, attention_mask, query_length, attention_mode)
        image_mask = None
        if image_attention_mask is not None:
            image_states = image_embeds
            if image_states is None:  # the mask's key length comes from `encoder_hidden_states`: the shape suffices
                image_states = embedding_output.new_empty(batch_size, image_key_values.num_features, 0)
            image_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=embedding_output[:, :query_length],
                attention_mask=image_attention_mask,
                encoder_hidden_states=image_states,
            )  # (B, 1, Q, P)

        last_hidden_state, hidden_states, attentions, cross_attentions = self.encoder(
            embedding_output,
            self_mask,
            image_embeds,
            image_mask,
            query_length,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            kv_cache=kv_cache,
            image_key_values=image_key_values,
            **kwargs,
        )
        output = BridgeModelOutput(
            image_tokens=last_hidden_state[:, :query_length] if query_length > 0 else None,
            last_hidden_state=last_hidden_state,
            hidden_states=hidden_states,
            attentions=attentions,
            cross_attentions=cross_attentions,
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _image_embeds_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
        # The bridge keeps its own dtype (fp32) whatever the vision tower runs in. Under autocast, though, every
        # cross-attention key / value projection would cast the features to the autocast dtype again (and keep a
        # copy for backward); casting them once up front gives the same numbers with one copy.
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return dtype

    def _self_attention_mask(
        self,
        embeddings: torch.Tensor,
        attention_mask: torch.Tensor | None,
        query_length: int,
        attention_mode: str,
    ) -> torch.Tensor | None:
        """Mask of the self-attention over `[queries; text]` in the format of the attention implementation (boolean
        for SDPA, additive for eager), or `None` when nothing is masked."""
        batch_size, length = embeddings.shape[:2]
        if attention_mask is not None and query_length > 0:
            # The caller's mask covers the text only; queries are never padding.
            query_mask = attention_mask.new_ones(batch_size, query_length)
            attention_mask = torch.cat([query_mask, attention_mask], dim=1)  # (B, Q + T)

        structure = None
        # Without text both structured masks reduce to the plain padding mask over the queries.
        if attention_mode == "multimodal_causal" and query_length < length:

            def structure(batch_idx, head_idx, q_idx, kv_idx):
                # UniLM: queries read queries only; text reads all queries and the text up to itself.
                return (kv_idx < query_length) | ((q_idx >= query_length) & (kv_idx <= q_idx))

        elif attention_mode == "unimodal" and 0 < query_length < length:

            def structure(batch_idx, head_idx, q_idx, kv_idx):
                # Two independent blocks, each bidirectional: queries with queries, text with text.
                return (q_idx < query_length) == (kv_idx < query_length)

        return create_bidirectional_mask(
            config=self.config, inputs_embeds=embeddings, attention_mask=attention_mask, and_mask_function=structure
        )  # (B, 1, Q + T, Q + T) or None

    def _continuation_mask(
        self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int
    ) -> torch.Tensor | None:
        """Mask of new text tokens over `[cached queries and text; new text]` (multimodal-causal: each reads all of
        the cache and the new text up to itself); `attention_mask` covers the whole text, cached part included."""
        batch_size, length = embeddings.shape[:2]
        num_queries = self.config.num_query_tokens
        if attention_mask is not None:
            query_mask = attention_mask.new_ones(batch_size, num_queries)
            attention_mask = torch.cat([query_mask, attention_mask], dim=1)  # (B, S) with S = past + T

        def structure(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx <= q_idx + past_length  # q_idx counts the new tokens only

        # The mask's key length comes from `encoder_hidden_states`; an empty-width tensor carries just the shape.
        keys = embeddings.new_empty(batch_size, past_length + length, 0)
        return create_bidirectional_mask(
            config=self.config,
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            encoder_hidden_states=keys,
            and_mask_function=structure,
        )  # (B, 1, T, S) or None

    def _check_cache(
        self,
        kv_cache: Cache | None,
        attention_mode: str,
        use_queries: bool,
        input_ids: torch.LongTensor | None,
        query_embeds: torch.Tensor | None,
    ) -> int:
        """Tokens already in `kv_cache` (0 without one); raises a `ValueError` for a cache the pass cannot use."""
        if kv_cache is None:
            return 0
        if attention_mode != "multimodal_causal":
            # Under the other masks the queries read the text, so their cached keys / values would go stale.
            raise ValueError(f"A KV cache needs attention_mode='multimodal_causal', not {attention_mode!r}.")
        past_length = kv_cache.get_seq_length()
        if past_length == 0 and not use_queries:
            raise ValueError("An empty KV cache is filled by a pass with the queries: set use_queries=True.")
        if past_length > 0 and use_queries:
            raise ValueError("The KV cache already holds the queries: continue with use_queries=False.")
        if query_embeds is not None and query_embeds.shape[1] != self.config.num_query_tokens:
            # A continuation finds where the text starts in the cache by `num_query_tokens`.
            raise ValueError(f"A KV cache needs exactly num_query_tokens={self.config.num_query_tokens} queries.")
        text_length = past_length - self.config.num_query_tokens + (0 if input_ids is None else input_ids.shape[1])
        if text_length > self.config.max_position_embeddings:
            raise ValueError(
                f"Text of length {text_length} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings}); truncate it."
            )
        return past_length

    def _check_inputs(
        self,
        image_embeds: torch.Tensor | None,
        image_attention_mask: torch.Tensor | None,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        query_embeds: torch.Tensor | None,
        use_queries: bool,
        image_key_values: ImageKeyValues | None = None,
    ):
        """Raise a `ValueError` naming the fix for inputs the Q-Former cannot use, so nothing is silently dropped."""
        if input_ids is not None and not self.config.use_text_input:
            raise ValueError(
                "input_ids were given but this Q-Former has no text branch (config.use_text_input=False). Build it "
                "with `use_text_input=True`, or drop the text."
            )
        if attention_mask is not None and input_ids is None:
            raise ValueError("attention_mask is the padding mask of input_ids; it was given without input_ids.")
        if input_ids is not None and input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"Text of length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings}); truncate it."
            )
        if not use_queries:
            if input_ids is None:
                raise ValueError("use_queries=False leaves neither queries nor text: pass input_ids.")
            image_inputs = (image_embeds, image_attention_mask, query_embeds, image_key_values)
            if any(value is not None for value in image_inputs):
                raise ValueError(
                    "use_queries=False is a text-only pass, but image_embeds / image_attention_mask / query_embeds / "
                    "image_key_values were given: only the queries read the image, so drop them or set "
                    "use_queries=True."
                )
            return
        if image_key_values is not None:
            if image_embeds is not None:
                raise ValueError(
                    "Both image_embeds and image_key_values were given: image_key_values already hold what the "
                    "cross-attention reads from the images, so pass only one of them."
                )
            self._check_image_key_values(image_key_values)
            source, batch_size = "image_key_values", image_key_values.batch_size
        elif image_embeds is None:
            raise ValueError(
                "image_embeds are required: the queries cross-attend to them (or pass image_key_values). For a "
                "text-only pass set use_queries=False."
            )
        else:
            self._check_image_embeds(image_embeds)
            source, batch_size = "image_embeds", image_embeds.shape[0]
        for name, tensor in (("input_ids", input_ids), ("query_embeds", query_embeds)):
            if tensor is not None and tensor.shape[0] != batch_size:
                raise ValueError(f"{name} has batch size {tensor.shape[0]}, {source} {batch_size}.")
        if query_embeds is not None and query_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"query_embeds must have width hidden_size={self.config.hidden_size}.")

    def _check_image_embeds(self, image_embeds: torch.Tensor) -> None:
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != self.config.encoder_hidden_size:
            raise ValueError(
                f"image_embeds must be (batch_size, num_features, {self.config.encoder_hidden_size}) "
                f"(config.encoder_hidden_size), got {tuple(image_embeds.shape)}."
            )

    def _check_image_key_values(self, image_key_values: ImageKeyValues) -> None:
        """Keys / values from another model (or another layout) would attend silently wrong: refuse them."""
        expected = [index for index, layer in enumerate(self.encoder.layer) if layer.has_cross_attention]
        if not isinstance(image_key_values, ImageKeyValues) or sorted(image_key_values.layers) != expected:
            raise ValueError(
                f"image_key_values must be the ImageKeyValues of this Q-Former's cross-attention layers {expected} "
                "(from `QFormerModel.image_key_values`)."
            )
        heads, head_dim = self.config.num_attention_heads, self.config.hidden_size // self.config.num_attention_heads
        for index, (key, value) in image_key_values.layers.items():
            if key.dim() != 4 or key.shape != value.shape or (key.shape[1], key.shape[3]) != (heads, head_dim):
                raise ValueError(
                    f"image_key_values of layer {index} must be (batch_size, {heads}, num_features, {head_dim}) "
                    f"keys and values, got {tuple(key.shape)} and {tuple(value.shape)}."
                )


__all__ = ["ImageKeyValues", "QFormerModel", "QFormerPreTrainedModel"]
