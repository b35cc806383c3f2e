"""Image captioning with a stage-1 Q-Former's ITG head through transformers' `GenerationMixin.generate`.

[`QFormerCaptioner`] is a thin decoder view of a [`QFormerForImageTextPretraining`]: it shares (does not copy) the
stage-1 model's `qformer` and `lm_head`, takes the vision tower's features as `image_embeds`, and returns next-token
logits for the text positions of a multimodal-causal pass. `generate` therefore brings greedy search, beam search,
nucleus / top-k sampling, repetition penalty, length limits and `num_return_sequences`, as BLIP's CapFilt needs.

With `use_cache=True` (the default) the Q-Former keeps a `DynamicCache` of its self-attention keys / values: the
queries' are computed once (under the multimodal-causal mask they never read the text, so they never change) and
each step runs only the new token. `use_cache=False` re-runs queries and the whole prefix every step (the same
numbers, slower).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..configuration.configuration_qformer_pretraining import QFormerPretrainingConfig
from .compat import CACHE_KEY
from .modeling_qformer import QFormerModel


def captioning_generation_config(config: QFormerPretrainingConfig, **kwargs) -> GenerationConfig:
    """Generation defaults of a stage-1 config: every caption starts with `decoder_start_token_id` (BLIP-2's `[DEC]`)
    and ends at `eos_token_id`; finished rows are padded with `pad_token_id` (EOS when there is none)."""
    if config.decoder_start_token_id is None:
        raise ValueError("Captioning needs config.decoder_start_token_id (BLIP-2's [DEC]).")
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return GenerationConfig(
        **{
            "bos_token_id": config.decoder_start_token_id,
            "decoder_start_token_id": config.decoder_start_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": pad_token_id,
            "use_cache": True,
            **kwargs,
        }
    )


class QFormerCaptioner(PreTrainedModel, GenerationMixin):
    r"""
    The ITG decoder of a stage-1 model as a generative model: `forward(input_ids, image_embeds)` gives the logits
    `(batch_size, text_length, vocab_size)` of [`~QFormerForImageTextPretraining.compute_itg_logits`], and
    `generate(input_ids, image_embeds=...)` decodes with any of transformers' strategies. `image_embeds` is a model
    keyword, so `generate` repeats it for beams and `num_return_sequences`.

    The captioner holds the stage-1 model's own `qformer` and `lm_head` modules (no copy, no new weights): build it
    with [`~QFormerForImageTextPretraining.get_captioner`], or use
    [`~QFormerForImageTextPretraining.generate_captions`], which calls it on pixel values.

    Args:
        config ([`QFormerPretrainingConfig`]):
            The stage-1 config; its `decoder_start_token_id`, `eos_token_id` and `pad_token_id` are the generation
            defaults (copied, so nothing set on the captioner leaks into the stage-1 model).
        qformer ([`QFormerModel`]):
            The stage-1 Q-Former, with its text branch.
        lm_head (`nn.Module`):
            The ITG head (hidden states to vocabulary logits).

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
    >>> captioner = model.get_captioner()
    >>> captioner.qformer is model.qformer
    True
    >>> image_embeds = model.get_vision_features(torch.randn(2, 3, 32, 32))  # (2, 17, 32)
    >>> start = torch.full((2, 1), config.decoder_start_token_id)
    >>> captioner(input_ids=start, image_embeds=image_embeds).logits.shape
    torch.Size([2, 1, 100])
    >>> out = captioner.generate(start, image_embeds=image_embeds, num_beams=3, max_new_tokens=5)
    >>> out.shape[0], bool((out[:, 0] == 1).all())
    (2, True)
    >>> sampled = captioner.generate(
    ...     start, image_embeds=image_embeds, do_sample=True, top_p=0.9, num_return_sequences=3, max_new_tokens=5
    ... )
    >>> sampled.shape[0]
    6
    ```
    """

    config: QFormerPretrainingConfig
    config_class = QFormerPretrainingConfig
    base_model_prefix = "qformer"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_flash_attn = False  # the Q-Former stays fp32

    def __init__(self, config: QFormerPretrainingConfig, qformer: QFormerModel, lm_head: nn.Module):
        # A copy: `PreTrainedModel.__init__` may adjust the config (attention implementation), which must not reach
        # the stage-1 model's. No `post_init`: it would initialise the shared, trained modules again.
        super().__init__(copy.deepcopy(config))
        self.qformer = qformer
        self.lm_head = lm_head
        self.generation_config = captioning_generation_config(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.qformer.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear | None:
        return getattr(self.lm_head, "decoder", None)

    def _check_generate_inputs(self, input_ids: torch.LongTensor | None, image_embeds: torch.Tensor | None):
        if image_embeds is None:
            raise ValueError("The captioner needs `image_embeds` (the vision tower's features) to read the image.")
        if input_ids is None:
            raise ValueError(
                "Pass input_ids: [[config.decoder_start_token_id]] per image, or a prefix starting with it."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`):
                Caption ids starting with `decoder_start_token_id`; with a filled cache, only the new ones.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, num_features, encoder_hidden_size)`):
                The vision tower's features (read once: a filled cache already holds the queries).
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                Padding mask of the whole text so far (cached part included).
            use_cache (`bool`, *optional*):
                Fill or extend a KV cache (`cache`, `past_key_values` on transformers < 5.24; a `DynamicCache` is
                made when none is given) and return it.

        Returns:
            `CausalLMOutputWithPast`: `logits` `(batch_size, text_length, vocab_size)` for the given text positions,
            and the cache when one is used.
        """
        cache: Cache | None = kwargs.pop(CACHE_KEY, None)
        if cache is None:  # the other release's name, for callers written against it
            cache = kwargs.pop("past_key_values" if CACHE_KEY == "cache" else "cache", None)
        if use_cache is False:
            cache = None
        elif use_cache and cache is None:
            cache = DynamicCache()
        continuing = cache is not None and cache.get_seq_length() > 0
        if not continuing:
            self._check_generate_inputs(input_ids, image_embeds)
        hidden = self.qformer(
            image_embeds=None if continuing else image_embeds,
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_queries=not continuing,
            attention_mode="multimodal_causal",
            return_dict=True,
            **({CACHE_KEY: cache} if cache is not None else {}),
            **kwargs,
        ).last_hidden_state  # (B, Q + T, H), or (B, T, H) when continuing
        logits = self.lm_head(hidden[:, hidden.shape[1] - input_ids.shape[1] :])  # (B, T, V)
        output = CausalLMOutputWithPast(logits=logits, **{CACHE_KEY: cache})
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        image_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        # Only what `forward` takes: the text not yet in the cache (its length minus the cached queries), the
        # images (ignored once cached), the text's padding mask and the cache.
        cache = kwargs.get(CACHE_KEY)
        if cache is not None and cache.get_seq_length() > 0:
            input_ids = input_ids[:, cache.get_seq_length() - self.config.qformer_config.num_query_tokens :]
        inputs = {"input_ids": input_ids, "image_embeds": image_embeds, "attention_mask": attention_mask}
        inputs["use_cache"] = use_cache
        if cache is not None:
            inputs[CACHE_KEY] = cache
        return inputs


__all__ = ["QFormerCaptioner", "captioning_generation_config"]
