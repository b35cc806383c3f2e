"""Real LLaVA-1.5 checkpoints (tiny, random, made by transformers itself) convert exactly: same input_ids from the
processors, same logits, same greedy tokens, and the converted folder reloads bit for bit."""

import logging

import pytest
import torch
from safetensors.torch import load_file
from tiny import IMAGE_ID, PAD_ID, make_images, make_tokenizer, text_config, vision_config
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlbridge import BridgeProcessor, BridgeVLMForConditionalGeneration
from vlbridge.conversion import CONVERTERS, convert_checkpoint, source_architecture
from vlbridge.conversion.llava import convert_llava_checkpoint, llava_config_to_vlbridge, load_llava_weights


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
PROMPTS = ["user : <image> what colour is the circle ? assistant :", "user : <image> how many squares ? assistant :"]


def llava_config(strategy: str = "default", feature_layer=-2, **kwargs) -> LlavaConfig:
    return LlavaConfig(
        vision_config=vision_config("clip").to_dict(),  # 32 px, patch 8: 16 patches + CLS
        text_config=text_config("llama").to_dict(),
        image_token_index=IMAGE_ID,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        **kwargs,
    )


def make_llava(tmp_path, strategy="default", feature_layer=-2, with_processor=True, num_additional_image_tokens=1):
    """A seeded tiny LLaVA with perturbed weights (a wrong mapping cannot hide behind zero / one inits), saved with
    its processor under `tmp_path / "source"`; returns `(model, directory)`."""
    torch.manual_seed(0)
    source = LlavaForConditionalGeneration(llava_config(strategy, feature_layer))
    for param in source.parameters():
        param.data.add_(torch.randn_like(param) * 0.02)
    source_dir = tmp_path / "source"
    source.save_pretrained(source_dir)
    if with_processor:
        processor = LlavaProcessor(
            CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            make_tokenizer(padding_side="left"),
            patch_size=8,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=num_additional_image_tokens,  # 1: CLIP's CLS
            chat_template=CHAT_TEMPLATE,
        )
        processor.save_pretrained(source_dir)
    return source.eval(), source_dir


@pytest.mark.parametrize("strategy,feature_layer", [("default", -2), ("full", -1)])
def test_converted_llava_matches_transformers(tmp_path, strategy, feature_layer):
    source, source_dir = make_llava(tmp_path, strategy, feature_layer)
    model, processor = convert_llava_checkpoint(source_dir, tmp_path / "converted")
    assert model.model.language_projection is None and model.config.use_language_projection is False
    assert model.config.bridge_config.drop_cls_token is (strategy == "default")
    assert model.config.num_image_tokens == (16 if strategy == "default" else 17)

    # The processors make the same input_ids and pixel values, and the chat template carries over.
    source_processor = AutoProcessor.from_pretrained(source_dir)
    images = make_images(2, seed=3)
    expected_inputs = source_processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    inputs = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
    assert torch.equal(inputs["attention_mask"], expected_inputs["attention_mask"])
    assert torch.equal(inputs["pixel_values"], expected_inputs["pixel_values"])
    assert int((inputs["input_ids"][0] == IMAGE_ID).sum()) == model.config.num_image_tokens
    assert processor.chat_template == CHAT_TEMPLATE

    with torch.no_grad():
        expected = source(**inputs)
        actual = model(**inputs)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)

    # LLaVA does not suppress <image> while generating, vlbridge does: suppress it on both sides.
    kwargs = dict(
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        num_beams=1,
        pad_token_id=PAD_ID,
        suppress_tokens=[IMAGE_ID],
    )
    assert torch.equal(model.generate(**inputs, **kwargs), source.generate(**inputs, **kwargs))


def test_converted_llava_saves_and_reloads_bit_exact(tmp_path):
    _, source_dir = make_llava(tmp_path)
    model, _ = convert_llava_checkpoint(source_dir, tmp_path / "converted")
    saved = load_file(tmp_path / "converted" / "model.safetensors")
    assert not any("language_projection" in key for key in saved)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "converted").eval()
    assert type(reloaded) is BridgeVLMForConditionalGeneration and reloaded.model.language_projection is None
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert state.keys() == reloaded_state.keys()
    assert all(torch.equal(state[key], reloaded_state[key]) for key in state)
    processor = AutoProcessor.from_pretrained(tmp_path / "converted")
    assert type(processor) is BridgeProcessor and processor.num_image_tokens == 16
    assert processor.image_token_id == IMAGE_ID and processor.chat_template == CHAT_TEMPLATE


def test_convert_checkpoint_dispatches_to_llava(tmp_path):
    source, source_dir = make_llava(tmp_path)
    assert source_architecture(source_dir) == "LlavaForConditionalGeneration"
    assert CONVERTERS["LlavaForConditionalGeneration"] == ("llava", "convert_llava_checkpoint")
    model, processor = convert_checkpoint(source_dir)
    assert isinstance(processor, BridgeProcessor)
    assert torch.equal(model.model.bridge.linear_2.weight, source.model.multi_modal_projector.linear_2.weight)
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)


def test_refuses_a_list_of_vision_feature_layers(tmp_path):
    llava_config(feature_layer=[-2, -1]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"concatenates .* layers \[-2, -1\].*single vision_feature_layer"):
        convert_llava_checkpoint(tmp_path)


def test_refuses_a_vision_feature_layer_out_of_range(tmp_path):
    llava_config(feature_layer=-4).save_pretrained(tmp_path)  # 2 layers: hidden states -3 .. 2
    with pytest.raises(ValueError, match=r"out of range.*vision_feature_layer=-4.*from -3 to 2"):
        convert_llava_checkpoint(tmp_path)


def test_refuses_a_cls_drop_on_a_tower_without_cls():
    config = LlavaConfig(
        vision_config=vision_config("siglip").to_dict(),
        text_config=text_config("llama").to_dict(),
        image_token_index=4,
    )
    with pytest.raises(ValueError, match="no CLS token.*vision_feature_select_strategy='full'"):
        llava_config_to_vlbridge(config)


def test_refuses_other_checkpoints(tmp_path):
    from tiny import vlm_config

    BridgeVLMForConditionalGeneration(vlm_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="convert_llava_checkpoint takes 'llava'"):
        convert_llava_checkpoint(tmp_path)


def test_mismatched_weights_are_refused(tmp_path):
    source, _ = make_llava(tmp_path, with_processor=False)
    other = llava_config(strategy="full")
    other.text_config.intermediate_size = 48  # the language model's MLP differs from the source's
    with pytest.raises(ValueError, match=r"language model does not fit.*shapes .*mlp"):
        load_llava_weights(BridgeVLMForConditionalGeneration(llava_config_to_vlbridge(other)), source)
    from tiny import vlm_config

    with pytest.raises(ValueError, match="no language projection"):
        load_llava_weights(BridgeVLMForConditionalGeneration(vlm_config(bridge="mlp", text="llama")), source)


def test_a_missing_processor_warns(tmp_path, caplog):
    source, source_dir = make_llava(tmp_path, with_processor=False)
    with caplog.at_level(logging.WARNING):
        model, processor = convert_llava_checkpoint(source_dir)
    assert processor is None
    assert "No processor converted" in caplog.text
    expected = source.model.vision_tower.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.model.vision_tower.state_dict().items())


def test_a_source_processor_that_miscounts_warns(tmp_path, caplog):
    # Without num_additional_image_tokens, LLaVA's processor forgets the CLS and gives 15 tokens for 16 features.
    _, source_dir = make_llava(tmp_path, num_additional_image_tokens=0)
    with caplog.at_level(logging.WARNING):
        _, processor = convert_llava_checkpoint(source_dir)
    assert "expands <image> into 15 tokens, but the model gives 16" in caplog.text
    assert processor.num_image_tokens == 16
