"""
BLIP-2 stage-2 generative pretraining: the bridge learns to caption images for a frozen language model. The script
behind `vlbridge stage2` and `examples/stage2.py`.

    # built-in captions, a tiny VLM built in code (a few minutes on 2 CPU cores)
    vlbridge stage2 --config stage2_builtin

    # BLIP-2's hand-off: the VLM is built around the vision tower and Q-Former of a stage-1 run, then --lm_text_steps
    # teaches the tiny LM the captions' language first
    vlbridge stage2 --config stage2_builtin --from_stage1 outputs/stage1-builtin \
        --lm_text_steps 300 --image_size 48 --max_objects 2

    # from the frozen vision tower's features, cached once (docs/feature_cache.md); the model must be the one cached
    vlbridge stage2 --config stage2_builtin --model_name_or_path outputs/my-vlm --vision_features outputs/features

    # Flamingo: Perceiver + gated cross-attention on interleaved sequences of 8 (image, caption) chunks,
    # "<image>caption<|endofchunk|>...", then held-out captions after 0, 2 and 4 in-context examples
    vlbridge stage2 --config stage2_flamingo_builtin
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoImageProcessor, Trainer, TrainingArguments

from ..data import build_word_tokenizer, chat_vocabulary, interleave_pairs, make_synthetic_image_text
from ..data.user import load_user_dataset
from ..evaluation import evaluate_few_shot, evaluate_generation
from ..hub.checkpoint import describe_train_data
from ..modeling import load_qformer_into_vlm, vlm_from_stage1
from ..modeling.saving import write_model_card
from ..processing import BridgeProcessor
from ..trainers import CaptionCollator, InterleavedCollator, caption_context_texts, train_language_model_on_text
from ..trainers.distributed import close_process_group
from .tiny import tiny_text_config
from .utils import (
    OUTSIDE_PATHS_HELP,
    ScriptParser,
    ScriptResult,
    VisionFeaturesArguments,
    VLMModelArguments,
    dataset_help,
    finish_training,
    load_model_and_processor,
    load_vision_features,
)


@dataclass
class CaptionDataArguments:
    """The captions: built-in (`vlbridge.data.make_synthetic_image_text`) or `--dataset`."""

    dataset: str = field(default="builtin", metadata={"help": dataset_help("captions")})
    allow_outside_paths: bool = field(default=False, metadata={"help": OUTSIDE_PATHS_HELP})
    num_train_images: int = field(default=1000, metadata={"help": "Built-in captions: training images."})
    num_eval_images: int = field(
        default=0,
        metadata={"help": "Held-out images captioned after training (from --dataset, kept out of training); 0 skips."},
    )
    image_size: int = field(default=32, metadata={"help": "Side of the built-in images."})
    captions_per_image: int = field(default=3, metadata={"help": "Built-in captions: captions per image."})
    max_objects: int = field(default=2, metadata={"help": "Built-in captions: most objects per scene."})
    data_seed_value: int = field(default=0, metadata={"help": "Seed of the built-in data."})


@dataclass
class Stage2Arguments:
    """Where stage 2 starts from, the caption layout, and the language model's text warm-up."""

    stage1_checkpoint: str | None = field(
        default=None, metadata={"help": "A saved QFormerForImageTextPretraining whose Q-Former starts the bridge."}
    )
    from_stage1: str | None = field(
        default=None,
        metadata={
            "help": "A stage-1 output directory (examples/stage1.py): build the VLM around its vision "
            "tower, Q-Former and image processor, with the tiny language model."
        },
    )
    prompt: str = field(default="", metadata={"help": "Text between the image and the caption, without loss."})
    max_length: int | None = field(default=None, metadata={"help": "Longest sequence in tokens; None never cuts."})
    eval_max_new_tokens: int = field(default=20, metadata={"help": "Most tokens generated per held-out caption."})
    lm_text_steps: int = field(
        default=0, metadata={"help": "First train the language model alone on the captions' text for this many steps."}
    )
    lm_text_learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate of that text-only run."})
    lm_text_context: bool = field(
        default=True,
        metadata={
            "help": "Train that run on pairs of captions of one image ('caption </s> other caption'), so that the "
            "LM learns to restate its context, which is how image tokens steer it once it is frozen."
        },
    )
    image_mean: float | None = field(
        default=None,
        metadata={
            "help": "Pixel normalisation mean (every channel) of the tiny VLM built in code; 1.0 maps the built-in "
            "white background to 0, so that only the shapes drive its random, frozen ViT (as stage1_builtin). "
            "Unset keeps CLIP's mean. Not with a saved model, whose image processor decides."
        },
    )
    interleaved_pairs: int = field(
        default=0,
        metadata={
            "help": "Train on interleaved sequences of this many (image, caption) chunks, "
            "'<image>caption<|endofchunk|><image>caption<|endofchunk|>...' (OpenFlamingo; vlbridge.data."
            "interleave_pairs), instead of single captions, and evaluate held-out captions after --eval_shots "
            "in-context examples; the tiny VLM's tokenizer gets <|endofchunk|>. 0 trains on single captions."
        },
    )
    eval_shots: list[int] = field(
        default_factory=lambda: [0, 2, 4],
        metadata={
            "help": "With --interleaved_pairs: in-context (image, caption) examples before each held-out image."
        },
    )


def vlm_around_stage1(directory: str, end_of_chunk_token: bool = False):
    """The stage-1 vision tower and Q-Former with a fresh tiny LM, the stage-1 image processor and a tokenizer over
    the chat words, with `<|endofchunk|>` if asked (BLIP-2's stage 2 reads the features its Q-Former was trained
    on)."""
    tokenizer = build_word_tokenizer(chat_vocabulary(), end_of_chunk_token=end_of_chunk_token)
    model = vlm_from_stage1(directory, tiny_text_config(tokenizer), image_token_id=tokenizer.image_token_id)
    image_processor = AutoImageProcessor.from_pretrained(directory)
    return model, BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)


def load_captions(data_args: CaptionDataArguments) -> dict:
    """`{"train": ..., "test": ...}` caption pairs (`image`, `caption`, `image_id`): the built-in ones, or
    `--dataset` with `num_eval_images` of its images held out (no test split when it is 0)."""
    if data_args.dataset == "builtin":
        splits = {"train": data_args.num_train_images}
        if data_args.num_eval_images > 0:
            splits["test"] = data_args.num_eval_images
        return make_synthetic_image_text(
            splits,
            image_size=data_args.image_size,
            seed=data_args.data_seed_value,
            captions_per_image=data_args.captions_per_image,
            max_objects=data_args.max_objects,
        )
    command = "vlbridge stage2"
    pairs = load_user_dataset(data_args.dataset, "captions", command, data_args.allow_outside_paths)
    if "image_id" not in pairs.column_names:
        pairs = pairs.add_column("image_id", list(range(len(pairs))))
    if data_args.num_eval_images <= 0:
        return {"train": pairs}
    images = sorted(set(pairs["image_id"]))
    if data_args.num_eval_images >= len(images):
        raise ValueError(
            f"--num_eval_images {data_args.num_eval_images} leaves no training image: --dataset has "
            f"{len(images)} images."
        )
    held_out = set(images[-data_args.num_eval_images :])
    return {
        "train": pairs.filter(lambda row: row["image_id"] not in held_out),
        "test": pairs.filter(lambda row: row["image_id"] in held_out),
    }


@dataclass
class Stage2ScriptArguments(VisionFeaturesArguments, Stage2Arguments, CaptionDataArguments):
    """The script's arguments: the captions ([`CaptionDataArguments`]), where stage 2 starts from
    ([`Stage2Arguments`]) and optionally a cache of the frozen vision tower's features
    ([`~vlbridge.scripts.utils.VisionFeaturesArguments`])."""


def make_parser() -> ScriptParser:
    """The script's command line: [`Stage2ScriptArguments`], `TrainingArguments` and `VLMModelArguments`;
    `--freeze` defaults to `stage2` (BLIP-2 stage 2 trains only the bridge and the projection).

    Example:

    ```python
    >>> from vlbridge.scripts.stage2 import make_parser
    >>> argv = ["--lm_text_steps", "300", "--output_dir", "outputs/stage2"]
    >>> script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    >>> model_args.freeze, script_args.lm_text_steps, script_args.captions_per_image
    ('stage2', 300, 3)
    ```
    """
    parser = ScriptParser((Stage2ScriptArguments, TrainingArguments, VLMModelArguments))
    # BLIP-2 stage 2 trains only the bridge and the projection, also without a preset.
    parser.set_defaults(freeze="stage2")
    return parser


def load_model(stage2_args: Stage2Arguments, model_args: VLMModelArguments):
    """The VLM and its processor: around a stage-1 run, from a checkpoint, or tiny and built in code (with
    `<|endofchunk|>` in its tokenizer for `--interleaved_pairs`)."""
    # chat_vocabulary covers the captions and the words of the chat template evaluate_generation renders.
    interleaved = stage2_args.interleaved_pairs > 0
    if stage2_args.image_mean is not None and (stage2_args.from_stage1 or model_args.model_name_or_path):
        raise ValueError(
            "--image_mean sets the image processor of the tiny VLM built in code; a saved model or stage-1 run brings "
            "its own (its vision tower was trained on those pixels). Drop --image_mean."
        )
    if stage2_args.from_stage1 is not None:
        model, processor = vlm_around_stage1(stage2_args.from_stage1, end_of_chunk_token=interleaved)
        model.freeze(model_args.freeze)
    else:
        if interleaved and model_args.instruct_from_stage1:
            raise ValueError(
                "--interleaved_pairs does not take --instruct_from_stage1: the Q-Former would need one instruction "
                "per image of a sequence."
            )
        model, processor = load_model_and_processor(model_args, chat_vocabulary(), end_of_chunk_token=interleaved)
    if stage2_args.image_mean is not None:
        processor.image_processor.image_mean = [stage2_args.image_mean] * 3
    if stage2_args.stage1_checkpoint is not None:
        load_qformer_into_vlm(model, stage2_args.stage1_checkpoint)
    return model, processor


def warm_up_language_model(model, processor, train, stage2_args: Stage2Arguments, training_args) -> None:
    """`--lm_text_steps` steps of the language model alone on the training captions (as caption pairs by default)."""
    # BLIP-2 starts from a pretrained LM; a tiny LM built in code must first learn the captions' language.
    text_args = TrainingArguments(
        output_dir=f"{training_args.output_dir}/lm-text",
        max_steps=stage2_args.lm_text_steps,
        learning_rate=stage2_args.lm_text_learning_rate,
        per_device_train_batch_size=32,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=training_args.use_cpu,
        seed=training_args.seed,
        disable_tqdm=training_args.disable_tqdm,
    )
    texts = train["caption"]
    if stage2_args.lm_text_context:
        texts = caption_context_texts(texts, train["image_id"], processor.tokenizer.eos_token)
    loss = train_language_model_on_text(model, processor.tokenizer, texts, text_args)
    print(f"language model on the captions' text: loss {loss:.3f}")


def evaluate_captions(model, processor, data, stage2_args: Stage2Arguments, training_args, metrics: dict) -> None:
    """Held-out CIDEr and BLEU-4 into `metrics`, printed with a few samples and written into the model card."""
    # The layout the collator trained on ("<image> prompt caption"), not a chat turn the model never saw.
    scores = evaluate_generation(
        model,
        processor,
        data["test"],
        task="caption",
        prompt=stage2_args.prompt,
        use_chat_template=False,
        max_new_tokens=stage2_args.eval_max_new_tokens,
        progress=not training_args.disable_tqdm,
    )
    metrics.update({key: scores[key] for key in ("cider", "bleu4")})
    print(
        f"held-out captions ({scores['num_examples']} images): CIDEr {scores['cider']:.3f} BLEU-4 "
        f"{scores['bleu4']:.3f}"
    )
    for sample in scores["samples"][:3]:
        print(f"  {sample['prediction']!r} <- {sample['references'][0]!r}")
    write_model_card(
        training_args.output_dir, stage="stage2", metrics=metrics, data=describe_train_data(data["train"])
    )


def evaluate_few_shot_captions(
    model, processor, data, stage2_args: Stage2Arguments, training_args, metrics: dict
) -> None:
    """Held-out CIDEr after `--eval_shots` in-context examples of the training pairs (`cider_{k}shot`), printed and
    written into the model card."""
    scores, predictions = evaluate_few_shot(
        model,
        processor,
        data["test"],
        data["train_pairs"],
        shots=stage2_args.eval_shots,
        seed=training_args.seed,
        max_new_tokens=stage2_args.eval_max_new_tokens,
        progress=not training_args.disable_tqdm,
        return_predictions=True,
    )
    metrics.update({f"cider_{shots}shot": score for shots, score in scores.items()})
    num_images = len(next(iter(predictions.values())))
    print(
        f"held-out few-shot captions ({num_images} images): "
        + ", ".join(f"{shots}-shot CIDEr {score:.3f}" for shots, score in scores.items())
    )
    for shots, captions in predictions.items():
        print(f"  {shots}-shot: {captions[0]!r}")
    write_model_card(
        training_args.output_dir, stage="stage2", metrics=metrics, data=describe_train_data(data["train"])
    )


def main(
    script_args: Stage2ScriptArguments, training_args: TrainingArguments, model_args: VLMModelArguments
) -> ScriptResult:
    """
    Runs the script on the parsed arguments (what [`make_parser`] returns, in that order).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the metrics, the checkpoint folder and the training log.

    Example:

    ```python
    >>> from vlbridge.scripts.stage2 import main, make_parser
    >>> argv = ["--config", "stage2_builtin", "--from_stage1", "outputs/stage1", "--image_size", "48"]
    >>> result = main(*make_parser().parse_args_and_config(argv))  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    data_args = stage2_args = script_args

    ################
    # Model, processor & data
    ################
    if stage2_args.interleaved_pairs > 0 and stage2_args.prompt:
        raise ValueError("--prompt goes with single captions; interleaved sequences have no prompt: drop it.")
    model, processor = load_model(stage2_args, model_args)
    if stage2_args.interleaved_pairs > 0 and script_args.vision_features:
        raise ValueError("--vision_features trains on single captions: drop it, or --interleaved_pairs.")
    cache = load_vision_features(script_args.vision_features, model, processor.image_processor)
    data = load_captions(data_args)
    # The same warm-up for single captions and interleaved sequences: the LM is what the two layouts share.
    if stage2_args.lm_text_steps > 0:
        warm_up_language_model(model, processor, data["train"], stage2_args, training_args)
    interleaved = stage2_args.interleaved_pairs > 0
    if interleaved:
        # The pairs stay for the in-context examples; training reads them as sequences of chunks.
        data["train_pairs"] = data["train"]
        data["train"] = interleave_pairs(
            data["train"],
            stage2_args.interleaved_pairs,
            seed=data_args.data_seed_value,
            image_token=processor.image_token,
        )
    # The collator reads the raw image / caption (text / images) columns, so the Trainer must keep them.
    if interleaved:
        collator = InterleavedCollator.from_model(model, processor, max_length=stage2_args.max_length)
    else:
        collator = CaptionCollator.from_model(
            model, processor, prompt=stage2_args.prompt, max_length=stage2_args.max_length, vision_features=cache
        )
    training_args.remove_unused_columns = False

    ################
    # Training & save
    ################
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], data_collator=collator)
    metrics = finish_training(trainer, trainer.train(), processor, training_args.output_dir)

    ################
    # Held-out captioning
    ################
    if "test" in data and trainer.is_world_process_zero():
        if interleaved:
            evaluate_few_shot_captions(trainer.model, processor, data, stage2_args, training_args, metrics)
        else:
            evaluate_captions(trainer.model, processor, data, stage2_args, training_args, metrics)
    log_history = list(trainer.state.log_history)
    # Under accelerate / torchrun: every process waits here for the others, then the process group closes cleanly.
    del trainer, model
    close_process_group()
    return ScriptResult(metrics, training_args.output_dir, log_history)


__all__ = [
    "CaptionDataArguments",
    "Stage2Arguments",
    "Stage2ScriptArguments",
    "main",
    "make_parser",
    "vlm_around_stage1",
]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
