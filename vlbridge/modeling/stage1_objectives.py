"""The stage-1 objectives of the BLIP family in one place: ITC, ITM with hard negatives, ITG (BLIP's LM), and ALBEF /
BLIP momentum distillation with feature queues, shared by [`QFormerForImageTextPretraining`] (BLIP-2) and
[`BlipMEDForImageTextPretraining`] (BLIP).

[`ImageTextPretrainingMixin`] orchestrates the losses (gathers, positives, negative sampling, weighting, the
momentum model and its queues, exact gradient accumulation through `stage1_accumulation.py`) with the pure functions
of `stage1_losses.py`. It never looks inside a model: the model provides these hooks,

- `get_vision_features(pixel_values, momentum=False) -> (B, P, Dv)`: the vision tower's features (a default here);
- `_unimodal_features(image_embeds, input_ids, attention_mask, momentum=False) -> ((B, Q, E), (B, E))`: the
  L2-normalised ITC image embeddings (`Q` queries for BLIP-2, `Q = 1`, the image `[CLS]`, for BLIP) and text embedding;
- `compute_itm_logits(image_embeds, input_ids, attention_mask) -> (N, 2)`: ITM logits of pairs (image `i`, text `i`);
- `compute_itg_logits(image_embeds, decoder_input_ids, attention_mask) -> (B, T, V)`: next-token logits;
- `_image_key_values(image_embeds)`: the images' cross-attention keys / values, projected once per step and shared by
  the ITC, ITM and ITG passes, or `None` (the default here, BLIP's) for passes that each read `image_embeds`. When it
  returns them (an object with `index_select(rows)` and `cat(parts)`, e.g. the Q-Former's [`ImageKeyValues`]), the
  three pass hooks above get `image_embeds=None, image_key_values=...` instead (ITM's pairs index them);
- `temp` (the learned temperature), `_momentum_modules` (names that get an EMA copy `<name>_m`; the vision tower's
  copy is added when the model builds `vision_tower_m`), `_num_image_features` (`Q`), `itc_label_smoothing`,
  `supports_matching` / `supports_captioning`, and `_output_class`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from . import stage1_losses as losses
from .bridge_utils import check_pixel_values, vision_tower_features
from .stage1_accumulation import AccumulationWindow, windowed_forward


logger = logging.get_logger(__name__)


@dataclass
class ImageTextPretrainingOutput(ModelOutput):
    """
    Output of a stage-1 model ([`QFormerForImageTextPretraining`], [`BlipMEDForImageTextPretraining`]).

    Args:
        loss (`torch.FloatTensor`, *optional*):
            `itc_weight * loss_itc + itm_weight * loss_itm + itg_weight * loss_itg` (the losses computed).
        loss_itc (`torch.FloatTensor`, *optional*):
            Image-text contrastive loss (symmetric, negatives from every process).
        loss_itm (`torch.FloatTensor`, *optional*):
            Image-text matching loss over `B` positives and `2B` hard negatives.
        loss_itg (`torch.FloatTensor`, *optional*):
            Image-grounded text generation loss (BLIP's LM loss; next-token cross-entropy, label-smoothed).
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, global_batch_size)`, *optional*):
            ITC logits of each local image against every text of the global batch; `(batch_size, batch_size)` local
            logits when `return_loss=False`.
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, global_batch_size)`, *optional*):
            The same for each local text against every image.
        itm_logits (`torch.FloatTensor` of shape `(3 * batch_size, 2)`, *optional*):
            ITM logits of the pairs `[positives; text with hard negative image; image with hard negative text]`.
        itm_labels (`torch.LongTensor` of shape `(3 * batch_size,)`, *optional*):
            `[1] * batch_size + [0] * 2 * batch_size`.
        itm_accuracy (`torch.FloatTensor`, *optional*):
            Fraction of the ITM pairs classified right (detached; for logging).
        itg_logits (`torch.FloatTensor` of shape `(batch_size, text_length, vocab_size)`, *optional*):
            Next-token logits at the text positions of the ITG pass.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_image_features, embed_dim)`, *optional*):
            L2-normalised ITC image embeddings.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`, *optional*):
            L2-normalised ITC text embeddings.
        temperature (`torch.FloatTensor`, *optional*):
            The (clamped) ITC temperature used (detached; for logging).
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_itg: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    itm_accuracy: torch.FloatTensor | None = None
    itg_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None


class ImageTextPretrainingMixin:
    """
    ITC + ITM + ITG pretraining with optional momentum distillation, for a `PreTrainedModel` that provides the hooks
    listed in the module docstring. Put it after the feature mixins and before `PreTrainedModel` among the bases.
    """

    _momentum_modules: tuple[str, ...] = ()
    _output_class: type[ImageTextPretrainingOutput] = ImageTextPretrainingOutput

    @property
    def _num_image_features(self) -> int:
        """`Q`: ITC image embeddings per image (queue shape)."""
        raise NotImplementedError

    @property
    def itc_label_smoothing(self) -> float:
        """Label smoothing of the hard ITC targets."""
        raise NotImplementedError

    @property
    def uses_momentum_distillation(self) -> bool:
        """Whether this model runs momentum distillation (it has the momentum copies and queues)."""
        return bool(self.config.use_momentum_distillation)

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------------

    def get_vision_features(self, pixel_values: torch.FloatTensor, momentum: bool = False) -> torch.FloatTensor:
        """
        Runs the vision tower as the stage-2 VLM does; `(B, C, H, W) -> (B, P, Dv)`, in the tower's dtype. A frozen
        tower builds no autograd graph.
        """
        tower = self.vision_tower_m if momentum else self.vision_tower
        trainable = False if momentum else None  # the momentum copy never gets gradients
        return vision_tower_features(tower, pixel_values, self.config.vision_feature_layer, trainable)

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        return_loss: bool = True,
        sampling_seed: int | None = None,
        itm_negative_hardness: float = 1.0,
        accumulation_window: AccumulationWindow | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> ImageTextPretrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`, *optional*):
                One image per caption (repeat an image for each of its captions). Give these or `vision_features`.
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`):
                Captions starting with `[CLS]` / BOS (ITG replaces it with `decoder_start_token_id`, BLIP's ITM with
                `enc_token_id`).
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                Text padding mask; padded positions get no ITG loss.
            image_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Non-negative id of each caption's image. Captions sharing an id are positives of each other in ITC and
                never drawn as ITM negatives; without ids only the pair itself is positive.
            return_loss (`bool`, *optional*, defaults to `True`):
                `False` returns only the local ITC logits and embeddings (no gathering, no ITM / ITG, no momentum
                update).
            sampling_seed (`int`, *optional*):
                Seeds the ITM hard-negative sampling (default: the global RNG). [`Stage1Trainer`] draws one per step.
            itm_negative_hardness (`float`, *optional*, defaults to 1.0):
                ITM negatives are drawn from `softmax(itm_negative_hardness * ITC logits)`: 1 is LAVIS, 0 draws them
                uniformly. [`Stage1Trainer`] ramps it from 0 to 1 over `Stage1Config.itm_hard_negative_warmup_ratio`
                of training: a from-scratch ITM head that only ever sees near-duplicate negatives can stay on "no
                match".
            accumulation_window ([`AccumulationWindow`], *optional*):
                Set by [`Stage1Trainer`] under gradient accumulation: the other micro-batches of this optimizer step,
                so that the accumulated loss and gradients equal those of the larger batch (see
                `vlbridge.modeling.stage1_accumulation`).
            vision_features (`torch.FloatTensor` of shape `(batch_size, num_features, hidden_size)`, *optional*):
                The frozen vision tower's features of the images (`hidden_size` is the tower's), as
                [`get_vision_features`] returns them (at `config.vision_feature_layer`), e.g. computed once and cached:
                used instead of running the tower on `pixel_values`, with the same losses. Only for a frozen tower
                (the features of a training tower go stale).
        """
        if input_ids is None:
            raise ValueError("input_ids are required: the captions, tokenized for the model (one per image).")
        self._check_image_inputs(pixel_values, vision_features, input_ids.shape[0])
        self._clamp_temperature()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()
        self._check_objectives(return_loss)
        image_embeds = self._step_image_embeds(pixel_values, vision_features)  # (B, P, Dv)
        if accumulation_window is not None and return_loss:
            return windowed_forward(
                self,
                accumulation_window,
                image_embeds,
                input_ids,
                attention_mask,
                self._output_class,
                itm_negative_hardness,
            )
        if not self.supports_matching:  # a captioner alone: ITG only (`_check_objectives` refused ITC / ITM)
            output = self._output_class(temperature=self.temp.detach().clone())
            output.loss_itg, output.itg_logits = self._itg(image_embeds, input_ids, attention_mask)
            output.loss = self.config.itg_weight * output.loss_itg
            return output
        if not return_loss:
            image_feats, text_feat = self._unimodal_features(image_embeds, input_ids, attention_mask)
            sim = losses.query_text_similarity(image_feats, text_feat) / self.temp  # (B, B)
            return self._output_class(
                logits_per_image=sim,
                logits_per_text=sim.t(),
                image_embeds=image_feats,
                text_embeds=text_feat,
                temperature=self.temp.detach().clone(),
            )
        return self._pretraining_losses(
            pixel_values, image_embeds, input_ids, attention_mask, image_ids, sampling_seed, itm_negative_hardness
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Image inputs: pixels or cached vision features; keys / values shared by the passes
    # ----------------------------------------------------------------------------------------------------------------

    def _check_image_inputs(self, pixel_values, vision_features, batch_size: int | None = None) -> None:
        """Raises a `ValueError` naming the fix unless exactly one of `pixel_values` / `vision_features` is given and
        `vision_features` fit this model (a frozen tower, its width, one row per caption)."""
        if (pixel_values is None) == (vision_features is None):
            given = "both" if pixel_values is not None else "neither"
            raise ValueError(
                f"Pass exactly one of pixel_values (the images, from the image processor) and vision_features (the "
                f"frozen vision tower's features, from get_vision_features); got {given}."
            )
        if vision_features is None:
            return
        # As in the composite VLM: a tower that trains (while gradients are on) would get no gradient from features
        # computed beforehand; a momentum tower (only built for a training one) needs the pixels in every step.
        training_tower = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        if training_tower or hasattr(self, "vision_tower_m"):
            raise ValueError(
                "vision_features stand for the output of a frozen vision tower, but this model trains its tower "
                "(freeze_vision_tower=False, or tower parameters that require grad): features computed beforehand "
                "would not follow its updates nor give it gradients. Pass pixel_values, or freeze the tower "
                "(freeze_vision_tower=True)."
            )
        width = self.config.vision_config.hidden_size
        if not torch.is_tensor(vision_features) or vision_features.dim() != 3 or vision_features.shape[-1] != width:
            got = tuple(vision_features.shape) if torch.is_tensor(vision_features) else type(vision_features).__name__
            raise ValueError(
                f"vision_features must have shape (batch_size, num_features, {width}) (the vision tower's hidden "
                f"size, which the model reads), got {got}: compute them with get_vision_features(pixel_values), at "
                "config.vision_feature_layer."
            )
        if not vision_features.is_floating_point():
            raise ValueError(f"vision_features must be floating point, got {vision_features.dtype}.")
        if batch_size is not None and vision_features.shape[0] != batch_size:
            raise ValueError(
                f"vision_features hold {vision_features.shape[0]} images for {batch_size} captions: one image per "
                "caption (repeat an image's features for each of its captions)."
            )

    def _step_image_embeds(self, pixel_values, vision_features) -> torch.FloatTensor:
        """The step's vision features `(B, P, Dv)`: the tower run on `pixel_values`, or `vision_features` on the
        tower's device and in the dtype it outputs (so that an fp32 cache of an fp32 tower gives bit-identical
        losses). Inputs checked by `_check_image_inputs`."""
        if vision_features is None:
            return self.get_vision_features(check_pixel_values(pixel_values))  # raises on raw or broken pixels
        return vision_features.to(device=self.vision_tower.device, dtype=self.vision_tower.dtype)

    def _image_key_values(self, image_embeds: torch.FloatTensor):
        """The cross-attention keys / values of `image_embeds`, projected once for every pass of the step; `None`
        (here: BLIP's MED, whose passes read `image_embeds`) makes each pass project its own. See the module
        docstring."""
        return None

    @staticmethod
    def _pass_images(image_embeds, image_key_values) -> tuple[torch.Tensor | None, dict]:
        """How a pass hook reads the step's images: `(image_embeds, {})`, or `(None, {"image_key_values": ...})`
        when they are shared (hooks of models without keys / values never see the argument)."""
        if image_key_values is None:
            return image_embeds, {}
        return None, {"image_key_values": image_key_values}

    def _itm_pair_key_values(self, image_key_values, negative_rows=None, negative_embeds=None):
        """Keys / values of ITM's pairs' images `[batch; negatives; batch]` (3B rows): the batch's own rows, and the
        negatives' by `negative_rows` `(B,)` when they are rows of this batch, else projected from `negative_embeds`
        `(B, P, Dv)` (other processes' or micro-batches' images: their keys / values are not here)."""
        if negative_rows is not None:
            # Only the B negatives are gathered: the batch's own rows are concatenated as they are, whose backward is
            # a slice, where gathering all 3B rows would scatter-add 3B rows of every layer's keys and values back.
            negatives = image_key_values.index_select(negative_rows)
        else:
            negatives = self._image_key_values(negative_embeds)
        return image_key_values.cat([image_key_values, negatives, image_key_values])

    def _check_objectives(self, return_loss: bool) -> None:
        """Refuses, naming the fix, an objective this model has no part for."""
        if self.supports_matching:
            return
        config = self.config
        if not return_loss or config.itc_weight or config.itm_weight:
            raise ValueError(
                f"This {type(self).__name__} has no text encoder, so it computes neither ITC nor ITM (nor "
                "`return_loss=False` logits): set itc_weight=0 and itm_weight=0 for a captioner trained on ITG alone, "
                "or build it with the text encoder."
            )

    def _pretraining_losses(
        self, pixel_values, image_embeds, input_ids, attention_mask, image_ids, sampling_seed, itm_negative_hardness
    ) -> ImageTextPretrainingOutput:
        """ITC (with momentum distillation when on), then ITM and ITG, weighted and summed."""
        # The images' cross-attention keys / values, projected once for the ITC, ITM and ITG passes (None: each pass
        # projects its own). One autograd graph: the key / value layers get the sum of the three losses' gradients.
        image_key_values = self._image_key_values(image_embeds)
        images, reuse = self._pass_images(image_embeds, image_key_values)
        image_feats, text_feat = self._unimodal_features(images, input_ids, attention_mask, **reuse)
        global_batch = input_ids.shape[0] * losses.world_info()[1]
        image_ids_all = None if image_ids is None else losses.concat_all_gather(image_ids.view(-1))
        if self.uses_momentum_distillation:
            loss_itc, sim_i2t, sim_t2i, positives = self._itc_momentum(
                pixel_values, image_embeds, input_ids, attention_mask, image_feats, text_feat, image_ids, image_ids_all
            )
        else:
            loss_itc, sim_i2t, sim_t2i, positives = self._itc(image_feats, text_feat, image_ids, image_ids_all)
        output = self._output_class(
            loss_itc=loss_itc,
            logits_per_image=sim_i2t[:, :global_batch],
            logits_per_text=sim_t2i[:, :global_batch],
            image_embeds=image_feats,
            text_embeds=text_feat,
            temperature=self.temp.detach().clone(),
        )
        weighted = [self.config.itc_weight * loss_itc]
        if self.config.itm_weight:
            output.loss_itm, output.itm_logits, output.itm_labels = self._itm(
                image_embeds,
                input_ids,
                attention_mask,
                sim_i2t[:, :global_batch],
                sim_t2i[:, :global_batch],
                positives[:, :global_batch],
                sampling_seed,
                itm_negative_hardness,
                image_key_values,
            )
            output.itm_accuracy = (output.itm_logits.detach().argmax(-1) == output.itm_labels).float().mean()
            weighted.append(self.config.itm_weight * output.loss_itm)
        if self.config.itg_weight:
            output.loss_itg, output.itg_logits = self._itg(image_embeds, input_ids, attention_mask, image_key_values)
            weighted.append(self.config.itg_weight * output.loss_itg)
        output.loss = torch.stack(weighted).sum()
        return output

    # ----------------------------------------------------------------------------------------------------------------
    # Losses
    # ----------------------------------------------------------------------------------------------------------------

    def _clamp_temperature(self):
        with torch.no_grad():
            self.temp.clamp_(self.config.temperature_min, self.config.temperature_max)

    def _itc(self, image_feats, text_feat, image_ids, image_ids_all):
        """ITC over the global batch; returns the loss, both logit matrices and the positive mask."""
        rank, _ = losses.world_info()
        image_feats_all = losses.all_gather_with_grad(image_feats)  # (N, Q, E)
        text_feat_all = losses.all_gather_with_grad(text_feat)  # (N, E)
        sim_i2t = losses.query_text_similarity(image_feats, text_feat_all) / self.temp  # (B, N)
        sim_t2i = losses.query_text_similarity(image_feats_all, text_feat).t() / self.temp  # (B, N)
        positives = losses.positive_mask(
            image_feats.shape[0], text_feat_all.shape[0], rank, image_ids, image_ids_all, device=sim_i2t.device
        )
        loss = losses.contrastive_loss(sim_i2t, sim_t2i, positives, self.itc_label_smoothing)
        return loss, sim_i2t, sim_t2i, positives

    def _itm(
        self,
        image_embeds,
        input_ids,
        attention_mask,
        sim_i2t,
        sim_t2i,
        positives,
        seed=None,
        hardness=1.0,
        image_key_values=None,
    ):
        """ITM with one hard negative text per image and one hard negative image per text (LAVIS)."""
        rank, world_size = losses.world_info()
        batch_size = input_ids.shape[0]
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        image_embeds_all = losses.all_gather_with_grad(image_embeds)  # (N, P, Dv)
        input_ids_all = losses.gather_padded(input_ids, pad_id)  # (N, T_max)
        attention_mask_all = losses.gather_padded(attention_mask, 0)
        local = slice(rank * batch_size, (rank + 1) * batch_size)  # this process's rows of the global batch
        # Every process draws the negatives of the whole global batch with the same seeded generator and keeps its
        # own rows: the draws are those of one process holding the global batch, whatever the world size. Drawing
        # from the local rows alone would give every process the random numbers of the global batch's first rows.
        sim_t2i_all = losses.concat_all_gather(sim_t2i)  # (N, N), detached
        sim_i2t_all = losses.concat_all_gather(sim_i2t)
        positives_all = losses.concat_all_gather(positives.to(torch.uint8)).bool()  # not every backend gathers bool
        generator = None if seed is None else torch.Generator(device=sim_i2t.device).manual_seed(seed)
        negative_images = losses.sample_hard_negatives(sim_t2i_all, positives_all, generator, hardness)[local]
        negative_texts = losses.sample_hard_negatives(sim_i2t_all, positives_all, generator, hardness)[local]
        texts = (
            input_ids_all[local],
            attention_mask_all[local],
            input_ids_all[negative_texts],
            attention_mask_all[negative_texts],
        )
        if image_key_values is None:
            return self._itm_on_pairs(image_embeds, image_embeds_all[negative_images], *texts)
        if world_size == 1:  # the negatives are rows of this batch: index their keys / values
            pair_key_values = self._itm_pair_key_values(image_key_values, negative_rows=negative_images)
        else:
            # Other processes' negatives: project the gathered features of those B images (gathering their keys /
            # values instead would move 2 x cross-attention layers x H / Dv times more data).
            pair_key_values = self._itm_pair_key_values(
                image_key_values, negative_embeds=image_embeds_all[negative_images]
            )
        return self._itm_on_pairs(None, None, *texts, pair_key_values=pair_key_values)

    def _itm_on_pairs(
        self,
        image_embeds,
        negative_images,
        text_ids,
        text_mask,
        negative_text_ids,
        negative_text_mask,
        pair_key_values=None,
    ):
        """ITM over LAVIS' 3B pairs: (image, its text) match; (hard negative image, text) and (image, hard negative
        text) do not. Returns the loss, the logits `(3B, 2)` and the labels. With `pair_key_values` (the keys /
        values of the pairs' images `[images; negative images; images]`, see `_itm_pair_key_values`) the images are
        read from them and `image_embeds` / `negative_images` are unused."""
        batch_size = text_ids.shape[0]
        texts = torch.cat([text_ids, text_ids, negative_text_ids])  # (3B, T)
        masks = torch.cat([text_mask, text_mask, negative_text_mask])
        if pair_key_values is None:
            images = torch.cat([image_embeds, negative_images.to(image_embeds.dtype), image_embeds])  # (3B, P, Dv)
            itm_logits = self.compute_itm_logits(images, texts, masks)  # (3B, 2)
        else:
            itm_logits = self.compute_itm_logits(None, texts, masks, image_key_values=pair_key_values)
        itm_labels = torch.cat([torch.ones(batch_size), torch.zeros(2 * batch_size)]).long().to(itm_logits.device)
        return F.cross_entropy(itm_logits.float(), itm_labels), itm_logits, itm_labels

    def _itg(self, image_embeds, input_ids, attention_mask, image_key_values=None):
        """ITG: `[DEC]` replaces the first token; labels are the ids, -100 on padding."""
        if self.config.decoder_start_token_id is None:
            raise ValueError("ITG needs config.decoder_start_token_id (BLIP-2's [DEC]); set it, or itg_weight=0.")
        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.config.decoder_start_token_id
        # Masking by the attention mask rather than by pad id keeps EOS when a tokenizer pads with its EOS token.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        images, reuse = self._pass_images(image_embeds, image_key_values)
        logits = self.compute_itg_logits(images, decoder_input_ids, attention_mask, **reuse)  # (B, T, V)
        return losses.itg_loss(logits, labels, self.config.label_smoothing), logits

    # ----------------------------------------------------------------------------------------------------------------
    # Momentum distillation (ALBEF / BLIP)
    # ----------------------------------------------------------------------------------------------------------------

    def _build_queues(self) -> None:
        """Feature queues of past batches' gathered momentum features (called by the model's `__init__`)."""
        size, num_features, embed_dim = self.config.queue_size, self._num_image_features, self.config.embed_dim
        # Every image feature (query) is queued, since ITC takes the best one per pair. The image ids let captions of
        # a queued image count as positives.
        self.register_buffer("image_queue", torch.zeros(size, num_features, embed_dim))  # (K, Q, E)
        self.register_buffer("text_queue", torch.zeros(size, embed_dim))  # (K, E)
        self.register_buffer("image_id_queue", torch.full((size,), -1, dtype=torch.long))  # (K,)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("momentum_step", torch.zeros((), dtype=torch.long))  # drives the alpha warm-up

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        names = self._momentum_modules + (("vision_tower",) if hasattr(self, "vision_tower_m") else ())
        return [(getattr(self, name), getattr(self, f"{name}_m")) for name in names]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)  # Linear / LayerNorm / Embedding: normal(initializer_range), ones, zeros
        if module is not self:
            return
        init.constant_(self.temp, self.config.temperature_init)
        if self.uses_momentum_distillation:
            if not getattr(self.image_queue, "_is_hf_initialized", False):
                init.copy_(self.image_queue, F.normalize(torch.randn_like(self.image_queue), dim=-1))
            if not getattr(self.text_queue, "_is_hf_initialized", False):
                init.copy_(self.text_queue, F.normalize(torch.randn_like(self.text_queue), dim=-1))
            init.constant_(self.image_id_queue, -1)
            init.zeros_(self.queue_ptr)
            init.zeros_(self.momentum_step)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """[`~PreTrainedModel.from_pretrained`]; momentum copies missing from the checkpoint start as copies of the
        loaded weights (ALBEF's `copy_params`) instead of random."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # Loading puts fresh parameters in place, which require grad again: a frozen tower would train.
        model._freeze_fixed_parts()
        prefixes = tuple(f"{name}_m." for name in cls._momentum_modules + ("vision_tower",))
        if model.uses_momentum_distillation and any(k.startswith(prefixes) for k in info["missing_keys"]):
            logger.warning("The checkpoint has no momentum encoders: initialising them as copies of the model.")
            model.copy_params()
        return (model, info) if want_info else model

    def _freeze_fixed_parts(self) -> None:
        """What never trains: the vision tower when the config freezes it, and the momentum copies (EMA only)."""
        if self.config.freeze_vision_tower:
            self.vision_tower.requires_grad_(False)
        if self.uses_momentum_distillation:
            for _, model_m in self._momentum_pairs():
                model_m.requires_grad_(False)

    @torch.no_grad()
    def copy_params(self):
        """Sets every momentum parameter to its model parameter (ALBEF's `copy_params`); they never train."""
        for model, model_m in self._momentum_pairs():
            for param, param_m in zip(model.parameters(), model_m.parameters(), strict=True):
                param_m.copy_(param)
                param_m.requires_grad_(False)

    @torch.no_grad()
    def _momentum_update(self):
        momentum = self.config.momentum
        for model, model_m in self._momentum_pairs():
            for param, param_m in zip(model.parameters(), model_m.parameters(), strict=True):
                param_m.mul_(momentum).add_(param.detach().to(param_m.dtype), alpha=1.0 - momentum)

    def current_alpha(self) -> float:
        """Weight of the momentum targets now: `alpha`, ramped linearly over the first `alpha_warmup_steps` steps."""
        warmup = self.config.alpha_warmup_steps
        if warmup <= 0:
            return float(self.config.alpha)
        return float(self.config.alpha) * min(1.0, int(self.momentum_step) / warmup)

    def _itc_momentum(
        self, pixel_values, image_embeds, input_ids, attention_mask, image_feats, text_feat, image_ids, image_ids_all
    ):
        """ITC against momentum features of the global batch plus the queues, with soft momentum targets."""
        rank, world_size = losses.world_info()
        batch_size = input_ids.shape[0]
        global_batch = batch_size * world_size
        if self.config.queue_size % global_batch:
            raise ValueError(
                f"queue_size ({self.config.queue_size}) must be a multiple of the global batch size ({global_batch})."
            )
        if self.training:
            self._momentum_update()
        with torch.no_grad():
            # Only a training tower has a momentum copy, and `vision_features` are refused with one; a frozen tower
            # is its own momentum copy, so the momentum model reads the step's features (from pixels or a cache).
            image_embeds_m = self.get_vision_features(pixel_values, True) if hasattr(self, "vision_tower_m") else None
            image_embeds_m = image_embeds if image_embeds_m is None else image_embeds_m
            image_feat_m, text_feat_m = self._unimodal_features(image_embeds_m, input_ids, attention_mask, True)
            image_feat_m_all = losses.concat_all_gather(image_feat_m)  # (N, Q, E)
            text_feat_m_all = losses.concat_all_gather(text_feat_m)  # (N, E)
            image_columns = torch.cat([image_feat_m_all, self.image_queue.clone()])  # (N + K, Q, E)
            text_columns = torch.cat([text_feat_m_all, self.text_queue.clone()])  # (N + K, E)
            sim_i2t_m = losses.query_text_similarity(image_feat_m, text_columns) / self.temp
            sim_t2i_m = losses.query_text_similarity(image_columns, text_feat_m).t() / self.temp
            positives = self._momentum_positives(batch_size, rank, global_batch, image_ids, image_ids_all)
        sim_i2t = losses.query_text_similarity(image_feats, text_columns) / self.temp  # (B, N + K)
        sim_t2i = losses.query_text_similarity(image_columns, text_feat).t() / self.temp  # (B, N + K)
        alpha = self.current_alpha()
        loss = losses.contrastive_loss(
            sim_i2t, sim_t2i, positives, self.itc_label_smoothing, sim_i2t_m, sim_t2i_m, alpha
        )
        if self.training:
            ids = image_ids_all
            if ids is None:  # queued entries without an id are never positives
                ids = torch.full_like(self.image_id_queue[:global_batch], -1)
            self._dequeue_and_enqueue(image_feat_m_all, text_feat_m_all, ids)
            self.momentum_step += 1
        return loss, sim_i2t, sim_t2i, positives

    def _momentum_positives(self, batch_size, rank, global_batch, image_ids, image_ids_all) -> torch.Tensor:
        """Positives over `[global batch; queue]`: the pair itself, or every column with the same image id."""
        num_columns = global_batch + self.config.queue_size
        if image_ids is None:
            return losses.positive_mask(batch_size, num_columns, rank, device=self.text_queue.device)
        column_ids = torch.cat([image_ids_all.to(self.image_id_queue.device), self.image_id_queue])
        return losses.positive_mask(batch_size, num_columns, rank, image_ids, column_ids)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feats: torch.Tensor, text_feats: torch.Tensor, image_ids: torch.Tensor):
        """Writes the gathered momentum features of this step over the oldest queue entries."""
        size, pointer = image_feats.shape[0], int(self.queue_ptr)
        self.image_queue[pointer : pointer + size] = image_feats.to(self.image_queue.dtype)
        self.text_queue[pointer : pointer + size] = text_feats.to(self.text_queue.dtype)
        self.image_id_queue[pointer : pointer + size] = image_ids.to(self.image_id_queue.device)
        self.queue_ptr.fill_((pointer + size) % self.config.queue_size)


__all__ = ["ImageTextPretrainingMixin", "ImageTextPretrainingOutput"]
