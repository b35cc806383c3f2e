"""DPO with LoRA of a bridged VLM with TRL's `DPOTrainer`, on the built-in preference pairs against hallucination.

Each pair is an image, a question ("describe the image.", "what colour is the circle?", "what colour is the star?"),
a chosen answer that is true of the image and a rejected one with one thing wrong: a hallucinated colour, shape, size,
count or object, a wrong answer, or a made-up answer about an absent object
(`vlbridge.data.make_synthetic_preference`). LoRA adapters go on the language model only
(`language_model_lora_config`); the bridge and the projection train fully unless `--train_bridge false`; the vision
tower stays frozen. The reference model is the same model with its adapters disabled (no `ref_model`). The script
prints the held-out preference accuracy (pairs whose chosen answer the model finds more likely than the rejected one),
overall and per pair type, before and after, then saves the adapter (`<output_dir>/adapter`, loads back with
`peft.PeftModel.from_pretrained`) and the merged model (`<output_dir>/merged`, a plain vlbridge checkpoint).

DPOConfig arguments that matter for a VLM: `max_length=None` (or a length that keeps every prompt whole: TRL cuts
from the end, and a cut into the image tokens fails), `precompute_ref_log_probs=False` (TRL refuses it for vision
data) and `truncation_mode="keep_start"` (TRL's default; "keep_end" is refused). `padding_free` is ignored by TRL 1.16.
TRL's defaults `bf16=True` and `gradient_checkpointing=True` work but only slow a tiny model down on CPU.

Post-training needs a trained model: start from an SFT checkpoint. A freshly built tiny VLM (no `model_name_or_path`)
only smoke-tests the pipeline, as its untrained head cannot express a preference.

    # 1. supervised fine-tuning on the built-in chats (examples/sft_trl.py), then 2. DPO from that checkpoint
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml
    python examples/dpo.py --config examples/configs/dpo_builtin.yaml

    # a short smoke run on a tiny VLM built in code; any preset value can be overridden on the command line
    python examples/dpo.py --config examples/configs/dpo_builtin.yaml --model_name_or_path none --max_steps 5

    # two CPU processes (gloo); examples/accelerate/ has the GPU configs
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/dpo.py \
        --config examples/configs/dpo_builtin.yaml
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from trl import DPOConfig, DPOTrainer

from vlbridge.data import make_synthetic_image_text, make_synthetic_preference, preference_vocabulary
from vlbridge.data.synthetic import Scene, describe_positions
from vlbridge.trainers import preference_accuracy
from vlbridge.trainers.distributed import close_process_group
from vlbridge.trainers.lora import LoraArguments
from vlbridge.trainers.scripts import VLMModelArguments, load_model_and_processor, parse_with_preset


@dataclass
class PreferenceDataArguments:
    """The built-in preference pairs (`vlbridge.data.make_synthetic_preference`)."""

    num_train_images: int = field(default=500, metadata={"help": "Images of the training pairs."})
    num_eval_images: int = field(default=100, metadata={"help": "Held-out images (scenes no training saw)."})
    pairs_per_image: int = field(default=2, metadata={"help": "Preference pairs per image."})
    pair_types: str = field(
        default="caption,question,absent", metadata={"help": "Comma-separated, among caption, question, absent."}
    )
    image_size: int = field(default=32, metadata={"help": "Side of the images (as in the SFT run)."})
    max_objects: int = field(default=2, metadata={"help": "Most objects per scene (as in the SFT run)."})
    data_seed_value: int = field(default=0, metadata={"help": "Seed of the built-in data (as in the SFT run)."})
    sft_num_train_images: int = field(
        default=500, metadata={"help": "Training chats of the SFT run (their scenes are kept out of the held-out)."}
    )


def held_out_pairs(data_args: PreferenceDataArguments):
    """Training pairs, and held-out pairs on scenes that neither the SFT chats nor the training pairs show."""
    options = {"image_size": data_args.image_size, "seed": data_args.data_seed_value}
    options["max_objects"] = data_args.max_objects
    splits = {"train": data_args.num_train_images, "test": data_args.num_eval_images}
    data = make_synthetic_preference(splits, pairs_per_image=data_args.pairs_per_image,
                                     pair_types=data_args.pair_types.split(","), **options)  # fmt: skip
    held_out = data["test"]
    if data_args.sft_num_train_images:
        # The SFT chats (`builtin_chat_dataset`) were drawn without this held-out split: drop the scenes they share.
        sft = make_synthetic_image_text({"train": data_args.sft_num_train_images}, **options)  # same draws as SFT
        seen = {describe_positions(Scene.from_objects(objects)) for objects in sft["train"]["objects"]}
        keep = [i for i, objects in enumerate(held_out["objects"]) if describe_positions(Scene.from_objects(objects))
                not in seen]  # fmt: skip
        held_out = held_out.select(keep)
    return data["train"].select_columns(["images", "prompt", "chosen", "rejected"]), held_out


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((PreferenceDataArguments, LoraArguments, VLMModelArguments, DPOConfig))
    data_args, lora_args, model_args, training_args = parse_with_preset(parser, sys.argv[1:] if argv is None else argv)
    if (model_args.model_name_or_path or "none").lower() in ("none", "null", ""):
        model_args.model_name_or_path = None

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, preference_vocabulary())
    train, held_out = held_out_pairs(data_args)
    before = preference_accuracy(model, processor, held_out, group_by="pair_type")

    ################
    # Training
    ################
    peft_config = lora_args.lora_config(model)  # LoRA on the language model only (language_model_lora_config)
    # No ref_model: with a PEFT model, TRL scores the reference with the adapters disabled (the starting model).
    trainer = DPOTrainer(model=model, args=training_args, train_dataset=train, processing_class=processor,
                         peft_config=peft_config)  # fmt: skip
    trainer.train()
    after = preference_accuracy(trainer.model, processor, held_out, group_by="pair_type")

    ################
    # Save: the adapter (with the trained bridge copies), then the merged model
    ################
    output_dir = training_args.output_dir
    trainer.save_model(os.path.join(output_dir, "adapter"))  # adapter_config.json + adapter_model.safetensors
    metrics = {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"]}
    metrics.update(margin_before=before["margin"], margin_after=after["margin"], held_out_pairs=after["num_pairs"])
    metrics.update({f"accuracy_after_{kind}": group["accuracy"] for kind, group in after["groups"].items()})
    if trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()  # a plain BridgeVLMForConditionalGeneration
        merged.save_pretrained(os.path.join(output_dir, "merged"))
        processor.save_pretrained(os.path.join(output_dir, "merged"))
        for name in ["all", *before["groups"]]:
            start, end = (before, after) if name == "all" else (before["groups"][name], after["groups"][name])
            print(
                f"held-out preference accuracy [{name}] {start['accuracy']:.3f} -> {end['accuracy']:.3f} (mean "
                f"log-prob margin {start['margin']:.2f} -> {end['margin']:.2f}, {end['num_pairs']} pairs)"
            )
    del trainer, model
    close_process_group()
    return metrics


if __name__ == "__main__":
    main()
