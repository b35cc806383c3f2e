"""`vision_features` in place of `pixel_values`: what `get_vision_features` returns goes through forward,
`get_image_features` and `generate` (beam search, encoder-decoder, gated cross-attention) with the same results bit
for bit, and what does not fit is refused naming the fix."""

import pytest
import torch
from tiny import BOS_ID, IMAGE_ID, vlm_config

from vlbridge import BridgeVLMForConditionalGeneration


pytestmark = pytest.mark.usefixtures("single_thread")


def build(bridge: str = "qformer", text: str = "llama", **kwargs) -> BridgeVLMForConditionalGeneration:
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", bridge, text, **kwargs)).eval()
    model.freeze("stage2")
    return model


def inputs(model, num_images: int = 2) -> dict:
    tokens = [IMAGE_ID] * model.config.num_image_tokens
    rows = [[BOS_ID, *tokens, 7 + i, 8] for i in range(num_images)]
    pixel_values = torch.randn(num_images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"input_ids": torch.tensor(rows), "pixel_values": pixel_values}


@pytest.mark.parametrize(
    "bridge,text", [("qformer", "llama"), ("perceiver", "opt"), ("mlp", "llama"), ("qformer", "t5")]
)
def test_vision_features_give_the_pixels_results_bit_for_bit(bridge, text):
    model = build(bridge, text)
    batch = inputs(model)
    features = model.get_vision_features(batch["pixel_values"])  # (2, 17, 32): 16 patches + CLS
    assert tuple(features.shape) == (2, 17, 32)
    cached = {"input_ids": batch["input_ids"], "vision_features": features}
    with torch.no_grad():
        assert torch.equal(
            model(**batch, labels=batch["input_ids"]).loss, model(**cached, labels=batch["input_ids"]).loss
        )
        assert torch.equal(
            model.get_image_features(batch["pixel_values"]), model.get_image_features(vision_features=features)
        )
    options = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(**batch, **options), model.generate(**cached, **options))


def test_gated_cross_attention_reads_vision_features_as_it_reads_pixels():
    model = build(
        "perceiver",
        image_fusion="gated_cross_attention",
        cross_attention_every_n_layers=1,
        cross_attention_num_heads=2,
        cross_attention_head_dim=8,
    )
    with torch.no_grad():
        for block in model.model.gated_cross_attention.values():
            block.attention_gate.fill_(1.0)  # open: the images reach the text
    batch = inputs(model)
    cached = {"input_ids": batch["input_ids"], "vision_features": model.get_vision_features(batch["pixel_values"])}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**cached).logits)
    assert torch.equal(model.generate(**batch, max_new_tokens=3), model.generate(**cached, max_new_tokens=3))


def test_what_does_not_fit_is_refused_naming_the_fix():
    model = build()
    batch = inputs(model)
    features = model.get_vision_features(batch["pixel_values"])
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="exactly one of pixel_values and vision_features"):
        model(**batch, vision_features=features)
    with pytest.raises(ValueError, match=r"shape \(num_images, 17, 32\).*got \(2, 16, 32\)"):
        model(input_ids=ids, vision_features=features[:, 1:])
    with pytest.raises(TypeError, match="floating-point"):
        model(input_ids=ids, vision_features=features.long())
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids, vision_features=features[:1])
    with pytest.raises(ValueError, match="image_sizes goes with any-res vision_features"):
        model(input_ids=ids, vision_features=features, image_sizes=torch.tensor([[32, 32], [32, 32]]))
    model.freeze("full-finetune")
    with pytest.raises(ValueError, match="the vision tower trains.*Freeze the tower"):
        model(input_ids=ids, vision_features=features)


def test_anyres_vision_features_must_cover_every_real_tile():
    model = build("perceiver", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    sizes = torch.tensor([[30, 60], [64, 64]])  # 1 + 2 and 1 + 4 tiles
    features = torch.zeros(8, 17, 32)
    tokens = [IMAGE_ID] * model.config.num_image_tokens
    ids = torch.tensor([[BOS_ID, *tokens * 3, *[0] * 2 * len(tokens)], [BOS_ID, *tokens * 5]])
    with torch.no_grad():
        assert model(input_ids=ids, vision_features=features[:8], image_sizes=sizes).logits.shape[0] == 2
    with pytest.raises(ValueError, match=r"give 8 tiles \(\[3, 5\] per image\), but vision_features hold 7 rows"):
        model(input_ids=ids, vision_features=features[:7], image_sizes=sizes)
