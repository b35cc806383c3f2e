"""`extract_features` (LAVIS) on the stage-1 model, its agreement with the ITC / ITM paths, and the VLM's
`get_qformer_features`."""

import pytest
import torch
from helpers import run_docstring_examples
from tiny import IMAGE_ID, stage1_config, vlm_config

from vlbridge import BridgeVLMForConditionalGeneration, QFormerForImageTextPretraining


pytestmark = pytest.mark.usefixtures("single_thread")

BATCH, QUERIES, HIDDEN, EMBED, TEXT = 3, 4, 32, 16, 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QFormerForImageTextPretraining(stage1_config()).eval()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 90, (BATCH, TEXT), generator=generator)
    input_ids[:, 0] = 2  # BOS / [CLS]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 3:] = 0  # one padded caption
    return {
        "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=generator),
        "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
        "attention_mask": attention_mask,
    }


@torch.no_grad()
def test_each_mode_returns_its_features_in_lavis_shapes(model, batch):
    image = model.extract_features(batch["pixel_values"], mode="image")
    assert image.image_embeds.shape == (BATCH, QUERIES, HIDDEN)
    assert image.image_embeds_proj.shape == (BATCH, QUERIES, EMBED)
    torch.testing.assert_close(image.image_embeds_proj.norm(dim=-1), torch.ones(BATCH, QUERIES))
    assert image.text_embeds is None and image.multimodal_embeds is None

    text = model.extract_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mode="text")
    assert text.text_embeds.shape == (BATCH, TEXT, HIDDEN)
    assert text.text_embeds_proj.shape == (BATCH, EMBED)
    torch.testing.assert_close(text.text_embeds_proj.norm(dim=-1), torch.ones(BATCH))
    assert text.image_embeds is None and text.multimodal_embeds is None

    multimodal = model.extract_features(**batch, mode="multimodal")
    assert multimodal.multimodal_embeds.shape == (BATCH, QUERIES, HIDDEN)
    assert multimodal.image_embeds is None and multimodal.text_embeds_proj is None


@torch.no_grad()
def test_features_agree_with_get_features_and_the_training_forward(model, batch):
    image = model.extract_features(batch["pixel_values"], mode="image")
    text = model.extract_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mode="text")
    # The same numbers as get_image_features / get_text_features (one implementation)...
    torch.testing.assert_close(
        image.image_embeds_proj, model.get_image_features(batch["pixel_values"]), rtol=0, atol=0
    )
    torch.testing.assert_close(
        text.text_embeds_proj, model.get_text_features(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0
    )
    # ...and as the training forward's single unimodal pass, whose ITC logits they reproduce.
    out = model(**batch, return_loss=False)
    torch.testing.assert_close(image.image_embeds_proj, out.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text.text_embeds_proj, out.text_embeds, rtol=1e-5, atol=1e-5)
    # Text embeds start with [CLS]: its projection is the text feature.
    cls = torch.nn.functional.normalize(model.text_proj(text.text_embeds[:, 0]), dim=-1)
    torch.testing.assert_close(cls, text.text_embeds_proj)


@torch.no_grad()
def test_multimodal_embeds_are_what_the_itm_head_reads(model, batch):
    multimodal = model.extract_features(**batch).multimodal_embeds  # the default mode
    vision = model.get_vision_features(batch["pixel_values"])
    itm_logits = model.compute_itm_logits(vision, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(model.itm_head(multimodal).mean(dim=1), itm_logits)
    # The training ITM path scores its positive pairs with the same pass.
    loss, logits, labels = model._itm_on_pairs(
        vision, vision, batch["input_ids"], batch["attention_mask"], batch["input_ids"], batch["attention_mask"]
    )
    torch.testing.assert_close(logits[:BATCH], itm_logits)
    # Vision features can stand in for pixel values.
    from_embeds = model.extract_features(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_embeds=vision
    )
    torch.testing.assert_close(from_embeds.multimodal_embeds, multimodal)


def test_a_mode_without_its_inputs_says_what_to_pass(model, batch):
    with pytest.raises(ValueError, match="pixel_values"):
        model.extract_features(input_ids=batch["input_ids"], mode="image")
    with pytest.raises(ValueError, match="input_ids"):
        model.extract_features(batch["pixel_values"], mode="text")
    with pytest.raises(ValueError, match="input_ids"):
        model.extract_features(batch["pixel_values"], mode="multimodal")
    with pytest.raises(ValueError, match="pixel_values"):
        model.extract_features(input_ids=batch["input_ids"], mode="multimodal")
    with pytest.raises(ValueError, match="one of"):
        model.extract_features(batch["pixel_values"], mode="images")
    with pytest.raises(ValueError, match="repeat the images"):
        model.extract_features(batch["pixel_values"][:2], batch["input_ids"], mode="multimodal")


@torch.no_grad()
def test_vlm_qformer_features_are_the_bridge_outputs_before_the_projection():
    torch.manual_seed(0)
    vlm = BridgeVLMForConditionalGeneration(vlm_config()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    qformer_outputs = vlm.get_qformer_features(pixel_values)
    bridge = vlm.config.bridge_config
    assert qformer_outputs.image_tokens.shape == (2, bridge.num_query_tokens, bridge.hidden_size)
    projected = vlm.model.language_projection(qformer_outputs.image_tokens)
    torch.testing.assert_close(projected, vlm.get_image_features(pixel_values))
    # And these are the tokens the forward scatters into the <image> placeholders.
    input_ids = torch.tensor([[1] + [IMAGE_ID] * vlm.config.num_image_tokens + [7, 8]] * 2)
    out = vlm.model(input_ids=input_ids, pixel_values=pixel_values)
    torch.testing.assert_close(out.image_hidden_states, projected)


@pytest.mark.parametrize(
    "module", ["vlbridge.modeling.qformer_features", "vlbridge.modeling.modeling_qformer_zero_shot"]
)
def test_docstring_examples(module):
    run_docstring_examples(module)
