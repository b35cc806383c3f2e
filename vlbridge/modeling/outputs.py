"""Output classes of the bridges and the composite VLM."""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .compat import CACHE_KEY


@dataclass
class BridgeModelOutput(ModelOutput):
    """
    Output of every bridge ([`QFormerModel`], [`PerceiverResamplerModel`], [`MLPProjectorModel`]).

    Args:
        image_tokens (`torch.FloatTensor` of shape `(batch_size, num_output_tokens, hidden_size)`):
            The tokens handed on to the language model: the query outputs of a Q-Former, the latents of a
            Perceiver, the projected patches of an MLP.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            The bridge's whole last hidden state (for a Q-Former with text input: queries then text).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Hidden states after the embeddings and after each layer, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Self-attention weights of each layer, when `output_attentions=True` (eager attention only).
        cross_attentions (`tuple(torch.FloatTensor)`, *optional*):
            Cross-attention weights of the layers that have them, when `output_attentions=True`.
    """

    image_tokens: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BridgeVLMModelOutput(ModelOutput):
    """
    Output of [`BridgeVLMModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Last hidden state of the language model (of its decoder for an encoder-decoder LM).
        cache (`Cache`, *optional*):
            The language model's KV cache (named `past_key_values` on transformers < 5.24, as there).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Hidden states of the language model (of its decoder for an encoder-decoder LM).
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights of the language model (of its decoder for an encoder-decoder LM).
        encoder_last_hidden_state (`torch.FloatTensor`, *optional*):
            Encoder output, for an encoder-decoder language model.
        image_hidden_states (`torch.FloatTensor` of shape `(num_images, num_image_tokens, hidden_size)`, *optional*):
            The projected bridge tokens scattered into the `<image>` positions (one row per real tile with any-res).
    """

    last_hidden_state: torch.FloatTensor | None = None
    # The cache field takes the name of the installed transformers' outputs (see `compat`).
    if CACHE_KEY == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class BridgeVLMOutput(ModelOutput):
    """
    Output of [`BridgeVLMForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            Next-token cross-entropy over the positions whose label is not -100.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Language-model logits, aligned one-to-one with `input_ids` (with `decoder_input_ids` for an
            encoder-decoder LM).
        cache, hidden_states, attentions, encoder_last_hidden_state, image_hidden_states:
            As in [`BridgeVLMModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_KEY == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None
