"""`transformers.pipeline("image-text-to-text")` runs a vlbridge model with its BridgeProcessor."""

import pytest
import torch
from helpers import chat_rows, make_model, make_processor
from transformers import pipeline


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def parts():
    processor = make_processor()
    processor.tokenizer.padding_side = "left"  # batched generation with a decoder-only LM
    return processor, make_model("llama").eval(), [row["images"][0] for row in chat_rows(3)]


def greedy(processor, model, image, question: str, max_new_tokens: int) -> str:
    """The reference: the chat template, the processor and `generate`, by hand."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_chat_input_gives_the_greedy_answer(parts):
    processor, model, images = parts
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    questions = ["what colour is the circle?", "how many stars are there?", "describe the image."]
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        for image, question in zip(images, questions)
    ]
    outputs = pipe(text=chats, max_new_tokens=6, do_sample=False, batch_size=3)  # one left-padded batch
    for image, question, output in zip(images, questions, outputs):
        answer = output[0]["generated_text"][-1]
        assert answer["role"] == "assistant"
        assert answer["content"].strip() == greedy(processor, model, image, question, 6).strip()
