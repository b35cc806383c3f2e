"""InstructBLIP mode for a BLIP-2 VLM: `add_qformer_instruction_input` gives a stage-2 / SFT model its Q-Former text
branch back from stage 1, keeping every weight the model learned."""

import pytest
import torch
from test_qformer_pretraining import make_batch, make_model, stage2_vlm

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.modeling import add_qformer_instruction_input, load_qformer_into_vlm


@pytest.fixture(scope="module")
def stage1():
    return make_model().eval()


@pytest.fixture(scope="module")
def trained_stage2(stage1):
    """A stage-2 VLM around the stage-1 Q-Former whose weights then moved, as stage-2 training moves them."""
    vlm = load_qformer_into_vlm(stage2_vlm(), stage1, include_vision_tower=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in vlm.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return vlm


def test_keeps_every_learned_weight_and_takes_the_text_branch_from_stage1(stage1, trained_stage2):
    instruct = add_qformer_instruction_input(trained_stage2, stage1)
    assert instruct.config.use_qformer_text_input and instruct.config.bridge_config.use_text_input
    assert not trained_stage2.config.use_qformer_text_input  # the source model is left as it was

    learned, new = trained_stage2.state_dict(), instruct.state_dict()
    for key, value in learned.items():
        assert torch.equal(new[key], value), key
    stage1_qformer = stage1.qformer.state_dict()
    text_branch = [key for key in new if key not in learned]
    assert any("word_embeddings" in key for key in text_branch)
    assert any(".intermediate." in key for key in text_branch)  # the text feed-forward blocks
    for key in text_branch:
        assert torch.equal(new[key], stage1_qformer[key.removeprefix("model.bridge.")]), key


def test_the_instruction_steers_the_image_tokens(stage1, trained_stage2, tmp_path):
    instruct = add_qformer_instruction_input(trained_stage2, stage1).eval()
    batch = make_batch()
    pixel_values, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        tokens = instruct.get_image_features(pixel_values, qformer_input_ids=ids, qformer_attention_mask=mask)
        other = instruct.get_image_features(
            pixel_values, qformer_input_ids=ids.flip(0), qformer_attention_mask=mask.flip(0)
        )
    assert not torch.allclose(tokens, other)  # a different instruction gives different image tokens
    with pytest.raises(ValueError, match="qformer_input_ids"):
        instruct.get_image_features(pixel_values)

    instruct.save_pretrained(tmp_path)
    reloaded = BridgeVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded.get_image_features(pixel_values, qformer_input_ids=ids, qformer_attention_mask=mask)
    torch.testing.assert_close(again, tokens)


def test_rejects_models_it_cannot_convert(stage1, trained_stage2):
    instruct = add_qformer_instruction_input(trained_stage2, stage1)
    with pytest.raises(ValueError, match="already reads the instruction"):
        add_qformer_instruction_input(instruct, stage1)
    with pytest.raises(ValueError, match="num_query_tokens"):
        add_qformer_instruction_input(stage2_vlm(num_query_tokens=8), stage1)


def test_sft_example_turns_a_stage2_model_into_instructblip(tmp_path):
    """`--instruct_from_stage1`: SFT starts from a BLIP-2 stage-2 checkpoint with the stage-1 text branch and
    tokenizer, trains with the instruction in the Q-Former, scores held-out VQA, and saves an InstructBLIP model."""
    from helpers import save_tiny_stage1
    from script_loader import EXAMPLES, run_example
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    save_tiny_stage1(tmp_path / "stage1")
    stage2 = ["--config", str(EXAMPLES / "configs" / "stage2_builtin.yaml"), "--max_steps", "1"]
    stage2 += ["--from_stage1", str(tmp_path / "stage1"), "--output_dir", str(tmp_path / "stage2")]
    stage2 += ["--num_train_images", "4", "--num_eval_images", "0", "--lm_text_steps", "0", "--disable_tqdm", "true"]
    run_example("stage2", stage2)

    sft = ["--config", str(EXAMPLES / "configs" / "sft_builtin.yaml"), "--max_steps", "2", "--disable_tqdm", "true"]
    sft += ["--model_name_or_path", str(tmp_path / "stage2"), "--instruct_from_stage1", str(tmp_path / "stage1")]
    sft += ["--output_dir", str(tmp_path / "sft"), "--num_train_images", "8", "--per_device_train_batch_size", "4"]
    metrics = run_example("sft", [*sft, "--num_eval_images", "3"])
    assert 0.0 <= metrics["vqa_accuracy"] <= 1.0 and metrics["train_loss"] > 0, metrics

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "sft")
    processor = AutoProcessor.from_pretrained(tmp_path / "sft")
    assert model.config.use_qformer_text_input
    assert processor.qformer_tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "stage1").get_vocab()


def test_an_empty_instruct_from_stage1_turns_a_presets_value_off():
    from vlbridge.data import chat_vocabulary
    from vlbridge.scripts.utils import VLMModelArguments, load_model_and_processor

    model, processor = load_model_and_processor(VLMModelArguments(instruct_from_stage1=""), chat_vocabulary())
    assert not model.config.use_qformer_text_input and processor.qformer_tokenizer is None
