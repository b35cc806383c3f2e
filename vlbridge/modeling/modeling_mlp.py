"""The LLaVA-1.5 MLP projector bridge: every image feature goes through the same small MLP, one token per feature.

The layers are named `linear_1`, `linear_2`, ... exactly as in transformers' `LlavaMultiModalProjector`, so a LLaVA
checkpoint's `multi_modal_projector.linear_{i}.*` keys load 1:1 into `bridge.linear_{i}.*`.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from ..configuration.configuration_mlp import MLPProjectorConfig
from .bridge_utils import check_image_features
from .outputs import BridgeModelOutput


class MLPProjectorPreTrainedModel(PreTrainedModel):
    config: MLPProjectorConfig
    config_class = MLPProjectorConfig
    base_model_prefix = "projector"
    main_input_name = "image_embeds"
    input_modalities = ("image",)
    # No attention inside, so any implementation a composite model asks for is trivially supported.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Spelled out rather than left to the base class, so that it cannot drift if the base class changes.
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


class MLPProjectorModel(MLPProjectorPreTrainedModel):
    r"""
    LLaVA-1.5's connector as a bridge: `num_layers` linear layers, `encoder_hidden_size -> hidden_size -> ... ->
    hidden_size`, with `hidden_act` between them, applied to each image feature independently. It gives one token per
    image feature, less the first one when `drop_cls_token=True` (LLaVA's "default" feature selection).

    Args:
        config ([`MLPProjectorConfig`]):
            The bridge configuration.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import MLPProjectorConfig
    >>> from vlbridge.modeling.modeling_mlp import MLPProjectorModel
    >>> config = MLPProjectorConfig(hidden_size=32, encoder_hidden_size=48, num_layers=2, drop_cls_token=True)
    >>> model = MLPProjectorModel(config)
    >>> image_embeds = torch.randn(2, 17, 48)  # (batch, CLS + 16 patches, encoder width)
    >>> model(image_embeds).image_tokens.shape  # the CLS feature is dropped
    torch.Size([2, 16, 32])

    ```"""

    def __init__(self, config: MLPProjectorConfig):
        super().__init__(config)
        self.num_layers = config.num_layers
        # Plain attributes rather than a ModuleList: the keys must be `linear_1.weight`, ... to match LLaVA's.
        in_features = config.encoder_hidden_size
        for index in range(1, config.num_layers + 1):
            self.add_module(f"linear_{index}", nn.Linear(in_features, config.hidden_size, bias=config.bias))
            in_features = config.hidden_size
        self.act = ACT2FN[config.hidden_act]
        self.post_init()

    def _check_inputs(self, image_embeds: torch.Tensor, image_attention_mask: torch.Tensor | None):
        check_image_features(image_embeds, image_attention_mask, self.config.encoder_hidden_size)
        if self.config.drop_cls_token and image_embeds.shape[1] < 2:
            raise ValueError(
                f"`drop_cls_token=True` drops the first image feature, but only {image_embeds.shape[1]} feature(s) "
                "were given. Set `drop_cls_token=False` for vision towers without a CLS token (e.g. SigLIP)."
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
            image_embeds (`torch.Tensor` of shape `(batch_size, num_features, encoder_hidden_size)`):
                Image features from the vision tower, CLS first when `config.drop_cls_token`. Cast to the bridge's
                parameter dtype on entry, so a bf16 tower can feed an fp32 bridge.
            image_attention_mask (`torch.Tensor` of shape `(batch_size, num_features)`, *optional*):
                Accepted for the uniform bridge interface, checked against `image_embeds` and sliced like it (first
                column dropped with the CLS token), but otherwise unused: each feature is projected on its own, so
                padding cannot affect the real tokens, and every feature (padding included) still yields a token.
                Hiding padding tokens from the language model is the job of its attention mask.
            output_attentions (`bool`, *optional*):
                Accepted for the uniform interface; there is no attention, so `attentions` is always `None`.
            output_hidden_states (`bool`, *optional*):
                Return the (CLS-dropped) input features and the output of each linear layer (after its activation,
                except the last).
            return_dict (`bool`, *optional*):
                Return a [`BridgeModelOutput`] rather than a plain tuple.

        Returns:
            [`BridgeModelOutput`]: `image_tokens` and `last_hidden_state` are the same `(batch_size, num_features
            - drop_cls_token, hidden_size)` tensor, in the bridge's dtype.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_inputs(image_embeds, image_attention_mask)

        # The bridge stays in its own (fp32) dtype even when the vision tower runs in bf16 / fp16.
        hidden_states = image_embeds.to(self.linear_1.weight.dtype)  # (B, P, Dv)
        if self.config.drop_cls_token:
            hidden_states = hidden_states[:, 1:]  # (B, P - 1, Dv)
            if image_attention_mask is not None:
                image_attention_mask = image_attention_mask[:, 1:]  # kept aligned with the tokens; not used below

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for index in range(1, self.num_layers + 1):
            hidden_states = getattr(self, f"linear_{index}")(hidden_states)
            if index < self.num_layers:
                hidden_states = self.act(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        output = BridgeModelOutput(
            image_tokens=hidden_states,  # (B, P - drop_cls_token, D)
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["MLPProjectorPreTrainedModel", "MLPProjectorModel"]
