"""Supervised fine-tuning of a bridged VLM with the HF Trainer and `ChatCollator`, on the built-in chat data.

    # built-in chats, a tiny VLM built in code (a few minutes on 2 CPU cores)
    python examples/sft.py --config examples/configs/sft_builtin.yaml

    # a short smoke run; any preset value can be overridden on the command line
    python examples/sft.py --config examples/configs/sft_builtin.yaml --max_steps 20

    # start from a saved vlbridge checkpoint (model + processor), e.g. a stage-2 model
    python examples/sft.py --config examples/configs/sft_builtin.yaml --model_name_or_path outputs/my-vlm

    # two CPU processes (gloo); examples/accelerate/ has the GPU configs (DDP, FSDP)
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/sft.py \
        --config examples/configs/sft_builtin.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, Trainer, TrainingArguments

from vlbridge.data import chat_vocabulary, make_synthetic_vqa
from vlbridge.modeling.hub import write_model_card
from vlbridge.trainers import ChatCollator, evaluate_generation
from vlbridge.trainers.distributed import close_process_group
from vlbridge.trainers.scripts import (
    ChatDataArguments,
    VLMModelArguments,
    builtin_chat_dataset,
    describe_train_data,
    finish_training,
    load_model_and_processor,
    parse_with_preset,
)


@dataclass
class CollatorArguments:
    max_length: int | None = field(default=None, metadata={"help": "Longest sequence in tokens; None never cuts."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ChatDataArguments, VLMModelArguments, CollatorArguments, TrainingArguments))
    data_args, model_args, collator_args, training_args = parse_with_preset(
        parser, sys.argv[1:] if argv is None else argv
    )

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, chat_vocabulary())
    train = builtin_chat_dataset(data_args)
    # The collator renders the chat template and masks all but the assistant's answers; it reads the raw columns,
    # so the Trainer must keep them (remove_unused_columns=False).
    collator = ChatCollator.from_model(model, processor, max_length=collator_args.max_length)
    training_args.remove_unused_columns = False

    ################
    # Training & save
    ################
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    metrics = finish_training(trainer, trainer.train(), processor, training_args.output_dir)

    ################
    # Held-out VQA
    ################
    if data_args.num_eval_images > 0 and trainer.is_world_process_zero():
        # The test split's scenes come from their own random stream, apart from the training chats'.
        questions = make_synthetic_vqa(
            {"test": data_args.num_eval_images}, image_size=data_args.image_size, seed=data_args.data_seed_value,
            max_objects=data_args.max_objects,
        )["test"]  # fmt: skip
        scores = evaluate_generation(
            trainer.model, processor, questions, task="vqa", max_new_tokens=8, progress=not training_args.disable_tqdm
        )
        metrics["vqa_accuracy"] = scores["vqa_accuracy"]
        print(f"held-out VQA ({scores['num_examples']} questions): accuracy {scores['vqa_accuracy']:.3f}")
        for kind, accuracy in sorted(scores.get("vqa_accuracy_per_type", {}).items()):
            print(f"  {kind}: {accuracy:.3f}")
        write_model_card(training_args.output_dir, stage="sft", metrics=metrics,
                         data=describe_train_data(train))  # fmt: skip
    # Under accelerate / torchrun: every process waits here for the others, then the process group closes cleanly.
    del trainer, model
    close_process_group()
    return metrics


if __name__ == "__main__":
    main()
