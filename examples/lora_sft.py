"""Safety / helpfulness LoRA SFT of a bridged VLM with TRL's `SFTTrainer`, on built-in chats that answer questions
about the image and decline to describe objects it does not hold ("what colour is the star?" -> "there is no star in
the image."), from `vlbridge.data.make_synthetic_safety_chat`.

LoRA adapters go on the language model only (`language_model_lora_config`, the same helper as examples/dpo.py); the
bridge and the projection train fully unless `--train_bridge false`; the vision tower stays frozen. The script prints
the held-out preference accuracy on refusal and question pairs (`make_synthetic_preference`) before and after, and
saves the adapter (`<output_dir>/adapter`) and the merged model (`<output_dir>/merged`). It takes the SFT preset's
arguments (see examples/sft_trl.py for why `assistant_only_loss=True` and `max_length=None`) and adds `--refusal_rate`
and the LoRA arguments (LoRA wants a higher learning rate than full fine-tuning). Start from an SFT checkpoint: LoRA
cannot teach an untrained tiny model's head anything.

    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml
    python examples/lora_sft.py --config examples/configs/sft_trl_builtin.yaml \
        --model_name_or_path outputs/sft-trl-builtin --output_dir outputs/lora-sft-safety \
        --max_steps 200 --learning_rate 0.01
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from vlbridge.data import make_synthetic_preference, make_synthetic_safety_chat, preference_vocabulary
from vlbridge.trainers import preference_accuracy
from vlbridge.trainers.distributed import close_process_group
from vlbridge.trainers.lora import LoraArguments
from vlbridge.trainers.scripts import ChatDataArguments, VLMModelArguments, load_model_and_processor, parse_with_preset


@dataclass
class SafetyDataArguments:
    """What the safety chats add to the built-in chat data arguments."""

    refusal_rate: float = field(default=0.3, metadata={"help": "Share of turns about an absent object (refused)."})
    num_preference_images: int = field(default=100, metadata={"help": "Held-out images of the preference pairs."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ChatDataArguments, SafetyDataArguments, LoraArguments, VLMModelArguments, SFTConfig))
    argv = sys.argv[1:] if argv is None else argv
    data_args, safety_args, lora_args, model_args, training_args = parse_with_preset(parser, argv)
    if (model_args.model_name_or_path or "none").lower() in ("none", "null", ""):
        model_args.model_name_or_path = None

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, preference_vocabulary())
    options = {"image_size": data_args.image_size, "seed": data_args.data_seed_value}
    options["max_objects"] = data_args.max_objects
    splits = {"train": data_args.num_train_images, "test": safety_args.num_preference_images}
    chats = make_synthetic_safety_chat(splits, turns=data_args.max_turns, refusal_rate=safety_args.refusal_rate,
                                       **options)  # fmt: skip
    held_out = make_synthetic_preference(splits, pair_types=["absent", "question"], pairs_per_image=1, **options)
    held_out = held_out["test"]  # the same held-out scenes as the chats' "test" split, which no training sees
    before = preference_accuracy(model, processor, held_out, group_by="pair_type")

    ################
    # Training & save
    ################
    train = chats["train"].select_columns(["messages", "images"])
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=processor,
                         peft_config=lora_args.lora_config(model))  # fmt: skip
    result = trainer.train()
    after = preference_accuracy(trainer.model, processor, held_out, group_by="pair_type")
    trainer.save_model(os.path.join(training_args.output_dir, "adapter"))
    metrics = {"train_loss": result.training_loss, "accuracy_before": before["accuracy"]}
    metrics.update({f"accuracy_after_{kind}": group["accuracy"] for kind, group in after["groups"].items()})
    metrics["accuracy_after"] = after["accuracy"]
    if trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(os.path.join(training_args.output_dir, "merged"))
        processor.save_pretrained(os.path.join(training_args.output_dir, "merged"))
        print(f"train loss {result.training_loss:.4f}")
        for name in ["all", *before["groups"]]:
            start, end = (before, after) if name == "all" else (before["groups"][name], after["groups"][name])
            print(f"held-out preference accuracy [{name}] {start['accuracy']:.3f} -> {end['accuracy']:.3f}")
    del trainer, model
    close_process_group()
    return metrics


if __name__ == "__main__":
    main()
