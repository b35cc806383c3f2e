"""
Supervised fine-tuning of a bridged VLM with TRL's `SFTTrainer`, on the built-in chat data. The recipe behind
`vlbridge train --stage sft-trl` and `examples/sft_trl.py`.

TRL renders each chat with the processor's chat template and, with `assistant_only_loss=True`, trains only on the
assistant's answers (the template marks them with `{% generation %}`). `max_length=None` keeps every image's tokens
whole; a shorter limit may cut them and misalign the images (see `tests/test_trl_sft.py`).

    vlbridge train --stage sft-trl --config sft_trl_builtin
    vlbridge train --stage sft-trl --config sft_trl_builtin --model_name_or_path outputs/my-vlm
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from ..data import chat_vocabulary
from ..trainers.distributed import close_process_group
from ..trainers.scripts import (
    ChatDataArguments,
    VLMModelArguments,
    builtin_chat_dataset,
    check_decoder_only_language_model,
    finish_training,
    load_model_and_processor,
    parse_with_preset,
)
from .common import RecipeResult


def build_parser() -> HfArgumentParser:
    """The recipe's command line: `ChatDataArguments`, `VLMModelArguments` and TRL's `SFTConfig`."""
    return HfArgumentParser((ChatDataArguments, VLMModelArguments, SFTConfig))


def run(argv: list[str] | None = None, parser: HfArgumentParser | None = None) -> RecipeResult:
    """
    Runs the recipe: `argv` is the command line (default `sys.argv[1:]`), `parser` a customised [`build_parser`].

    Returns:
        [`~vlbridge.recipes.common.RecipeResult`]: the metrics, the checkpoint folder and the training log.

    Example:

    ```python
    >>> from vlbridge.recipes.sft_trl import run
    >>> argv = ["--config", "sft_trl_builtin", "--max_steps", "20"]
    >>> result = run(argv)  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    data_args, model_args, training_args = parse_with_preset(
        parser or build_parser(), sys.argv[1:] if argv is None else argv
    )

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, chat_vocabulary())
    check_decoder_only_language_model(model, "SFT")  # before TRL, which fails deep inside an encoder-decoder
    train = builtin_chat_dataset(data_args, "vlbridge train --stage sft-trl")

    ################
    # Training & save
    ################
    # TRL renders the chats with the processor's template and tokenizes them itself (SFTConfig.max_length).
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=processor)
    metrics = finish_training(trainer, trainer.train(), processor, training_args.output_dir)
    log_history = list(trainer.state.log_history)
    # Under accelerate / torchrun: every process waits here for the others, then the process group closes cleanly.
    del trainer, model
    close_process_group()
    return RecipeResult(metrics, training_args.output_dir, log_history)


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe on `argv` (default `sys.argv[1:]`) and returns its metrics."""
    return run(argv).metrics


__all__ = ["build_parser", "main", "run"]
