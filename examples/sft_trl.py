"""Supervised fine-tuning of a bridged VLM with TRL's `SFTTrainer`, on the built-in chat data.

TRL renders each chat with the processor's chat template and, with `assistant_only_loss=True`, trains only on the
assistant's answers (the template marks them with `{% generation %}`). `max_length=None` keeps every image's tokens
whole; a shorter limit may cut them and misalign the images (see `tests/test_trl_sft.py`).

    # built-in chats, a tiny VLM built in code (a few minutes on 2 CPU cores)
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml

    # a short smoke run; any preset value can be overridden on the command line
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml --max_steps 20

    # start from a saved vlbridge checkpoint (model + processor), e.g. a stage-2 model
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml --model_name_or_path outputs/my-vlm

    # two CPU processes (gloo); examples/accelerate/ has the GPU configs (DDP, FSDP)
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/sft_trl.py \
        --config examples/configs/sft_trl_builtin.yaml
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from vlbridge.data import chat_vocabulary
from vlbridge.trainers.distributed import close_process_group
from vlbridge.trainers.scripts import (
    ChatDataArguments,
    VLMModelArguments,
    builtin_chat_dataset,
    finish_training,
    load_model_and_processor,
    parse_with_preset,
)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ChatDataArguments, VLMModelArguments, SFTConfig))
    data_args, model_args, training_args = parse_with_preset(parser, sys.argv[1:] if argv is None else argv)

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, chat_vocabulary())
    train = builtin_chat_dataset(data_args)

    ################
    # Training & save
    ################
    # TRL renders the chats with the processor's template and tokenizes them itself (SFTConfig.max_length).
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=processor)
    metrics = finish_training(trainer, trainer.train(), processor, training_args.output_dir)
    # Under accelerate / torchrun: every process waits here for the others, then the process group closes cleanly.
    del trainer, model
    close_process_group()
    return metrics


if __name__ == "__main__":
    main()
