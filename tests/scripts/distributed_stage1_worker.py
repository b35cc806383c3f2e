"""A short, fully seeded stage-1 training run for `test_stage1_distributed.py`; not a test module itself.

    python tests/scripts/distributed_stage1_worker.py OUT.json --batch_size 16
    torchrun --nproc_per_node 2 tests/scripts/distributed_stage1_worker.py OUT.json --batch_size 8

Trains a tiny ViT + Q-Former from scratch (dropout off) with [`Stage1Trainer`] on the built-in synthetic data, logging
every step. The main process writes the log history and, for every optimizer step, the image ids of the global batch
in the order the loss sees them and the ITM sampling seed, so that the test can check that the runs it compares saw
the same data and drew the same negatives. Before training, every process also runs one step on its own batch with
the cross-attention keys / values reused and without (`reuse_image_key_values`), and the largest gaps between the two
(losses, gradients) over the processes are written too.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from transformers import CLIPImageProcessor

from vlbridge import QFormerForImageTextPretraining, QFormerPretrainingConfig
from vlbridge.data import build_word_tokenizer, caption_vocabulary, make_synthetic_image_text
from vlbridge.trainers import ImageTextCollator, Stage1Config, Stage1Trainer
from vlbridge.trainers.distributed import close_process_group


IMAGE_SIZE = 32


class RecordingTrainer(Stage1Trainer):
    """Keeps, per optimizer step, the global batch's image ids (rank-major, as the gathers order them), the ITM
    seed, and each process's count of ITG label tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            ids = self.accelerator.gather(inputs["image_ids"])
            tokens = self.accelerator.gather(inputs["attention_mask"][:, 1:].sum().reshape(1))
            self.seen.append({"image_ids": ids.tolist(), "seed": self._window_seed, "itg_tokens": tokens.tolist()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def reuse_gaps(model, batch: dict, accelerator) -> dict[str, float]:
    """Largest absolute gaps, over the processes, between one step with the keys / values reused and one without (on
    copies of `model`): per loss, and over every gradient. Every process runs both steps in the same order, so that
    their gathers pair up; with several processes the ITM negatives come from other processes too."""
    results = []
    for reuse in (True, False):
        step_model = copy.deepcopy(model)
        step_model.config.reuse_image_key_values = reuse
        out = step_model(**batch, sampling_seed=0)
        out.loss.backward()
        grads = [p.grad for p in step_model.parameters() if p.grad is not None]
        results.append(({key: out[key].detach() for key in ("loss", "loss_itc", "loss_itm", "loss_itg")}, grads))
    (reused, reused_grads), (plain, plain_grads) = results
    gaps = {key: (reused[key] - plain[key]).abs() for key in reused}
    gaps["gradients"] = max((a - b).abs().max() for a, b in zip(reused_grads, plain_grads, strict=True))
    return {key: accelerator.gather(value.reshape(1)).max().item() for key, value in gaps.items()}


def build_model(tokenizer) -> QFormerForImageTextPretraining:
    config = QFormerPretrainingConfig(
        vision_config={
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        qformer_config={
            "model_type": "vlbridge_qformer",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "num_query_tokens": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
            "initializer_range": 0.3,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        embed_dim=16,
        # A trained tower also puts the gathered ITM negatives' gradients (AllGatherWithGrad) to the test.
        freeze_vision_tower=False,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return QFormerForImageTextPretraining(config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", help="JSON file the main process writes.")
    parser.add_argument("--batch_size", type=int, required=True, help="Per-device batch size.")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--num_images", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two processes share two cores

    # One caption per image and one object per image: every caption has the same length (see the test's docstring).
    train = make_synthetic_image_text(
        {"train": args.num_images}, image_size=IMAGE_SIZE, captions_per_image=1, max_objects=1
    )["train"]
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]"])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    collator = ImageTextCollator(image_processor, tokenizer, max_length=16)

    torch.manual_seed(0)  # the same initial weights in every process and in every run
    model = build_model(tokenizer)
    training_args = Stage1Config(
        output_dir=str(args.output) + ".trainer",
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_drop_last=True,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    rank = trainer.args.process_index
    own_rows = collator([train[i] for i in range(rank * args.batch_size, (rank + 1) * args.batch_size)])
    gaps = reuse_gaps(model, own_rows, trainer.accelerator)
    trainer.train()
    result = {
        "world_size": trainer.args.world_size,
        "log_history": trainer.state.log_history,
        "steps": trainer.seen,
        "reuse_gaps": gaps,
    }
    if trainer.is_world_process_zero():
        with open(args.output, "w") as file:
            json.dump(result, file)
    del trainer, model
    close_process_group()
    return result


if __name__ == "__main__":
    main()
