"""BridgeProcessor: image-token expansion, Q-Former text, padding, chat template, save / load, and the input errors."""

import doctest

import pytest
import torch
from tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, make_images, make_tokenizer, vlm_config
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoProcessor, CLIPImageProcessor, PreTrainedTokenizerFast, SiglipImageProcessor

from vlbridge import BridgeVLMConfig
from vlbridge.processing import BridgeProcessor, default_chat_template, processing_bridge


# The package registers this on import; doing it here too keeps the AutoProcessor tests independent of that.
AutoProcessor.register(BridgeVLMConfig, BridgeProcessor, exist_ok=True)

N = 4  # image tokens per image in most tests
QFORMER_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "is", "the", "colour", "red", "circle", "describe"]


def clip_processor(size: int = 32):
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def siglip_processor(size: int = 32):
    return SiglipImageProcessor(size={"height": size, "width": size})


def make_qformer_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-like word-level tokenizer: [CLS] text [SEP], right padding."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(QFORMER_WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def make_processor(qformer: bool = False, num_image_tokens: int = N, image_processor=None, **kwargs):
    return BridgeProcessor(
        image_processor or siglip_processor(),
        kwargs.pop("tokenizer", None) or make_tokenizer(),
        qformer_tokenizer=make_qformer_tokenizer() if qformer else None,
        num_image_tokens=num_image_tokens,
        **kwargs,
    )


def image_runs(ids) -> list[int]:
    """Lengths of the runs of consecutive image tokens in one row."""
    runs, current = [], 0
    for token in list(ids) + [None]:
        if token == IMAGE_ID:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# Expansion and shapes
# ---------------------------------------------------------------------------------------------------------------------


def test_one_image_expands_to_exactly_num_image_tokens():
    processor = make_processor(num_image_tokens=5)
    out = processor(images=make_images(1), text="<image> what colour is the circle", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids[:7] == [BOS_ID] + [IMAGE_ID] * 5 + [processor.tokenizer.convert_tokens_to_ids("what")]
    assert image_runs(ids) == [5]
    assert ids == processor.tokenizer("<image>" * 5 + " what colour is the circle")["input_ids"]
    assert out["attention_mask"].tolist() == [[1] * len(ids)]


def test_several_images_in_one_sample_each_expand():
    processor = make_processor()
    out = processor(images=make_images(3), text="<image> left of <image> and <image>")
    assert image_runs(out["input_ids"][0]) == [N, N, N]
    assert sum(t == IMAGE_ID for t in out["input_ids"][0]) == 3 * N


@pytest.mark.parametrize("nested", [True, False])
def test_batch_with_different_image_counts_including_zero(nested):
    processor = make_processor()
    images = make_images(3)
    batched = [images[:1], images[1:], []] if nested else images
    texts = ["<image> what is the colour", "<image> and <image> describe", "a red circle"]
    out = processor(images=batched, text=texts, padding=True, return_tensors="pt")
    assert [image_runs(row) for row in out["input_ids"].tolist()] == [[N], [N, N], []]
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    # Images keep their order, sample after sample.
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], expected)


@pytest.mark.parametrize("make_image_processor", [clip_processor, siglip_processor], ids=["clip", "siglip"])
@pytest.mark.parametrize("size", [16, 32])
def test_pixel_values_from_clip_and_siglip_image_processors(make_image_processor, size):
    processor = make_processor(image_processor=make_image_processor(size))
    images = make_images(2, size=48)
    out = processor(images=images, text=["<image> red", "<image> blue"], padding=True, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, size, size)
    assert out["pixel_values"].dtype == torch.float32
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}


def test_text_only_and_images_only():
    processor = make_processor()
    out = processor(text=["a red circle", "two"], padding=True, return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert IMAGE_ID not in out["input_ids"]
    out = processor(images=make_images(2), return_tensors="pt")
    assert set(out.keys()) == {"pixel_values"} and out["pixel_values"].shape[0] == 2


def test_two_images_side_by_side_are_legit():
    processor = make_processor(num_image_tokens=3)
    out = processor(images=make_images(2), text="<image><image> what is the colour")
    assert image_runs(out["input_ids"][0]) == [6]  # two images of 3 tokens each, adjacent
    # As many placeholders in a row as the expansion length is legit when there are that many images.
    out = processor(images=make_images(3), text="<image><image><image> describe")
    assert sum(t == IMAGE_ID for t in out["input_ids"][0]) == 9


def test_tokenizer_without_image_token_gets_it_added():
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "red": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    assert not hasattr(tokenizer, "image_token")
    processor = BridgeProcessor(siglip_processor(), tokenizer, num_image_tokens=2)
    assert processor.image_token == "<image>" and processor.image_token_id == 3 and len(tokenizer) == 4
    assert processor(images=make_images(1), text="<image> red")["input_ids"] == [[3, 3, 2]]


def test_image_token_taken_from_tokenizer_string_attribute():
    tokenizer = make_tokenizer()
    assert isinstance(tokenizer.image_token, str)  # the attribute that breaks Blip2Processor
    processor = BridgeProcessor(siglip_processor(), tokenizer, num_image_tokens=2)
    assert (processor.image_token, processor.image_token_id, len(tokenizer)) == ("<image>", IMAGE_ID, len(tokenizer))


def test_processor_matches_model_config():
    config = vlm_config(bridge="qformer")
    processor = make_processor(num_image_tokens=config.num_image_tokens)
    assert processor.image_token_id == config.image_token_id
    out = processor(images=make_images(1), text="<image> red")
    assert sum(t == config.image_token_id for t in out["input_ids"][0]) == config.num_image_tokens


# ---------------------------------------------------------------------------------------------------------------------
# Q-Former text
# ---------------------------------------------------------------------------------------------------------------------


def test_qformer_outputs_are_text_without_placeholders():
    processor = make_processor(qformer=True)
    texts = ["<s><image> what is the colour", "<image> describe <image>"]
    out = processor(images=make_images(3), text=texts, padding=True, return_tensors="pt")
    assert set(out.keys()) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "qformer_input_ids",
        "qformer_attention_mask",
    }
    expected = make_qformer_tokenizer()(["what is the colour", "describe"], padding=True, return_tensors="pt")
    assert out["qformer_input_ids"].tolist() == expected["input_ids"].tolist()
    assert out["qformer_attention_mask"].tolist() == [[1] * 6, [1] * 3 + [0] * 3]
    assert processor.model_input_names == [
        "input_ids",
        "attention_mask",
        "pixel_values",
        "pixel_values_videos",
        "video_num_frames",
        "qformer_input_ids",
        "qformer_attention_mask",
    ]


def test_a_chat_rendered_by_the_default_template_gives_the_q_former_the_messages_words():
    """TRL's trainers and pipelines pass the rendered chat: its role headers must not reach the Q-Former, which
    `ChatCollator` trains on the user's message alone."""
    processor = make_processor(qformer=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "user: " in prompt and prompt.endswith("assistant: ")
    out = processor(images=make_images(1), text=[prompt], return_tensors="pt")
    expected = make_qformer_tokenizer()(["what is the colour"], return_tensors="pt")["input_ids"]
    assert out["qformer_input_ids"].tolist() == expected.tolist()
    assert processor.qformer_instructions(messages) == ["what is the colour"]  # what ChatCollator gives

    # Another template's words are the user's to keep: only the default template's headers are known.
    custom = make_processor(qformer=True, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert custom.qformer_text("user: what is the colour") == "user: what is the colour"


def test_no_qformer_keys_without_qformer_tokenizer():
    processor = make_processor()
    assert processor.qformer_tokenizer is None
    assert processor.model_input_names == [
        "input_ids",
        "attention_mask",
        "pixel_values",
        "pixel_values_videos",
        "video_num_frames",
    ]
    assert "qformer_input_ids" not in processor(images=make_images(1), text="<image> red")


# ---------------------------------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------------------------------


def test_padding_side_kwarg_and_tokenizer_setting():
    images, texts = make_images(2), ["<image> what is the colour of the circle", "<image> red"]
    right = make_processor()(images=images, text=texts, padding=True, return_tensors="pt")
    left = make_processor()(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    from_tokenizer = make_processor(tokenizer=make_tokenizer(padding_side="left"))(
        images=images, text=texts, padding=True, return_tensors="pt"
    )
    short_right, short_left = right["input_ids"][1].tolist(), left["input_ids"][1].tolist()
    pads = len(short_right) - (N + 2)
    assert pads > 0
    assert short_right[-pads:] == [PAD_ID] * pads and short_right[0] == BOS_ID
    assert short_left[:pads] == [PAD_ID] * pads and short_left[pads] == BOS_ID
    assert left["attention_mask"][1].tolist() == [0] * pads + [1] * (N + 2)
    assert image_runs(short_left) == image_runs(short_right) == [N]
    assert torch.equal(from_tokenizer["input_ids"], left["input_ids"])
    # An explicit kwarg wins over the tokenizer's setting.
    back_right = make_processor(tokenizer=make_tokenizer(padding_side="left"))(
        images=images, text=texts, padding=True, padding_side="right", return_tensors="pt"
    )
    assert torch.equal(back_right["input_ids"], right["input_ids"])


def test_trl_style_prompt_and_completion_calls():
    processor = make_processor()
    prompts = processor(
        images=[make_images(1), make_images(1)],
        text=["<s>user: <image>\n", "<s>user: <image> red\n"],
        padding=True,
        padding_side="left",
        return_tensors="pt",
        add_special_tokens=False,
    )
    completions = processor(
        text=["a red circle</s>", "no</s>"],
        padding=True,
        padding_side="right",
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert prompts["input_ids"][:, -1].tolist() != [PAD_ID, PAD_ID] and prompts["input_ids"][0, 0].item() == PAD_ID
    assert completions["input_ids"][1].tolist()[-2:] == [PAD_ID, PAD_ID]
    assert prompts["pixel_values"].shape[0] == 2


def test_text_starting_with_bos_gets_no_second_bos():
    processor = make_processor()
    ids = processor(images=make_images(1), text="<s>user: <image>\nred")["input_ids"][0]
    assert ids[:2] == [BOS_ID, processor.tokenizer.convert_tokens_to_ids("user")]
    # An explicit choice is honoured.
    ids = processor(images=make_images(1), text="<s>user: <image>", add_special_tokens=True)["input_ids"][0]
    assert ids[:2] == [BOS_ID, BOS_ID]


# ---------------------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "describe the picture"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": "and the shape ?"},
    {"role": "assistant", "content": "a circle"},
]


def test_default_chat_template_renders_roles_images_and_generation_prompt():
    processor = make_processor()
    assert processor.chat_template == default_chat_template("<image>")
    assert "{% generation %}" in processor.chat_template.replace("{%- generation -%}", "{% generation %}")
    rendered = processor.apply_chat_template(CONVERSATION)
    assert rendered == (
        "<s>system: describe the picture\nuser: <image>\nwhat is the colour ?\nassistant: red</s>"
        "user: and the shape ?\nassistant: a circle</s>"
    )
    prompt = processor.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt == "<s>system: describe the picture\nuser: <image>\nwhat is the colour ?\nassistant: "
    assert rendered.startswith(prompt)  # prompt + completion rendering stays consistent (TRL relies on it)
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
    assert processor.apply_chat_template(two_images) == "<s>user: <image>\n<image>\nx\n"
    with pytest.raises(Exception, match="roles must be system, user or assistant"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_tokenized_with_images():
    processor = make_processor()
    images = make_images(2)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "red ?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "what"}]}],
    ]
    out = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    for row in out["input_ids"].tolist():
        assert image_runs(row) == [N]
        assert row.count(BOS_ID) == 1  # the template's BOS, not a second one from the tokenizer
    ids = processor.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=True)
    assert ids == [out["input_ids"][0][out["attention_mask"][0] == 1].tolist()]


def test_assistant_tokens_mask_covers_assistant_turns_only():
    processor = make_processor()
    out = processor.apply_chat_template(
        CONVERSATION,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={"images": make_images(1)},
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    vocab = processor.tokenizer.convert_tokens_to_ids
    assistant = [ids[i] for i in range(len(ids)) if mask[i]]
    assert assistant == [vocab("red"), EOS_ID, vocab("a"), vocab("circle"), EOS_ID]
    assert image_runs(ids) == [N] and not any(mask[i] for i in range(len(ids)) if ids[i] == IMAGE_ID)
    assert "offset_mapping" not in out and "text_replacement_offsets" not in out


# ---------------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [BridgeProcessor, AutoProcessor], ids=["BridgeProcessor", "AutoProcessor"])
def test_save_load_round_trip_with_qformer_tokenizer(tmp_path, loader):
    template = default_chat_template("<image>").replace("'assistant: '", "'assistant : '")
    processor = make_processor(qformer=True, num_image_tokens=7, image_processor=clip_processor(16))
    processor.chat_template = template
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "qformer_tokenizer" / "tokenizer_config.json").is_file()
    assert (tmp_path / "chat_template.jinja").read_text() == template

    loaded = loader.from_pretrained(tmp_path)
    assert isinstance(loaded, BridgeProcessor)
    assert (loaded.num_image_tokens, loaded.image_token, loaded.image_token_id) == (7, "<image>", IMAGE_ID)
    assert loaded.chat_template == template
    assert loaded.image_processor.crop_size == {"height": 16, "width": 16}
    assert loaded.qformer_tokenizer is not None and loaded.qformer_tokenizer.get_vocab() == dict(
        make_qformer_tokenizer().get_vocab()
    )
    inputs = dict(images=make_images(2), text=["<image> what is the colour", "<image> red"], padding=True)
    before, after = processor(**inputs, return_tensors="pt"), loaded(**inputs, return_tensors="pt")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(before[key], after[key])


def test_save_load_round_trip_without_qformer_tokenizer(tmp_path):
    processor = make_processor(num_image_tokens=3)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "qformer_tokenizer").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, BridgeProcessor) and loaded.qformer_tokenizer is None
    assert loaded.num_image_tokens == 3 and loaded.chat_template == processor.chat_template
    red = loaded.tokenizer.convert_tokens_to_ids("red")
    ids = loaded(images=make_images(1), text="<image> red")["input_ids"]
    assert ids == [[BOS_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, red]]


# ---------------------------------------------------------------------------------------------------------------------
# Errors that name the fix
# ---------------------------------------------------------------------------------------------------------------------


def test_error_per_sample_image_count_mismatch():
    processor = make_processor()
    images = make_images(3)
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\) in sample 1 but 2 image\(s\).*exactly one"):
        processor(images=[images[:1], images[1:]], text=["<image> red", "<image> red"])
    # The totals agree (2 and 2) but the split does not.
    with pytest.raises(ValueError, match="sample 0 but 1 image"):
        processor(images=[images[:1], images[1:2]], text=["<image><image> red", "red"])
    with pytest.raises(ValueError, match="Got 2 lists of images for 3 texts: pass one list of images per text"):
        processor(images=[images[:1], images[1:]], text=["<image>", "<image>", "red"])


def test_error_total_image_count_mismatch():
    processor = make_processor()
    with pytest.raises(ValueError, match=r"Found 2 '<image>' placeholder\(s\) in the text \(per sample: \[1, 1\]\)"):
        processor(images=make_images(3), text=["<image> red", "<image> blue"])
    with pytest.raises(ValueError, match=r"Found 0 '<image>' .* but 1 image\(s\).*Put exactly one '<image>'"):
        processor(images=make_images(1), text="a red circle")  # an image without a placeholder is never dropped
    with pytest.raises(ValueError, match="but no images for it: pass `images`"):
        processor(text="<image> red")


def test_error_pre_expanded_image_tokens():
    processor = make_processor(num_image_tokens=4)
    with pytest.raises(ValueError, match="4 of them in a row, but 1 image.*already expanded. Pass one '<image>' per"):
        processor(images=make_images(1), text="<image>" * 4 + " red")
    with pytest.raises(ValueError, match="already expanded"):
        processor(images=[make_images(1)], text=["<image> " * 5 + "red"])
    with pytest.raises(ValueError, match="already expanded"):
        processor(text="<image>" * 4)
    with pytest.raises(ValueError, match="pre-tokenized or pre-expanded ids are not accepted"):
        processor(images=make_images(1), text=[[IMAGE_ID] * 4])


def test_truncation_that_would_cut_an_image_raises_with_the_needed_max_length():
    processor = make_processor(num_image_tokens=4)
    text = "what is the colour <image> red circle"  # BOS + 4 words + 4 image tokens + 2 words = 11 tokens
    with pytest.raises(ValueError, match="max_length>=9 to keep every image whole"):
        processor(images=make_images(1), text=text, truncation=True, max_length=7)
    out = processor(images=make_images(1), text=text, truncation=True, max_length=9)  # cuts the text after the image
    assert len(out["input_ids"][0]) == 9 and image_runs(out["input_ids"][0]) == [4]

    processor.tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="truncation_side='left'.*max_length>=7.*after its first image"):
        processor(images=make_images(1), text=text, truncation=True, max_length=6)
    out = processor(images=make_images(1), text=text, truncation=True, max_length=7)  # cuts the text before it
    assert out["input_ids"][0][0] == BOS_ID and image_runs(out["input_ids"][0]) == [4]


def test_truncation_checks_every_sample_of_a_batch():
    processor = make_processor(num_image_tokens=4)
    texts = ["<image> red", "what is the colour of the <image>"]
    with pytest.raises(ValueError, match="sample 1.*max_length>=11"):
        processor(images=make_images(2), text=texts, truncation=True, max_length=8, padding=True)
    out = processor(images=make_images(2), text=texts, truncation=True, max_length=11, padding=True)
    assert [image_runs(row) for row in out["input_ids"]] == [[4], [4]]


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="num_image_tokens must be a positive integer.*config.num_image_tokens"):
        make_processor(num_image_tokens=0)
    with pytest.raises(TypeError):
        BridgeProcessor(siglip_processor(), make_tokenizer(), qformer_tokenizer="not a tokenizer")
    with pytest.raises(TypeError, match="Could not read `videos`"):
        make_processor()(text="red", videos=[1])
    with pytest.raises(ValueError, match="got audio"):
        make_processor()(text="red", audio=[1])


# ---------------------------------------------------------------------------------------------------------------------
# Decoding and docs
# ---------------------------------------------------------------------------------------------------------------------


def test_decode_helpers():
    processor = make_processor()
    ids = processor(text=["a red circle", "two squares"], padding=True, return_tensors="pt")["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["a red circle", "two squares"]
    assert processor.decode(ids[0], skip_special_tokens=True) == "a red circle"
    assert processor.post_process_image_text_to_text(ids) == ["a red circle", "two squares"]


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(processing_bridge) if t.examples]
    assert tests
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
