"""BLIP-2 stage 1 (ITC + ITM + ITG) with the HF Trainer, on the built-in synthetic data or a local image-text set.

    # built-in data, the preset the figures in docs/results.md come from (about 10 minutes on 2 CPU cores)
    python examples/pretrain_qformer.py --config examples/configs/pretrain_qformer_builtin.yaml

    # a short smoke run; any preset value can be overridden on the command line
    python examples/pretrain_qformer.py --config examples/configs/pretrain_qformer_builtin.yaml --max_steps 20

    # a local folder of images with metadata.jsonl ({"file_name": ..., "text": ...} per line)
    python examples/pretrain_qformer.py --config examples/configs/pretrain_qformer_builtin.yaml \
        --dataset path/to/folder --output_dir outputs/my-stage1

    # two processes (gloo on CPU, NCCL on GPUs)
    torchrun --nproc_per_node 2 examples/pretrain_qformer.py --config examples/configs/pretrain_qformer_builtin.yaml

The recipe lives in `vlbridge.recipes.stage1` (installed with the package); this script is its thin wrapper.
"""

from vlbridge.recipes.stage1 import main


if __name__ == "__main__":
    main()
