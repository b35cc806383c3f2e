"""
BLIP's visual question answering model (Li et al., 2022, §5.3) in the HF stack: an image-grounded question encoder
and an answer decoder that reads the encoded question, as BLIP's `blip_vqa.py` and transformers'
`BlipForQuestionAnswering` build it, on a [`BlipMEDConfig`]. Released weights convert here from transformers'
`BlipForQuestionAnswering` (`vlbridge.conversion.blip`).

Where it follows BLIP rather than transformers, on purpose:

- The answer decoder starts with `decoder_start_token_id` (`[DEC]`) in training too: `forward` puts it in the first
  label position, as BLIP does. transformers' `forward` feeds the labels unchanged (the processor's `[CLS]` first)
  while its `generate` starts from `[DEC]`, so it trains on one start token and answers from another.
- The answer decoder never reads the questions' padding, in `forward` and `generate` alike (BLIP masks it in
  training). transformers' BLIP text layers drop the cross-attention mask (`BlipTextAttention` hands it to
  `BlipTextSelfAttention` as `attention_mask`, which cross-attention ignores for the `encoder_attention_mask` it is
  never given), so its VQA decoder reads question padding, in training and answering, and a question's answer can
  change with the longest question of its batch; BLIP's own `generate` reads it too. Here a forward pre-hook on the
  decoder's cross-attention passes the mask on ([`pass_cross_attention_mask`]). Unpadded (one question, or questions
  of one length) all give the same numbers.
- The decoder's cross-attention reads the question encoder's states, so its width is the text width (BLIP's decoder
  config does this too); transformers sizes it by the vision width, which only works while both are equal.

Kept from transformers: the first question token is used as given unless `config.enc_token_id` is set (BLIP puts
`[ENC]` there; transformers' converted checkpoints run with `[CLS]`, so converted configs set `enc_token_id=None`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AutoModel, BlipTextLMHeadModel, BlipTextModel, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..configuration.configuration_blip_med import BlipMEDConfig
from .bridge_utils import check_pixel_values, vision_tower_features
from .freezing import FrozenVisionTowerMixin
from .saving import SelfDescribingMixin


@dataclass
class BlipMEDQuestionAnsweringOutput(ModelOutput):
    """
    Output of [`BlipMEDForQuestionAnswering`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            Next-token cross-entropy of the answer tokens (label-smoothed by `config.label_smoothing`; `-100` and
            padding positions carry none), returned when `labels` is given.
        logits (`torch.FloatTensor` of shape `(batch_size, answer_length, vocab_size)`):
            The answer decoder's next-token logits, aligned with the decoder's input (position `t` predicts token
            `t + 1`).
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden_size)`):
            The vision tower's features the question encoder read.
        question_embeds (`torch.FloatTensor` of shape `(batch_size, question_length, hidden_size)`):
            The image-grounded question encoding the answer decoder read.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    question_embeds: torch.FloatTensor | None = None


def answer_decoder_config(config: BlipMEDConfig):
    """The answer decoder's text config: the MED text config, with cross-attention over the question encoder's states
    (text width) instead of the image patches (vision width)."""
    decoder_config = copy.deepcopy(config.text_config)
    decoder_config.encoder_hidden_size = config.text_config.hidden_size
    return decoder_config


def pass_cross_attention_mask(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """
    Forward pre-hook for a `BlipTextSelfAttention` used as cross-attention: gives it the padding mask of what it reads.

    transformers' `BlipTextAttention` passes the cross-attention mask on as `attention_mask`, and
    `BlipTextSelfAttention` then replaces it by its `encoder_attention_mask` argument, which nothing passes, so the
    padding of the attended sequence is read. Image patches are never padded (the image-grounded encoder is
    unaffected); questions are. The hook only fills a missing `encoder_attention_mask`: once transformers passes it,
    the hook changes nothing.
    """
    if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
        kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
    return args, kwargs


def answer_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, num_items_in_batch=None
) -> torch.Tensor:
    """
    Next-token cross-entropy of the answers: `logits[:, t]` predicts `labels[:, t + 1]`; `-100` targets are skipped.
    With `num_items_in_batch` (the Trainer's count of target tokens over the accumulation window) the summed loss is
    divided by it, so accumulated micro-batches give the mean of the larger batch.
    """
    shifted_logits = logits[:, :-1].float().flatten(0, 1)  # (B * (T - 1), V)
    targets = labels[:, 1:].flatten().to(shifted_logits.device)  # (B * (T - 1),)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(
        shifted_logits, targets, ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction
    )
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


class BlipMEDForQuestionAnswering(SelfDescribingMixin, FrozenVisionTowerMixin, PreTrainedModel, GenerationMixin):
    r"""
    BLIP's VQA model: a vision tower (`vision_tower`), a question encoder (`text_encoder`, transformers'
    `BlipTextModel`) whose every layer cross-attends to the image patches, and an answer decoder (`text_decoder`,
    `BlipTextLMHeadModel`, its vocabulary projection tied to its own word embeddings) that cross-attends to the
    encoded question. Answers are generated, open-ended, through the decoder's `GenerationMixin.generate` with its
    KV cache: greedy, beam search, sampling, `num_return_sequences`.

    The config must build both text towers, unshared (`with_text_encoder=True`, `with_text_decoder=True`,
    `share_encoder_decoder=False`), without momentum distillation (`use_momentum_distillation=False`): BLIP fine-tunes
    VQA without them. Its `decoder_start_token_id` (`[DEC]`), `eos_token_id` (`[SEP]`) and `pad_token_id` drive
    training and generation; `enc_token_id`, when set, replaces the first question token (BLIP's `[ENC]`).

    Args:
        config ([`BlipMEDConfig`]):
            The vision tower and BERT text configs, token ids and `label_smoothing` of the answer loss.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import BlipMEDConfig, BlipMEDForQuestionAnswering
    >>> config = BlipMEDConfig(
    ...     vision_config={"model_type": "blip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    ...     share_encoder_decoder=False, use_momentum_distillation=False,
    ... )
    >>> model = BlipMEDForQuestionAnswering(config)
    >>> pixel_values = torch.randn(2, 3, 32, 32)
    >>> questions = torch.tensor([[101, 2054, 3609, 102], [101, 2129, 102, 0]])  # [CLS] question [SEP], padded
    >>> answers = torch.tensor([[101, 2417, 102], [101, 2048, 102]])  # [CLS] answer [SEP]; [CLS] becomes [DEC]
    >>> out = model(pixel_values, questions, attention_mask=questions != 0, labels=answers)
    >>> out.logits.shape, out.loss.ndim
    (torch.Size([2, 3, 30524]), 0)
    >>> model.generate(pixel_values, questions, attention_mask=questions != 0, max_new_tokens=4).shape[0]
    2
    ```
    """

    config: BlipMEDConfig
    config_class = BlipMEDConfig
    base_model_prefix = "blip_med"  # no such submodule: loading never adds or strips a prefix
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlipEncoderLayer", "BlipTextEmbeddings", "BlipTextLayer"]
    # The Trainer passes `num_items_in_batch` (see `answer_lm_loss`): the loss is then the mean over every answer token
    # of the accumulation window.
    accepts_loss_kwargs = True

    def __init__(self, config: BlipMEDConfig):
        _check_vqa_config(config)
        super().__init__(config)
        # The answer loss is a shifted next-token loss: the Trainer then counts `labels[..., 1:]` for
        # `num_items_in_batch` (the class name alone would make it a span-extraction "ForQuestionAnswering" loss).
        self.loss_type = "ForCausalLM"
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(answer_decoder_config(config))
        for layer in self.text_decoder.bert.encoder.layer:  # question padding stays unread (pass_cross_attention_mask)
            layer.crossattention.self.register_forward_pre_hook(pass_cross_attention_mask, with_kwargs=True)
        # A frozen tower also stays in eval mode, whatever train() is called with (FrozenVisionTowerMixin).
        self._frozen_vision_tower = config.freeze_vision_tower
        self.post_init()
        if config.freeze_vision_tower:
            self.vision_tower.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """[`~PreTrainedModel.from_pretrained`], keeping a frozen vision tower frozen (loading puts fresh parameters
        in place, which require grad again)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if model.config.freeze_vision_tower:
            model.vision_tower.requires_grad_(False)
        return (model, info) if want_info else model

    def get_input_embeddings(self):
        # The question encoder's words: what `resize_token_embeddings` and PEFT see first. The decoder has its own.
        return self.text_encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.text_encoder.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.text_decoder.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.text_decoder.set_output_embeddings(value)

    # ----------------------------------------------------------------------------------------------------------------
    # Question encoding
    # ----------------------------------------------------------------------------------------------------------------

    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """The vision tower's features, `(B, C, H, W) -> (B, P, Dv)`; a frozen tower builds no autograd graph."""
        pixel_values = check_pixel_values(pixel_values)
        return vision_tower_features(self.vision_tower, pixel_values, self.config.vision_feature_layer)

    def encode_questions(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.LongTensor, torch.FloatTensor]:
        """
        Image-grounded question states: the question encoder over `input_ids` (first token replaced by
        `config.enc_token_id` when set), cross-attending to every image patch.

        Returns:
            `(question_embeds (B, Tq, H), question_mask (B, Tq), image_embeds (B, P, Dv))`.
        """
        if input_ids is None:
            raise ValueError("BLIP's VQA model needs the tokenized questions as `input_ids`.")
        image_embeds = self.get_vision_features(pixel_values)  # (B, P, Dv)
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"Got {image_embeds.shape[0]} images for {input_ids.shape[0]} questions: pass one image per question "
                "(repeat an image for each of its questions)."
            )
        question_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if self.config.enc_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.config.enc_token_id  # BLIP's [ENC]: the image-grounded encoder's first token
        encoder_dtype = self.text_encoder.get_input_embeddings().weight.dtype
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)  # (B, P)
        question_embeds = self.text_encoder(
            input_ids=input_ids,
            attention_mask=question_mask,
            encoder_hidden_states=image_embeds.to(encoder_dtype),
            encoder_attention_mask=image_mask,
            return_dict=True,
        ).last_hidden_state  # (B, Tq, H)
        return question_embeds, question_mask, image_embeds

    # ----------------------------------------------------------------------------------------------------------------
    # Training forward
    # ----------------------------------------------------------------------------------------------------------------

    def _decoder_inputs(
        self, labels: torch.LongTensor | None, decoder_input_ids, decoder_attention_mask
    ) -> tuple[torch.LongTensor, torch.Tensor, torch.LongTensor | None]:
        """`(decoder_input_ids, decoder_attention_mask, targets)` from the answer labels (or given decoder inputs)."""
        pad_token_id = self.config.pad_token_id
        targets = None
        if labels is not None:
            # Padding is no target, whether it comes as -100 or as the pad id (BLIP masks pad ids itself).
            padding = labels.eq(-100) | (labels.eq(pad_token_id) if pad_token_id is not None else False)
            targets = labels.masked_fill(padding, -100)
            if decoder_input_ids is None:
                decoder_input_ids = labels.masked_fill(labels.eq(-100), pad_token_id or 0)
                if decoder_attention_mask is None:
                    decoder_attention_mask = (~padding).long()
        if decoder_input_ids is None:
            raise ValueError(
                "Pass the answers as `labels` to train (`[CLS] answer [SEP]` token ids, padded with -100 or the pad "
                "id), or `decoder_input_ids` for their logits; `generate` answers questions."
            )
        if self.config.decoder_start_token_id is None:
            raise ValueError("The answer decoder needs config.decoder_start_token_id (BLIP's [DEC]).")
        decoder_input_ids = decoder_input_ids.clone()
        decoder_input_ids[:, 0] = self.config.decoder_start_token_id  # BLIP's [DEC] starts every answer
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        decoder_attention_mask = decoder_attention_mask.long().clone()
        decoder_attention_mask[:, 0] = 1  # the start token is always read
        return decoder_input_ids, decoder_attention_mask, targets

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BlipMEDQuestionAnsweringOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                One image per question (repeat an image for each of its questions).
            input_ids (`torch.LongTensor` of shape `(batch_size, question_length)`):
                The questions, `[CLS] question [SEP]` (BERT tokenizer).
            attention_mask (`torch.Tensor` of shape `(batch_size, question_length)`, *optional*):
                Question padding mask; the encoder and the answer decoder never read padded positions.
            labels (`torch.LongTensor` of shape `(batch_size, answer_length)`, *optional*):
                The answers, `[CLS] answer [SEP]` padded with `-100` or the pad id. They are also the decoder's input
                (first token replaced by `[DEC]`); the loss is the next-token cross-entropy of the answer tokens.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, answer_length)`, *optional*):
                Decoder input instead of `labels` (logits without loss); its first token becomes `[DEC]` too.
            decoder_attention_mask (`torch.Tensor` of shape `(batch_size, answer_length)`, *optional*):
                Answer padding mask; derived from `labels` when not given.
            token_type_ids (`torch.LongTensor`, *optional*):
                Ignored: BLIP's text towers have no token types (a BERT tokenizer returns them).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        question_embeds, question_mask, image_embeds = self.encode_questions(pixel_values, input_ids, attention_mask)
        decoder_input_ids, decoder_attention_mask, targets = self._decoder_inputs(
            labels, decoder_input_ids, decoder_attention_mask
        )
        logits = self.text_decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=question_embeds,
            encoder_attention_mask=question_mask,
            use_cache=False,
            return_dict=True,
        ).logits  # (B, Ta, V)
        loss = None
        if targets is not None:
            loss = answer_lm_loss(logits, targets, self.config.label_smoothing, num_items_in_batch)
        return BlipMEDQuestionAnsweringOutput(
            loss=loss, logits=logits, image_embeds=image_embeds, question_embeds=question_embeds
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Answering
    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        r"""
        Answers the questions: the question encoder runs once, then the answer decoder generates from `[DEC]` through
        transformers' `GenerationMixin.generate` with its KV cache (the question states are repeated for beams and
        `num_return_sequences`).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                One image per question.
            input_ids (`torch.LongTensor` of shape `(batch_size, question_length)`):
                The questions, `[CLS] question [SEP]`.
            attention_mask (`torch.Tensor` of shape `(batch_size, question_length)`, *optional*):
                Question padding mask (neither the encoder nor the decoder reads padding).
            token_type_ids (`torch.LongTensor`, *optional*):
                Ignored (a BERT tokenizer returns them).
            **generate_kwargs:
                Anything `generate` takes: `max_new_tokens`, `num_beams`, `do_sample`, `top_p`,
                `num_return_sequences`, a `generation_config`... Defaults: `model.generation_config`, with
                `eos_token_id` / `pad_token_id` from the config (`[SEP]`, padding).

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, answer_length)`: the answers, starting
            with `[DEC]` and ending with `[SEP]` (decode with `skip_special_tokens=True`).
        """
        if self.config.decoder_start_token_id is None:
            raise ValueError("Answering needs config.decoder_start_token_id (BLIP's [DEC]).")
        question_embeds, question_mask, _ = self.encode_questions(pixel_values, input_ids, attention_mask)
        start = torch.full(
            (question_embeds.shape[0], 1), self.config.decoder_start_token_id, device=question_embeds.device
        )  # (B, 1)
        # The model's generation config (saved as generation_config.json) holds the defaults; the keyword arguments
        # that are generation settings update a copy, the rest (streamer, logits_processor, ...) go to `generate`.
        generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        other_kwargs = generation_config.update(**generate_kwargs)
        if generation_config.eos_token_id is None:
            generation_config.eos_token_id = self.config.eos_token_id
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = self.config.pad_token_id
        return self.text_decoder.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=question_embeds,
            encoder_attention_mask=question_mask,
            generation_config=generation_config,
            **other_kwargs,
        )


def _check_vqa_config(config: BlipMEDConfig) -> None:
    """Refuses a config this model cannot honour, naming the settings to change."""
    wrong = {
        name: value
        for name, value, wanted in (
            ("with_text_encoder", config.with_text_encoder, True),
            ("with_text_decoder", config.with_text_decoder, True),
            ("share_encoder_decoder", config.share_encoder_decoder, False),
            ("use_momentum_distillation", config.use_momentum_distillation, False),
        )
        if value != wanted
    }
    if wrong:
        raise ValueError(
            f"BlipMEDForQuestionAnswering builds a question encoder and a separate answer decoder without momentum "
            f"encoders (BLIP's VQA fine-tuning); this config has {wrong}. Set with_text_encoder=True, "
            "with_text_decoder=True, share_encoder_decoder=False, use_momentum_distillation=False."
        )


__all__ = ["BlipMEDForQuestionAnswering", "BlipMEDQuestionAnsweringOutput", "pass_cross_attention_mask"]
