"""
Checkpoints saved before the package was laid out in layers (tests/fixtures/saved_before_layers, written by vlbridge
0.1.0 at the commit before the move) still load, with the same weights and the same outputs: checkpoint keys,
`model_type`s, `auto_map` and the processor files stay readable across the move.
"""

import subprocess
import sys

import torch
from helpers import TESTS
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from vlbridge import BridgeProcessor, BridgeVLMForConditionalGeneration, QFormerForImageTextPretraining


FIXTURES = TESTS / "fixtures" / "saved_before_layers"


def test_a_vlm_saved_before_the_move_loads_and_gives_the_same_logits():
    model = AutoModelForImageTextToText.from_pretrained(FIXTURES / "vlm").eval()
    processor = AutoProcessor.from_pretrained(FIXTURES / "vlm")
    assert type(model) is BridgeVLMForConditionalGeneration and type(processor) is BridgeProcessor
    expected = load_file(FIXTURES / "vlm_expected.safetensors")
    with torch.no_grad():
        logits = model(
            input_ids=expected["input_ids"],
            attention_mask=expected["attention_mask"],
            pixel_values=expected["pixel_values"],
        ).logits  # (2, T, V)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    # The saved weights are the loaded ones, key for key.
    saved = load_file(FIXTURES / "vlm" / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in saved.items())


def test_a_stage1_model_saved_before_the_move_loads_with_every_weight():
    model = AutoModel.from_pretrained(FIXTURES / "stage1")
    assert type(model) is QFormerForImageTextPretraining
    saved = load_file(FIXTURES / "stage1" / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() <= state.keys()
    assert all(torch.equal(state[key], value) for key, value in saved.items())


def test_the_old_auto_map_loads_without_import_vlbridge():
    # The folder's vlbridge_auto.py re-exports the installed classes: it keeps working across the move.
    script = (
        "from transformers import AutoModelForImageTextToText\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(FIXTURES / 'vlm')!r}, trust_remote_code=True)\n"
        "print(type(model).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("BridgeVLMForConditionalGeneration")
