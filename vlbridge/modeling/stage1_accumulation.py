"""Gradient accumulation that gives the same loss and gradients as one larger batch, for contrastive stage-1 losses.

ITC and ITM are defined over the whole batch: every caption is a negative of every other image, and ITM's hard
negatives are drawn from the batch's similarity matrix. Plain gradient accumulation would shrink that batch to one
micro-batch. Here the micro-batches of one optimizer step form an *accumulation window* (GradCache, Gao et al. 2021):

1. a no-grad pre-pass computes every micro-batch's ITC features and vision features once per window;
2. micro-batch `j` recomputes its own features with autograd and splices them into the window's detached ones, so
   the full `N x N` ITC loss is evaluated with exactly this micro-batch's features live. Summed over the window,
   each feature's gradient is counted once: the big batch's gradient. Its value enters the loss as `1/k` of the
   full ITC loss, its gradient in full (the temperature's only in micro-batch 0);
3. ITM negatives are sampled from the full window matrix with a generator seeded once per step, as the big batch
   samples them, and this micro-batch's ITM / ITG losses are weighted by its share of pairs / tokens.

The equivalence is exact with dropout off and a frozen vision tower (the Q-Former model's default); with dropout the
pre-pass and the live pass draw different masks, which changes nothing in expectation, and with a training vision
tower the ITM negatives' vision features from other micro-batches come from the pre-pass, detached, so the tower
misses their (small) ITM gradient.

The window needs only the model's stage-1 hooks (`get_vision_features`, `_unimodal_features`, `_itm_on_pairs`,
`_itg`, `_image_key_values`, `temp`, `itc_label_smoothing`), so it serves every [`ImageTextPretrainingMixin`] model.
A model without ITC (`supports_matching` false: BLIP's captioner alone) gets ITG only, each micro-batch weighted by
its share of tokens. Micro-batches may carry the frozen tower's cached `vision_features` instead of `pixel_values`.
With shared cross-attention keys / values (the Q-Former's `reuse_image_key_values`), a micro-batch projects its own
images once for its ITC, ITM and ITG passes, and its ITM negative images (from any micro-batch) once more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from . import stage1_losses as losses


@dataclass
class AccumulationWindow:
    """What micro-batch `index` of an accumulation window needs to know about the others (all detached)."""

    image_feats: torch.Tensor | None  # (N, Q, E) ITC image embeddings of the whole window (None without ITC)
    text_feat: torch.Tensor | None  # (N, E) ITC text embeddings
    image_embeds: torch.Tensor  # (N, P, Dv) vision features, for ITM negatives
    input_ids: torch.Tensor  # (N, T_max) every caption, padded to the window's longest
    attention_mask: torch.Tensor  # (N, T_max)
    image_ids: torch.Tensor | None  # (N,)
    starts: list[int]  # offset of each micro-batch in the window
    num_itg_tokens: int  # ITG label tokens over the window
    seed: int  # seeds the ITM negative sampling, identical in every micro-batch of the window
    index: int = 0  # which micro-batch this is

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def itg_token_count(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Tokens that carry ITG loss: every non-padded position after the first (decoder start) one."""
    return int(attention_mask[:, 1:].sum())


@torch.no_grad()
def build_accumulation_window(model, batches: list[dict], seed: int) -> AccumulationWindow:
    """The no-grad pre-pass over every micro-batch of one optimizer step."""
    if model.uses_momentum_distillation:
        raise ValueError(
            "Accumulation windows do not support momentum distillation; use gradient_accumulation_steps=1."
        )
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    feats, texts, embeds, starts = [], [], [], []
    length = max(batch["input_ids"].shape[1] for batch in batches)
    ids, masks = [], []
    for batch in batches:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).long()
        # Pixels, or the frozen tower's cached features in their place (whichever the collator put in the batch).
        pixel_values, vision_features = batch.get("pixel_values"), batch.get("vision_features")
        model._check_image_inputs(pixel_values, vision_features, batch["input_ids"].shape[0])
        image_embeds = model._step_image_embeds(pixel_values, vision_features)  # (b, P, Dv)
        starts.append(sum(len(e) for e in embeds))
        if model.supports_matching:
            image_feats, text_feat = model._unimodal_features(image_embeds, batch["input_ids"], mask)
            feats.append(image_feats)
            texts.append(text_feat)
        embeds.append(image_embeds)
        ids.append(F.pad(batch["input_ids"], (0, length - batch["input_ids"].shape[1]), value=pad_id))
        masks.append(F.pad(mask, (0, length - mask.shape[1]), value=0))
    image_ids = [batch.get("image_ids") for batch in batches]
    return AccumulationWindow(
        image_feats=torch.cat(feats) if feats else None,
        text_feat=torch.cat(texts) if texts else None,
        image_embeds=torch.cat(embeds),
        input_ids=torch.cat(ids),
        attention_mask=torch.cat(masks),
        image_ids=None if any(i is None for i in image_ids) else torch.cat(image_ids),
        starts=starts,
        num_itg_tokens=sum(itg_token_count(i, m) for i, m in zip(ids, masks)),
        seed=seed,
    )


def _splice(window_tensor: torch.Tensor, local: torch.Tensor, start: int) -> torch.Tensor:
    """The window's detached tensor with rows `start : start + len(local)` replaced by the live `local`."""
    end = start + local.shape[0]
    return torch.cat([window_tensor[:start].to(local.dtype), local, window_tensor[end:].to(local.dtype)])


def windowed_forward(
    model, window: AccumulationWindow, image_embeds, input_ids, attention_mask, output_class, hardness: float = 1.0
):
    """One micro-batch's share of the window's loss (see the module docstring); the logged sub-losses are unscaled.
    `image_embeds` `(B, P, Dv)` are this micro-batch's vision features."""
    config = model.config
    start, batch_size, num_windows = window.starts[window.index], input_ids.shape[0], len(window.starts)
    local = slice(start, start + batch_size)
    if window.image_feats is None:  # no ITC / ITM: this micro-batch's token share of the window's ITG loss
        output = output_class(temperature=model.temp.detach().clone())
        output.loss_itg, output.itg_logits = model._itg(image_embeds, input_ids, attention_mask)
        share = itg_token_count(input_ids, attention_mask) / max(window.num_itg_tokens, 1)
        output.loss = config.itg_weight * output.loss_itg * share
        return output
    # Keys / values projected once for this micro-batch's passes, as in the plain step (None: not shared).
    image_key_values = model._image_key_values(image_embeds)
    images, reuse = model._pass_images(image_embeds, image_key_values)
    image_feats, text_feat = model._unimodal_features(images, input_ids, attention_mask, **reuse)
    # The temperature is shared by every micro-batch: let its gradient through once per window.
    temp = model.temp if window.index == 0 else model.temp.detach()
    image_feats_all = _splice(window.image_feats, image_feats, start)  # (N, Q, E)
    text_feat_all = _splice(window.text_feat, text_feat, start)  # (N, E)
    sim_i2t = losses.query_text_similarity(image_feats_all, text_feat_all) / temp  # (N, N)
    sim_t2i = sim_i2t.t()
    positives = losses.positive_mask(window.size, window.size, 0, window.image_ids, window.image_ids, sim_i2t.device)
    loss_itc = losses.contrastive_loss(sim_i2t, sim_t2i, positives, model.itc_label_smoothing)
    # Value 1/k of the window's ITC loss (the k micro-batches add up to it), gradient in full (see step 2).
    itc_share = loss_itc.detach() / num_windows + (loss_itc - loss_itc.detach())
    output = output_class(
        loss_itc=loss_itc.detach(),
        logits_per_image=sim_i2t[local].detach(),
        logits_per_text=sim_t2i[local].detach(),
        image_embeds=image_feats,
        text_embeds=text_feat,
    )
    weighted = [config.itc_weight * itc_share]
    if config.itm_weight:
        generator = torch.Generator(device=sim_i2t.device).manual_seed(window.seed)
        negative_images = losses.sample_hard_negatives(sim_t2i.detach(), positives, generator, hardness)[local]
        negative_texts = losses.sample_hard_negatives(sim_i2t.detach(), positives, generator, hardness)[local]
        ids, mask = window.input_ids, window.attention_mask
        texts = (ids[local], mask[local], ids[negative_texts], mask[negative_texts])
        negative_embeds = window.image_embeds[negative_images]  # (B, P, Dv), from the pre-pass (detached)
        if image_key_values is None:
            itm = model._itm_on_pairs(image_embeds, negative_embeds, *texts)
        else:
            # The negatives come from any micro-batch, as the pre-pass's detached features: projected here, so that
            # the gradients stay those of the path without reuse (a training tower gets none through them).
            pairs = model._itm_pair_key_values(image_key_values, negative_embeds=negative_embeds)
            itm = model._itm_on_pairs(None, None, *texts, pair_key_values=pairs)
        output.loss_itm, output.itm_logits, output.itm_labels = itm
        weighted.append(config.itm_weight * output.loss_itm * batch_size / window.size)
    if config.itg_weight:
        output.loss_itg, output.itg_logits = model._itg(image_embeds, input_ids, attention_mask, image_key_values)
        share = itg_token_count(input_ids, attention_mask) / max(window.num_itg_tokens, 1)
        weighted.append(config.itg_weight * output.loss_itg * share)
    output.loss = torch.stack(weighted).sum()
    return output
