"""Gated cross-attention (Flamingo) against prefix tokens (BLIP-2 / LLaVA / BLIP-3) as the images per sample grow: one
training step and `generate` tokens per second, same vision tower, same Perceiver Resampler, same language model.

With token fusion every image adds the Perceiver's `num_latents` placeholder tokens to the language model's sequence,
so self-attention, the MLPs and the KV cache all grow with the image count. With gated cross-attention each image is
one `<image>` marker; the text reads the images through blocks before every `--every`-th decoder layer, whose cost
grows with the image tokens only in the cross-attention (and whose keys / values are computed once per generation).
The blocks add parameters (a cross-attention and a feed-forward layer per block), so at one image the prefix can win.

Each sample holds k (image, caption) chunks, k in `--images` (1, 3, 5 by default): "<image> caption" per chunk. The
training step is forward + backward + AdamW on the `stage2` freezing stage (Perceiver + projection, or Perceiver +
gated blocks, train; tower and LM frozen) and, with `--stages finetune`, with the LM training too. `generate` is
greedy with the KV cache, `--new-tokens` forced (min = max new tokens), batch `--batch-size`, and the table gives
new tokens per second over the whole call (prefill included). All configurations are timed in one process,
round-robin, the order flipped every round, after `--warmup` rounds; a cell is the median of `--repeats` rounds, and
the ratio is cross-attention time over prefix time (below 1: cross-attention is faster).

    OMP_NUM_THREADS=2 python benchmarks/bench_fusion.py          # CPU, a few minutes on an idle 2-core machine
    python benchmarks/bench_fusion.py --device cuda --batch-size 16 --hidden 1024 --layers 16
    python benchmarks/bench_fusion.py --quick                    # tiny sizes, one round: a smoke test (tests/)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass


# Idle OpenMP threads spin by default, which slows everything down when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration  # noqa: E402


sys.path.insert(0, os.path.dirname(__file__))
from _timing import time_rounds  # noqa: E402


FUSIONS = ("tokens", "gated_cross_attention")
IMAGE_TOKEN_ID = 3
CAPTION_LENGTH = 12


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    heads: int
    latents: int
    every: int
    image_size: int
    patch: int
    vocab: int = 1000


def make_config(sizes: Sizes, fusion: str) -> BridgeVLMConfig:
    head_dim = sizes.hidden // sizes.heads
    return BridgeVLMConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": sizes.hidden // 2,
            "intermediate_size": sizes.hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": max(1, sizes.heads // 2),
            "image_size": sizes.image_size,
            "patch_size": sizes.patch,
        },
        bridge_config={
            "model_type": "vlbridge_perceiver",
            "hidden_size": sizes.hidden // 2,
            "num_latents": sizes.latents,
            "num_hidden_layers": 2,
            "num_attention_heads": max(1, sizes.heads // 2),
            "head_dim": head_dim,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": sizes.hidden,
            "intermediate_size": 4 * sizes.hidden,
            "num_hidden_layers": sizes.layers,
            "num_attention_heads": sizes.heads,
            "vocab_size": sizes.vocab,
            "max_position_embeddings": 4096,
        },
        image_token_id=IMAGE_TOKEN_ID,
        image_fusion=fusion,
        cross_attention_every_n_layers=sizes.every,
        cross_attention_num_heads=sizes.heads,
        cross_attention_head_dim=head_dim,
    )


def make_batch(config: BridgeVLMConfig, num_images: int, batch_size: int, device: str) -> dict:
    """`num_images` chunks of "<image> x num_image_tokens, caption" per sample; loss on the captions."""
    generator = torch.Generator().manual_seed(num_images)
    chunks = []
    for _ in range(num_images):
        markers = torch.full((batch_size, config.num_image_tokens), IMAGE_TOKEN_ID)
        caption = torch.randint(10, config.text_config.vocab_size, (batch_size, CAPTION_LENGTH), generator=generator)
        chunks += [markers, caption]
    input_ids = torch.cat([torch.full((batch_size, 1), 1), *chunks], dim=1)  # (B, T)
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size * num_images, 3, size, size, generator=generator)
    batch = {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}
    return {key: value.to(device) for key, value in batch.items()}


def build(sizes: Sizes, fusion: str, stage: str, device: str) -> tuple[BridgeVLMForConditionalGeneration, object]:
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(make_config(sizes, fusion)).to(device)
    model.freeze(stage)
    if model.model.gated_cross_attention is not None:  # open the gates: a trained model's blocks do work
        for block in model.model.gated_cross_attention.values():
            block.attention_gate.data.fill_(0.5)
            block.mlp_gate.data.fill_(0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def step_call(model, optimizer, batch):
    def call(_round: int) -> float:
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return call


def generate_call(model, batch, new_tokens: int):
    inputs = {key: batch[key] for key in ("input_ids", "pixel_values")}

    def call(_round: int) -> int:
        model.eval()
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        return out.shape[1] - inputs["input_ids"].shape[1]

    return call


def run(args: argparse.Namespace, sizes: Sizes) -> dict:
    """Times every (task, fusion, images) cell; returns {(task, fusion, images): (seconds, sequence length)}."""
    calls, lengths = {}, {}
    for stage in args.stages:
        for fusion in FUSIONS:
            model, optimizer = build(sizes, fusion, stage, args.device)
            for images in args.images:
                batch = make_batch(model.config, images, args.batch_size, args.device)
                calls[(f"step ({stage})", fusion, images)] = step_call(model, optimizer, batch)
                lengths[(f"step ({stage})", fusion, images)] = batch["input_ids"].shape[1]
                if stage == args.stages[0]:
                    calls[("generate", fusion, images)] = generate_call(model, batch, args.new_tokens)
                    lengths[("generate", fusion, images)] = batch["input_ids"].shape[1]
    wall, _, _ = time_rounds(calls, warmup=args.warmup, repeats=args.repeats, device=args.device)
    return {key: (statistics.median(times), lengths[key]) for key, times in wall.items()}


def table(results: dict, args: argparse.Namespace) -> str:
    tasks = list(dict.fromkeys(task for task, _, _ in results))
    rows = [
        "| task | images / sample | LM sequence, prefix | LM sequence, cross-attn | prefix | cross-attention | "
        "cross-attn / prefix time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in tasks:
        for images in args.images:
            (prefix, prefix_length), (cross, cross_length) = (results[(task, f, images)] for f in FUSIONS)
            if task == "generate":
                new = args.batch_size * args.new_tokens
                cells = f"{new / prefix:,.0f} tok/s | {new / cross:,.0f} tok/s"
            else:
                cells = f"{1000 * prefix:,.1f} ms | {1000 * cross:,.1f} ms"
            rows.append(f"| {task} | {images} | {prefix_length} | {cross_length} | {cells} | {cross / prefix:.2f} |")
    return "\n".join(rows)


QUICK = Sizes(hidden=32, layers=2, heads=2, latents=4, every=1, image_size=32, patch=16, vocab=100)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--stages", nargs="+", default=["stage2"], choices=["stage2", "finetune"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512, help="Language model width (the tower and bridge: half).")
    parser.add_argument("--layers", type=int, default=8, help="Language model depth.")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--latents", type=int, default=64, help="Perceiver latents = image tokens per image.")
    parser.add_argument("--every", type=int, default=4, help="cross_attention_every_n_layers.")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, one timed round (a smoke test).")
    return parser


def main(args: argparse.Namespace) -> dict:
    hf_logging.set_verbosity_error()
    if args.quick:
        sizes, args.repeats, args.warmup, args.new_tokens, args.batch_size = QUICK, 1, 0, 3, 2
    else:
        sizes = Sizes(args.hidden, args.layers, args.heads, args.latents, args.every, args.image_size, args.patch)
    results = run(args, sizes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {sizes}")
    print(table(results, args))
    return results


if __name__ == "__main__":
    main(make_parser().parse_args())
