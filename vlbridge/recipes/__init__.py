"""
The training recipes behind the `vlbridge` command and the scripts in `examples/`, one module per stage:

| module | stage | `vlbridge` command | preset |
| --- | --- | --- | --- |
| `stage1` | BLIP-2 stage 1: ITC + ITM + ITG with `Stage1Trainer` | `vlbridge pretrain` | `pretrain_qformer_builtin` |
| `stage2` | BLIP-2 stage 2: captions, frozen LM | `vlbridge train --stage stage2` | `pretrain_generative_builtin` |
| `sft` | SFT with the HF `Trainer` and `ChatCollator` | `vlbridge train --stage sft` | `sft_builtin` |
| `sft_trl` | SFT with TRL's `SFTTrainer` | `vlbridge train --stage sft-trl` | `sft_trl_builtin` |
| `lora_sft` | safety LoRA SFT with TRL's `SFTTrainer` | `vlbridge train --stage lora-sft` | `sft_trl_builtin` |
| `dpo` | DPO with LoRA through TRL's `DPOTrainer` | `vlbridge dpo` | `dpo_builtin` |
| `demo` | all four stages, evaluation and a report | `vlbridge demo` | `demo` |

Each recipe module has its argument dataclasses, `build_parser()`, `run(argv) -> RecipeResult` and
`main(argv) -> dict` (the metrics). The YAML presets ship in `vlbridge/recipes/presets/`; `--config` takes a path or a
preset name. Importing this package imports no torch; the recipe modules do.
"""

from .common import PRESETS_DIR, RecipeResult, preset_names, resolve_preset


__all__ = ["PRESETS_DIR", "RecipeResult", "preset_names", "resolve_preset"]
