"""The Perceiver-Resampler VLM (BLIP-3 / xGen-MM style) trains through the same stage-2 (CaptionCollator) and SFT
(ChatCollator) paths as the Q-Former VLM, with a Llama-style and a Phi-3-style decoder and BLIP-3's Phi-3 prompt.

Each run freezes the model as BLIP-3 does ("finetune": everything but the vision tower trains), goes ~40 steps with
the HF Trainer on synthetic shapes, and must bring the loss under half its starting value; the labels must hold the
target text only: no image, system, user or role-header token.
"""

import pytest
import torch
from tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, bridge_config, text_config, vision_config
from transformers import AutoConfig, SiglipImageProcessorPil, Trainer, TrainingArguments
from transformers.tokenization_utils_base import AddedToken

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
from vlbridge.data import build_word_tokenizer, chat_vocabulary, make_synthetic_chat, make_synthetic_image_text
from vlbridge.processing import BridgeProcessor
from vlbridge.trainers import CaptionCollator, ChatCollator


pytestmark = pytest.mark.usefixtures("single_thread")

PHI3_ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
PHI3_END = "<|end|>"
VOCAB_SIZE = 96
NUM_LATENTS = 4

# BLIP-3's Phi-3 prompt (reference_algorithms §3.4): "<|system|>\n...<|end|>\n<|user|>\n<image>\n{prompt}<|end|>\n
# <|assistant|>\n"; the answer and its "<|end|>\n" are the only trained text (inside `{% generation %}`).
PHI3_CHAT_TEMPLATE = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ns.text + '<|end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}{{- ns.text + '<|end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def phi3_text_config():
    return AutoConfig.for_model(
        "phi3",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=VOCAB_SIZE,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def make_model(text: str, seed: int = 0) -> BridgeVLMForConditionalGeneration:
    torch.manual_seed(seed)
    config = BridgeVLMConfig(
        vision_config=vision_config("clip"),
        bridge_config=bridge_config("perceiver"),
        text_config=phi3_text_config() if text == "phi3" else text_config(text),
        image_token_id=IMAGE_ID,
    )
    assert config.num_image_tokens == NUM_LATENTS and config.text_config.model_type == text
    model = BridgeVLMForConditionalGeneration(config)
    model.freeze("finetune")  # BLIP-3: the vision tower is frozen, the resampler and the language model train
    return model


def make_processor(phi3: bool) -> BridgeProcessor:
    tokenizer = build_word_tokenizer(chat_vocabulary() + ["photo", "user", "assistant", "system", ":"])
    chat_template = None
    if phi3:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in [*PHI3_ROLES, PHI3_END]])
        chat_template = PHI3_CHAT_TEMPLATE
    assert len(tokenizer) <= VOCAB_SIZE
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return BridgeProcessor(image_processor, tokenizer, chat_template=chat_template, num_image_tokens=NUM_LATENTS)


def train(model, dataset, collator, tmp_path, steps: int = 40) -> list[float]:
    """Train with the HF Trainer; check that the frozen vision tower did not move; return the logged losses."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    vision_before = {n: p.detach().clone() for n, p in model.model.vision_tower.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    for name, param in model.model.vision_tower.named_parameters():
        assert torch.equal(param, vision_before[name]), f"frozen vision tower changed: {name}"
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def assert_falls_by_half(losses: list[float], steps: int) -> None:
    assert len(losses) == steps
    initial, final = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert final < 0.5 * initial, [round(loss, 3) for loss in losses[::4]]


def role_of_each_position(tokenizer, ids: list[int]) -> list[str | None]:
    """For a Phi-3 rendered chat: the role whose message each position belongs to (None before the first header,
    "header" on the role tokens themselves)."""
    header_ids = {tokenizer.convert_tokens_to_ids(role): role.strip("<|>") for role in PHI3_ROLES}
    roles, current = [], None
    for token in ids:
        if token in header_ids:
            current = header_ids[token]
            roles.append("header")
        else:
            roles.append(current)
    return roles


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: captions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["llama", "phi3"])
def test_stage2_caption_training_loss_falls(tmp_path, text):
    processor = make_processor(phi3=text == "phi3")
    model = make_model(text)
    dataset = make_synthetic_image_text({"train": 16}, image_size=32, captions_per_image=1)["train"]
    collator = CaptionCollator.from_model(model, processor, prompt="a photo of")

    batch = collator([dataset[i] for i in range(4)])
    for row, ids, labels in zip([dataset[i] for i in range(4)], batch["input_ids"], batch["labels"]):
        trained = labels != -100
        assert not (ids[trained] == IMAGE_ID).any() and (ids == IMAGE_ID).sum() == NUM_LATENTS
        assert processor.tokenizer.decode(ids[trained]) == f"{row['caption']} {processor.tokenizer.eos_token}"

    losses = train(model, dataset, collator, tmp_path)
    assert_falls_by_half(losses, 40)


# ---------------------------------------------------------------------------------------------------------------------
# SFT: chats
# ---------------------------------------------------------------------------------------------------------------------


def test_phi3_chat_labels_hold_only_the_assistant_answers():
    processor = make_processor(phi3=True)
    tokenizer = processor.tokenizer
    rows = [
        make_synthetic_chat({"train": 4}, image_size=32, turns=2, system_prompt=True)["train"][i] for i in range(4)
    ]
    rendered = processor.apply_chat_template(rows[0]["messages"], add_generation_prompt=True)
    assert rendered.startswith("<s><|system|>\n") and "<|user|>\n<image>\n" in rendered
    assert rendered.endswith("<|end|>\n<|assistant|>\n")

    batch = ChatCollator(processor)(rows)
    for row, ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
        roles = role_of_each_position(tokenizer, ids)
        trained = [j for j, label in enumerate(labels) if label != -100]
        # Only assistant message text is trained: no image, system, user or header token, no padding.
        assert {roles[j] for j in trained} == {"assistant"}
        assert IMAGE_ID not in [ids[j] for j in trained]
        assert all(labels[j] == ids[j] for j in trained)
        answers = [" ".join(e["text"] for e in m["content"] if e["type"] == "text") for m in row["messages"]]
        answers = [a for a, m in zip(answers, row["messages"]) if m["role"] == "assistant"]
        assert tokenizer.decode([ids[j] for j in trained]) == " ".join(f"{a} {PHI3_END}" for a in answers)
        # ... and every assistant token is trained (the end-of-turn marker included).
        assert trained == [j for j, role in enumerate(roles) if role == "assistant" and ids[j] != PAD_ID]


@pytest.mark.parametrize("text", ["llama", "phi3"])
def test_sft_chat_training_loss_falls(tmp_path, text):
    processor = make_processor(phi3=text == "phi3")
    model = make_model(text)
    dataset = make_synthetic_chat({"train": 16}, image_size=32, turns=1, system_prompt=text == "phi3")["train"]
    collator = ChatCollator.from_model(model, processor)
    losses = train(model, dataset, collator, tmp_path)
    assert_falls_by_half(losses, 40)
