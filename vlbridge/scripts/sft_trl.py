"""
Supervised fine-tuning of a bridged VLM with TRL's `SFTTrainer`, on the built-in chat data. The script behind
`vlbridge sft_trl` and `examples/sft_trl.py`.

TRL renders each chat with the processor's chat template and, with `assistant_only_loss=True`, trains only on the
assistant's answers (the template marks them with `{% generation %}`). `max_length=None` keeps every image's tokens
whole; a shorter limit may cut them and misalign the images (see `tests/scripts/test_trl_sft.py`).

    vlbridge sft_trl --config sft_trl_builtin
    vlbridge sft_trl --config sft_trl_builtin --model_name_or_path outputs/my-vlm
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from ..data import chat_vocabulary
from ..trainers.distributed import close_process_group
from .utils import (
    ChatDataArguments,
    ScriptParser,
    ScriptResult,
    VLMModelArguments,
    builtin_chat_dataset,
    check_decoder_only_language_model,
    finish_training,
    load_model_and_processor,
)


def make_parser() -> ScriptParser:
    """The script's command line: `ChatDataArguments` (the script's arguments), TRL's `SFTConfig` and
    `VLMModelArguments`."""
    return ScriptParser((ChatDataArguments, SFTConfig, VLMModelArguments))


def main(script_args: ChatDataArguments, training_args: SFTConfig, model_args: VLMModelArguments) -> ScriptResult:
    """
    Runs the script on the parsed arguments (what [`make_parser`] returns, in that order).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the metrics, the checkpoint folder and the training log.

    Example:

    ```python
    >>> from vlbridge.scripts.sft_trl import main, make_parser
    >>> argv = ["--config", "sft_trl_builtin", "--max_steps", "20"]
    >>> result = main(*make_parser().parse_args_and_config(argv))  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    data_args = script_args

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, chat_vocabulary())
    check_decoder_only_language_model(model, "SFT")  # before TRL, which fails deep inside an encoder-decoder
    train = builtin_chat_dataset(data_args, "vlbridge sft_trl")

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
    return ScriptResult(metrics, training_args.output_dir, log_history)


__all__ = ["main", "make_parser"]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
