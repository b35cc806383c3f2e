"""Any-res against single-tile on small objects (BLIP-3 / LLaVA-NeXT tiling): two tiny VLMs that differ only in image
processing are fine-tuned on the same questions about images whose objects are all small, then answer held-out ones.

* **single-tile**: the whole image resized to the vision tower's input size (`--tile_size`, 24 px in the preset), so
  the 11-14 px objects of a 96 px image (`make_synthetic_small_objects`) shrink to about 3 px;
* **any-res**: `BridgeAnyResImageProcessor`: that same resized base view, then the tiles of the best-fit canvas among
  `--grids` (3x3 tiles of 24 px in the preset: one tile per cell of the scene's 3x3 grid, objects at about 9 px),
  each through the vision tower and the bridge on its own; every tile adds the bridge's tokens to the language
  model's input (here 10x the tokens, and about 2.3x the step time).

Everything else is the same: the model (one config but for `image_grid_pinpoints`, which holds no weights, built from
the same seed, so with identical initial weights; the base view is byte-identical in both), the data and its order,
the steps and the optimiser. Training is the HF `Trainer` with `ChatCollator` (loss on the answers only) and
`model.freeze(--freeze)`; the held-out questions (the test split, one row per question, asked alone after the image)
are answered greedily and scored by `evaluate_generation(task="vqa")`, overall and per question type. Each `--seeds`
entry trains both variants again from that seed (initial weights and data order; the data stay `--data_seed_value`'s).

Why these settings (measured on 2 shared CPU cores): the tiny models start from a random, frozen vision tower and a
random language model, and first learn the answers' text prior; whether and when they learn to read the image is a
jump out of that plateau. Larger per-token signal (objects filling more of a patch) makes the jump come sooner, which
is what the tiles give. Every training chat asks all five question types (more answers per image step). The MLP
projector is the bridge: a Perceiver Resampler (8 latents per tile) had not left the plateau after 2400 steps even
with any-res, and the 32-px tiles (16 patches) needed more steps than fit in 5 minutes.

    # both variants, two seeds (under 5 minutes of CPU time per any-res model, about 2 per single-tile model)
    OMP_NUM_THREADS=1 python examples/anyres_small_objects.py --config examples/configs/anyres_small_objects.yaml

    # a short smoke run; any preset value can be overridden on the command line
    python examples/anyres_small_objects.py --config examples/configs/anyres_small_objects.yaml --max_steps 20 \
        --seeds 0 --num_train_images 64 --num_eval_images 16
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import SiglipImageProcessorPil, Trainer, TrainingArguments

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
from vlbridge.data import build_word_tokenizer, make_synthetic_small_objects
from vlbridge.data.synthetic_multi import SMALL_OBJECT_TURN_TYPES, multi_image_vocabulary
from vlbridge.evaluation import evaluate_generation
from vlbridge.processing import BridgeAnyResImageProcessor, BridgeProcessor, grid_pinpoints_from_grids
from vlbridge.scripts.utils import ScriptParser
from vlbridge.trainers import ChatCollator


VARIANTS = ("single-tile", "any-res")


@dataclass
class SmallObjectsDataArguments:
    """The built-in small-object chats (`vlbridge.data.make_synthetic_small_objects`)."""

    num_train_images: int = field(default=8000, metadata={"help": "Training images (one chat each)."})
    num_eval_images: int = field(default=200, metadata={"help": "Held-out images; each of their questions is scored."})
    image_size: int = field(default=96, metadata={"help": "Side of the images (96 to 192)."})
    max_objects: int = field(default=2, metadata={"help": "Most objects per image (1 to 9)."})
    min_turns: int = field(default=5, metadata={"help": "Fewest questions per training chat."})
    max_turns: int = field(default=5, metadata={"help": "Most questions per training chat."})
    turn_types: str = field(
        default="colour,shape,count,position,exists",
        metadata={"help": f"Comma-separated question types, among {', '.join(SMALL_OBJECT_TURN_TYPES)}."},
    )
    data_seed_value: int = field(default=0, metadata={"help": "Seed of the data (the same for every run)."})


@dataclass
class ComparisonArguments:
    """The two tiny VLMs and what the comparison runs."""

    variants: str = field(default="single-tile,any-res", metadata={"help": f"Comma-separated, among {VARIANTS}."})
    seeds: str = field(default="0,1", metadata={"help": "Comma-separated seeds; each trains every variant."})
    tile_size: int = field(default=24, metadata={"help": "The vision tower's input size: the base view and tiles."})
    patch_size: int = field(default=8, metadata={"help": "The vision tower's patch size."})
    grids: str = field(
        default="3x3",
        metadata={"help": "Any-res canvases, comma-separated ROWSxCOLUMNS tile grids (BLIP-3: 1x2,2x1,2x2,3x1,1x3)."},
    )
    bridge: str = field(default="mlp", metadata={"help": "Bridge: perceiver, qformer or mlp."})
    num_tokens: int = field(default=8, metadata={"help": "Perceiver latents / Q-Former queries per tile."})
    width: int = field(default=64, metadata={"help": "Width of the vision tower, the bridge and the language model."})
    freeze: str = field(default="finetune", metadata={"help": "What trains (model.freeze stage)."})
    max_new_tokens: int = field(default=4, metadata={"help": "Most tokens of a generated answer."})


def vocabulary() -> list[str]:
    """Every word of the data, plus the role headers the default chat template writes (`"user: "`, `"assistant: "`),
    which `multi_image_vocabulary()` lacks: without them both headers are `<unk> <unk>`, the same two tokens."""
    return multi_image_vocabulary() + ["user", "assistant", ":"]


def parse_grids(grids: str) -> list[tuple[int, int]]:
    """`"1x2,2x2"` -> `[(1, 2), (2, 2)]`."""
    try:
        return [tuple(int(n) for n in grid.lower().split("x")) for grid in grids.split(",") if grid.strip()]
    except ValueError as error:
        raise ValueError(f"--grids takes ROWSxCOLUMNS entries separated by commas, got {grids!r}.") from error


# ---------------------------------------------------------------------------------------------------------------------
# Model & processor
# ---------------------------------------------------------------------------------------------------------------------


def bridge_config(args: ComparisonArguments) -> dict:
    width = args.width
    if args.bridge == "perceiver":
        return {
            "model_type": "vlbridge_perceiver",
            "hidden_size": width,
            "num_latents": args.num_tokens,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "head_dim": width // 4,
        }
    if args.bridge == "qformer":
        return {
            "model_type": "vlbridge_qformer",
            "hidden_size": width,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 2 * width,
            "num_query_tokens": args.num_tokens,
            "use_text_input": False,
        }
    if args.bridge == "mlp":
        return {"model_type": "vlbridge_mlp", "hidden_size": width, "drop_cls_token": True}
    raise ValueError(f"Unknown bridge {args.bridge!r}: choose perceiver, qformer or mlp.")


def build_model(args: ComparisonArguments, tokenizer, anyres: bool, seed: int) -> BridgeVLMForConditionalGeneration:
    """A tiny CLIP-style ViT + bridge + Llama; `anyres` only sets `image_grid_pinpoints`, which holds no weights."""
    width = args.width
    config = BridgeVLMConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": args.tile_size,
            "patch_size": args.patch_size,
        },
        bridge_config=bridge_config(args),
        text_config={
            "model_type": "llama",
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=grid_pinpoints_from_grids(args.tile_size, parse_grids(args.grids)) if anyres else None,
    )
    torch.manual_seed(seed)  # the same seed gives both variants the same initial weights
    return BridgeVLMForConditionalGeneration(config)


def build_processor(model: BridgeVLMForConditionalGeneration, tokenizer) -> BridgeProcessor:
    """Single-tile: the image resized to the tile size. Any-res: that same base view, then the canvas's tiles (the
    any-res processor's base view is this resize, bicubic, normalised with the same mean and std)."""
    size = {"height": model.config.vision_config.image_size, "width": model.config.vision_config.image_size}
    if model.config.image_grid_pinpoints is None:
        image_processor = SiglipImageProcessorPil(size=size)
    else:
        image_processor = BridgeAnyResImageProcessor(size=size, image_grid_pinpoints=model.config.image_grid_pinpoints)
    return BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------------


def load_data(args: SmallObjectsDataArguments):
    """Training chats (`messages` + `images`), and the held-out questions as VQA rows (`image`, `question`,
    `answer`, `question_type`), one per question of each test chat."""
    from datasets import Dataset

    types = [kind.strip() for kind in args.turn_types.split(",") if kind.strip()]
    turns = (min(args.min_turns, len(types)), min(args.max_turns, len(types)))
    data = make_synthetic_small_objects(
        {"train": args.num_train_images, "test": args.num_eval_images},
        image_size=args.image_size,
        seed=args.data_seed_value,
        turns=turns,
        max_objects=args.max_objects,
        turn_types=types,
    )
    rows = {"image": [], "question": [], "answer": [], "question_type": []}
    for chat in data["test"]:
        users = [m for m in chat["messages"] if m["role"] == "user"]
        answers = [m for m in chat["messages"] if m["role"] == "assistant"]
        for kind, user, answer in zip(chat["turn_types"], users, answers):
            if kind == "caption":  # a caption has no single right answer to match exactly: captions only train
                continue
            rows["image"].append(chat["images"][0])
            rows["question"].append(user["content"][-1]["text"])
            rows["answer"].append(answer["content"][0]["text"])
            rows["question_type"].append(kind)
    return data["train"].select_columns(["messages", "images"]), Dataset.from_dict(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Training & evaluation
# ---------------------------------------------------------------------------------------------------------------------


def train_and_score(
    variant: str, seed: int, args: ComparisonArguments, training_args: TrainingArguments, tokenizer, train, questions
) -> dict:
    """Trains one variant from `seed` and scores it on the held-out questions."""
    model = build_model(args, tokenizer, anyres=variant == "any-res", seed=seed)
    model.freeze(args.freeze)
    processor = build_processor(model, tokenizer)
    tiles = processor.num_tiles([questions[0]["image"].size[::-1]])[0]
    # ChatCollator reads the raw `messages` / `images` columns, so the Trainer must keep them.
    run_args = dataclasses.replace(
        training_args,
        seed=seed,
        output_dir=f"{training_args.output_dir}/{variant}-seed{seed}",
        remove_unused_columns=False,
    )
    collator = ChatCollator.from_model(model, processor)
    trainer = Trainer(model=model, args=run_args, train_dataset=train, data_collator=collator)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = trainer.train()
    # Wall clock and this process's CPU seconds: on a shared machine the first also counts waits for a core.
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    scores = evaluate_generation(
        trainer.model,
        processor,
        questions,
        task="vqa",
        batch_size=32,
        max_new_tokens=args.max_new_tokens,
        progress=False,
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "variant": variant,
        "seed": seed,
        "tiles": tiles,
        "tokens_per_image": tiles * model.config.num_image_tokens,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "eval_seconds": time.perf_counter() - start,
        "final_loss": losses[-1] if losses else result.training_loss,
        "accuracy": scores["vqa_accuracy"],
        "per_type": scores.get("vqa_accuracy_per_type", {}),
        "samples": scores["samples"],
    }


def print_results(results: list[dict], num_questions: int) -> None:
    """One row per run, then the mean over seeds of each variant."""
    types = sorted({kind for result in results for kind in result["per_type"]})
    print(f"\nheld-out questions: {num_questions}")
    print(
        "| variant | seed | tiles | tokens / image | train (s) | train CPU (s) | final loss | accuracy | "
        + " | ".join(types)
        + " |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(types))
    for r in results:
        cells = [
            r["variant"],
            r["seed"],
            r["tiles"],
            r["tokens_per_image"],
            f"{r['train_seconds']:.0f}",
            f"{r['train_cpu_seconds']:.0f}",
            f"{r['final_loss']:.3f}",
            f"{r['accuracy']:.3f}",
        ]
        cells += [f"{r['per_type'].get(kind, math.nan):.3f}" for kind in types]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        mean = statistics.mean(r["accuracy"] for r in runs)
        per_type = ", ".join(
            f"{kind} {statistics.mean(r['per_type'].get(kind, math.nan) for r in runs):.3f}" for kind in types
        )
        print(f"{variant}: mean accuracy over {len(runs)} seed(s) {mean:.3f} ({per_type})")


def make_parser() -> ScriptParser:
    return ScriptParser((SmallObjectsDataArguments, ComparisonArguments, TrainingArguments))


def main(argv: list[str] | None = None) -> list[dict]:
    """Trains and scores every (seed, variant); prints the table and returns one result dict per run."""
    data_args, args, training_args = make_parser().parse_args_and_config(sys.argv[1:] if argv is None else argv)
    variants = [variant.strip() for variant in args.variants.split(",") if variant.strip()]
    if unknown := [variant for variant in variants if variant not in VARIANTS]:
        raise ValueError(f"Unknown --variants {unknown}: choose among {VARIANTS}.")
    tokenizer = build_word_tokenizer(vocabulary())
    train, questions = load_data(data_args)
    results = []
    for seed in [int(seed) for seed in args.seeds.split(",") if seed.strip()]:
        for variant in variants:
            results.append(train_and_score(variant, seed, args, training_args, tokenizer, train, questions))
            r = results[-1]
            print(
                f"{variant} seed {seed}: accuracy {r['accuracy']:.3f} after {r['train_seconds']:.0f} s "
                f"({r['tiles']} tiles, {r['tokens_per_image']} image tokens)",
                flush=True,
            )
    print_results(results, len(questions))
    return results


if __name__ == "__main__":
    main()
