"""The model core stays closed: importing the models loads none of the training, evaluation or report code."""

import subprocess
import sys


def test_importing_the_models_loads_no_training_code():
    script = (
        "import sys, vlbridge.modeling, vlbridge.processing, vlbridge.configuration\n"
        "above = ('trainers', 'data', 'metrics', 'report', 'recipes', 'conversion', 'cli')\n"
        "print(sorted(m for m in sys.modules if m.startswith('vlbridge.') and m.split('.')[1] in above))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"the model core imported: {result.stdout.strip()}"


def test_the_lora_helper_still_imports_from_the_top_level():
    from vlbridge import language_model_lora_config
    from vlbridge.trainers.lora import language_model_lora_config as helper

    assert language_model_lora_config is helper
