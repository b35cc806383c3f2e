"""
BLIP-2 stage 1 (ITC + ITM + ITG) with the HF Trainer, on the built-in synthetic data or a local image-text set: the
script behind `vlbridge stage1` and `examples/stage1.py`. `--model_type blip` trains BLIP's multimodal mixture of
encoder-decoder instead of a Q-Former (ITC + ITM + LM, momentum distillation; docs/blip.md), with the same trainer.

    # built-in data, the preset the figures in docs/results.md come from (about 10 minutes on 2 CPU cores)
    vlbridge stage1 --config stage1_builtin
    # a short smoke run; any preset value can be overridden on the command line
    vlbridge stage1 --config stage1_builtin --max_steps 20
    # BLIP from scratch on the built-in data (docs/blip.md)
    vlbridge stage1 --config stage1_blip_builtin
    # a saved stage-1 model with a frozen vision tower, from its cached features (docs/feature_cache.md)
    vlbridge stage1 --config stage1_builtin --model_name_or_path outputs/stage1 --vision_features outputs/features

It trains, then reports held-out retrieval recall, ITM accuracy and exact greedy captions, and saves the model with
its tokenizer, image processor and a model card (`stage1_metrics.json` beside them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import CLIPImageProcessor

from ..configuration import BlipMEDConfig, QFormerPretrainingConfig
from ..data import (
    build_word_tokenizer,
    chat_vocabulary,
    group_captions,
    make_synthetic_image_text,
)
from ..data.synthetic_noisy import add_caption_noise
from ..data.user import load_user_dataset
from ..evaluation import evaluate_stage1
from ..hub.checkpoint import describe_checkpoint, describe_train_data
from ..modeling import BlipMEDForImageTextPretraining, QFormerForImageTextPretraining
from ..processing import BridgeProcessor
from ..trainers import ImageTextCollator, Stage1Config, Stage1Trainer
from ..trainers.distributed import close_process_group
from .utils import (
    OUTSIDE_PATHS_HELP,
    ScriptParser,
    ScriptResult,
    VisionFeaturesArguments,
    dataset_help,
    load_vision_features,
)


@dataclass
class DataArguments(VisionFeaturesArguments):
    dataset: str = field(default="builtin", metadata={"help": dataset_help("captions")})
    allow_outside_paths: bool = field(default=False, metadata={"help": OUTSIDE_PATHS_HELP})
    num_train_images: int = field(default=2000, metadata={"help": "Built-in data: training images."})
    num_eval_images: int = field(default=200, metadata={"help": "Built-in data: held-out test images."})
    image_size: int = field(default=64, metadata={"help": "Side of the built-in images and of the model input."})
    captions_per_image: int = field(default=3, metadata={"help": "Built-in data: captions per image (1 to 5)."})
    max_objects: int = field(default=4, metadata={"help": "Built-in data: most objects per scene (1 to 9)."})
    image_mean: float = field(
        default=0.5, metadata={"help": "Pixel normalisation mean; 1.0 maps the built-in white background to 0."}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Local data: share of images held out."})
    data_seed_value: int = field(default=0, metadata={"help": "Seed of the built-in data."})
    caption_noise: float = field(
        default=0.0,
        metadata={
            "help": "Built-in data: share of the training captions made wrong (another scene's caption, or one "
            "colour / shape word changed), a stand-in for web alt-text noise; the held-out captions stay true."
        },
    )
    k_test: int = field(default=16, metadata={"help": "Held-out retrieval: candidates re-ranked by ITM (LAVIS: 128)."})


MODEL_TYPES = ("qformer", "blip")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue stage 1 from a saved stage-1 folder (one trained here, a converted BLIP-2 "
            "Blip2ForImageTextRetrieval, or a converted BLIP retrieval / captioning model: vlbridge convert) with its "
            "tokenizer and image processor; --model_type and the size arguments below are then ignored."
        },
    )
    model_type: str = field(
        default="qformer",
        metadata={
            "help": "What to train from scratch: 'qformer' (BLIP-2's Q-Former beside a ViT) or 'blip' (BLIP's "
            "multimodal mixture of encoder-decoder: ViT, BERT text encoder and a decoder sharing all but "
            "self-attention; docs/blip.md).",
            "choices": list(MODEL_TYPES),
        },
    )
    vision_hidden_size: int = field(default=128, metadata={"help": "ViT width (trained from scratch)."})
    vision_layers: int = field(default=4, metadata={"help": "ViT depth."})
    patch_size: int = field(default=8, metadata={"help": "ViT patch size."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Freeze the (random) ViT."})
    qformer_hidden_size: int = field(default=128, metadata={"help": "Q-Former width."})
    qformer_layers: int = field(default=4, metadata={"help": "Q-Former depth."})
    num_query_tokens: int = field(default=8, metadata={"help": "Learned queries."})
    text_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "BLIP (--model_type blip): width of the text encoder / decoder (default: qformer_hidden_size)."
        },
    )
    text_layers: int | None = field(
        default=None,
        metadata={"help": "BLIP: depth of the text encoder / decoder (default: qformer_layers)."},
    )
    share_encoder_decoder: bool = field(
        default=True,
        metadata={"help": "BLIP: the decoder shares every encoder parameter but self-attention (BLIP's pretraining)."},
    )
    num_attention_heads: int = field(
        default=4, metadata={"help": "Heads of the ViT and the Q-Former (or BLIP's text)."}
    )
    embed_dim: int = field(default=64, metadata={"help": "ITC embedding width."})
    dropout: float = field(default=0.0, metadata={"help": "Q-Former (BLIP: text) dropout."})
    initializer_range: float = field(
        default=0.1,
        metadata={"help": "Q-Former init std. From scratch, BERT's 0.02 leaves ITC on its ln(N) plateau for long."},
    )
    vision_initializer_range: float = field(default=0.02, metadata={"help": "ViT init std."})
    itc_weight: float = field(default=1.0, metadata={"help": "Weight of the ITC loss."})
    itm_weight: float = field(default=1.0, metadata={"help": "Weight of the ITM loss."})
    itg_weight: float = field(default=1.0, metadata={"help": "Weight of the ITG loss (BLIP's LM loss)."})
    use_momentum_distillation: bool | None = field(
        default=None,
        metadata={
            "help": "ALBEF / BLIP momentum distillation with feature queues (default: the model's, on for BLIP, off "
            "for the Q-Former); needs gradient_accumulation_steps=1 and a queue_size that the batch size divides."
        },
    )
    queue_size: int | None = field(
        default=None, metadata={"help": "Momentum distillation: queue length, a multiple of the global batch size."}
    )
    alpha_warmup_steps: int | None = field(
        default=None, metadata={"help": "Momentum distillation: steps over which the soft targets' weight ramps up."}
    )

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"--model_type must be one of {MODEL_TYPES}, got {self.model_type!r}.")

    def momentum_options(self) -> dict:
        """The momentum-distillation settings given on the command line (the rest stay the model's defaults)."""
        options = {
            "use_momentum_distillation": self.use_momentum_distillation,
            "queue_size": self.queue_size,
            "alpha_warmup_steps": self.alpha_warmup_steps,
        }
        return {key: value for key, value in options.items() if value is not None}


def make_parser() -> ScriptParser:
    """
    The script's command line: [`DataArguments`] (the script's arguments), [`Stage1Config`] (the training
    arguments) and [`ModelArguments`], with `--config` presets.

    Example:

    ```python
    >>> from vlbridge.scripts.stage1 import make_parser
    >>> data_args, training_args, model_args = make_parser().parse_args_and_config(
    ...     ["--config", "stage1_builtin", "--max_steps", "5"]
    ... )
    >>> data_args.image_size, model_args.num_query_tokens, training_args.max_steps
    (48, 8, 5)
    ```
    """
    return ScriptParser((DataArguments, Stage1Config, ModelArguments))


def load_data(args: DataArguments):
    """`(train pairs, held-out images with their captions, tokenizer vocabulary)`: the built-in scenes, or a local
    folder / `.jsonl` of which `eval_fraction` of the images is held out."""
    if args.dataset == "builtin":
        splits = make_synthetic_image_text(
            {"train": args.num_train_images, "test": args.num_eval_images},
            image_size=args.image_size,
            seed=args.data_seed_value,
            captions_per_image=args.captions_per_image,
            max_objects=args.max_objects,
        )
        train = splits["train"]
        if args.caption_noise:
            train = add_caption_noise(train, args.caption_noise, seed=args.data_seed_value)
        # Every word of the built-in data, questions and prompts too, not only the captions': the stage-1 tokenizer
        # is also the Q-Former's in InstructBLIP mode, where the instruction enters the Q-Former.
        return train, group_captions(splits["test"]), chat_vocabulary()
    if args.caption_noise:
        raise ValueError("--caption_noise applies to the built-in data only (--dataset builtin).")
    pairs = load_user_dataset(args.dataset, "captions", "vlbridge stage1", args.allow_outside_paths)
    if "image_id" not in pairs.column_names:
        pairs = pairs.add_column("image_id", list(range(len(pairs))))
    images = group_captions(pairs).train_test_split(test_size=args.eval_fraction, seed=args.data_seed_value)
    held_out = set(images["test"]["image_id"])
    train = pairs.filter(lambda row: row["image_id"] not in held_out)
    words = sorted({word for caption in pairs["caption"] for word in caption.lower().split()})
    return train, images["test"], words


def build_model(args: ModelArguments, data: DataArguments, tokenizer):
    """A stage-1 model from scratch of `args.model_type`: a ViT and a Q-Former ([`QFormerForImageTextPretraining`])
    or BLIP's MED ([`build_blip_model`]), of the sizes `args` gives."""
    if args.model_type == "blip":
        return build_blip_model(args, data, tokenizer)
    config = QFormerPretrainingConfig(
        vision_config={
            "model_type": "vit",
            "hidden_size": args.vision_hidden_size,
            "num_hidden_layers": args.vision_layers,
            "num_attention_heads": args.num_attention_heads,
            "intermediate_size": 4 * args.vision_hidden_size,
            "image_size": data.image_size,
            "patch_size": args.patch_size,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": args.vision_initializer_range,
        },
        qformer_config={
            "model_type": "vlbridge_qformer",
            "hidden_size": args.qformer_hidden_size,
            "num_hidden_layers": args.qformer_layers,
            "num_attention_heads": args.num_attention_heads,
            "intermediate_size": 4 * args.qformer_hidden_size,
            "num_query_tokens": args.num_query_tokens,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "initializer_range": args.initializer_range,
            "hidden_dropout_prob": args.dropout,
            "attention_probs_dropout_prob": args.dropout,
        },
        embed_dim=args.embed_dim,
        itc_weight=args.itc_weight,
        itm_weight=args.itm_weight,
        itg_weight=args.itg_weight,
        freeze_vision_tower=args.freeze_vision_tower,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **args.momentum_options(),
    )
    return QFormerForImageTextPretraining(config)


def build_blip_model(args: ModelArguments, data: DataArguments, tokenizer) -> BlipMEDForImageTextPretraining:
    """A [`BlipMEDForImageTextPretraining`] from scratch: BLIP's ViT of the ViT arguments' sizes and a BERT text
    encoder / decoder of `text_hidden_size` x `text_layers` (the Q-Former's sizes when unset); `[DEC]` and `[ENC]`
    come from the tokenizer."""
    width = args.text_hidden_size or args.qformer_hidden_size
    decoder_start, enc = tokenizer.convert_tokens_to_ids("[DEC]"), tokenizer.convert_tokens_to_ids("[ENC]")
    if tokenizer.unk_token_id in (decoder_start, enc):
        raise ValueError("BLIP needs [DEC] and [ENC] in the tokenizer's vocabulary (build_word_tokenizer adds words).")
    config = BlipMEDConfig(
        vision_config={
            "model_type": "blip_vision_model",
            "hidden_size": args.vision_hidden_size,
            "num_hidden_layers": args.vision_layers,
            "num_attention_heads": args.num_attention_heads,
            "intermediate_size": 4 * args.vision_hidden_size,
            "image_size": data.image_size,
            "patch_size": args.patch_size,
            "attention_dropout": 0.0,
            "initializer_range": args.vision_initializer_range,
        },
        text_config={
            "model_type": "blip_text_model",
            "vocab_size": len(tokenizer),
            "hidden_size": width,
            "num_hidden_layers": args.text_layers or args.qformer_layers,
            "num_attention_heads": args.num_attention_heads,
            "intermediate_size": 4 * width,
            "max_position_embeddings": 64,
            "initializer_range": args.initializer_range,
            "hidden_dropout_prob": args.dropout,
            "attention_probs_dropout_prob": args.dropout,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": decoder_start,
            "eos_token_id": tokenizer.eos_token_id,
            "sep_token_id": tokenizer.eos_token_id,
        },
        embed_dim=args.embed_dim,
        share_encoder_decoder=args.share_encoder_decoder,
        itc_weight=args.itc_weight,
        itm_weight=args.itm_weight,
        itg_weight=args.itg_weight,
        freeze_vision_tower=args.freeze_vision_tower,
        initializer_range=args.initializer_range,
        decoder_start_token_id=decoder_start,
        enc_token_id=enc,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **args.momentum_options(),
    )
    return BlipMEDForImageTextPretraining(config)


def build_tokenizer(words: list[str], model_type: str = "qformer"):
    """The word tokenizer of a from-scratch model: the data's words and `[DEC]` (ITG's start), plus `[ENC]` (ITM's
    first token) for BLIP."""
    return build_word_tokenizer([*words, "[DEC]", *(["[ENC]"] if model_type == "blip" else [])])


def load_stage1_folder(path: str):
    """A saved stage-1 model with the tokenizer and image processor beside it, checked to be a stage-1 model."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    architectures = AutoConfig.from_pretrained(path).architectures or []
    # A BLIP MED folder may hold the VQA model, which AutoModel would build as the pretraining model, half empty.
    blip_other = any(name.startswith("BlipMED") and name != "BlipMEDForImageTextPretraining" for name in architectures)
    model = None if blip_other else AutoModel.from_pretrained(path)
    if not isinstance(model, (QFormerForImageTextPretraining, BlipMEDForImageTextPretraining)):
        held = type(model).__name__ if model is not None else ", ".join(architectures)
        raise ValueError(
            f"--model_name_or_path {path} holds a {held}, not a stage-1 model (QFormerForImageTextPretraining or "
            "BlipMEDForImageTextPretraining): pass a folder saved by vlbridge stage1, or a BLIP-2 "
            "Blip2ForImageTextRetrieval / BLIP retrieval or captioning model converted with `vlbridge convert`."
        )
    return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def image_processor_for(data_args: DataArguments) -> CLIPImageProcessor:
    """Square images of `image_size`, normalised with mean `image_mean` (1.0 makes the white background 0)."""
    size = data_args.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[data_args.image_mean] * 3,
        image_std=[0.5, 0.5, 0.5],
    )


def evaluate_and_save(trainer, held_out, collator, data_args: DataArguments, output_dir: str) -> dict:
    """Held-out retrieval / ITM / ITG metrics, then the model, tokenizer, image processor, metrics file and card."""
    model, tokenizer, image_processor = trainer.model, collator.tokenizer, collator.image_processor
    metrics = evaluate_stage1(model, held_out, collator, k_test=data_args.k_test)
    samples = metrics.pop("samples")
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    metrics["train_seconds"] = trainer.state.log_history[-1].get("train_runtime")
    Path(output_dir, "stage1_metrics.json").write_text(json.dumps(metrics, indent=2))
    # Self-describing checkpoint: processor + chat template, auto_map, and a card with the data and metrics.
    source = "built-in scenes (make_synthetic_image_text)" if data_args.dataset == "builtin" else data_args.dataset
    # Image embeddings per image: the Q-Former's queries, BLIP's one projected [CLS].
    queries = model.config.qformer_config.num_query_tokens if isinstance(model, QFormerForImageTextPretraining) else 1
    describe_checkpoint(
        output_dir,
        stage="stage1",
        metrics=metrics,
        data=f"{describe_train_data(trainer.train_dataset)} Source: {source}; metrics on {len(held_out)} held-out "
        "images.",
        processor=BridgeProcessor(image_processor, tokenizer, num_image_tokens=queries),
    )
    print("| metric | value |\n|---|---|")
    for key, value in metrics.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    for truth, generated in samples:
        print(f"  {truth!r} -> {generated!r}")
    return metrics


def main(data_args: DataArguments, training_args: Stage1Config, model_args: ModelArguments) -> ScriptResult:
    """
    Trains, evaluates on the held-out images and saves; the arguments are what [`make_parser`] parses.

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the metrics, the checkpoint folder and the training log.

    Example:

    ```python
    >>> from vlbridge.scripts.stage1 import main, make_parser
    >>> argv = ["--config", "stage1_builtin", "--max_steps", "20", "--output_dir", "outputs/stage1"]
    >>> result = main(*make_parser().parse_args_and_config(argv))  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    ################
    # Data
    ################
    train, held_out, words = load_data(data_args)
    if model_args.model_name_or_path:
        model, tokenizer, image_processor = load_stage1_folder(model_args.model_name_or_path)
    else:
        tokenizer = build_tokenizer(words, model_args.model_type)
        image_processor = image_processor_for(data_args)
        model = build_model(model_args, data_args, tokenizer)
    collator = ImageTextCollator(image_processor, tokenizer, max_length=training_args.max_text_length)
    # The held-out evaluation below runs the tower on its own images: the cache is for training batches only.
    cache = load_vision_features(data_args.vision_features, model, image_processor)
    train_collator = dataclasses.replace(collator, vision_features=cache) if cache is not None else collator

    ################
    # Training
    ################
    trainer = Stage1Trainer(model=model, args=training_args, train_dataset=train, data_collator=train_collator)
    trainer.train()

    ################
    # Held-out evaluation and save
    ################
    metrics = {}
    if trainer.is_world_process_zero():
        metrics = evaluate_and_save(trainer, held_out, collator, data_args, training_args.output_dir)
    log_history = list(trainer.state.log_history)
    # Under torchrun: every process waits here for the others, then the process group closes cleanly.
    del trainer, model
    close_process_group()
    return ScriptResult(metrics, training_args.output_dir, log_history)


__all__ = [
    "DataArguments",
    "ModelArguments",
    "build_blip_model",
    "build_model",
    "build_tokenizer",
    "load_data",
    "main",
    "make_parser",
]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
