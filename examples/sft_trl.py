"""Supervised fine-tuning of a bridged VLM with TRL's `SFTTrainer`, on the built-in chat data.

TRL renders each chat with the processor's chat template and, with `assistant_only_loss=True`, trains only on the
assistant's answers (the template marks them with `{% generation %}`). `max_length=None` keeps every image's tokens
whole; a shorter limit may cut them and misalign the images (see `tests/scripts/test_trl_sft.py`).

    # built-in chats, a tiny VLM built in code (a few minutes on 2 CPU cores)
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml

    # a short smoke run; any preset value can be overridden on the command line
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml --max_steps 20

    # start from a saved vlbridge checkpoint (model + processor), e.g. a stage-2 model
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml --model_name_or_path outputs/my-vlm

    # two CPU processes (gloo); examples/accelerate/ has the GPU configs (DDP, FSDP)
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/sft_trl.py \
        --config examples/configs/sft_trl_builtin.yaml

The script lives in `vlbridge.scripts.sft_trl` (installed with the package); this file runs it as TRL's scripts run.
"""

from vlbridge.scripts.sft_trl import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
