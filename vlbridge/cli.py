"""The `vlbridge` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from transformers import CLIPImageProcessor

from . import BridgeProcessor, BridgeVLMConfig, BridgeVLMForConditionalGeneration
from .data import build_word_tokenizer
from .data.shapes import caption_words, shape_captions


TINY_BRIDGES = {
    "qformer": {"model_type": "vlbridge_qformer", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128, "num_query_tokens": 8, "use_text_input": False},
    "perceiver": {"model_type": "vlbridge_perceiver", "hidden_size": 64, "num_latents": 8, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "head_dim": 16},
    "mlp": {"model_type": "vlbridge_mlp", "hidden_size": 64, "drop_cls_token": True},
}  # fmt: skip


def tiny_text_config(tokenizer) -> dict:
    """The demo's language model: a 2-layer Llama of width 64 over `tokenizer`'s vocabulary."""
    return {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }  # fmt: skip


def _tiny_vlm(bridge: str, tokenizer) -> BridgeVLMForConditionalGeneration:
    config = BridgeVLMConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        bridge_config=TINY_BRIDGES[bridge],
        text_config=tiny_text_config(tokenizer),
        image_token_id=tokenizer.image_token_id,
    )  # fmt: skip
    return BridgeVLMForConditionalGeneration(config)


def _batch(processor, pairs, eos: str):
    texts = [f"<image> {caption} {eos}" for _, caption in pairs]
    batch = processor(images=[image for image, _ in pairs], text=texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[(labels == processor.tokenizer.image_token_id) | (batch["attention_mask"] == 0)] = -100
    labels[:, 0] = -100  # BOS
    return batch, labels


def run_demo(bridges: list[str], steps: int, seed: int = 0) -> list[dict]:
    """Builds a tiny VLM per bridge, fine-tunes it on shape captions, captions held-out images, saves and reloads."""
    tokenizer = build_word_tokenizer(caption_words())
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    train, held_out = shape_captions(64, seed=seed), shape_captions(4, seed=seed + 1)
    rows = []
    for bridge in bridges:
        torch.manual_seed(seed)
        model = _tiny_vlm(bridge, tokenizer)
        model.freeze("finetune")
        processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        start, losses = time.perf_counter(), []
        model.train()
        for step in range(steps):
            batch, labels = _batch(processor, [train[(step * 16 + i) % len(train)] for i in range(16)], "</s>")
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        prompts = processor(images=[image for image, _ in held_out], text=["<image>"] * len(held_out),
                            return_tensors="pt")  # fmt: skip
        generated = model.generate(**prompts, max_new_tokens=4, do_sample=False)
        captions = tokenizer.batch_decode(generated[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)
        exact = sum(c.strip() == truth for c, (_, truth) in zip(captions, held_out))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            reloaded = BridgeVLMForConditionalGeneration.from_pretrained(tmp).eval()
            with torch.no_grad():
                same = torch.equal(model(**prompts).logits, reloaded(**prompts).logits)
        rows.append({"bridge": bridge, "image_tokens": model.config.num_image_tokens,
                     "params": sum(p.numel() for p in model.parameters()), "loss_start": losses[0],
                     "loss_end": sum(losses[-5:]) / len(losses[-5:]), "exact_captions": f"{exact}/{len(held_out)}",
                     "sample": f"{held_out[0][1]!r} -> {captions[0].strip()!r}", "round_trip": same,
                     "seconds": time.perf_counter() - start})  # fmt: skip
    return rows


def _print_table(rows: list[dict]) -> None:
    header = ["bridge", "image_tokens", "params", "loss_start", "loss_end", "exact_captions", "round_trip", "seconds"]
    print("| " + " | ".join(header) + " | sample |")
    print("|" + "---|" * (len(header) + 1))
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else f"{row[k]:,}" if isinstance(row[k], int)
                 and not isinstance(row[k], bool) else str(row[k]) for k in header]  # fmt: skip
        print("| " + " | ".join(cells) + f" | {row['sample']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlbridge", description="Vision-language models with learned bridges.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="Build a tiny VLM with each bridge, fine-tune it on built-in shape captions, caption held-out images, "
        "save and reload it. Runs on CPU in about a minute, downloads nothing.",
    )
    demo.add_argument("--bridges", default="qformer,perceiver,mlp", help="Comma-separated: qformer,perceiver,mlp.")
    demo.add_argument("--steps", type=int, default=150, help="Training steps per bridge.")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        bridges = [b.strip() for b in args.bridges.split(",") if b.strip()]
        unknown = sorted(set(bridges) - set(TINY_BRIDGES))
        if unknown:
            parser.error(f"unknown bridge(s) {unknown}; choose from {sorted(TINY_BRIDGES)}")
        rows = run_demo(bridges, args.steps, args.seed)
        _print_table(rows)
        return 0 if all(row["round_trip"] for row in rows) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
