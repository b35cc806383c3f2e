"""Zero-shot image classification with a stage-1 Q-Former: the model behind `transformers.pipeline(
"zero-shot-image-classification")` for a `vlbridge_qformer_pretraining` checkpoint.

The class adds no weights to [`QFormerForImageTextPretraining`]: it loads the same checkpoint keys and only changes
what `forward` computes, the CLIP-style `logits_per_image` / `logits_per_text` the pipeline reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from . import stage1_losses as losses
from .bridge_utils import check_pixel_values
from .modeling_qformer_pretraining import QFormerForImageTextPretraining


# Image-label pairs per ITM forward when re-ranking: bounds the memory of many images x many labels.
ITM_CHUNK = 256


@dataclass
class QFormerZeroShotOutput(ModelOutput):
    """
    Output of [`QFormerForZeroShotImageClassification`].

    Args:
        logits_per_image (`torch.FloatTensor` of shape `(num_images, num_labels)`):
            Each image's scores over the labels (the pipeline's softmax turns them into probabilities): the ITC
            logits (best query's cosine divided by the temperature), or with ITM re-ranking the ITM "match" logit
            plus the ITC cosine.
        logits_per_text (`torch.FloatTensor` of shape `(num_labels, num_images)`):
            `logits_per_image.t()`.
        cosine (`torch.FloatTensor` of shape `(num_images, num_labels)`):
            The ITC cosine of the best query per pair (no temperature).
        itm_scores (`torch.FloatTensor` of shape `(num_images, num_labels)`, *optional*):
            The ITM "match" logits, with ITM re-ranking.
        image_embeds (`torch.FloatTensor` of shape `(num_images, num_query_tokens, embed_dim)`):
            The images' ITC features ([`~QFormerForImageTextPretraining.get_image_features`]).
        text_embeds (`torch.FloatTensor` of shape `(num_labels, embed_dim)`):
            The labels' ITC features ([`~QFormerForImageTextPretraining.get_text_features`]).
    """

    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    cosine: torch.FloatTensor | None = None
    itm_scores: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


class QFormerForZeroShotImageClassification(QFormerForImageTextPretraining):
    r"""
    A stage-1 Q-Former as a zero-shot image classifier, registered with `AutoModelForZeroShotImageClassification`,
    so that `transformers.pipeline("zero-shot-image-classification", model=<stage-1 folder>)` works after
    `import vlbridge` (the folder's tokenizer and image processor are found beside the model).

    Every image is scored against every label as the stage-1 ITC does: the best query's cosine divided by the learned
    temperature. With ITM re-ranking (`use_itm=True`, or `config.zero_shot_use_itm` for the pipeline) every label is
    re-scored with the ITM "match" logit plus the ITC cosine, LAVIS' retrieval re-ranking score.

    Args:
        config ([`QFormerPretrainingConfig`]):
            The stage-1 model's config; the checkpoint of a [`QFormerForImageTextPretraining`] loads as it is.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import QFormerForZeroShotImageClassification, QFormerPretrainingConfig
    >>> config = QFormerPretrainingConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                     "intermediate_size": 64, "num_query_tokens": 4, "vocab_size": 100},
    ...     embed_dim=16, decoder_start_token_id=1, eos_token_id=3, pad_token_id=0,
    ... )
    >>> model = QFormerForZeroShotImageClassification(config).eval()
    >>> labels = torch.tensor([[2, 10, 11], [2, 12, 13], [2, 14, 0]])  # three tokenized labels
    >>> out = model(input_ids=labels, attention_mask=labels != 0, pixel_values=torch.randn(2, 3, 32, 32))
    >>> out.logits_per_image.shape, out.logits_per_text.shape
    (torch.Size([2, 3]), torch.Size([3, 2]))
    >>> model(input_ids=labels, pixel_values=torch.randn(2, 3, 32, 32), use_itm=True).itm_scores.shape
    torch.Size([2, 3])
    ```
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_itm: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
    ) -> QFormerZeroShotOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(num_labels, text_length)`):
                The candidate labels (prompts), tokenized with the stage-1 tokenizer; at least two.
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`):
                The images, from the stage-1 image processor.
            attention_mask (`torch.Tensor` of shape `(num_labels, text_length)`, *optional*):
                Padding mask of the labels.
            use_itm (`bool`, *optional*):
                Re-rank every label with ITM; defaults to `config.zero_shot_use_itm`.
            token_type_ids (`torch.LongTensor`, *optional*):
                Accepted from BERT-style tokenizers and unused (the Q-Former has no segment embeddings).

        Returns:
            [`QFormerZeroShotOutput`]: `logits_per_image (num_images, num_labels)` and its transpose.
        """
        self._check_zero_shot_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        use_itm = self.config.zero_shot_use_itm if use_itm is None else use_itm
        vision_embeds = self.get_vision_features(check_pixel_values(pixel_values))  # (N, P, Dv)
        image_embeds = self.get_image_features(image_embeds=vision_embeds)  # (N, Q, E)
        text_embeds = self.get_text_features(input_ids, attention_mask)  # (L, E)
        cosine = losses.query_text_similarity(image_embeds, text_embeds)  # (N, L)
        # The clamp the training forward applies in place, without changing the parameter here.
        temperature = self.temp.clamp(self.config.temperature_min, self.config.temperature_max)
        itm_scores = None
        if use_itm:
            itm_scores = self._itm_match_scores(vision_embeds, input_ids, attention_mask)  # (N, L)
            logits = itm_scores + cosine
        else:
            logits = cosine / temperature
        return QFormerZeroShotOutput(
            logits_per_image=logits,
            logits_per_text=logits.t(),
            cosine=cosine,
            itm_scores=itm_scores,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )

    def _check_zero_shot_inputs(self, input_ids, pixel_values):
        """Errors that name the fix, before any tensor reaches the Q-Former."""
        if pixel_values is None or input_ids is None:
            raise ValueError(
                "Zero-shot classification needs pixel_values (the images, from the image processor) and input_ids "
                "(the candidate labels, tokenized with the stage-1 tokenizer)."
            )
        num_labels = input_ids.shape[0]
        if num_labels < 2:
            raise ValueError(
                f"Zero-shot classification chooses between candidate labels, got {num_labels}: pass at least two "
                "(candidate_labels=['a red circle', 'a blue square']); one label would always score 1."
            )
        max_length = self.config.qformer_config.max_position_embeddings
        if input_ids.shape[1] > max_length:
            raise ValueError(
                f"A candidate label is {input_ids.shape[1]} tokens long (with its prompt template), more than the "
                f"Q-Former's text branch takes (max_position_embeddings={max_length}): shorten the labels or the "
                'hypothesis_template (hypothesis_template="{}" uses the labels as they are).'
            )

    def _itm_match_scores(self, vision_embeds, input_ids, attention_mask) -> torch.FloatTensor:
        """ITM "match" logits of every (image, label) pair, `(N, L)`, in chunks of `ITM_CHUNK` pairs."""
        num_images, num_labels = vision_embeds.shape[0], input_ids.shape[0]
        image_index = torch.arange(num_images, device=input_ids.device).repeat_interleave(num_labels)  # (N * L,)
        label_index = torch.arange(num_labels, device=input_ids.device).repeat(num_images)  # (N * L,)
        scores = []
        for start in range(0, num_images * num_labels, ITM_CHUNK):
            images, labels = image_index[start : start + ITM_CHUNK], label_index[start : start + ITM_CHUNK]
            logits = self.compute_itm_logits(vision_embeds[images], input_ids[labels], attention_mask[labels])
            scores.append(logits[:, 1])  # (chunk,)
        return torch.cat(scores).view(num_images, num_labels)


__all__ = ["QFormerForZeroShotImageClassification", "QFormerZeroShotOutput"]
