"""Does Flamingo's fusion learn? Gated cross-attention against image tokens at stage 2, and few-shot captioning.

Every arm is the tiny VLM of `vlbridge stage2` (2-layer CLIP-style ViT on 32-px images, Llama of width 64) with the
SAME random vision tower and the SAME language model: the LM's text warm-up (`--lm_text_steps` on caption pairs of
one image, `caption_context_texts`, as `vlbridge stage2 --lm_text_steps` runs it) is run once and copied into every
arm, over one tokenizer (the chat words and `<|endofchunk|>`). Then, with the tower and the LM frozen
(`freeze="stage2"`), each arm trains its bridge (and gated blocks) for the same steps, learning rate and seed, on the
same built-in training pairs (`--batch_size` pairs a step), and is scored on the same held-out images:

(a) single captions, `[BOS] <image> caption [EOS]` (`CaptionCollator`), held-out CIDEr-D / BLEU-4 as
    `vlbridge stage2` reports them (`evaluate_generation` in the training layout):
    - `qformer_tokens`: BLIP-2, the Q-Former's 8 tokens in the `<image>` placeholders;
    - `perceiver_tokens`: the Perceiver Resampler's 8 latents in the placeholders (the next arm's bridge, so the two
      separate the bridge from the fusion);
    - `perceiver_xattn`: Flamingo, one `<image>` marker per image and tanh-gated cross-attention blocks before both
      LM layers, reading the Perceiver's 8 latents.
(b) `flamingo_interleaved`: the Flamingo arm trained on the same pairs laid out as interleaved sequences of
    `--interleaved_pairs` chunks, `<image>caption<|endofchunk|>...` (`interleave_pairs`, `InterleavedCollator`),
    `--batch_size / --interleaved_pairs` sequences a step (as many pairs as (a)), then scored after 0, 2 and 4
    in-context examples drawn from the training pairs (`evaluate_few_shot`).

Pixels are normalised with mean `--image_mean` (1.0: the white background becomes 0, so only the shapes drive the
random ViT, as the stage1_builtin preset does); with CLIP's mean (0.48) no arm left the caption prior within 1,000
steps. `mlp_tokens` (LLaVA's projector, one token per patch) can be added with `--arms`.

    python benchmarks/flamingo_learning.py
    python benchmarks/flamingo_learning.py --max_steps 300 --arms perceiver_xattn  # a quick look at one arm
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import CLIPImageProcessor, Trainer, TrainingArguments, set_seed

from vlbridge.data import build_word_tokenizer, chat_vocabulary, interleave_pairs, make_synthetic_image_text
from vlbridge.evaluation import evaluate_few_shot, evaluate_generation
from vlbridge.processing import BridgeProcessor
from vlbridge.scripts.tiny import tiny_vlm
from vlbridge.trainers import (
    CaptionCollator,
    InterleavedCollator,
    caption_context_texts,
    train_language_model_on_text,
)


ARMS = {
    # name: (bridge, image fusion, training layout)
    "qformer_tokens": ("qformer", "tokens", "captions"),
    "perceiver_tokens": ("perceiver", "tokens", "captions"),
    "perceiver_xattn": ("perceiver", "gated_cross_attention", "captions"),
    "flamingo_interleaved": ("perceiver", "gated_cross_attention", "interleaved"),
    "mlp_tokens": ("mlp", "tokens", "captions"),  # not run by default
}
DEFAULT_ARMS = ["qformer_tokens", "perceiver_tokens", "perceiver_xattn", "flamingo_interleaved"]
# What every arm shares, copied from the warmed-up model.
SHARED = ("model.vision_tower.", "model.language_model.", "lm_head.")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/flamingo-learning", help="The cached warm-up, result.json.")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS, help="Which arms to run.")
    parser.add_argument("--num_train_images", type=int, default=1000, help="Training images (built-in captions).")
    parser.add_argument("--num_eval_images", type=int, default=100, help="Held-out images scored.")
    parser.add_argument("--captions_per_image", type=int, default=3, help="Built-in captions per image.")
    parser.add_argument("--max_objects", type=int, default=2, help="Most objects per scene.")
    parser.add_argument("--image_mean", type=float, default=1.0, help="Pixel mean (1.0: white -> 0; CLIP's: 0.48).")
    parser.add_argument("--lm_text_steps", type=int, default=1000, help="The LM's text warm-up (batch 32).")
    parser.add_argument("--max_steps", type=int, default=3000, help="Stage-2 steps of every arm.")
    parser.add_argument("--batch_size", type=int, default=16, help="(image, caption) pairs a step, every arm.")
    parser.add_argument("--interleaved_pairs", type=int, default=8, help="Chunks per interleaved sequence.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Stage-2 learning rate (cosine, warmup 10).")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 2, 4], help="In-context examples, arm (b).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the models, training order and examples.")
    parser.add_argument("--data_seed", type=int, default=0, help="Seed of the built-in data.")
    return parser


def build(arm: str, tokenizer, args):
    """The arm's tiny VLM (seeded) and its processor (32-px CLIP image processor with mean `--image_mean`)."""
    bridge, fusion, _ = ARMS[arm]
    set_seed(args.seed)
    model = tiny_vlm(bridge, tokenizer, fusion)
    size = model.config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=[args.image_mean] * 3
    )
    processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
    return model, processor


def stage2_args(out: Path, steps: int, batch_size: int, args) -> TrainingArguments:
    """The stage2_builtin preset's schedule (cosine, 10 warm-up steps)."""
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def warm_language_model(train, tokenizer, args, work: Path) -> dict:
    """The vision tower, and the LM and head after their warm-up, which every arm starts from (cached in `work`)."""
    data = f"{args.num_train_images}x{args.captions_per_image}-obj{args.max_objects}-data{args.data_seed}"
    path = work / f"warm-{data}-{args.lm_text_steps}-steps-seed{args.seed}.pt"
    if path.exists():
        return torch.load(path)
    model, _ = build("qformer_tokens", tokenizer, args)
    if args.lm_text_steps > 0:
        texts = caption_context_texts(train["caption"], train["image_id"], tokenizer.eos_token)
        # As `vlbridge stage2 --lm_text_steps` runs it: batch 32, lr 3e-3, linear decay.
        text_args = TrainingArguments(
            output_dir=str(work / "lm-text"),
            max_steps=args.lm_text_steps,
            learning_rate=3e-3,
            per_device_train_batch_size=32,
            logging_steps=max(1, args.lm_text_steps // 10),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
        )
        loss = train_language_model_on_text(model, tokenizer, texts, text_args)
        print(f"LM warm-up: {args.lm_text_steps} steps on caption pairs, loss {loss:.3f}", flush=True)
    state = {key: value for key, value in model.state_dict().items() if key.startswith(SHARED)}
    torch.save(state, path)
    return state


def gate_values(model) -> dict | None:
    """tanh of each gated block's attention and feed-forward gates: how much of the image the blocks let in."""
    blocks = getattr(model.model, "gated_cross_attention", None)
    if blocks is None:
        return None
    return {
        index: [round(math.tanh(block.attention_gate.item()), 3), round(math.tanh(block.mlp_gate.item()), 3)]
        for index, block in blocks.items()
    }


def run_arm(arm: str, data, shared: dict, tokenizer, args, work: Path) -> dict:
    model, processor = build(arm, tokenizer, args)
    missing = set(shared) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"{arm}: the shared weights do not fit the model ({sorted(missing)[:3]} ...).")
    model.load_state_dict(shared, strict=False)
    model.freeze("stage2")
    interleaved = ARMS[arm][2] == "interleaved"
    if interleaved:
        train = interleave_pairs(data["train"], args.interleaved_pairs, seed=args.data_seed)
        collator = InterleavedCollator.from_model(model, processor)
        batch_size = max(1, args.batch_size // args.interleaved_pairs)
    else:
        train, collator, batch_size = data["train"], CaptionCollator.from_model(model, processor), args.batch_size
    trainer = Trainer(
        model=model,
        args=stage2_args(work / arm, args.max_steps, batch_size, args),
        train_dataset=train,
        data_collator=collator,
    )
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    row = {"arm": arm, "train_s": seconds, "train_loss": result.training_loss, "final_loss": losses[-1]}
    if interleaved:
        scores, predictions = evaluate_few_shot(
            model,
            processor,
            data["test"],
            data["train"],
            shots=args.shots,
            seed=args.seed,
            max_new_tokens=20,
            progress=False,
            return_predictions=True,
        )
        row.update({f"cider_{shots}shot": score for shots, score in scores.items()})
        row["samples"] = {shots: captions[:3] for shots, captions in predictions.items()}
    else:
        scores = evaluate_generation(
            model, processor, data["test"], use_chat_template=False, max_new_tokens=20, progress=False
        )
        row.update({"cider": scores["cider"], "bleu4": scores["bleu4"]})
        row["samples"] = [sample["prediction"] for sample in scores["samples"][:3]]
    row["gates"] = gate_values(model)
    print(json.dumps({key: value for key, value in row.items() if key != "samples"}), flush=True)
    return row


def print_tables(rows: list[dict], args) -> None:
    single = [row for row in rows if "cider" in row]
    if single:
        print(f"\n(a) single captions: {args.max_steps} steps of {args.batch_size}, {args.num_eval_images} held-out")
        print("| arm | final loss | CIDEr | BLEU-4 | train (s) |\n| --- | ---: | ---: | ---: | ---: |")
        for row in single:
            cells = f"{row['final_loss']:.3f} | {row['cider']:.3f} | {row['bleu4']:.3f} | {row['train_s']:.0f}"
            print(f"| {row['arm']} | {cells} |")
    for row in rows:
        shots = [key for key in row if key.startswith("cider_")]
        if not shots:
            continue
        print(
            f"\n(b) {row['arm']}: {args.max_steps} steps of {max(1, args.batch_size // args.interleaved_pairs)} "
            f"sequences of {args.interleaved_pairs} chunks, final loss {row['final_loss']:.3f}, "
            f"train {row['train_s']:.0f} s"
        )
        print("| in-context examples | " + " | ".join(key[len("cider_") : -len("shot")] for key in shots) + " |")
        print("| --- |" + " ---: |" * len(shots))
        print("| held-out CIDEr | " + " | ".join(f"{row[key]:.3f}" for key in shots) + " |")


def main(args) -> dict:
    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = make_synthetic_image_text(
        {"train": args.num_train_images, "test": args.num_eval_images},
        image_size=32,
        seed=args.data_seed,
        captions_per_image=args.captions_per_image,
        max_objects=args.max_objects,
    )
    tokenizer = build_word_tokenizer(chat_vocabulary(), end_of_chunk_token=True)
    shared = warm_language_model(data["train"], tokenizer, args, work)
    rows = [run_arm(arm, data, shared, tokenizer, args, work) for arm in args.arms]
    result = {"args": vars(args), "rows": rows}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print_tables(rows, args)
    return result


if __name__ == "__main__":
    main(make_parser().parse_args())
