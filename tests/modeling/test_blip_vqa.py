"""BlipMEDForQuestionAnswering: BLIP's VQA model (a question encoder reading the image, an answer decoder reading the
encoded question)."""

import os

import pytest
import torch
from helpers import run_docstring_examples
from transformers import AutoModelForVisualQuestionAnswering

from vlbridge import BlipMEDConfig, BlipMEDForQuestionAnswering


PAD, CLS, SEP, DEC, ENC = 0, 2, 3, 38, 39
VOCAB = 40


def vqa_config(**overrides) -> BlipMEDConfig:
    """A tiny VQA config; the vision width (48) differs from the text width (32), as BLIP-large's do."""
    options = dict(
        vision_config={
            "model_type": "blip_vision_model",
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "initializer_range": 0.02,  # BlipVisionConfig's 1e-10 is meant for loading weights, not training
        },
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "bos_token_id": DEC,
            "sep_token_id": SEP,
            "pad_token_id": PAD,
        },
        share_encoder_decoder=False,
        use_momentum_distillation=False,
        decoder_start_token_id=DEC,
        enc_token_id=None,
        pad_token_id=PAD,
        eos_token_id=SEP,
    )
    return BlipMEDConfig(**{**options, **overrides})


def make_model(seed: int = 0, **overrides) -> BlipMEDForQuestionAnswering:
    torch.manual_seed(seed)
    return BlipMEDForQuestionAnswering(vqa_config(**overrides)).eval()


def batch(seed: int = 1):
    """Three questions, the last two padded, and their answers (padded with -100)."""
    g = torch.Generator().manual_seed(seed)
    questions = torch.tensor([[CLS, 10, 11, 12, 13, SEP], [CLS, 14, 15, SEP, PAD, PAD], [CLS, 16, SEP, PAD, PAD, PAD]])
    answers = torch.tensor([[CLS, 20, 21, SEP], [CLS, 22, SEP, -100], [CLS, 23, SEP, -100]])
    return torch.randn(3, 3, 32, 32, generator=g), questions, (questions != PAD).long(), answers


def test_docstring_examples():
    run_docstring_examples("vlbridge.modeling.modeling_blip_vqa")


def test_refuses_configs_it_cannot_honour():
    with pytest.raises(ValueError, match="share_encoder_decoder=False, use_momentum_distillation=False"):
        BlipMEDForQuestionAnswering(vqa_config(share_encoder_decoder=True))
    with pytest.raises(ValueError, match="'use_momentum_distillation': True"):
        BlipMEDForQuestionAnswering(vqa_config(use_momentum_distillation=True))


def test_answer_decoder_reads_the_question_at_text_width():
    model = make_model()
    cross = model.text_decoder.bert.encoder.layer[0].crossattention.self.key
    assert cross.in_features == 32  # the question encoder's width, not the vision tower's 48
    assert model.text_encoder.encoder.layer[0].crossattention.self.key.in_features == 48
    head = model.text_decoder.cls.predictions.decoder.weight
    assert head.data_ptr() == model.text_decoder.bert.embeddings.word_embeddings.weight.data_ptr()
    assert model.get_input_embeddings() is model.text_encoder.get_input_embeddings()


def test_loss_is_the_answer_tokens_cross_entropy():
    model = make_model(label_smoothing=0.1)
    pixel_values, questions, mask, answers = batch()
    out = model(pixel_values, questions, attention_mask=mask, labels=answers)
    assert out.logits.shape == (3, 4, VOCAB) and out.question_embeds.shape == (3, 6, 32)
    targets = answers[:, 1:]
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=0.1
    )
    torch.testing.assert_close(out.loss, expected)
    # Padding given as the pad id is masked as -100 is; the first label is [DEC] to the decoder whatever it is.
    padded = answers.masked_fill(answers == -100, PAD)
    padded[:, 0] = DEC
    again = model(pixel_values, questions, attention_mask=mask, labels=padded)
    torch.testing.assert_close(again.loss, out.loss)
    torch.testing.assert_close(again.logits, out.logits)
    # With num_items_in_batch (the Trainer's count over the accumulation window) the loss is the sum over it.
    count = int((targets != -100).sum())
    summed = model(pixel_values, questions, attention_mask=mask, labels=answers, num_items_in_batch=2 * count)
    torch.testing.assert_close(summed.loss * 2, out.loss)
    assert model.loss_type == "ForCausalLM"  # the Trainer counts `labels[..., 1:]`


def test_padding_changes_nothing():
    """A question and answer give the same logits alone and in a padded batch (neither tower reads padding)."""
    model = make_model()
    pixel_values, questions, mask, answers = batch()
    with torch.no_grad():
        batched = model(pixel_values, questions, attention_mask=mask, labels=answers).logits
        for i in (1, 2):
            length, answer_length = int(mask[i].sum()), int((answers[i] != -100).sum())
            alone = model(
                pixel_values[i : i + 1], questions[i : i + 1, :length], labels=answers[i : i + 1, :answer_length]
            )
            torch.testing.assert_close(alone.logits[0], batched[i, :answer_length], atol=1e-5, rtol=1e-5)


def test_enc_token_replaces_the_first_question_token():
    model = make_model(enc_token_id=ENC)
    pixel_values, questions, mask, answers = batch()
    other_first = questions.clone()
    other_first[:, 0] = 5
    with torch.no_grad():
        first = model(pixel_values, questions, attention_mask=mask, labels=answers).logits
        second = model(pixel_values, other_first, attention_mask=mask, labels=answers).logits
        as_enc = make_model()(pixel_values, questions.masked_fill(torch.arange(6) == 0, ENC), mask, answers).logits
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, as_enc)


def test_greedy_generate_is_the_argmax_of_forward():
    """generate (KV cache) writes, token by token, the argmax of the full forward's logits, padded batch included."""
    model = make_model(seed=3)
    pixel_values, questions, mask, _ = batch()
    generated = model.generate(pixel_values, questions, attention_mask=mask, max_new_tokens=5, min_new_tokens=5)
    assert generated.shape == (3, 6) and bool((generated[:, 0] == DEC).all())
    with torch.no_grad():
        logits = model(pixel_values, questions, attention_mask=mask, decoder_input_ids=generated).logits
    assert torch.equal(generated[:, 1:], logits[:, :-1].argmax(-1))
    no_cache = model.generate(
        pixel_values, questions, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, use_cache=False
    )
    assert torch.equal(no_cache, generated)


def test_generation_modes():
    model = make_model(seed=3)
    pixel_values, questions, mask, _ = batch()
    beams = model.generate(pixel_values, questions, attention_mask=mask, max_new_tokens=4, num_beams=3)
    assert beams.shape[0] == 3
    several = model.generate(
        pixel_values, questions, attention_mask=mask, max_new_tokens=4, num_beams=3, num_return_sequences=2
    )
    assert several.shape[0] == 6 and torch.equal(several[::2, : beams.shape[1]], beams[:, : several.shape[1]])
    torch.manual_seed(0)
    sampled = model.generate(pixel_values, questions, attention_mask=mask, max_new_tokens=4, do_sample=True, top_p=0.9)
    torch.manual_seed(0)
    again = model.generate(pixel_values, questions, attention_mask=mask, max_new_tokens=4, do_sample=True, top_p=0.9)
    assert torch.equal(sampled, again)
    # The model's generation config (saved as generation_config.json) gives the defaults.
    model.generation_config.max_new_tokens = 2
    assert model.generate(pixel_values, questions, attention_mask=mask).shape[1] <= 3


def test_save_and_load(tmp_path):
    model = make_model(freeze_vision_tower=True)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path).eval()
    assert type(reloaded) is BlipMEDForQuestionAnswering
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    head = reloaded.text_decoder.cls.predictions.decoder.weight
    assert head.data_ptr() == reloaded.text_decoder.bert.embeddings.word_embeddings.weight.data_ptr()
    # The frozen vision tower stays frozen after loading, and in eval mode under train().
    assert not any(p.requires_grad for p in reloaded.vision_tower.parameters())
    reloaded.train()
    assert not reloaded.vision_tower.training and reloaded.text_encoder.training
    pixel_values, questions, mask, answers = batch()
    reloaded(pixel_values, questions, attention_mask=mask, labels=answers).loss.backward()
    assert reloaded.text_encoder.encoder.layer[0].crossattention.self.key.weight.grad is not None


def test_a_saved_vqa_folder_describes_itself_as_one(tmp_path):
    import json

    make_model().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    # AutoModel would build the pretraining model for this config: the folder points only at the VQA class.
    assert auto_map["AutoModelForVisualQuestionAnswering"].endswith("BlipMEDForQuestionAnswering")
    assert "AutoModel" not in auto_map and "AutoModelForPreTraining" not in auto_map
    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: visual-question-answering" in card and "question encoder" in card


def test_bad_input_is_refused():
    model = make_model()
    pixel_values, questions, mask, answers = batch()
    with pytest.raises(TypeError, match="never rescaled"):
        model(pixel_values.to(torch.uint8), questions, mask, answers)
    with pytest.raises(ValueError, match="one image per question"):
        model(pixel_values[:2], questions, mask, answers)
    with pytest.raises(ValueError, match="`generate` answers questions"):
        model(pixel_values, questions, mask)


# A tiny VQA model trained here on the built-in synthetic VQA data: one object per 24-px image, "is the ... small or
# large?" (the answer is in the image alone; the question says which two words to choose from). 800 steps of AdamW,
# 30-40 s on one busy core. Model seeds 0 / 1 / 2 reached held-out accuracy 0.95 / 0.88 / 0.90 against a majority
# prior of 0.52, the loss falling from about 2.8 to 0.02-0.05. Colour questions take several times longer, and with
# colour and size mixed some seeds had not found the image by 1200 steps (accuracy 0.22-0.94), hence one question
# type here. Opt-in like the other learning tests, as any seed-dependent result: VLBRIDGE_LEARNING_TESTS=1.
@pytest.mark.skipif(
    os.environ.get("VLBRIDGE_LEARNING_TESTS") != "1", reason="seed-dependent; set VLBRIDGE_LEARNING_TESTS=1"
)
def test_a_vqa_model_trained_here_answers_held_out_questions(single_thread):
    from collections import Counter

    from transformers import BlipImageProcessor

    from vlbridge.data import build_word_tokenizer, make_synthetic_vqa
    from vlbridge.data.synthetic_vqa import vqa_vocabulary

    data = make_synthetic_vqa(
        {"train": 400, "test": 60}, image_size=24, questions_per_image=1, max_objects=1, question_types=["size"]
    )
    tokenizer = build_word_tokenizer([*vqa_vocabulary(), "[DEC]"], image_token=False)  # "<s> question"
    image_processor = BlipImageProcessor(size={"height": 24, "width": 24})

    def encode(rows):
        pixel_values = image_processor(images=rows["image"], return_tensors="pt")["pixel_values"]
        questions = tokenizer(rows["question"], padding=True, return_tensors="pt")
        answers = [[tokenizer.bos_token_id, *tokenizer(a, add_special_tokens=False).input_ids] for a in rows["answer"]]
        labels = torch.tensor([answer + [tokenizer.eos_token_id] for answer in answers])  # one-word answers
        return pixel_values, questions.input_ids, questions.attention_mask, labels

    vision = {**vqa_config().vision_config.to_dict(), "image_size": 24, "hidden_size": 32}
    text = {**vqa_config().text_config.to_dict(), "vocab_size": len(tokenizer), "num_hidden_layers": 1}
    text.update(bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), sep_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = BlipMEDForQuestionAnswering(
        vqa_config(
            vision_config=vision,
            text_config=text,
            decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            label_smoothing=0.0,  # plain cross-entropy: the loss then says how much was learnt
        )
    ).train()
    pixel_values, questions, mask, labels = encode(data["train"][:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    generator, losses = torch.Generator().manual_seed(0), []
    for _ in range(800):
        rows = torch.randint(0, len(labels), (32,), generator=generator)
        loss = model(pixel_values[rows], questions[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())

    model.eval()
    pixel_values, questions, mask, _ = encode(data["test"][:])
    answers = model.generate(pixel_values, questions, attention_mask=mask, max_new_tokens=3)
    predicted = [
        answer.replace("[DEC]", "").strip() for answer in tokenizer.batch_decode(answers, skip_special_tokens=True)
    ]
    accuracy = sum(p == a for p, a in zip(predicted, data["test"]["answer"])) / len(predicted)
    majority = Counter(data["train"]["answer"]).most_common(1)[0][1] / data["train"].num_rows
    first, last = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    assert last < 0.1 * first, (first, last)  # answering from the text alone stays above 0.3
    assert accuracy >= majority + 0.2, (accuracy, majority)
