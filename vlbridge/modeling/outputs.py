"""Output classes shared by the bridges and the composite VLM."""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


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
