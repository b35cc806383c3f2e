"""transformers' BLIP-2 stage-1 (`Blip2ForImageTextRetrieval`), `Blip2Model` and `Blip2QFormerModel` checkpoints (tiny,
random, perturbed, made by transformers itself) convert into vlbridge models with matching outputs."""

import logging

import pytest
import torch
from helpers import BLIP2_QFORMER, BLIP2_VISION, NUM_QUERY, make_qformer_tokenizer, run_docstring_examples
from safetensors.torch import load_file, save_file
from tiny import text_config
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    BlipImageProcessor,
)

from vlbridge import BridgeProcessor, QFormerForImageTextPretraining
from vlbridge.conversion import convert_checkpoint
from vlbridge.conversion.blip2_retrieval import convert_blip2_qformer_checkpoint, convert_blip2_retrieval_checkpoint
from vlbridge.modeling.modeling_qformer import QFormerModel
from vlbridge.modeling.stage1_losses import query_text_similarity


ATOL = 1e-4
EMBED_DIM = 16


def perturb(model: torch.nn.Module) -> None:
    """Breaks the zero / one inits (query tokens, biases, LayerNorms) so that a wrong mapping cannot hide."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)


def make_retrieval_source(tmp_path, with_dec: bool = False, processing: str = "both"):
    """A `Blip2ForImageTextRetrieval` over a BERT-like tokenizer (with `[DEC]` in its vocabulary when `with_dec`),
    saved under `tmp_path / "retrieval"` with its tokenizer and image processor (`processing="both"`), its tokenizer
    alone (`"tokenizer"`) or neither (`"none"`); returns `(model, tokenizer, directory)`."""
    torch.manual_seed(0)
    tokenizer = make_qformer_tokenizer()
    if with_dec:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    qformer = {**BLIP2_QFORMER, "vocab_size": len(tokenizer), "use_qformer_text_input": True}
    config = Blip2Config(
        vision_config=BLIP2_VISION,
        qformer_config=qformer,
        num_query_tokens=NUM_QUERY,
        image_text_hidden_size=EMBED_DIM,
    )
    source = Blip2ForImageTextRetrieval(config)
    perturb(source)
    directory = tmp_path / "retrieval"
    source.save_pretrained(directory)
    if processing != "none":
        tokenizer.save_pretrained(directory)
    if processing == "both":
        BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return source.eval(), tokenizer, directory


def texts(tokenizer, batch: list[str]):
    encoded = tokenizer(batch, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


CAPTIONS = ["what colour is the circle", "a red square", "how many"]


@pytest.fixture
def retrieval(tmp_path, single_thread):
    source, tokenizer, directory = make_retrieval_source(tmp_path)
    model, processor = convert_checkpoint(directory, tmp_path / "converted")  # dispatches on the architecture
    assert type(model) is QFormerForImageTextPretraining and isinstance(processor, BridgeProcessor)
    return source, tokenizer, model, tmp_path / "converted"


def test_itm_matches_transformers(retrieval):
    source, tokenizer, model, _ = retrieval
    input_ids, attention_mask = texts(tokenizer, CAPTIONS)
    pixel_values = images(3)
    with torch.no_grad():
        expected = source(pixel_values, input_ids, attention_mask, use_image_text_matching_head=True)
        actual = model.compute_itm_logits(model.get_vision_features(pixel_values), input_ids, attention_mask)
    torch.testing.assert_close(actual, expected.logits_per_image, atol=ATOL, rtol=ATOL)


def test_itc_matches_transformers(retrieval):
    source, tokenizer, model, _ = retrieval
    input_ids, attention_mask = texts(tokenizer, CAPTIONS)
    pixel_values = images(2)  # 2 images against 3 texts: a transposed similarity cannot pass
    with torch.no_grad():
        expected = source(pixel_values, input_ids, attention_mask, use_image_text_matching_head=False)
        image_feats = model.get_image_features(pixel_values)  # (2, Q, E)
        text_feats = model.get_text_features(input_ids, attention_mask)  # (3, E)
    torch.testing.assert_close(image_feats, expected.image_embeds, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(text_feats, expected.text_embeds, atol=ATOL, rtol=ATOL)
    similarity = query_text_similarity(image_feats, text_feats)  # (2, 3): the best query's cosine
    assert expected.logits_per_image.shape == (2, 3)
    torch.testing.assert_close(similarity, expected.logits_per_image, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(similarity.t(), expected.logits_per_text, atol=ATOL, rtol=ATOL)

    # The stage-1 forward's single unimodal pass gives the same numbers, divided by its temperature.
    pixel_values = images(3)
    with torch.no_grad():
        expected = source(pixel_values, input_ids, attention_mask, use_image_text_matching_head=False)
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=False)
    torch.testing.assert_close(out.logits_per_image * out.temperature, expected.logits_per_image, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.logits_per_text * out.temperature, expected.logits_per_text, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.text_embeds, expected.text_embeds, atol=ATOL, rtol=ATOL)


def test_tokenizer_dec_and_itg_head(retrieval):
    source, tokenizer, model, _ = retrieval
    config = model.config
    source_vocab = source.config.qformer_config.vocab_size
    # [DEC] was missing: added after the source's vocabulary, one new row, the mean of the trained ones.
    assert config.decoder_start_token_id == source_vocab and config.qformer_config.vocab_size == source_vocab + 1
    words = model.qformer.embeddings.word_embeddings.weight
    assert torch.equal(words[:source_vocab], source.embeddings.word_embeddings.weight)
    torch.testing.assert_close(words[source_vocab], source.embeddings.word_embeddings.weight.mean(0))
    assert config.eos_token_id == tokenizer.sep_token_id and config.pad_token_id == tokenizer.pad_token_id
    # The ITG decoder is tied to the word embeddings (BERT); the transform starts fresh; ITG runs.
    assert model.lm_head.decoder.weight.data_ptr() == words.data_ptr()
    assert torch.equal(model.qformer.query_tokens, source.query_tokens)
    input_ids, attention_mask = texts(tokenizer, CAPTIONS)
    out = model(pixel_values=images(3), input_ids=input_ids, attention_mask=attention_mask, sampling_seed=0)
    assert torch.isfinite(out.loss) and out.itg_logits.shape[-1] == source_vocab + 1


def test_released_tokenizer_layout_keeps_vocabulary(tmp_path, single_thread):
    """`Salesforce/blip2-itm-vit-g`'s layout: BERT + [DEC] (inside the Q-Former's vocabulary), then the `<image>` that
    transformers' Blip2Processor added when saving (outside it)."""
    source, tokenizer, directory = make_retrieval_source(tmp_path, with_dec=True, processing="none")
    Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(directory)
    assert AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids("<image>") == len(tokenizer) - 1
    model, processor = convert_blip2_retrieval_checkpoint(directory)
    assert model.config.qformer_config.vocab_size == source.config.qformer_config.vocab_size
    assert model.config.decoder_start_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    assert torch.equal(model.qformer.embeddings.word_embeddings.weight, source.embeddings.word_embeddings.weight)
    assert isinstance(processor, BridgeProcessor) and processor.num_image_tokens == NUM_QUERY


def test_saved_folder_reloads_bit_exact(retrieval):
    _, tokenizer, model, directory = retrieval
    reloaded = AutoModel.from_pretrained(directory).eval()
    assert type(reloaded) is QFormerForImageTextPretraining
    expected_state, actual_state = model.state_dict(), reloaded.state_dict()
    assert sorted(actual_state) == sorted(expected_state)
    assert all(torch.equal(actual_state[k], expected_state[k]) for k in expected_state)
    assert reloaded.lm_head.decoder.weight.data_ptr() == reloaded.qformer.embeddings.word_embeddings.weight.data_ptr()

    saved_tokenizer = AutoTokenizer.from_pretrained(directory)
    assert saved_tokenizer.convert_tokens_to_ids("[DEC]") == reloaded.config.decoder_start_token_id
    image_processor = AutoImageProcessor.from_pretrained(directory)
    assert type(AutoProcessor.from_pretrained(directory)) is BridgeProcessor
    pixel_values = image_processor(images=[torch.zeros(3, 40, 40).numpy()], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    input_ids, attention_mask = texts(saved_tokenizer, CAPTIONS)
    assert torch.equal(input_ids, texts(tokenizer, CAPTIONS)[0])
    with torch.no_grad():
        vision = model.get_vision_features(images(3))
        expected = model.compute_itm_logits(vision, input_ids, attention_mask)
        actual = reloaded.compute_itm_logits(reloaded.get_vision_features(images(3)), input_ids, attention_mask)
        itg_expected = model.compute_itg_logits(vision, input_ids, attention_mask)
        itg_actual = reloaded.compute_itg_logits(vision, input_ids, attention_mask)
    assert torch.equal(actual, expected) and torch.equal(itg_actual, itg_expected)


def test_conversion_is_deterministic(tmp_path, single_thread):
    _, _, directory = make_retrieval_source(tmp_path)
    first, _ = convert_blip2_retrieval_checkpoint(directory)
    torch.manual_seed(123)  # the caller's RNG state does not change the fresh ITG transform
    second, _ = convert_blip2_retrieval_checkpoint(directory)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------------------
# Blip2Model / Blip2QFormerModel -> QFormerModel
# ---------------------------------------------------------------------------------------------------------------------


def test_blip2_model_qformer_matches_get_qformer_features(tmp_path, single_thread, caplog):
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=BLIP2_VISION,
        qformer_config=BLIP2_QFORMER,
        text_config=text_config("opt").to_dict(),
        num_query_tokens=NUM_QUERY,
    )
    source = Blip2Model(config)
    perturb(source)
    source.save_pretrained(tmp_path / "blip2")
    with caplog.at_level(logging.WARNING):
        model, processor = convert_checkpoint(tmp_path / "blip2", tmp_path / "qformer")
    assert processor is None and type(model) is QFormerModel
    assert any("language model are left out" in r.getMessage() for r in caplog.records)
    reloaded = AutoModel.from_pretrained(tmp_path / "qformer").eval()
    assert type(reloaded) is QFormerModel and reloaded.config.num_query_tokens == NUM_QUERY
    pixel_values = images(2)
    with torch.no_grad():
        expected = source.eval().get_qformer_features(pixel_values)  # (2, Q, H)
        vision = source.vision_model(pixel_values).last_hidden_state
        actual = reloaded(image_embeds=vision).image_tokens
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def test_bare_qformer_matches_transformers(tmp_path, single_thread, caplog):
    torch.manual_seed(0)
    hf_config = Blip2QFormerConfig(
        **{k: v for k, v in BLIP2_QFORMER.items() if k != "vocab_size"}, encoder_hidden_size=24
    )
    source = Blip2QFormerModel(hf_config)
    perturb(source)
    source.save_pretrained(tmp_path / "qformer")
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(1, NUM_QUERY, 32, generator=generator)
    image_embeds = torch.randn(2, 7, 24, generator=generator)
    with torch.no_grad():
        expected = source.eval()(query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=image_embeds)

    model, _ = convert_blip2_qformer_checkpoint(tmp_path / "qformer", query_tokens=queries)
    with torch.no_grad():
        torch.testing.assert_close(
            model(image_embeds=image_embeds).image_tokens, expected.last_hidden_state, atol=ATOL, rtol=ATOL
        )

    # Without queries: converted anyway (dispatcher), with seeded untrained queries and a warning; query_embeds= then
    # computes what transformers' Q-Former does.
    with caplog.at_level(logging.WARNING):
        model, _ = convert_checkpoint(tmp_path / "qformer")
    assert any("holds no query tokens" in r.getMessage() for r in caplog.records)
    assert model.config.num_query_tokens == 32 and model.query_tokens.std() > 0
    with torch.no_grad():
        actual = model(image_embeds=image_embeds, query_embeds=queries.expand(2, -1, -1)).image_tokens
    torch.testing.assert_close(actual, expected.last_hidden_state, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_weights_that_do_not_match_the_config(tmp_path, single_thread, change):
    _, _, directory = make_retrieval_source(tmp_path)
    weights = load_file(directory / "model.safetensors")
    if change == "missing":
        del weights["itm_head.bias"]
        key = "itm_head.bias"
    elif change == "extra":
        weights["text_projection.extra"] = torch.zeros(3)
        key = "text_projection.extra"
    else:
        weights["vision_projection.weight"] = torch.zeros(EMBED_DIM + 1, 32)
        key = "vision_projection.weight"
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_checkpoint(directory)


@pytest.mark.parametrize("processing", ["none", "tokenizer"])
def test_missing_processing_files_warn(tmp_path, single_thread, caplog, processing):
    source, tokenizer, directory = make_retrieval_source(tmp_path, processing=processing)
    with caplog.at_level(logging.WARNING):
        model, processor = convert_blip2_retrieval_checkpoint(directory, tmp_path / "converted")
    assert processor is None
    missing = "tokenizer" if processing == "none" else "image processor"
    assert any(
        f"No processor converted: {directory} has no loadable {missing}" in r.getMessage() for r in caplog.records
    )
    assert type(AutoModel.from_pretrained(tmp_path / "converted")) is QFormerForImageTextPretraining
    if processing == "none":  # no [DEC] to find: ITG waits for the ids
        assert model.config.decoder_start_token_id is None
        assert model.config.qformer_config.vocab_size == source.config.qformer_config.vocab_size
    else:  # the tokenizer still sets the ids, and is saved beside the model
        saved = AutoTokenizer.from_pretrained(tmp_path / "converted")
        assert saved.convert_tokens_to_ids("[DEC]") == model.config.decoder_start_token_id == len(tokenizer)


def test_tokenizer_of_another_checkpoint(tmp_path, single_thread):
    _, _, directory = make_retrieval_source(tmp_path)
    big = make_qformer_tokenizer()
    big.add_tokens([f"extra{i}" for i in range(200)])
    big.save_pretrained(directory)
    with pytest.raises(ValueError, match="not the tokenizer this checkpoint was trained with"):
        convert_blip2_retrieval_checkpoint(directory)


def test_rejects_other_architectures(tmp_path, single_thread):
    _, _, directory = make_retrieval_source(tmp_path)
    with pytest.raises(ValueError, match="convert_blip2_qformer_checkpoint takes"):
        convert_blip2_qformer_checkpoint(directory)
    config = Blip2Config(vision_config=BLIP2_VISION, qformer_config=BLIP2_QFORMER, num_query_tokens=NUM_QUERY)
    Blip2ForImageTextRetrieval(config).save_pretrained(tmp_path / "no_text")  # use_qformer_text_input=False
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        convert_blip2_retrieval_checkpoint(tmp_path / "no_text")


def test_docstring_examples():
    run_docstring_examples("vlbridge.conversion.blip2_retrieval")


def test_stage1_training_continues_from_a_converted_checkpoint(retrieval, tmp_path):
    # BLIP-2's released stage-1 weights, converted, are where `vlbridge stage1 --model_name_or_path` starts.
    from vlbridge.cli import main

    _, _, model, converted = retrieval
    output = tmp_path / "continued"
    argv = ["stage1", "--model_name_or_path", str(converted), "--output_dir", str(output), "--max_steps", "2"]
    argv += ["--num_train_images", "16", "--num_eval_images", "4", "--k_test", "2", "--image_size", "32"]
    assert main([*argv, "--logging_steps", "1", "--disable_tqdm", "true"]) == 0
    continued = AutoModel.from_pretrained(output)
    assert type(continued) is QFormerForImageTextPretraining
    before, after = model.state_dict(), continued.state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["itm_head.weight"], after["itm_head.weight"])  # it trained
    # The converted model keeps BLIP-2's frozen vision tower, also after loading.
    assert continued.config.freeze_vision_tower
    assert all(torch.equal(before[key], after[key]) for key in before if key.startswith("vision_tower."))


def test_zero_shot_pipeline_on_a_converted_checkpoint(retrieval):
    # BLIP-2's released stage-1 weights, converted, classify through transformers' own pipeline; the labels rank as
    # transformers' ITC similarities rank them.
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    source, tokenizer, _, converted = retrieval
    image = Image.fromarray((images(1)[0].permute(1, 2, 0).clamp(-1, 1) * 127 + 128).byte().numpy())
    classifier = pipeline("zero-shot-image-classification", model=str(converted))
    ranked = classifier(image, candidate_labels=CAPTIONS, hypothesis_template="{}")
    pixel_values = AutoImageProcessor.from_pretrained(converted)(images=[image], return_tensors="pt")["pixel_values"]
    input_ids, attention_mask = texts(tokenizer, CAPTIONS)
    with torch.no_grad():
        cosine = source(pixel_values, input_ids, attention_mask, use_image_text_matching_head=False).logits_per_image
    expected = sorted(CAPTIONS, key=lambda caption: -cosine[0, CAPTIONS.index(caption)].item())
    assert [result["label"] for result in ranked] == expected
    assert sum(result["score"] for result in ranked) == pytest.approx(1.0, abs=1e-5)
