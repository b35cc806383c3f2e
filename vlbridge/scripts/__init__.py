"""
The training scripts behind the `vlbridge` command and `examples/`, one module per method, in the shape of TRL's
`trl/scripts/`: each has its argument dataclasses, `make_parser()` and `main(script_args, training_args, model_args)`,
runs as `python -m vlbridge.scripts.<name>`, and has a default preset in `vlbridge/scripts/presets/`
(`vlbridge.scripts.utils.run_script(name, argv)` parses and runs one).

| module | method | `vlbridge` command | default preset |
| --- | --- | --- | --- |
| `stage1` | BLIP-2 stage 1: ITC + ITM + ITG with `Stage1Trainer` | `vlbridge stage1` | `stage1_builtin` |
| `stage2` | BLIP-2 stage 2: captions, frozen LM | `vlbridge stage2` | `stage2_builtin` |
| `sft` | SFT with the HF `Trainer` and `ChatCollator` | `vlbridge sft` | `sft_builtin` |
| `sft_trl` | SFT with TRL's `SFTTrainer` | `vlbridge sft_trl` | `sft_trl_builtin` |
| `lora_sft` | safety LoRA SFT with TRL's `SFTTrainer` | `vlbridge lora_sft` | `lora_sft_builtin` |
| `dpo` | DPO with LoRA through TRL's `DPOTrainer` | `vlbridge dpo` | `dpo_builtin` |

`inference` holds what `vlbridge caption / retrieve / eval` run. `--config` takes a YAML path or a preset name
(`vlbridge.scripts.utils.resolve_preset`). Importing this package imports nothing; the script modules import torch.
"""
