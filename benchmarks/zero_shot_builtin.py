"""Zero-shot image classification accuracy of a stage-1 checkpoint on the built-in held-out scenes, ITC and ITM.

Every colour x shape of the built-in data is a label ("a {colour} {shape}": 8 x 6 = 48 labels, chance 1/48;
`--template "a {size} {colour} {shape}"` asks each in both sizes, 96 labels, right on colour and shape), scored
by [`QFormerForZeroShotImageClassification`] exactly as `pipeline("zero-shot-image-classification")` scores them
(the folder's tokenizer and image processor, the labels tokenized as the pipeline does). An image is right when its
top label names its object's colour and shape; colour-only and shape-only accuracy are read off the same top label.

Which images: scenes of the built-in *test* stream (`make_synthetic_image_text`, the stream `vlbridge eval` and the
training script's held-out evaluation draw from). The training run avoided only the first `--num_eval_images` test
scenes, so the training split is rebuilt with the run's sizes and any later test scene that also occurs in it is
skipped: every image scored is unseen in training. `--scenes` picks the target:

- `largest` (default): every scene; the target is its largest object (the first listed of equal size). Scenes of two
  kinds have a second true label, so "any object" (the top label names some object of the scene) is reported too.
- `single`: scenes of exactly one object, one true label. Few exist unseen (one object, 8 x 6 x 2 sizes x 9 cells
  = 864 scenes, most drawn for training): about 100 in the first 3,000 test scenes.
- `single_kind`: scenes whose objects all share one colour and shape ("two small red triangles").

    python benchmarks/zero_shot_builtin.py --model outputs/demo/stage1
    python benchmarks/zero_shot_builtin.py --model outputs/demo/stage1 --num_images 200 --scenes single_kind
"""

import argparse
import json
import time

import torch
from transformers import AutoImageProcessor, AutoModelForZeroShotImageClassification, AutoTokenizer

import vlbridge  # noqa: F401  (registers the stage-1 model with AutoModelForZeroShotImageClassification)
from vlbridge.data import make_synthetic_image_text
from vlbridge.data.synthetic import COLOURS, SHAPES, SIZES


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A stage-1 folder (vlbridge stage1 / vlbridge demo).")
    parser.add_argument("--num_images", type=int, default=200, help="Held-out images scored.")
    parser.add_argument("--scenes", choices=["largest", "single", "single_kind"], default="largest", help="Targets.")
    parser.add_argument(
        "--template", default="a {colour} {shape}", help="The label prompt; with {size}, both sizes are labels."
    )
    parser.add_argument("--image_size", type=int, default=48, help="As in training (stage1_builtin: 48).")
    parser.add_argument("--max_objects", type=int, default=2, help="As in training (stage1_builtin: 2).")
    parser.add_argument("--num_train_images", type=int, default=5000, help="As in training, to skip its scenes.")
    parser.add_argument("--num_eval_images", type=int, default=200, help="As in training (its held-out split).")
    parser.add_argument("--data_seed", type=int, default=0, help="As in training.")
    parser.add_argument("--pool", type=int, default=3000, help="Test scenes drawn, at most, to find the images.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    return parser


def scene_label(objects: list[dict], scenes: str) -> tuple[str, str] | None:
    """The target `(colour, shape)` of a scene under `--scenes`, or None when the scene does not count."""
    kinds = {(obj["colour"], obj["shape"]) for obj in objects}
    if scenes == "largest":
        largest = max(objects, key=lambda obj: obj["size"] == "large")  # max keeps the first of equal size
        return largest["colour"], largest["shape"]
    if len(kinds) != 1 or (scenes == "single" and len(objects) != 1):
        return None
    return next(iter(kinds))


def held_out_scenes(args) -> tuple[list, list[tuple[str, str]], list[set], int]:
    """The first `num_images` eligible test scenes unseen in training: the images, their target `(colour, shape)`,
    every `(colour, shape)` of each scene, and how many test scenes were skipped as seen in training."""
    options = dict(image_size=args.image_size, seed=args.data_seed, max_objects=args.max_objects)
    train = make_synthetic_image_text(
        {"train": args.num_train_images, "test": args.num_eval_images}, captions_per_image=5, **options
    )["train"]
    # The "positions" caption is the data's scene key: unique per scene across splits.
    train_keys = {row["caption"] for row in train if row["caption_style"] == "positions"}
    test = make_synthetic_image_text({"test": args.pool}, captions_per_image=5, **options)["test"]
    images, targets, kinds, seen_in_train = [], [], [], 0
    for row in test:
        if row["caption_style"] != "positions":
            continue
        if row["caption"] in train_keys:
            seen_in_train += 1
            continue
        target = scene_label(row["objects"], args.scenes)
        if target is not None:
            images.append(row["image"])
            targets.append(target)
            kinds.append({(obj["colour"], obj["shape"]) for obj in row["objects"]})
        if len(images) == args.num_images:
            break
    if len(images) < args.num_images:
        raise SystemExit(f"Only {len(images)} eligible scenes in a pool of {args.pool}: raise --pool.")
    return images, targets, kinds, seen_in_train


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    images, targets, kinds, skipped = held_out_scenes(args)
    model = AutoModelForZeroShotImageClassification.from_pretrained(args.model).eval()
    tokenizer, image_processor = (
        AutoTokenizer.from_pretrained(args.model),
        AutoImageProcessor.from_pretrained(args.model),
    )
    # With "{size}" in the template each colour x shape is asked in both sizes; a label is right on colour and shape.
    sizes = SIZES if "{size}" in args.template else ("",)
    labels = [(colour, shape) for size in sizes for colour in COLOURS for shape in SHAPES]
    prompts = [
        args.template.format(size=size, colour=colour, shape=shape)
        for size in sizes
        for colour in COLOURS
        for shape in SHAPES
    ]
    text = tokenizer(prompts, padding=True, return_tensors="pt")  # as the pipeline tokenizes them
    text = {key: text[key] for key in ("input_ids", "attention_mask")}
    hits = {"itc": [], "itm": []}
    for first in range(0, len(images), 50):
        pixel_values = image_processor(images=images[first : first + 50], return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixel_values, use_itm=True, **text)
        for name, scores in (("itc", out.cosine), ("itm", out.logits_per_image)):
            hits[name].extend(labels[i] for i in scores.argmax(dim=-1).tolist())
    chance = 1 / (len(COLOURS) * len(SHAPES))
    figures = {"images": len(images), "labels": len(labels), "chance": chance, "scenes": args.scenes}
    for name, predicted in hits.items():
        pairs = list(zip(predicted, targets))
        figures[f"{name}_accuracy"] = sum(p == t for p, t in pairs) / len(pairs)
        figures[f"{name}_colour_accuracy"] = sum(p[0] == t[0] for p, t in pairs) / len(pairs)
        figures[f"{name}_shape_accuracy"] = sum(p[1] == t[1] for p, t in pairs) / len(pairs)
        figures[f"{name}_any_object_accuracy"] = sum(p in k for p, k in zip(predicted, kinds)) / len(pairs)
    figures["test_scenes_skipped_as_seen_in_training"] = skipped
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(f"zero-shot, {len(images)} held-out {args.scenes} scenes, {len(labels)} labels '{args.template}'")
    print("| scoring | accuracy | colour | shape | any object |\n|---|---:|---:|---:|---:|")
    print(f"| chance | {chance:.3f} | {1 / len(COLOURS):.3f} | {1 / len(SHAPES):.3f} | |")
    for name, title in (("itc", "ITC"), ("itm", "ITM re-ranked")):
        row = [figures[f"{name}_{key}accuracy"] for key in ("", "colour_", "shape_", "any_object_")]
        print(f"| {title} | " + " | ".join(f"{value:.3f}" for value in row) + " |")
    print(f"({skipped} test scenes skipped as seen in training; {figures['seconds']} s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return figures


if __name__ == "__main__":
    main(make_parser().parse_args())
