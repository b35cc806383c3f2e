"""
The language model's text warm-up before BLIP-2's stage 2: a tiny language model built in code does not yet speak
the captions' language, and a frozen one that cannot restate its context cannot be steered by image tokens.
"""

from __future__ import annotations

import random


def caption_context_texts(captions: list[str], image_ids: list[int], separator: str, seed: int = 0) -> list[str]:
    """
    Every caption preceded by another caption of the same image, `"{other} {separator} {caption}"`: text on which a
    language model learns to restate what its context says.

    Why: in stage 2 a frozen language model is steered only by the image tokens in front of the caption. Pretrained
    LMs have learned from web text to carry what the context says into what they write; a tiny LM trained on lone
    captions has not, and then no bridge can steer it (measured on the built-in data: held-out CIDEr 0.44 after
    training on lone captions, 0.94 after the same number of stage-2 steps on an LM trained on these pairs).

    Args:
        captions (`list[str]`): The captions, several per image.
        image_ids (`list[int]`): The image of each caption.
        separator (`str`): Put between the two captions (e.g. the tokenizer's EOS).
        seed (`int`, *optional*, defaults to 0): Which other caption precedes each one.

    Example:

    ```python
    >>> from vlbridge.trainers import caption_context_texts
    >>> caption_context_texts(["a red circle", "one red circle", "a blue star"], [0, 0, 1], "</s>")
    ['one red circle </s> a red circle', 'a red circle </s> one red circle', 'a blue star </s> a blue star']
    ```
    """
    by_image: dict[int, list[str]] = {}
    for image_id, caption in zip(image_ids, captions):
        by_image.setdefault(image_id, []).append(caption)
    rng = random.Random(seed)
    texts = []
    for image_id, caption in zip(image_ids, captions):
        others = [other for other in by_image[image_id] if other != caption] or [caption]
        texts.append(f"{rng.choice(others)} {separator} {caption}")
    return texts


def train_language_model_on_text(model, tokenizer, texts: list[str], args) -> float:
    """
    Trains the VLM's language model (and its head) alone on plain text, no images, with the HF `Trainer`: BLIP-2's
    stage 2 expects an LM that already speaks the captions' language, and the tiny LM built in code does not.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]): Its `language_model` and `lm_head` train; nothing else does.
            Afterwards the model is frozen again for the stage it was in (`model.freeze_stage`).
        tokenizer ([`PreTrainedTokenizerBase`]): Adds BOS / EOS as the model's captions have them.
        texts (`list[str]`): The text (e.g. every training caption).
        args ([`~transformers.TrainingArguments`]): The run (`max_steps`, `learning_rate`, batch size, ...).

    Returns:
        `float`: The mean training loss of the last logged steps.
    """
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer

    eos = tokenizer.eos_token or ""
    data = Dataset.from_dict({"text": [f"{text} {eos}".strip() for text in texts]})
    data = data.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    # Back to the caller's stage afterwards; a model no stage has frozen trains everything, as "full-finetune".
    previous_stage = getattr(model, "freeze_stage", None) or "full-finetune"
    model.freeze("language-model")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    model.freeze(previous_stage)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return sum(losses[-3:]) / max(len(losses[-3:]), 1)


__all__ = ["caption_context_texts", "train_language_model_on_text"]
