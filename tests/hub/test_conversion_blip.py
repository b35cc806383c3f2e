"""transformers' BLIP (v1) checkpoints (`BlipForImageTextRetrieval`, `BlipForConditionalGeneration`,
`BlipForQuestionAnswering`; tiny, random, perturbed, built and saved by transformers itself) convert into vlbridge's
BLIP MED models with matching ITM / ITC scores, logits and generated tokens."""

import logging

import pytest
import torch
from helpers import run_docstring_examples
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForVisualQuestionAnswering,
    AutoProcessor,
    AutoTokenizer,
    BertTokenizer,
    Blip2Config,
    Blip2ForImageTextRetrieval,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
)

from vlbridge import BlipMEDForImageTextPretraining, BlipMEDForQuestionAnswering
from vlbridge.conversion import CONVERTERS, convert_checkpoint
from vlbridge.conversion.blip import convert_blip_checkpoint


ATOL = 1e-4
# A BERT-like vocabulary: BLIP's tokenizer is bert-base-uncased plus [DEC] (the decoder start, `bos_token`) and [ENC].
WORDS = (
    "a an the picture photo of is are there what colour shape how many where red blue green square circle "
    "two one three yes no small large left right top bottom cat dog on sitting ?"
).split()
HF_CLASSES = {
    "BlipForImageTextRetrieval": BlipForImageTextRetrieval,
    "BlipForConditionalGeneration": BlipForConditionalGeneration,
    "BlipForQuestionAnswering": BlipForQuestionAnswering,
}


def make_tokenizer(directory) -> BertTokenizer:
    """A tiny BertTokenizer from a vocab file, with BLIP's `[DEC]` (as `bos_token`) and `[ENC]` added."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def perturb(model: torch.nn.Module) -> None:
    """Breaks the zero / one inits (biases, LayerNorms) and BLIP's 1e-10 vision init, so a wrong mapping shows."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)


def make_source(tmp_path, architecture: str, vision_width: int = 48, processing: str = "both"):
    """A transformers BLIP model of `architecture` saved under `tmp_path / architecture` with its tokenizer and image
    processor (`processing="both"`), its tokenizer alone (`"tokenizer"`) or neither (`"none"`); returns
    `(model, tokenizer, directory)`. VQA needs the vision width to equal the text width in transformers."""
    torch.manual_seed(0)
    directory = tmp_path / architecture
    tokenizer = make_tokenizer(tmp_path / "vocab")
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 40,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "label_smoothing": 0.1,
    }
    vision = {
        "hidden_size": vision_width,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    config = BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    source = HF_CLASSES[architecture](config)
    perturb(source)
    source.save_pretrained(directory)
    if processing == "both":
        BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(directory)
    elif processing == "tokenizer":
        tokenizer.save_pretrained(directory)
    return source.eval(), tokenizer, directory


def texts(tokenizer, batch: list[str]):
    encoded = tokenizer(batch, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def converted(tmp_path, architecture: str, **kwargs):
    """`(source, tokenizer, converted model reloaded by the Auto class, its folder)`."""
    source, tokenizer, directory = make_source(tmp_path, architecture, **kwargs)
    model, processor = convert_checkpoint(directory, tmp_path / "converted")  # dispatches on the architecture
    assert isinstance(processor, BlipProcessor)
    auto = AutoModelForVisualQuestionAnswering if architecture == "BlipForQuestionAnswering" else AutoModel
    reloaded = auto.from_pretrained(tmp_path / "converted").eval()
    assert type(reloaded) is type(model)
    return source, tokenizer, reloaded, tmp_path / "converted"


CAPTIONS = ["a picture of a red square", "two dogs sitting on the left", "a cat"]
QUESTIONS = ["what colour is the square ?", "how many dogs are there ?", "is there a cat ?"]


def test_registered_with_the_dispatcher():
    assert {name for name, (module, _) in CONVERTERS.items() if module == "blip"} == set(HF_CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# BlipForImageTextRetrieval -> BlipMEDForImageTextPretraining (matcher)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def retrieval(tmp_path, single_thread):
    return converted(tmp_path, "BlipForImageTextRetrieval")


def test_retrieval_config_and_weights(retrieval):
    source, tokenizer, model, _ = retrieval
    assert type(model) is BlipMEDForImageTextPretraining
    config = model.config
    assert config.with_text_encoder and not config.with_text_decoder and not hasattr(model, "text_decoder")
    assert config.itg_weight == 0 and config.enc_token_id is None and not config.use_momentum_distillation
    assert config.decoder_start_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    assert config.eos_token_id == tokenizer.sep_token_id and config.embed_dim == 16
    expected = source.state_dict()
    for key, value in model.state_dict().items():
        if key != "temp":  # the only weight transformers' retrieval model lacks
            source_key = key.replace("vision_tower.", "vision_model.", 1)
            assert torch.equal(value, expected[source_key]), key
    assert model.temp.item() == pytest.approx(config.temperature_init)


def test_itm_matches_transformers(retrieval):
    source, tokenizer, model, _ = retrieval
    input_ids, attention_mask = texts(tokenizer, CAPTIONS)  # padded: the mask matters
    pixel_values = images(3)
    with torch.no_grad():
        expected = source(input_ids, pixel_values, use_itm_head=True, attention_mask=attention_mask).itm_score
        actual = model.compute_itm_logits(model.get_vision_features(pixel_values), input_ids, attention_mask)
    assert expected.shape == (3, 2)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def test_itc_matches_transformers(retrieval):
    source, tokenizer, model, _ = retrieval
    input_ids, attention_mask = texts(tokenizer, CAPTIONS)
    pixel_values = images(2)  # 2 images against 3 texts: a transposed similarity cannot pass
    with torch.no_grad():
        expected = source(input_ids, pixel_values, use_itm_head=False, attention_mask=attention_mask).itm_score
        image_feats = model.get_image_features(pixel_values)  # (2, 1, E)
        text_feats = model.get_text_features(input_ids, attention_mask)  # (3, E)
    assert expected.shape == (2, 3)
    torch.testing.assert_close(image_feats[:, 0] @ text_feats.t(), expected, atol=ATOL, rtol=ATOL)

    # The pretraining forward's ITC logits are the same cosines over the (fresh) temperature.
    pixel_values = images(3)
    with torch.no_grad():
        expected = source(input_ids, pixel_values, use_itm_head=False, attention_mask=attention_mask).itm_score
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=False)
    torch.testing.assert_close(out.logits_per_image * out.temperature, expected, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# BlipForConditionalGeneration -> BlipMEDForImageTextPretraining (captioner)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def captioner(tmp_path, single_thread):
    return converted(tmp_path, "BlipForConditionalGeneration")


def test_captioner_config(captioner):
    source, _, model, _ = captioner
    config = model.config
    assert not config.with_text_encoder and config.with_text_decoder and not hasattr(model, "text_encoder")
    assert config.itc_weight == 0 and config.itm_weight == 0 and config.label_smoothing == pytest.approx(0.1)
    assert model.supports_captioning and not model.supports_matching
    head = model.text_decoder.cls.predictions.decoder.weight
    assert head.data_ptr() == model.text_decoder.bert.embeddings.word_embeddings.weight.data_ptr()  # tied again
    assert torch.equal(head, source.text_decoder.cls.predictions.decoder.weight)


def test_caption_logits_match_transformers(captioner):
    source, tokenizer, model, _ = captioner
    input_ids, attention_mask = texts(tokenizer, CAPTIONS)
    pixel_values = images(3)
    with torch.no_grad():
        # transformers' forward reads the ids as given: give it the [DEC] start that vlbridge puts there (as its
        # `generate` and BLIP do).
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = tokenizer.bos_token_id
        expected = source(pixel_values, dec_ids, attention_mask=attention_mask).logits
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        actual = model.compute_itg_logits(model.get_vision_features(pixel_values), dec_ids, attention_mask)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.itg_logits, expected, atol=ATOL, rtol=ATOL)

    # Unpadded captions: the LM loss (label smoothing carried over) equals transformers'.
    input_ids, attention_mask = texts(tokenizer, ["a red square", "a blue circle"])
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = tokenizer.bos_token_id
    with torch.no_grad():
        expected = source(images(2), dec_ids, attention_mask=attention_mask, labels=dec_ids).loss
        actual = model(pixel_values=images(2), input_ids=input_ids, attention_mask=attention_mask).loss_itg
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_captions_match_transformers(captioner, num_beams):
    source, tokenizer, model, _ = captioner
    pixel_values = images(2)
    kwargs = dict(max_new_tokens=8, num_beams=num_beams)
    # Unconditional: transformers starts from [DEC] (and returns it); generate_captions returns what follows.
    expected = source.generate(pixel_values, **kwargs)
    actual = model.generate_captions(pixel_values, **kwargs)
    assert torch.equal(actual, expected[:, 1:])
    # With a text prompt: transformers takes "[CLS] a picture of [SEP]", puts [DEC] first and drops the [SEP].
    prompt_ids, prompt_mask = texts(tokenizer, ["a picture of", "a picture of"])
    expected = source.generate(pixel_values, input_ids=prompt_ids.clone(), attention_mask=prompt_mask, **kwargs)
    prompt = tokenizer("a picture of", add_special_tokens=False).input_ids
    actual = model.generate_captions(pixel_values, prompt_ids=prompt, **kwargs)
    assert bool((expected[:, 1 : 1 + len(prompt)] == torch.tensor(prompt)).all())
    assert torch.equal(actual, expected[:, 1 + len(prompt) :])


def test_captioning_through_the_saved_processor(captioner):
    """docs/released_weights.md's captioning lines, on the converted folder."""
    source, _, model, directory = captioner
    processor = AutoProcessor.from_pretrained(directory)
    image = (images(1)[0].permute(1, 2, 0).clamp(-1, 1) * 127 + 128).byte().numpy()
    pixel_values = processor(images=[image], return_tensors="pt").pixel_values
    prompt = processor.tokenizer("a picture of", add_special_tokens=False).input_ids
    captions = model.generate_captions(pixel_values, prompt_ids=prompt, max_new_tokens=6, num_beams=3)
    prompt_ids = processor(text=["a picture of"], return_tensors="pt").input_ids
    expected = source.generate(pixel_values, input_ids=prompt_ids, max_new_tokens=6, num_beams=3)
    assert torch.equal(captions, expected[:, 1 + len(prompt) :])


# ---------------------------------------------------------------------------------------------------------------------
# BlipForQuestionAnswering -> BlipMEDForQuestionAnswering
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def vqa(tmp_path, single_thread):
    return converted(tmp_path, "BlipForQuestionAnswering", vision_width=32)


def transformers_answer_logits(source, pixel_values, input_ids, attention_mask, answer_ids, answer_mask):
    """What `BlipForQuestionAnswering.forward` computes before its loss (it returns no logits)."""
    image_embeds = source.vision_model(pixel_values).last_hidden_state
    question = source.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    return source.text_decoder(
        input_ids=answer_ids,
        attention_mask=answer_mask,
        encoder_hidden_states=question,
        encoder_attention_mask=attention_mask,
    ).logits


def test_vqa_logits_and_loss_match_transformers(vqa):
    source, tokenizer, model, _ = vqa
    assert type(model) is BlipMEDForQuestionAnswering and model.config.enc_token_id is None
    input_ids, attention_mask = texts(tokenizer, ["what colour is the square ?", "how many dogs are there ?"])
    assert bool(attention_mask.all())  # questions of one length: see the padded case below
    answers, answer_mask = texts(tokenizer, ["red", "two dogs"])  # padded answers
    dec_answers = answers.clone()
    dec_answers[:, 0] = tokenizer.bos_token_id
    pixel_values = images(2)
    with torch.no_grad():
        expected = transformers_answer_logits(
            source, pixel_values, input_ids, attention_mask, dec_answers, answer_mask
        )
        actual = model(pixel_values, input_ids, attention_mask=attention_mask, labels=answers).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)

    # Unpadded answers starting with [DEC]: transformers' own forward loss (its labels are its decoder input).
    answers, _ = texts(tokenizer, ["red", "two"])
    answers[:, 0] = tokenizer.bos_token_id
    with torch.no_grad():
        expected = source(input_ids, pixel_values, attention_mask=attention_mask, labels=answers).loss
        actual = model(pixel_values, input_ids, attention_mask=attention_mask, labels=answers).loss
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def test_vqa_padded_questions_are_read_as_alone(vqa):
    """Padded questions: each row's logits are transformers' for that question asked alone. transformers' own padded
    batch differs, as its BLIP text cross-attention drops the question mask (the model docstring says why)."""
    source, tokenizer, model, _ = vqa
    input_ids, attention_mask = texts(tokenizer, QUESTIONS)
    assert not bool(attention_mask.all())
    answers, answer_mask = texts(tokenizer, ["red", "two", "yes"])
    answers[:, 0] = tokenizer.bos_token_id
    pixel_values = images(3)
    with torch.no_grad():
        actual = model(pixel_values, input_ids, attention_mask=attention_mask, labels=answers).logits
        batched = transformers_answer_logits(source, pixel_values, input_ids, attention_mask, answers, answer_mask)
        for i, question in enumerate(QUESTIONS):
            alone_ids, alone_mask = texts(tokenizer, [question])
            expected = transformers_answer_logits(
                source, pixel_values[i : i + 1], alone_ids, alone_mask, answers[i : i + 1], answer_mask[i : i + 1]
            )
            torch.testing.assert_close(actual[i : i + 1], expected, atol=ATOL, rtol=ATOL)
    shortest = int(attention_mask.sum(-1).argmin())
    assert not torch.allclose(batched[shortest], actual[shortest], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 1},
        {"num_beams": 3},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 5, "temperature": 1.5},
    ],
    ids=["greedy", "beam", "beam-2-returned", "sampling"],
)
def test_vqa_answers_match_transformers(vqa, kwargs):
    source, tokenizer, model, _ = vqa
    # Questions of one length: transformers' generate attends to question padding, vlbridge does not (see below).
    input_ids, attention_mask = texts(tokenizer, ["what colour is the square ?", "how many dogs are there ?"])
    assert bool(attention_mask.all())
    pixel_values = images(2)
    torch.manual_seed(7)
    expected = source.generate(input_ids, pixel_values, attention_mask=attention_mask, max_new_tokens=8, **kwargs)
    torch.manual_seed(7)
    actual = model.generate(pixel_values, input_ids, attention_mask=attention_mask, max_new_tokens=8, **kwargs)
    assert torch.equal(actual, expected)


def test_vqa_padded_questions_answer_as_alone(vqa):
    """In a padded batch each question gets transformers' answer to that question asked alone (transformers' own
    batched generate reads the padding, so its answers depend on the batch)."""
    source, tokenizer, model, _ = vqa
    input_ids, attention_mask = texts(tokenizer, QUESTIONS)
    assert not bool(attention_mask.all())
    pixel_values = images(3)
    batched = model.generate(
        pixel_values, input_ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6
    )
    for i, question in enumerate(QUESTIONS):
        alone_ids, alone_mask = texts(tokenizer, [question])
        expected = source.generate(alone_ids, pixel_values[i : i + 1], max_new_tokens=6, min_new_tokens=6)
        assert torch.equal(batched[i : i + 1], expected)


def test_vqa_processor_round_trip(vqa):
    """The saved BlipProcessor feeds the converted model end to end, as transformers' VQA examples do."""
    source, tokenizer, model, directory = vqa
    processor = AutoProcessor.from_pretrained(directory)
    assert type(processor) is BlipProcessor
    assert AutoTokenizer.from_pretrained(directory).get_vocab() == tokenizer.get_vocab()
    assert AutoImageProcessor.from_pretrained(directory).size == {"height": 32, "width": 32}
    image = (images(1)[0].permute(1, 2, 0).clamp(-1, 1) * 127 + 128).byte().numpy()
    inputs = processor(images=[image], text=["what colour is the square ?"], return_tensors="pt")
    assert "token_type_ids" not in inputs
    expected = source.generate(**inputs, max_new_tokens=5)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5), expected)
    assert isinstance(processor.batch_decode(expected, skip_special_tokens=True)[0], str)


# ---------------------------------------------------------------------------------------------------------------------
# Every architecture: determinism, dtype, what the source lacks, bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", sorted(HF_CLASSES))
def test_conversion_is_deterministic_and_reports_fresh_weights(tmp_path, single_thread, caplog, architecture):
    _, _, directory = make_source(tmp_path, architecture, vision_width=32)
    with caplog.at_level(logging.INFO, logger="vlbridge.conversion.blip"):
        first, _ = convert_blip_checkpoint(directory)
    torch.manual_seed(123)  # the caller's RNG does not change what starts fresh
    second, _ = convert_blip_checkpoint(directory)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert not any(record.levelno >= logging.WARNING for record in caplog.records), messages
    if architecture != "BlipForQuestionAnswering":  # the pretraining model's ITC temperature
        assert "temp: the ITC temperature" in messages


def test_dtype(tmp_path, single_thread):
    _, _, directory = make_source(tmp_path, "BlipForImageTextRetrieval")
    model, _ = convert_blip_checkpoint(directory, dtype=torch.bfloat16)
    assert model.vision_tower.dtype == torch.bfloat16 and model.text_encoder.dtype == torch.bfloat16
    assert model.itm_head.weight.dtype == torch.float32 and model.temp.dtype == torch.float32  # kept fp32


@pytest.mark.parametrize("processing", ["none", "tokenizer"])
def test_missing_processing_files_warn(tmp_path, single_thread, caplog, processing):
    _, _, directory = make_source(tmp_path, "BlipForQuestionAnswering", vision_width=32, processing=processing)
    with caplog.at_level(logging.WARNING):
        model, processor = convert_blip_checkpoint(directory, tmp_path / "converted")
    assert processor is None
    missing = "tokenizer" if processing == "none" else "image processor"
    assert any(f"has no loadable {missing}" in record.getMessage() for record in caplog.records)
    assert type(AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path / "converted")) is type(model)
    if processing == "tokenizer":
        assert AutoTokenizer.from_pretrained(tmp_path / "converted").bos_token == "[DEC]"


def test_tokenizer_of_another_checkpoint(tmp_path, single_thread):
    _, tokenizer, directory = make_source(tmp_path, "BlipForConditionalGeneration", processing="none")
    tokenizer.add_tokens([f"extra{i}" for i in range(20)])
    tokenizer.save_pretrained(directory)
    with pytest.raises(ValueError, match="not the tokenizer this checkpoint was trained with"):
        convert_blip_checkpoint(directory)


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_weights_that_do_not_match_the_config(tmp_path, single_thread, change):
    _, _, directory = make_source(tmp_path, "BlipForImageTextRetrieval")
    weights = load_file(directory / "model.safetensors")
    key = "itm_head.bias"
    if change == "missing":
        del weights[key]
    else:
        weights[key] = torch.zeros(3)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_checkpoint(directory)


def test_rejects_other_architectures(tmp_path, single_thread):
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
        num_query_tokens=2,
    )
    Blip2ForImageTextRetrieval(config).save_pretrained(tmp_path / "blip2")
    with pytest.raises(ValueError, match="convert_blip_checkpoint takes BlipForImageTextRetrieval"):
        convert_blip_checkpoint(tmp_path / "blip2")
    # transformers' CLIP-style BlipModel has no ITM head nor decoder: the dispatcher refuses it, listing what converts.
    from transformers import BlipModel

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = BlipConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8})
    BlipModel(config).save_pretrained(tmp_path / "blip_model")
    with pytest.raises(ValueError, match="BlipForQuestionAnswering"):
        convert_checkpoint(tmp_path / "blip_model")


def test_cli_convert(tmp_path, single_thread, capsys):
    from vlbridge.cli import main

    _, _, directory = make_source(tmp_path, "BlipForQuestionAnswering", vision_width=32)
    assert main(["convert", str(directory), str(tmp_path / "out")]) == 0
    assert "BlipMEDForQuestionAnswering" in capsys.readouterr().out
    assert type(AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path / "out")) is BlipMEDForQuestionAnswering


def test_docstring_examples():
    run_docstring_examples("vlbridge.conversion.blip")
