"""Tests of `QFormerModel`: structure, masks, attention backends, checkpointing, dtypes, and parity with
transformers' BLIP-2 / InstructBLIP Q-Formers through `vlbridge.conversion`."""

import doctest

import pytest
import torch
from bridge_tester import BridgeTesterMixin
from tiny import bridge_config
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from vlbridge import QFormerConfig
from vlbridge.conversion import qformer as conversion_module
from vlbridge.conversion import qformer_config_from_blip2, qformer_state_dict_from_blip2
from vlbridge.modeling import modeling_qformer
from vlbridge.modeling.modeling_qformer import QFormerModel


ENCODER_WIDTH = 16  # image feature width, deliberately != hidden_size (32)
NUM_FEATURES = 7
MODES = ("bidirectional", "multimodal_causal", "unimodal")


def make_config(**overrides) -> QFormerConfig:
    return bridge_config("qformer", encoder_hidden_size=ENCODER_WIDTH, **overrides)


def make_model(seed: int = 0, **overrides) -> QFormerModel:
    torch.manual_seed(seed)
    model = QFormerModel(make_config(**overrides)).eval()
    with torch.no_grad():  # LayerNorm weights / biases are 1 / 0 at init; perturb them so every parameter matters
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def make_inputs(batch_size: int = 3, text_length: int = 5, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 90, (batch_size, text_length), generator=generator)
    attention_mask = torch.ones(batch_size, text_length, dtype=torch.long)
    attention_mask[1, -2:] = 0  # right padding
    attention_mask[2, :1] = 0  # left padding
    return {
        "image_embeds": torch.randn(batch_size, NUM_FEATURES, ENCODER_WIDTH, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


def perturb_params_(module: torch.nn.Module, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn_like(param))


class TestQFormerBridge(BridgeTesterMixin):
    """The contract of every bridge (bridge_tester.py), for a Q-Former with its text branch: the inputs carry padded
    text that attends with the queries (bidirectional), so the gradient check also covers the text embeddings and the
    text FFNs, and save / load compares the text positions too."""

    model_class = QFormerModel
    hidden_size, encoder_hidden_size = 32, ENCODER_WIDTH
    num_features, num_output_tokens, batch_size = NUM_FEATURES, 4, 3
    expected_parameters = (
        "query_tokens",
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "encoder.layer.0.crossattention.attention.key.weight",
        "encoder.layer.1.intermediate.dense.weight",  # text FFN
        "encoder.layer.1.intermediate_query.dense.weight",  # query FFN
    )

    def make_model(self) -> QFormerModel:
        return make_model()

    def make_inputs(self) -> dict:
        return make_inputs(batch_size=self.batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Config and structure
# ----------------------------------------------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    config = make_config(cross_attention_frequency=3, use_text_input=False)
    config.save_pretrained(tmp_path)
    loaded = QFormerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert (loaded.cross_attention_frequency, loaded.use_text_input, loaded.encoder_hidden_size) == (3, False, 16)


@pytest.mark.parametrize("frequency", [1, 2, 3])
def test_cross_attention_layers(frequency):
    model = QFormerModel(make_config(num_hidden_layers=6, cross_attention_frequency=frequency))
    expected = [i for i in range(6) if i % frequency == 0]
    assert [i for i, layer in enumerate(model.encoder.layer) if layer.has_cross_attention] == expected
    # encoder.layer.N.crossattention.*
    assert sorted({int(key.split(".")[2]) for key in model.state_dict() if ".crossattention." in key}) == expected
    # Cross-attention keys / values read the image features, whose width is encoder_hidden_size.
    assert model.encoder.layer[0].crossattention.attention.key.in_features == ENCODER_WIDTH


def test_text_branch_only_with_use_text_input():
    keys = QFormerModel(make_config(use_text_input=False)).state_dict().keys()
    assert not any(k.startswith("embeddings.word_embeddings") or ".intermediate." in k for k in keys)
    keys = QFormerModel(make_config()).state_dict().keys()
    assert "embeddings.word_embeddings.weight" in keys and "encoder.layer.0.intermediate.dense.weight" in keys


def test_query_tokens_init():
    model = QFormerModel(make_config(num_query_tokens=64, hidden_size=64, intermediate_size=64))
    assert model.query_tokens.shape == (1, 64, 64)
    assert abs(model.query_tokens.std().item() - model.config.initializer_range) < 0.003


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


def test_output_shapes():
    model = make_model()
    inputs = make_inputs()
    query_only = model(image_embeds=inputs["image_embeds"], output_hidden_states=True)
    assert query_only.image_tokens.shape == (3, 4, 32) and query_only.last_hidden_state.shape == (3, 4, 32)
    assert len(query_only.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(query_only.hidden_states[-1], query_only.last_hidden_state)

    out = model(**inputs)
    assert out.image_tokens.shape == (3, 4, 32) and out.last_hidden_state.shape == (3, 9, 32)
    assert torch.equal(out.image_tokens, out.last_hidden_state[:, :4])

    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_queries=False)
    assert out.image_tokens is None and out.last_hidden_state.shape == (3, 5, 32)

    query_embeds = torch.randn(3, 6, 32)  # override with a different number of queries
    assert model(image_embeds=inputs["image_embeds"], query_embeds=query_embeds).image_tokens.shape == (3, 6, 32)

    as_tuple = model(image_embeds=inputs["image_embeds"], return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], query_only.image_tokens)


def test_queries_have_no_position_embeddings():
    model = make_model()
    inputs = make_inputs()
    permutation = torch.tensor([2, 0, 3, 1])
    out = model(image_embeds=inputs["image_embeds"]).image_tokens
    with torch.no_grad():
        model.query_tokens.copy_(model.query_tokens[:, permutation])
    permuted = model(image_embeds=inputs["image_embeds"]).image_tokens
    torch.testing.assert_close(permuted, out[:, permutation], atol=1e-5, rtol=0)


def test_multimodal_causal_mask():
    model = make_model()
    inputs = make_inputs()
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][:, -1] = (inputs["input_ids"][:, -1] + 1) % 90 + 5
    rows = [0, 2]  # rows whose last text token is not padding
    base = model(**inputs, attention_mode="multimodal_causal").last_hidden_state[rows]
    after = model(**changed, attention_mode="multimodal_causal").last_hidden_state[rows]
    torch.testing.assert_close(after[:, :-1], base[:, :-1], atol=1e-6, rtol=0)  # queries and earlier text
    assert (after[:, -1] - base[:, -1]).abs().max() > 1e-3  # the token itself

    # The same change reaches the queries when attention is bidirectional.
    base = model(**inputs).image_tokens[rows]
    after = model(**changed).image_tokens[rows]
    assert (after - base).abs().max() > 1e-3


def test_multimodal_causal_text_sees_queries():
    model = make_model()
    inputs = make_inputs()
    base = model(**inputs, attention_mode="multimodal_causal").last_hidden_state[:, 4:]
    other_image = {**inputs, "image_embeds": inputs["image_embeds"] + 1.0}
    after = model(**other_image, attention_mode="multimodal_causal").last_hidden_state[:, 4:]
    assert (after - base).abs().max() > 1e-3


def test_unimodal_mask():
    model = make_model()
    inputs = make_inputs()
    text_only = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_queries=False)
    query_only = model(image_embeds=inputs["image_embeds"])
    out = model(**inputs, attention_mode="unimodal").last_hidden_state
    # Text never affects the queries, queries (and so the image) never affect the text.
    torch.testing.assert_close(out[:, :4], query_only.image_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 4:], text_only.last_hidden_state, atol=1e-5, rtol=0)
    other_image = {**inputs, "image_embeds": inputs["image_embeds"] + 1.0}
    torch.testing.assert_close(
        model(**other_image, attention_mode="unimodal").last_hidden_state[:, 4:], out[:, 4:], atol=1e-6, rtol=0
    )
    # Text attention inside the text block is bidirectional (causal=False): the last token reaches the first.
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][:, -1] = (inputs["input_ids"][:, -1] + 1) % 90 + 5
    after = model(**changed, attention_mode="unimodal").last_hidden_state
    torch.testing.assert_close(after[:, :4], out[:, :4], atol=1e-6, rtol=0)
    assert (after[0, 4] - out[0, 4]).abs().max() > 1e-3


def test_padding_is_masked():
    model = make_model()
    inputs = make_inputs()
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][1, -2:] = 7  # padded positions of row 1
    for mode in MODES:
        base = model(**inputs, attention_mode=mode).last_hidden_state[1, :-2]
        after = model(**changed, attention_mode=mode).last_hidden_state[1, :-2]
        torch.testing.assert_close(after, base, atol=1e-6, rtol=0)


def test_image_attention_mask_equals_dropping_features():
    model = make_model()
    inputs = make_inputs()
    mask = torch.ones(3, NUM_FEATURES, dtype=torch.long)
    mask[:, -3:] = 0
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        masked = model(image_embeds=inputs["image_embeds"], image_attention_mask=mask).image_tokens
        dropped = model(image_embeds=inputs["image_embeds"][:, :-3]).image_tokens
        torch.testing.assert_close(masked, dropped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_eager_and_sdpa_agree(mode):
    model = make_model()
    inputs = make_inputs()
    image_mask = torch.ones(3, NUM_FEATURES, dtype=torch.long)
    image_mask[0, -2:] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        outputs[implementation] = [
            model(**inputs, image_attention_mask=image_mask, attention_mode=mode).last_hidden_state,
            model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_queries=False,
                attention_mode=mode,
            ).last_hidden_state,
        ]
    # A left-padded token under a causal mask sees nothing at all: its (unused) output differs between backends
    # (uniform weights in eager, zeros in SDPA), so only real positions are compared.
    text_valid = inputs["attention_mask"].bool()
    full_valid = torch.cat([torch.ones(3, 4, dtype=torch.bool), text_valid], dim=1)
    for eager, sdpa, valid in zip(outputs["eager"], outputs["sdpa"], (full_valid, text_valid)):
        torch.testing.assert_close(sdpa[valid], eager[valid], atol=1e-5, rtol=0)


def test_output_attentions_eager_only():
    model = make_model()
    inputs = make_inputs()
    with pytest.raises(ValueError, match="eager"):
        model(**inputs, output_attentions=True)
    model.set_attn_implementation("eager")
    out = model(**inputs, attention_mode="multimodal_causal", output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 9, 9)
    assert len(out.cross_attentions) == 1 and out.cross_attentions[0].shape == (3, 4, 4, NUM_FEATURES)
    # UniLM mask: queries put no weight on text, text puts none on later text.
    weights = out.attentions[0]
    assert weights[:, :, :4, 4:].abs().max() == 0
    assert torch.triu(weights[:, :, 4:, 4:], diagonal=1).abs().max() == 0


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(use_reentrant):
    model = make_model()
    inputs = make_inputs()

    def gradients():
        model.zero_grad()
        image_embeds = inputs["image_embeds"].clone().requires_grad_()
        torch.manual_seed(0)  # same dropout masks in both runs
        out = model(**{**inputs, "image_embeds": image_embeds}, attention_mode="multimodal_causal")
        (out.last_hidden_state**2).sum().backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        return grads, image_embeds.grad

    model.train()
    reference, reference_image_grad = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    for layer in model.encoder.layer:
        assert layer.gradient_checkpointing
        original = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    checkpointed, checkpointed_image_grad = gradients()
    assert len(calls) == model.config.num_hidden_layers
    assert reference.keys() == checkpointed.keys() and "query_tokens" in reference
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(checkpointed_image_grad, reference_image_grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------------------------

HF_QFORMER_KWARGS = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    encoder_hidden_size=ENCODER_WIDTH,
    vocab_size=96,
    max_position_embeddings=64,
    cross_attention_frequency=2,
)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_parity_blip2(implementation):
    hf_config = Blip2QFormerConfig(**HF_QFORMER_KWARGS)
    hf_model = Blip2QFormerModel(hf_config).eval()
    perturb_params_(hf_model)
    query_tokens = torch.randn(1, 4, 32)

    config = qformer_config_from_blip2(hf_config, num_query_tokens=4, use_text_input=False)
    model = QFormerModel(config).eval()
    result = model.load_state_dict(
        qformer_state_dict_from_blip2(hf_model.state_dict(), prefix="", query_tokens=query_tokens)
    )
    assert not result.missing_keys and not result.unexpected_keys
    hf_model.set_attn_implementation(implementation)
    model.set_attn_implementation(implementation)

    image_embeds = torch.randn(2, NUM_FEATURES, ENCODER_WIDTH)
    image_mask = torch.ones(2, NUM_FEATURES, dtype=torch.long)
    image_mask[1, -3:] = 0
    with torch.no_grad():
        for mask in (None, image_mask):
            expected = hf_model(
                query_embeds=query_tokens.expand(2, -1, -1),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=mask,
            ).last_hidden_state
            ours = model(image_embeds=image_embeds, image_attention_mask=mask).image_tokens
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_parity_blip2_full_state_dict_and_text_embeddings():
    """A `Blip2ForImageTextRetrieval`-like layout: Q-Former with text FFNs, text embeddings outside it."""
    hf_config = Blip2QFormerConfig(**HF_QFORMER_KWARGS, use_qformer_text_input=True)
    hf_model = Blip2QFormerModel(hf_config).eval()
    hf_embeddings = Blip2TextEmbeddings(hf_config).eval()
    perturb_params_(hf_model)
    perturb_params_(hf_embeddings, seed=1)
    query_tokens = torch.randn(1, 4, 32)
    state_dict = {"query_tokens": query_tokens, "vision_model.post_layernorm.weight": torch.ones(8)}
    state_dict |= {f"qformer.{k}": v for k, v in hf_model.state_dict().items()}
    state_dict |= {f"embeddings.{k}": v for k, v in hf_embeddings.state_dict().items()}

    model = QFormerModel(qformer_config_from_blip2(hf_config, num_query_tokens=4, use_text_input=True)).eval()
    converted = qformer_state_dict_from_blip2(state_dict, text_embeddings_prefix="embeddings.")
    result = model.load_state_dict(converted)
    assert not result.missing_keys and not result.unexpected_keys

    inputs = make_inputs(batch_size=3)
    full_mask = torch.cat([torch.ones(3, 4, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        embeds = hf_embeddings(input_ids=inputs["input_ids"], query_embeds=query_tokens.expand(3, -1, -1))
        expected = hf_model(
            query_embeds=embeds,
            query_length=4,
            attention_mask=full_mask,
            encoder_hidden_states=inputs["image_embeds"],
        ).last_hidden_state
        ours = model(**inputs).last_hidden_state
    valid = full_mask.bool()  # padded positions are not compared: their values carry no meaning
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_parity_instructblip(implementation):
    hf_config = InstructBlipQFormerConfig(**HF_QFORMER_KWARGS)
    hf_model = InstructBlipQFormerModel(hf_config).eval()
    perturb_params_(hf_model)
    query_tokens = torch.randn(1, 4, 32)
    state_dict = {"query_tokens": query_tokens, **{f"qformer.{k}": v for k, v in hf_model.state_dict().items()}}

    model = QFormerModel(qformer_config_from_blip2(hf_config, num_query_tokens=4, use_text_input=True)).eval()
    result = model.load_state_dict(qformer_state_dict_from_blip2(state_dict))
    assert not result.missing_keys and not result.unexpected_keys
    hf_model.set_attn_implementation(implementation)
    model.set_attn_implementation(implementation)

    inputs = make_inputs(batch_size=3)
    full_mask = torch.cat([torch.ones(3, 4, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        expected = hf_model(
            input_ids=inputs["input_ids"],
            attention_mask=full_mask,
            query_embeds=query_tokens.expand(3, -1, -1),
            encoder_hidden_states=inputs["image_embeds"],
        ).last_hidden_state
        ours = model(**inputs).last_hidden_state
    valid = full_mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=0)


def test_conversion_rejects_unknown_keys_and_copies_config():
    hf_config = InstructBlipQFormerConfig(**HF_QFORMER_KWARGS)
    config = qformer_config_from_blip2(hf_config, num_query_tokens=4, use_text_input=True)
    assert (config.hidden_size, config.encoder_hidden_size, config.vocab_size, config.num_query_tokens) == (
        32,
        ENCODER_WIDTH,
        96,
        4,
    )
    state_dict = {"qformer.encoder.layer.0.attention.attention.query.weight": torch.zeros(1), "qformer.lm_head": 0}
    with pytest.raises(ValueError, match="not Q-Former weights"):
        qformer_state_dict_from_blip2(state_dict)


# ----------------------------------------------------------------------------------------------------------------
# Serialisation, dtypes, embeddings, errors
# ----------------------------------------------------------------------------------------------------------------


def test_load_in_bf16(tmp_path):
    make_model().save_pretrained(tmp_path)
    model = QFormerModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    out = model(**make_inputs())  # fp32 image features are cast to the Q-Former's dtype on entry
    assert out.last_hidden_state.dtype == torch.bfloat16 and torch.isfinite(out.last_hidden_state.float()).all()


def test_resize_token_embeddings():
    model = make_model()
    model.resize_token_embeddings(model.config.vocab_size + 1)  # stage 1 adds `[DEC]`
    assert model.get_input_embeddings().num_embeddings == 97 and model.config.vocab_size == 97
    inputs = make_inputs()
    inputs["input_ids"][:, 0] = 96
    assert model(**inputs).last_hidden_state.shape == (3, 9, 32)
    assert QFormerModel(make_config(use_text_input=False)).get_input_embeddings() is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long)), "use_text_input"),
        (dict(use_queries=False), "neither queries nor text"),
        (dict(attention_mode="causal"), "Unknown attention_mode"),
        (dict(image_embeds=None), "image_embeds are required"),
        (dict(image_embeds=torch.randn(1, 4, 8)), "encoder_hidden_size"),
        (dict(attention_mask=torch.ones(1, 3)), "without input_ids"),
    ],
)
def test_clear_errors(kwargs, message):
    model = QFormerModel(make_config(use_text_input=False))
    with pytest.raises(ValueError, match=message):
        model(**{"image_embeds": torch.randn(1, 4, ENCODER_WIDTH), **kwargs})


def test_text_only_pass_rejects_image():
    model = make_model()
    with pytest.raises(ValueError, match="text-only pass"):
        model(
            image_embeds=torch.randn(1, 4, ENCODER_WIDTH),
            input_ids=torch.ones(1, 3, dtype=torch.long),
            use_queries=False,
        )


@pytest.mark.parametrize("module", [modeling_qformer, conversion_module])
def test_docstring_examples_run(module):
    # The examples close with a markdown fence, which plain doctest would read as expected output.
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module):
        if test.docstring and ">>>" in test.docstring:
            text = "\n".join(line for line in test.docstring.splitlines() if line.strip() != "```")
            runner.run(parser.get_doctest(text, dict(test.globs), test.name, test.filename, test.lineno))
    assert runner.failures == 0 and runner.tries > 0
