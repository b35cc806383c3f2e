"""DPO with LoRA of a bridged VLM with TRL's `DPOTrainer`, on the built-in preference pairs against hallucination.

Each pair is an image, a question ("describe the image.", "what colour is the circle?", "what colour is the star?"),
a chosen answer that is true of the image and a rejected one with one thing wrong: a hallucinated colour, shape, size,
count or object, a wrong answer, a made-up answer about an absent object, or a denial of an object that is there
(`vlbridge.data.make_synthetic_preference`). LoRA adapters go on the language model only
(`language_model_lora_config`); the bridge and the projection train fully unless `--train_bridge false`; the vision
tower stays frozen. The reference model is the same model with its adapters disabled (no `ref_model`). The script
prints the held-out preference accuracy (pairs whose chosen answer the model finds more likely than the rejected one),
overall and per pair type, before and after, with how often greedy generation gives the chosen answer (DPO can
widen the margins while it breaks generation), then saves the adapter (`<output_dir>/adapter`, loads back with
`peft.PeftModel.from_pretrained`) and the merged model (`<output_dir>/merged`, a plain vlbridge checkpoint).

DPOConfig arguments that matter for a VLM: `max_length=None` (or a length that keeps every prompt whole: TRL cuts
from the end, and a cut into the image tokens fails), `precompute_ref_log_probs=False` (TRL refuses it for vision
data) and `truncation_mode="keep_start"` (TRL's default; "keep_end" is refused). `padding_free` is ignored by TRL 1.16.
TRL's defaults `bf16=True` and `gradient_checkpointing=True` work but only slow a tiny model down on CPU. The presets
add the chosen answers' NLL to the DPO loss (`loss_type: [sigmoid, sft]`, `loss_weights: [1.0, 1.0]`): without it,
DPO from the learning chain's SFT model lowered both log-probs until held-out VQA fell from 0.75 to 0.62.

Post-training needs a trained model: start from an SFT checkpoint. A freshly built tiny VLM (no `model_name_or_path`)
only smoke-tests the pipeline, as its untrained head cannot express a preference.

    # 1. supervised fine-tuning on the built-in chats (examples/sft_trl.py), then 2. DPO from that checkpoint
    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml
    python examples/dpo.py --config examples/configs/dpo_builtin.yaml

    # a short smoke run on a tiny VLM built in code; any preset value can be overridden on the command line
    python examples/dpo.py --config examples/configs/dpo_builtin.yaml --model_name_or_path none --max_steps 5

    # two CPU processes (gloo); examples/accelerate/ has the GPU configs
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/dpo.py \
        --config examples/configs/dpo_builtin.yaml

The script lives in `vlbridge.scripts.dpo` (installed with the package); this file runs it as TRL's scripts run.
"""

from vlbridge.scripts.dpo import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
