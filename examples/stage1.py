"""BLIP-2 stage 1 (ITC + ITM + ITG) with the HF Trainer, on the built-in synthetic data or a local image-text set.

    # built-in data, the preset the figures in docs/results.md come from (about 10 minutes on 2 CPU cores)
    python examples/stage1.py --config examples/configs/stage1_builtin.yaml

    # a short smoke run; any preset value can be overridden on the command line
    python examples/stage1.py --config examples/configs/stage1_builtin.yaml --max_steps 20

    # a local folder of images with metadata.jsonl ({"file_name": ..., "text": ...} per line)
    python examples/stage1.py --config examples/configs/stage1_builtin.yaml \
        --dataset path/to/folder --output_dir outputs/my-stage1

    # two processes (gloo on CPU, NCCL on GPUs)
    torchrun --nproc_per_node 2 examples/stage1.py --config examples/configs/stage1_builtin.yaml

The script lives in `vlbridge.scripts.stage1` (installed with the package); this file runs it as TRL's scripts run.
"""

from vlbridge.scripts.stage1 import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
