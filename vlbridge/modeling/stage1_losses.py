"""Cross-process gathers and the loss functions of BLIP-2's stage 1 (ITC, ITM hard negatives, ITG).

Pure functions of tensors, used by [`QFormerForImageTextPretraining`]. Every function works without an initialised
`torch.distributed` process group (world size 1), where the gathers are the identity. This module imports torch only,
so a distributed test can load it in a worker process without importing transformers.

Gathers require the same local batch size on every process (the HF Trainer's distributed sampler pads the last
batch for this); text lengths may differ ([`gather_padded`]).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F


def world_info() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AllGatherWithGrad(torch.autograd.Function):
    """
    All-gather along dim 0 that keeps the autograd graph (LAVIS' `GatherLayer`, open_clip's `gather_with_grad`).

    Forward concatenates every process's tensor, so each process sees the global batch. Backward all-reduces (sums)
    the gradient of the gathered tensor over processes and returns this process's slice: the local tensor thus gets
    the gradient of *every* process's loss, not only of its own. With DDP averaging the parameter gradients, the
    result equals the gradient of the mean loss computed on the whole global batch in a single process.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, world_size = world_info()
        ctx.local_size = tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)  # (world_size * B, ...)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.rank * ctx.local_size, ctx.local_size)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`(B, ...) -> (world_size * B, ...)`, differentiable ([`AllGatherWithGrad`]); the identity for one process."""
    if world_info()[1] == 1:
        return tensor
    return AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """`(B, ...) -> (world_size * B, ...)` without gradient (ids, masks, momentum features)."""
    world_size = world_info()[1]
    if world_size == 1:
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def gather_padded(tensor: torch.Tensor, pad_value: int) -> torch.Tensor:
    """
    Gathers `(B, T_rank)` tensors whose length differs between processes (texts padded to each local batch's
    longest), right-padding them with `pad_value` to the longest first. Returns `(world_size * B, max T)`.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor.detach()
    length = torch.tensor([tensor.shape[1]], device=tensor.device)
    lengths = [torch.empty_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    padding = int(max(int(n) for n in lengths)) - tensor.shape[1]
    return concat_all_gather(F.pad(tensor, (0, padding), value=pad_value))


def positive_mask(
    batch_size: int,
    num_columns: int,
    rank: int = 0,
    image_ids: torch.Tensor | None = None,
    column_image_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """
    Which (local row, global column) pairs are positives: `(batch_size, num_columns)` boolean.

    Without image ids the positive of local row `i` is column `rank * batch_size + i`. With them, every column showing
    the same image is positive (LAVIS' COCO-retrieval targets), so two captions of one image are never each other's
    negatives. Row `i` is image `i` and text `i`, so the mask serves both directions.
    """
    if image_ids is None:
        mask = torch.zeros(batch_size, num_columns, dtype=torch.bool, device=device)
        rows = torch.arange(batch_size, device=device)
        mask[rows, rank * batch_size + rows] = True
        return mask
    return image_ids.view(-1, 1) == column_image_ids.view(1, -1).to(image_ids.device)


def contrastive_targets(positives: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hard ITC targets spread evenly over each row's positives, then label-smoothed: `(B, N)` rows summing to 1."""
    targets = positives.float() / positives.sum(dim=1, keepdim=True).clamp(min=1)
    return (1.0 - label_smoothing) * targets + label_smoothing / positives.shape[1]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of `-sum(targets * log_softmax(logits))`; equals `F.cross_entropy` for one-hot targets."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def query_text_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """
    BLIP-2's image-text similarity: the best-matching query. `image_feats (B_i, Q, E)`, `text_feats (B_t, E)` ->
    `(B_i, B_t)`. Features are L2-normalised, so this is a cosine; divide by the temperature for ITC logits.
    """
    return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


def contrastive_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positives: torch.Tensor,
    label_smoothing: float = 0.0,
    soft_i2t: torch.Tensor | None = None,
    soft_t2i: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """
    Symmetric ITC loss: the mean of the image-to-text and text-to-image soft cross-entropies.

    Args:
        sim_i2t, sim_t2i (`torch.Tensor` of shape `(B, N)`):
            Similarities / temperature of each local image (text) against the `N` candidate texts (images).
        positives (`torch.Tensor` of shape `(B, N)`):
            Boolean mask of positive pairs ([`positive_mask`]).
        label_smoothing (`float`):
            Smoothing of the hard targets (0.1 in LAVIS).
        soft_i2t, soft_t2i (`torch.Tensor` of shape `(B, N)`, *optional*):
            Momentum-model logits; targets become `alpha * softmax(soft) + (1 - alpha) * hard` (ALBEF / BLIP).
        alpha (`float`):
            Weight of the momentum targets.
    """
    hard = contrastive_targets(positives.to(sim_i2t.device), label_smoothing)
    targets_i2t = targets_t2i = hard
    if soft_i2t is not None:
        targets_i2t = alpha * F.softmax(soft_i2t.float(), dim=1) + (1.0 - alpha) * hard
        targets_t2i = alpha * F.softmax(soft_t2i.float(), dim=1) + (1.0 - alpha) * hard
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


@torch.no_grad()
def sample_hard_negatives(
    similarity: torch.Tensor,
    positives: torch.Tensor,
    generator: torch.Generator | None = None,
    hardness: float = 1.0,
) -> torch.Tensor:
    """
    One hard negative per row for ITM, drawn from `softmax(hardness * similarity)` over the non-positive columns
    (LAVIS: `hardness=1`).

    Args:
        similarity (`torch.Tensor` of shape `(B, N)`):
            ITC logits (similarity / temperature) over the global batch.
        positives (`torch.Tensor` of shape `(B, N)`):
            Pairs that must never be drawn: the positive and every other caption of the same image.
        generator (`torch.Generator`, *optional*):
            Random generator of `torch.multinomial`.
        hardness (`float`, *optional*, defaults to 1.0):
            Scales the logits: 1 is LAVIS' hard-negative sampling, 0 draws negatives uniformly (easy ones).

    Returns:
        `torch.LongTensor` of shape `(B,)`: a column index per row.
    """
    if hardness < 0:
        raise ValueError(f"`hardness` must be non-negative, got {hardness}.")
    positives = positives.to(similarity.device)
    if not (~positives).any(dim=1).all():
        raise ValueError(
            "ITM needs a negative for every sample, but some sample's whole (global) batch shows its own image "
            "(batch size 1, or every caption of one image). Use larger or more varied batches, or set itm_weight=0."
        )
    logits = (hardness * similarity.float()).masked_fill(positives, float("-inf"))
    weights = F.softmax(logits, dim=1)  # zero on positives
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """
    Next-token cross-entropy of image-grounded text generation. `logits (B, T, V)` at text positions, `labels (B, T)`
    with -100 where no loss is taken; position `t` predicts label `t + 1`.
    """
    shifted_logits = logits[:, :-1].flatten(0, 1).float()  # (B * (T - 1), V)
    shifted_labels = labels[:, 1:].flatten().to(logits.device)  # (B * (T - 1),)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, label_smoothing=label_smoothing)


__all__ = [
    "AllGatherWithGrad",
    "all_gather_with_grad",
    "concat_all_gather",
    "contrastive_loss",
    "contrastive_targets",
    "gather_padded",
    "itg_loss",
    "positive_mask",
    "query_text_similarity",
    "sample_hard_negatives",
    "soft_cross_entropy",
    "world_info",
]
