"""Tokens per image and training-step time of vlbridge's three bridges as any-res tiles grow (BLIP-3's question: what
does the Perceiver Resampler save over an MLP projector, and what does it cost next to a Q-Former?).

For each bridge (`vlbridge_qformer`, `vlbridge_perceiver`, `vlbridge_mlp`) a `BridgeVLMForConditionalGeneration` is
built around the same CLIP-style ViT (224 px, patch 14: 256 patches + CLS per tile) and the same small Llama, with the
same bridge width, depth and head count. The Q-Former and the Perceiver output as many tokens per tile (32 queries /
latents); the MLP passes every patch through (256 tokens per tile, CLS dropped as LLaVA does). Each model is fed
BridgeProcessor / CaptionCollator batches (images + captions, loss on the caption only) at three tile counts:

* 1 tile: a single-view model (`image_grid_pinpoints=None`), the image resized to 224 px;
* 3 tiles: an any-res model (BLIP-3's grids, `BridgeAnyResImageProcessor`), a 224 x 448 image -> base view + 1x2;
* 5 tiles: the same any-res model, a 448 x 448 image -> base view + 2x2.

"tokens / image" is the number of `<image>` placeholders the processor expanded one image into (the model checks the
bridge output against it); "sequence" is the language model's input length of the longest sample. The step is
forward + backward + AdamW (fused where torch has it, lr 1e-4) in two of `model.freeze` stages: `"stage2"` (BLIP-2
stage 2 / LLaVA pre-training: only the bridge and the projection train) and `"finetune"` (the language model trains
too; the vision tower stays frozen in both). Dropout is off in every part, so that the times compare the
architectures. The step times of one stage are taken in one process, round-robin over every (bridge, tiles) after
`--warmup` untimed rounds, the order reversed every round, and each cell is the median of `--repeats` rounds; the
ratio is against the Q-Former at 1 tile in the same stage. On a machine shared with other processes the wall clock
also counts the waits for a core, so the table gives this process's CPU seconds per step too.

    OMP_NUM_THREADS=1 python benchmarks/bench_bridges.py                 # 224 px tiles, 5 rounds (a few minutes)
    python benchmarks/bench_bridges.py --stages stage2 --repeats 9
    python benchmarks/bench_bridges.py --device cuda --batch-size 16
    python benchmarks/bench_bridges.py --quick                           # tiny sizes, 2 rounds: a smoke test (tests/)
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass


# Read by OpenMP when torch loads it: idle OpenMP threads spin by default, which slows everything down as soon as
# another process shares the cores (see bench_stage1.py); PASSIVE makes them sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessorPil  # noqa: E402

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration  # noqa: E402
from vlbridge.data import build_word_tokenizer  # noqa: E402
from vlbridge.processing import BridgeAnyResImageProcessor, BridgeProcessor, grid_pinpoints_from_grids  # noqa: E402
from vlbridge.trainers import CaptionCollator  # noqa: E402


# The timing helpers beside this script, found also when the script is loaded by its path (as the tests do).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import time_rounds  # noqa: E402


BRIDGES = ("qformer", "perceiver", "mlp")
TILES = (1, 3, 5)
STAGES = ("stage2", "finetune")
# Image (height, width) in base-size units per tile count: the best-fit BLIP-3 canvas then has no padding at all.
IMAGE_SHAPES = {1: (2, 2), 3: (1, 2), 5: (2, 2)}
WORDS = "a an the of and is in on left right above below next to red green blue yellow circle square star small large"


@dataclass
class Sizes:
    """Model and input sizes of one benchmark configuration."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    bridge_hidden: int
    bridge_layers: int
    bridge_heads: int
    num_queries: int  # Q-Former queries = Perceiver latents
    text_hidden: int
    text_layers: int
    text_heads: int
    vocab_size: int
    batch_size: int
    caption_words: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


FULL = Sizes(
    image_size=224,
    patch_size=14,
    vision_hidden=192,
    vision_layers=4,
    vision_heads=3,
    bridge_hidden=256,
    bridge_layers=4,
    bridge_heads=4,
    num_queries=32,
    text_hidden=256,
    text_layers=4,
    text_heads=4,
    vocab_size=32000,
    batch_size=2,
    caption_words=24,
)
QUICK = Sizes(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    bridge_hidden=32,
    bridge_layers=2,
    bridge_heads=2,
    num_queries=4,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    vocab_size=128,
    batch_size=2,
    caption_words=6,
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and 2 rounds: checks the code path only")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per stage (5; quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per stage")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of stage2,finetune")
    parser.add_argument("--bridges", default=",".join(BRIDGES), help="comma-separated subset of qformer,perceiver,mlp")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Models, processors and batches
# ---------------------------------------------------------------------------------------------------------------------


def bridge_config(bridge: str, sizes: Sizes) -> dict:
    """The three bridges at one width, depth and head count; the Q-Former and the Perceiver emit as many tokens."""
    width, layers, heads = sizes.bridge_hidden, sizes.bridge_layers, sizes.bridge_heads
    if bridge == "qformer":
        return {
            "model_type": "vlbridge_qformer",
            "hidden_size": width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": 4 * width,
            "num_query_tokens": sizes.num_queries,
            "cross_attention_frequency": 2,
            "use_text_input": False,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
    if bridge == "perceiver":
        return {
            "model_type": "vlbridge_perceiver",
            "hidden_size": width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "head_dim": width // heads,
            "ff_mult": 4,
            "num_latents": sizes.num_queries,
        }
    if bridge == "mlp":
        return {"model_type": "vlbridge_mlp", "hidden_size": width, "num_layers": 2, "drop_cls_token": True}
    raise ValueError(f"Unknown bridge {bridge!r}; choose among {BRIDGES}.")


def build_model(bridge: str, anyres: bool, sizes: Sizes, tokenizer) -> BridgeVLMForConditionalGeneration:
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": 4 * sizes.vision_hidden,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "image_size": sizes.image_size,
        "patch_size": sizes.patch_size,
    }
    text = {
        "model_type": "llama",
        "hidden_size": sizes.text_hidden,
        "intermediate_size": 4 * sizes.text_hidden,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "vocab_size": sizes.vocab_size,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = BridgeVLMConfig(
        vision_config=vision,
        bridge_config=bridge_config(bridge, sizes),
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=grid_pinpoints_from_grids(sizes.image_size) if anyres else None,
    )
    torch.manual_seed(0)
    return BridgeVLMForConditionalGeneration(config)


def build_processor(model: BridgeVLMForConditionalGeneration, tokenizer) -> BridgeProcessor:
    size = model.config.vision_config.image_size
    if model.config.image_grid_pinpoints is None:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        image_processor = BridgeAnyResImageProcessor(
            size={"height": size, "width": size}, image_grid_pinpoints=model.config.image_grid_pinpoints
        )
    return BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)


def make_batch(processor: BridgeProcessor, model, tiles: int, sizes: Sizes) -> tuple[dict, int]:
    """A captioning batch whose images each give `tiles` tiles, and the `<image>` tokens one image took."""
    height, width = (units * sizes.image_size for units in IMAGE_SHAPES[tiles])
    rng = np.random.default_rng(tiles)
    words = WORDS.split()
    examples = [
        {
            "image": Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
            "caption": " ".join(rng.choice(words, sizes.caption_words)),
        }
        for _ in range(sizes.batch_size)
    ]
    batch = CaptionCollator.from_model(model, processor)(examples)
    counted = processor.num_tiles(batch["image_sizes"].tolist()) if "image_sizes" in batch else [1] * len(examples)
    if counted != [tiles] * len(examples):
        raise RuntimeError(f"The processor cut {counted} tiles per image, expected {tiles}.")
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    if len(set(per_row)) != 1:
        raise RuntimeError(f"Images of the same shape took different token counts: {per_row}.")
    return dict(batch), per_row[0]


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def make_train_step(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    """One forward + backward + AdamW step on `batch`; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW is the HF Trainer's default (`adamw_torch_fused`) where torch supports it.
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def time_round_robin(steps: dict, warmup: int, repeats: int, device: str) -> dict[tuple, dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds of every step, over `repeats` rounds after `warmup` (`time_rounds`), and
    the losses of every round; a loss that is not finite stops the run."""

    def check(index: int, losses: dict) -> None:
        for key, loss in losses.items():
            if not np.isfinite(loss):
                raise RuntimeError(f"{key}: the loss is {loss} in round {index}.")

    calls = {key: (lambda index, step=step: step()) for key, step in steps.items()}
    wall, cpu, losses = time_rounds(calls, warmup, repeats, device, after_round=check)
    return {key: {"wall": wall[key], "cpu": cpu[key], "loss": losses[key]} for key in steps}


def run_stage(stage: str, bridges: list[str], sizes: Sizes, args: argparse.Namespace, repeats: int) -> dict:
    """Builds every (bridge, view) model frozen for `stage`, and times all (bridge, tiles) steps round-robin."""
    tokenizer = build_word_tokenizer(WORDS.split())
    steps, info = {}, {}
    for bridge in bridges:
        for anyres in (False, True):
            model = build_model(bridge, anyres, sizes, tokenizer).to(args.device)
            model.freeze(stage)
            model.train()
            processor = build_processor(model, tokenizer)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            bridge_params = sum(p.numel() for p in model.model.bridge.parameters())
            for tiles in TILES:
                if (tiles > 1) != anyres:
                    continue
                batch, tokens = make_batch(processor, model, tiles, sizes)
                batch = {key: value.to(args.device) for key, value in batch.items()}
                steps[bridge, tiles] = make_train_step(model, batch)
                info[bridge, tiles] = {
                    "tokens": tokens,
                    "sequence": batch["input_ids"].shape[1],
                    "trainable": trainable,
                    "bridge_params": bridge_params,
                }
    times = time_round_robin(steps, args.warmup, repeats, args.device)
    results = {}
    for key, measured in times.items():
        results[key] = {
            **info[key],
            "median_ms": 1e3 * statistics.median(measured["wall"]),
            "min_ms": 1e3 * min(measured["wall"]),
            "cpu_ms": 1e3 * statistics.median(measured["cpu"]),
            "losses": measured["loss"],
        }
    reference = results.get(("qformer", 1), {}).get("median_ms")
    for summary in results.values():
        summary["ratio"] = summary["median_ms"] / reference if reference else float("nan")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def print_table(results: dict[str, dict], bridges: list[str]) -> None:
    stages = list(results)
    header = "| bridge | tiles | tokens / image | sequence | bridge params (M) |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    for stage in stages:
        header += f" {stage} step (ms) | {stage} CPU (ms) | {stage} vs Q-Former @ 1 tile |"
        rule += " ---: | ---: | ---: |"
    print(header)
    print(rule)
    first = results[stages[0]]
    for bridge in bridges:
        for tiles in TILES:
            row = first[bridge, tiles]
            line = f"| {bridge} | {tiles} | {row['tokens']} | {row['sequence']} | {row['bridge_params'] / 1e6:.2f} |"
            for stage in stages:
                cell = results[stage][bridge, tiles]
                line += f" {cell['median_ms']:.0f} | {cell['cpu_ms']:.0f} | {cell['ratio']:.2f}x |"
            print(line)


def main(args: argparse.Namespace) -> dict[str, dict[tuple[str, int], dict]]:
    """Runs the benchmark and prints its table; returns `{stage: {(bridge, tiles): summary}}` for the tests."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.batch_size is not None:
        sizes = Sizes(**{**sizes.__dict__, "batch_size": args.batch_size})
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    stages = [stage.strip() for stage in args.stages.split(",")]
    bridges = [bridge.strip() for bridge in args.bridges.split(",")]
    if unknown := sorted(set(stages) - set(STAGES)) + sorted(set(bridges) - set(BRIDGES)):
        raise ValueError(f"Unknown stages / bridges {unknown}: choose among {STAGES} and {BRIDGES}.")
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"transformers={transformers.__version__} quick={args.quick} warmup={args.warmup} repeats={repeats} "
        f"load average={os.getloadavg()[0]:.2f}"
    )
    print(f"sizes: {sizes}; {sizes.patches} patches + CLS per tile\n")
    results = {}
    for stage in stages:
        results[stage] = run_stage(stage, bridges, sizes, args, repeats)
        gc.collect()  # the stage's models go before the next stage builds its own
    print(f"load average after the runs: {os.getloadavg()[0]:.2f}\n")
    print_table(results, bridges)
    return results


if __name__ == "__main__":
    # `freeze` logs what trains for every model; the table says it once.
    logging.getLogger("vlbridge").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    main(make_parser().parse_args())
