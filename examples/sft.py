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

The script lives in `vlbridge.scripts.sft` (installed with the package); this file runs it as TRL's scripts run.
"""

from vlbridge.scripts.sft import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
