"""Safety / helpfulness LoRA SFT of a bridged VLM with TRL's `SFTTrainer`, on built-in chats that answer questions
about the image and decline to describe objects it does not hold ("what colour is the star?" -> "there is no star in
the image."), from `vlbridge.data.make_synthetic_safety_chat`.

LoRA adapters go on the language model only (`language_model_lora_config`, the same helper as examples/dpo.py); the
bridge and the projection train fully unless `--train_bridge false`; the vision tower stays frozen. The script prints
the held-out preference accuracy on refusal, present-object and question pairs (`make_synthetic_preference`; the
present-object pairs catch a model that refuses everything) before and after, and
saves the adapter (`<output_dir>/adapter`) and the merged model (`<output_dir>/merged`). It takes the SFT preset's
arguments (see examples/sft_trl.py for why `assistant_only_loss=True` and `max_length=None`) and adds `--refusal_rate`
and the LoRA arguments (LoRA wants a higher learning rate than full fine-tuning). Start from an SFT checkpoint: LoRA
cannot teach an untrained tiny model's head anything.

    python examples/sft_trl.py --config examples/configs/sft_trl_builtin.yaml
    python examples/lora_sft.py --config examples/configs/lora_sft_builtin.yaml

The script lives in `vlbridge.scripts.lora_sft` (installed with the package); this file runs it as TRL's scripts run.
"""

from vlbridge.scripts.lora_sft import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
