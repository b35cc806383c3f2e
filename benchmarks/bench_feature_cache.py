"""A BLIP-2 stage-1 epoch with and without the frozen vision-feature cache (`vlbridge cache-features`,
docs/feature_cache.md): how much of an epoch the frozen tower costs, what writing the cache costs, and how large it
is on disk.

BLIP-2's stage 1 trains a Q-Former of ~107M parameters (the paper's Table 2; its section 3.1 counts 188M, queries and
embeddings included) beside a frozen ViT-g of ~1.0B: about 10:1 in parameters, and per image the tower's forward
(2 x 1.0B x 257 tokens, ~514 GFLOP) costs ~37 times one Q-Former pass (2 x 107M x (32 queries + 32 text tokens),
~14 GFLOP). The default sizes keep these ratios, scaled down: a ViT-B/16 (width 768, 12 layers, 224 px, 197 tokens,
86.4M parameters, ~34 GFLOP per image) and a Q-Former of width 256, 6 layers (cross-attention every 2, BLIP-2's
separate query feed-forward), 32 queries (9.5M parameters, ~1.2 GFLOP per pass): 9.1:1 in parameters, 28:1 in
forward FLOPs per image and pass. The script prints the counted parameters and analytic FLOPs of what it built.

An epoch is one pass over `--num_images` built-in images with `--captions_per_image` captions each (one training row
per caption, shuffled, as `vlbridge stage1` feeds them), in batches of `--batch_size`: the collator, ITC + ITM + ITG
forward, backward and an AdamW step of everything but the tower. Three epochs are timed:

* pixels: `ImageTextCollator` without a cache (the image processor and the tower run on every row of every epoch);
* cache, epoch 1: `write_feature_cache` over the images (each distinct image through the tower once), then the epoch
  from the cache: the first epoch of a cached run;
* cache, epoch 2+: the epoch from a cache already written (`vision_features` in the batches): every later epoch.

They run in one process, round-robin after `--warmup` untimed rounds (the order reversed every round), each the
median of `--repeats` rounds; ratios are against the pixels epoch. The disk size per image is measured on caches
written in bf16 and fp32. A check before timing compares one batch's loss from pixels and from an fp32 cache: equal
bit for bit on CPU (asserted); on a GPU the difference is printed (the tower's kernels may round differently at the
cache's batch size than at the training batch's).

    python benchmarks/bench_feature_cache.py --device cuda                  # ViT-B/16 + Q-Former 256, 256 images
    OMP_NUM_THREADS=1 python benchmarks/bench_feature_cache.py --num_images 64 --repeats 2
    python benchmarks/bench_feature_cache.py --quick                        # tiny sizes: a smoke test (tests/)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


# Idle OpenMP threads spin by default and slow everything down when another process shares the cores; PASSIVE sleeps.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402

from vlbridge.configuration import QFormerPretrainingConfig  # noqa: E402
from vlbridge.data import build_word_tokenizer, caption_vocabulary, make_synthetic_image_text  # noqa: E402
from vlbridge.data.feature_cache import VisionFeatureCache, write_feature_cache  # noqa: E402
from vlbridge.modeling import QFormerForImageTextPretraining  # noqa: E402
from vlbridge.trainers import ImageTextCollator  # noqa: E402


# The timing helpers beside this script, found also when the script is loaded by its path (as the tests do).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import time_rounds  # noqa: E402


RUNS = ("pixels", "cache, epoch 1", "cache, epoch 2+")
TEXT_LENGTH = 32  # caption tokens per pass, BOS and EOS included (LAVIS' max_txt_len)


@dataclass
class Sizes:
    """Model and data sizes of one benchmark configuration."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    num_queries: int
    num_images: int
    captions_per_image: int
    batch_size: int

    @property
    def vision_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


FULL = Sizes(224, 16, 768, 12, 12, 256, 6, 8, 32, num_images=256, captions_per_image=5, batch_size=32)
QUICK = Sizes(32, 8, 48, 2, 4, 16, 2, 4, 4, num_images=8, captions_per_image=2, batch_size=4)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=None, help="images per epoch (default: 256; quick: 8)")
    parser.add_argument("--captions_per_image", type=int, default=None, help="rows per image (default 5; quick: 2)")
    parser.add_argument("--batch_size", type=int, default=None, help="rows per step (default 32; quick: 4)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the timed cache's dtype")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each run: one epoch per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); default: torch's")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: a smoke test")
    return parser


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    overrides = {
        name: getattr(args, name)
        for name in ("num_images", "captions_per_image", "batch_size")
        if getattr(args, name) is not None
    }
    return Sizes(**{**base.__dict__, **overrides})


def build_model(sizes: Sizes, tokenizer) -> QFormerForImageTextPretraining:
    """A stage-1 model with a frozen ViT, dropout off everywhere (the runs compare data paths, not noise)."""
    torch.manual_seed(0)
    config = QFormerPretrainingConfig(
        vision_config={
            "model_type": "vit",
            "hidden_size": sizes.vision_hidden,
            "num_hidden_layers": sizes.vision_layers,
            "num_attention_heads": sizes.vision_heads,
            "intermediate_size": 4 * sizes.vision_hidden,
            "image_size": sizes.image_size,
            "patch_size": sizes.patch_size,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        qformer_config={
            "model_type": "vlbridge_qformer",
            "hidden_size": sizes.qformer_hidden,
            "num_hidden_layers": sizes.qformer_layers,
            "num_attention_heads": sizes.qformer_heads,
            "intermediate_size": 4 * sizes.qformer_hidden,
            "num_query_tokens": sizes.num_queries,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        embed_dim=min(256, sizes.qformer_hidden),
        freeze_vision_tower=True,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return QFormerForImageTextPretraining(config)


def cost_ratios(model: QFormerForImageTextPretraining, sizes: Sizes) -> dict[str, float]:
    """Parameters of the tower and of the Q-Former, and the analytic forward FLOPs (2 x parameters x tokens) of the
    tower on one image and of one Q-Former pass on its queries and a caption."""
    tower = sum(p.numel() for p in model.vision_tower.parameters())
    qformer = sum(p.numel() for p in model.qformer.parameters())
    tower_flops = 2 * tower * sizes.vision_tokens
    qformer_flops = 2 * qformer * (sizes.num_queries + TEXT_LENGTH)
    return {
        "tower_params": tower,
        "qformer_params": qformer,
        "param_ratio": tower / qformer,
        "tower_gflops": tower_flops / 1e9,
        "qformer_gflops": qformer_flops / 1e9,
        "flop_ratio": tower_flops / qformer_flops,
    }


def run_epoch(model, collator, rows, sizes: Sizes, device: str, seed: int) -> float:
    """One shuffled epoch of stage-1 steps (last partial batch dropped); the mean loss."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    losses = []
    for step, start in enumerate(range(0, len(order) - sizes.batch_size + 1, sizes.batch_size)):
        batch = collator([rows[i] for i in order[start : start + sizes.batch_size]])
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = model(**batch, sampling_seed=seed * 100_003 + step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return statistics.fmean(losses)


def check_fp32_cache(model, image_processor, tokenizer, rows, sizes: Sizes, folder: Path, device: str) -> float:
    """One batch through pixels and through an fp32 cache: the absolute loss difference. 0 on CPU (raises
    otherwise); on a GPU the tower's kernels may round differently at another batch size than the cache's."""
    write_feature_cache(model, image_processor, rows, folder, dtype="fp32", progress=False)
    batch_rows = [rows[i] for i in range(sizes.batch_size)]
    losses = []
    for cache in (None, VisionFeatureCache(folder)):
        batch = ImageTextCollator(image_processor, tokenizer, vision_features=cache)(batch_rows)
        with torch.no_grad():
            losses.append(model(**{k: v.to(device) for k, v in batch.items()}, sampling_seed=0).loss)
    if device == "cpu" and not torch.equal(*losses):
        raise AssertionError(f"An fp32 cache gave another loss than the pixels: {losses[0]} vs {losses[1]}.")
    return float((losses[0] - losses[1]).abs())


def disk_bytes_per_image(folder: Path, num_images: int) -> float:
    return sum(path.stat().st_size for path in folder.glob("features-*.safetensors")) / num_images


def time_epochs(model, image_processor, tokenizer, rows, sizes, args, work: Path) -> dict[str, list[float]]:
    """Seconds per epoch of each run, round by round."""
    written = work / "epoch2"
    write_feature_cache(model, image_processor, rows, written, dtype=args.dtype, progress=False)
    plain = ImageTextCollator(image_processor, tokenizer)
    cached = ImageTextCollator(image_processor, tokenizer, vision_features=VisionFeatureCache(written))

    def first_epoch(index: int) -> float:
        folder = work / f"epoch1-{index}"
        shutil.rmtree(work / f"epoch1-{index - 1}", ignore_errors=True)  # keep one fresh cache on disk at a time
        write_feature_cache(model, image_processor, rows, folder, dtype=args.dtype, progress=False)
        collator = ImageTextCollator(image_processor, tokenizer, vision_features=VisionFeatureCache(folder))
        return run_epoch(model, collator, rows, sizes, args.device, index)

    calls = {
        "pixels": lambda index: run_epoch(model, plain, rows, sizes, args.device, index),
        "cache, epoch 1": first_epoch,
        "cache, epoch 2+": lambda index: run_epoch(model, cached, rows, sizes, args.device, index),
    }
    wall, _, _ = time_rounds(calls, args.warmup, args.repeats, args.device)
    return wall


def print_tables(sizes: Sizes, costs: dict, seconds: dict[str, float], disk: dict[str, float]) -> None:
    print(
        f"tower {costs['tower_params'] / 1e6:.1f}M parameters, {costs['tower_gflops']:.2f} GFLOP / image; Q-Former "
        f"{costs['qformer_params'] / 1e6:.2f}M, {costs['qformer_gflops']:.3f} GFLOP / pass: "
        f"{costs['param_ratio']:.1f}:1 in parameters, {costs['flop_ratio']:.1f}:1 in forward FLOPs"
    )
    rows = sizes.num_images * sizes.captions_per_image
    print(f"\n{sizes.num_images} images x {sizes.captions_per_image} captions = {rows} rows, ", end="")
    print(f"batch {sizes.batch_size}\n")
    print("| run | seconds / epoch | vs. pixels |\n|---|---|---|")
    for run in RUNS:
        print(f"| {run} | {seconds[run]:.3f} | {seconds[run] / seconds['pixels']:.2f} |")
    print("\n| cache dtype | bytes / image |\n|---|---|")
    for dtype, size in disk.items():
        print(f"| {dtype} | {size:,.0f} |")


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    sizes = sizes_of(args)
    data = make_synthetic_image_text(
        {"train": sizes.num_images}, image_size=sizes.image_size, captions_per_image=sizes.captions_per_image
    )
    rows = data["train"]  # a datasets.Dataset: images are decoded on access, as in training
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]"])
    side = sizes.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    model = build_model(sizes, tokenizer).to(args.device).train()
    costs = cost_ratios(model, sizes)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        difference = check_fp32_cache(model, image_processor, tokenizer, rows, sizes, work / "fp32", args.device)
        write_feature_cache(model, image_processor, rows, work / "bf16", dtype="bf16", progress=False)
        disk = {dtype: disk_bytes_per_image(work / dtype, sizes.num_images) for dtype in ("bf16", "fp32")}
        wall = time_epochs(model, image_processor, tokenizer, rows, sizes, args, work)
    seconds = {run: statistics.median(times) for run, times in wall.items()}
    print(f"fp32 cache vs pixels, one batch: loss difference {difference:.3g}")
    print_tables(sizes, costs, seconds, disk)
    return {"costs": costs, "seconds": seconds, "disk_bytes_per_image": disk, "fp32_loss_difference": difference}


if __name__ == "__main__":
    main(make_parser().parse_args())
