"""Gradient accumulation on the VLM equals the larger batch (loss and gradients), with captions of unequal length.

The Trainer counts the label tokens of the whole accumulation window (`num_items_in_batch`) and the model divides its
summed token losses by that count (`accepts_loss_kwargs = True`), so 2 micro-batches of 4 give the loss and gradients
of one batch of 8. Averaging each micro-batch over its own tokens instead (the old behaviour) moved the gradients by
about 1e-2 relative.
"""

import pytest
import torch
from tiny import make_tokenizer, vlm_config
from transformers import SiglipImageProcessorPil, Trainer, TrainingArguments

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.data import make_synthetic_image_text
from vlbridge.processing import BridgeProcessor
from vlbridge.trainers import CaptionCollator


pytestmark = pytest.mark.usefixtures("single_thread")


DATA_SEED = 3


def _one_step(
    tmp_path, batch_size: int, accumulation: int, label_tokens: list[int]
) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    # Bridge and LM without dropout: both runs must compute the same function.
    config = vlm_config(bridge="perceiver", text="llama")
    model = BridgeVLMForConditionalGeneration(config)
    model.freeze("finetune")
    processor = BridgeProcessor(
        SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer, num_image_tokens=config.num_image_tokens
    )
    # One to three objects per scene: the captions, hence the label tokens per micro-batch, differ in length.
    data = make_synthetic_image_text({"train": 8}, image_size=32, captions_per_image=1, max_objects=3, seed=DATA_SEED)[
        "train"
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{batch_size}"),
        per_device_train_batch_size=batch_size,
        max_steps=1,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.0,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=True,
        max_grad_norm=1e9,
    )
    caption_collator = CaptionCollator.from_model(model, processor)

    def collator(rows):
        batch = caption_collator(rows)
        label_tokens.append(int((batch["labels"] != -100).sum()))
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    # Keep the accumulated gradients: the optimizer step zeroes them afterwards.
    grads = {}
    hooks = [
        parameter.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    ]
    trainer.train()
    for hook in hooks:
        hook.remove()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, grads


def test_accumulation_equals_the_larger_batch(tmp_path):
    big_loss, big_grads = _one_step(tmp_path, batch_size=8, accumulation=1, label_tokens=[])
    micro_batch_tokens = []
    small_loss, small_grads = _one_step(tmp_path, batch_size=4, accumulation=2, label_tokens=micro_batch_tokens)
    # Unequal label tokens per micro-batch: a mean of per-micro-batch means would differ from the global mean.
    assert len(micro_batch_tokens) == 2 and micro_batch_tokens[0] != micro_batch_tokens[1], micro_batch_tokens
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    assert big_grads.keys() == small_grads.keys() and big_grads
    for name, grad in big_grads.items():
        torch.testing.assert_close(small_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
