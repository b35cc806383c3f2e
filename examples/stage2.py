"""BLIP-2 stage-2 generative pretraining: the bridge learns to caption images for a frozen language model.

    # built-in captions, a tiny VLM built in code (a few minutes on 2 CPU cores)
    python examples/stage2.py --config examples/configs/stage2_builtin.yaml

    # BLIP-2's hand-off: the VLM is built around the vision tower and Q-Former of a stage-1 run (image size and
    # normalisation come with it), then --lm_text_steps teaches the tiny LM the captions' language first
    python examples/stage2.py --config examples/configs/stage2_builtin.yaml \
        --from_stage1 outputs/stage1-builtin --lm_text_steps 300 --image_size 48 --max_objects 2

    # start the bridge from a stage-1 Q-Former saved by examples/stage1.py (its sizes must match the
    # VLM's bridge: build such a VLM, save it with its processor and pass it with --model_name_or_path)
    python examples/stage2.py --config examples/configs/stage2_builtin.yaml \
        --model_name_or_path outputs/my-vlm --stage1_checkpoint outputs/stage1-builtin

The script lives in `vlbridge.scripts.stage2` (installed with the package); this file runs it as TRL's scripts run.
"""

from vlbridge.scripts.stage2 import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
