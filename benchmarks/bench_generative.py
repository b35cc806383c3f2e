"""Speed of a BLIP-2 stage-2 training step and of greedy `generate` in vlbridge's `BridgeVLMForConditionalGeneration`
against transformers' `Blip2ForConditionalGeneration`, with identical weights.

A `Blip2ForConditionalGeneration` (ViT 384 x 6 layers at 224 px / patch 14, i.e. 257 image features; a Q-Former with
BLIP-2's layout, 12 layers, cross-attention every 2, 32 queries, but hidden 384; OPT 768 x 6 layers with OPT's
50272-token vocabulary) is built from configs in code, saved to a temporary directory, and converted with
`vlbridge.conversion.convert_blip2_checkpoint`; both models then run in this process, on the same inputs:

* **stage-2 training step**: forward + backward + AdamW (fused, lr 1e-4, weight decay 0.05) with the vision tower
  and the language model frozen and the Q-Former, the query tokens and the language projection training, as in
  BLIP-2's stage 2 (`model.freeze("stage2")` in vlbridge). The batch is images plus captions in BLIP-2's layout,
  `[<image> x 32, </s>, caption, padding]`, with the loss on the caption tokens only. Dropout is on (BLIP-2's 0.1 in
  the Q-Former and OPT) and the RNG is re-seeded before every step, so that both models draw the same dropout masks:
  their losses must agree (to 1e-5 in fp32) on the first step, before any timing counts.
* **greedy `generate`**: a batch of images with a short prompt, `max_new_tokens == min_new_tokens` so that both
  generate exactly as many tokens (eos cannot end a row early); the generated ids must be identical, every round.

Runs alternate between the two implementations (the order flips every round); each table row gives the median time
after warm-up, the throughput (samples/s for training; for `generate`, generated tokens/s over the whole call, image
encoding included) and the time ratio vlbridge / transformers (goal: at most 1.0), as the ratio of medians, the
median of per-round ratios and their range. On a machine shared with other processes the wall clock also counts
the time spent waiting for a core, so the ratio of this process's CPU seconds is printed as well.

    python benchmarks/bench_generative.py                       # fp32, 5 rounds
    python benchmarks/bench_generative.py --precisions fp32,bf16 --repeats 7
    python benchmarks/bench_generative.py --device cuda --precisions fp32,bf16
    python benchmarks/bench_generative.py --quick               # tiny sizes, 2 rounds: a smoke test (tests/)
    python benchmarks/bench_generative.py --device cuda --size blip2 --precisions bf16   # BLIP-2 OPT-2.7B's sizes

Every run also counts each call's FLOPs (`FlopCounterMode`) and prints the achieved TFLOP/s; on a GPU whose bf16 peak
is known (`_timing.BF16_PEAK_TFLOPS`, or `--peak-tflops`) the model FLOPs utilisation against it.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass


# Read by OpenMP when torch loads it: idle OpenMP threads spin by default, which slows everything down as soon as
# another process shares the cores (see bench_stage1.py); PASSIVE makes them sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Blip2Config, Blip2ForConditionalGeneration  # noqa: E402

from vlbridge import BridgeVLMForConditionalGeneration  # noqa: E402
from vlbridge.conversion import convert_blip2_checkpoint  # noqa: E402


# The timing helpers beside this script, found also when the script is loaded by its path (as the tests do).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import count_flops, device_peak_tflops, time_rounds  # noqa: E402


PAD_ID, BOS_ID, EOS_ID = 1, 2, 2  # OPT's


@dataclass
class Sizes:
    """Model and input sizes of one benchmark configuration."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    num_queries: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vocab_size: int
    train_batch: int
    caption_length: int
    generate_batch: int
    prompt_length: int
    new_tokens: int
    vision_intermediate: int | None = None  # 4 x vision_hidden when not given (ViT-g/14 has 6144 for 1408)
    # Standard deviation of the random weights. The tiny models need more than BLIP-2's 0.02: at width 32 their
    # logits barely depend on the input, and every greedy output would be one repeated token, a weak parity check.
    init_std: float = 0.02

    @property
    def image_token_id(self) -> int:
        # A token of its own at the end of the vocabulary, as transformers' converted BLIP-2 checkpoints add one.
        return self.vocab_size - 1


FULL = Sizes(
    vision_hidden=384,
    vision_layers=6,
    vision_heads=6,
    image_size=224,
    patch_size=14,
    qformer_hidden=384,
    qformer_layers=12,
    qformer_heads=6,
    num_queries=32,
    text_hidden=768,
    text_layers=6,
    text_heads=12,
    vocab_size=50272,
    train_batch=8,
    caption_length=24,
    generate_batch=4,
    prompt_length=4,
    new_tokens=24,
)
# BLIP-2 OPT-2.7B itself: EVA ViT-g/14 (1408 x 39 layers, FFN 6144, 257 features at 224 px), the Q-Former (768 x 12
# layers, 32 queries), OPT-2.7B (2560 x 32 layers, 32 heads). 3.8B parameters: a GPU run (`--size blip2 --device cuda`,
# weights in bf16, the Q-Former in fp32 in both models).
BLIP2 = Sizes(
    vision_hidden=1408,
    vision_layers=39,
    vision_heads=16,
    vision_intermediate=6144,
    image_size=224,
    patch_size=14,
    qformer_hidden=768,
    qformer_layers=12,
    qformer_heads=12,
    num_queries=32,
    text_hidden=2560,
    text_layers=32,
    text_heads=32,
    vocab_size=50272,
    train_batch=32,
    caption_length=24,
    generate_batch=16,
    prompt_length=4,
    new_tokens=24,
)
QUICK = Sizes(
    vision_hidden=32,
    vision_layers=2,
    vision_heads=4,
    image_size=32,
    patch_size=8,
    qformer_hidden=32,
    qformer_layers=2,
    qformer_heads=4,
    num_queries=4,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    vocab_size=128,
    train_batch=2,
    caption_length=6,
    generate_batch=2,
    prompt_length=3,
    new_tokens=5,
    init_std=0.3,
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and 2 rounds: checks the code path only")
    parser.add_argument(
        "--size",
        default=None,
        choices=sorted(SIZES),
        help="model sizes: small (the default: BLIP-2's layout at width 384 / 768), blip2 (BLIP-2 OPT-2.7B's own "
        "sizes, for a GPU), quick (= --quick)",
    )
    parser.add_argument(
        "--weights-dtype",
        default=None,
        choices=["fp32", "bf16"],
        help="dtype the models are loaded in (the Q-Former stays fp32 in both); default fp32, bf16 with --size blip2",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 peak for model FLOPs utilisation (default: data sheet)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per task and precision (5; quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per task and precision")
    parser.add_argument("--precisions", default="fp32", help="comma-separated subset of fp32,bf16 (bf16 = autocast)")
    parser.add_argument("--tasks", default="generate,train", help="comma-separated subset of generate,train")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout of the Q-Former and OPT (BLIP-2: 0.1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    return parser


SIZES = {"small": FULL, "blip2": BLIP2, "quick": QUICK}


def blip2_config(sizes: Sizes, dropout: float) -> Blip2Config:
    vision = dict(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_intermediate or 4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        initializer_range=sizes.init_std,
    )
    qformer = dict(
        hidden_size=sizes.qformer_hidden,
        intermediate_size=4 * sizes.qformer_hidden,
        num_hidden_layers=sizes.qformer_layers,
        num_attention_heads=sizes.qformer_heads,
        cross_attention_frequency=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=sizes.init_std,
    )
    text = dict(
        model_type="opt",
        hidden_size=sizes.text_hidden,
        word_embed_proj_dim=sizes.text_hidden,
        ffn_dim=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        vocab_size=sizes.vocab_size,
        max_position_embeddings=512,
        dropout=dropout,
        init_std=sizes.init_std,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=sizes.num_queries,
        image_token_index=sizes.image_token_id,
        initializer_range=sizes.init_std,
    )


def build_models(
    sizes: Sizes, dropout: float, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[BridgeVLMForConditionalGeneration, Blip2ForConditionalGeneration]:
    """A random BLIP-2 saved to disk, loaded back by transformers and converted by vlbridge (same weights), both in
    `dtype` (their Q-Formers in fp32) on `device`. The source is built on the device: BLIP-2's own sizes take minutes
    to initialise on a CPU."""
    torch.manual_seed(0)
    with torch.device(device):
        source = Blip2ForConditionalGeneration(blip2_config(sizes, dropout))
    with torch.no_grad():
        # Break the zero / one initialisations (query tokens, biases, LayerNorms), so that a wrong mapping or an
        # ignored parameter changes the outputs instead of hiding.
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    if dtype != torch.float32:
        source.to(dtype)
    with tempfile.TemporaryDirectory() as directory:
        source.save_pretrained(directory)
        del source
        theirs = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(device)
        ours, _ = convert_blip2_checkpoint(directory, dtype=dtype)
    return ours.to(device), theirs


def make_train_batch(sizes: Sizes) -> dict[str, torch.Tensor]:
    """Stage-2 captioning batch: `[<image> x Q, </s>, caption, <pad>...]`; labels only on the caption (and its eos)."""
    generator = torch.Generator().manual_seed(1)
    batch, queries, length = sizes.train_batch, sizes.num_queries, sizes.caption_length
    captions = torch.randint(4, sizes.image_token_id, (batch, length), generator=generator)
    # Captions of different lengths (the longest fills the row), so that padding and the attention mask take part.
    lengths = torch.linspace(length // 2, length, batch).round().long()
    positions = torch.arange(length)
    captions = torch.where(positions < lengths[:, None] - 1, captions, EOS_ID)
    captions = torch.where(positions < lengths[:, None], captions, PAD_ID)
    input_ids = torch.cat(
        [torch.full((batch, queries), sizes.image_token_id), torch.full((batch, 1), BOS_ID), captions], 1
    )
    attention_mask = (input_ids != PAD_ID).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : queries + 1] = -100  # no loss on the image tokens and the bos
    pixel_values = torch.randn(batch, 3, sizes.image_size, sizes.image_size, generator=generator)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_generate_batch(sizes: Sizes) -> dict[str, torch.Tensor]:
    """`[<image> x Q, </s>, prompt]` for every image; same-length prompts, so no padding."""
    generator = torch.Generator().manual_seed(2)
    batch, queries = sizes.generate_batch, sizes.num_queries
    prompt = torch.randint(4, sizes.image_token_id, (batch, sizes.prompt_length), generator=generator)
    input_ids = torch.cat(
        [torch.full((batch, queries), sizes.image_token_id), torch.full((batch, 1), BOS_ID), prompt], 1
    )
    pixel_values = torch.randn(batch, 3, sizes.image_size, sizes.image_size, generator=generator)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def freeze_for_stage2(ours: BridgeVLMForConditionalGeneration, theirs: Blip2ForConditionalGeneration) -> int:
    """BLIP-2 stage 2 in both: only the Q-Former, its query tokens and the language projection train. Returns the
    number of trainable parameters, checked to be the same in both."""
    ours.freeze("stage2")
    theirs.requires_grad_(False)
    for module in (theirs.qformer, theirs.language_projection):
        module.requires_grad_(True)
    theirs.query_tokens.requires_grad_(True)
    counts = [sum(p.numel() for p in model.parameters() if p.requires_grad) for model in (ours, theirs)]
    if counts[0] != counts[1]:
        raise RuntimeError(f"Trainable parameters differ: vlbridge {counts[0]:,}, transformers {counts[1]:,}")
    return counts[0]


def set_mode(ours: BridgeVLMForConditionalGeneration, theirs: Blip2ForConditionalGeneration, training: bool) -> None:
    ours.train(training)  # a frozen vision tower stays in eval mode (FreezingMixin)
    theirs.train(training)
    theirs.vision_model.eval()  # BLIP-2's frozen ViT has no dropout either way; kept in eval like vlbridge's


def make_train_step(model: torch.nn.Module, batch: dict, precision: str) -> Callable[[int], float]:
    """One training step on `batch`; the RNG is seeded with the round index first, so both models draw the same
    dropout masks in the same round. Returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)

    def step(round_index: int) -> float:
        torch.manual_seed(1000 + round_index)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def make_generate(model: torch.nn.Module, batch: dict, sizes: Sizes, precision: str) -> Callable[[int], torch.Tensor]:
    # The same settings in both, the image token suppressed in both (vlbridge does it by default, BLIP-2 does not).
    settings = dict(
        max_new_tokens=sizes.new_tokens,
        min_new_tokens=sizes.new_tokens,
        do_sample=False,
        num_beams=1,
        suppress_tokens=[sizes.image_token_id],
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )

    def generate(round_index: int) -> torch.Tensor:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model.generate(**batch, **settings)

    return generate


def time_alternating(
    runs: dict[str, Callable[[int], object]],
    warmup: int,
    repeats: int,
    check: Callable[[int, dict], None],
    device: str = "cpu",
) -> tuple[dict, dict]:
    """Seconds per call of each implementation over `repeats` rounds after `warmup` (wall-clock, and under the key
    `"cpu"` this process's CPU seconds), and every call's result; `check(round_index, {name: result})` runs after
    every round, so that a mismatch stops the run at once."""
    times, cpu_times, results = time_rounds(runs, warmup, repeats, device, after_round=check)
    return {**times, "cpu": cpu_times}, results


def summarize(times: dict, work: int) -> dict:
    """Medians, throughputs (`work` units per call) and the vlbridge / transformers ratios."""
    cpu = times.pop("cpu")
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        # On a shared machine the wall clock also counts the time this process waited for a core; its own CPU
        # seconds do not, so their ratio is the steadier comparison of the work done (both use the same threads).
        "cpu_ratio": statistics.median(cpu["vlbridge"]) / statistics.median(cpu["transformers"]),
        "median_s": medians,
        "min_s": {name: min(values) for name, values in times.items()},
        "throughput": {name: work / median for name, median in medians.items()},
        "ratio": medians["vlbridge"] / medians["transformers"],
        # Both run back to back in a round, so the per-round ratio cancels slow drifts of the machine's load.
        "paired_ratio": statistics.median(a / b for a, b in zip(times["vlbridge"], times["transformers"])),
        "spread": (
            min(a / b for a, b in zip(times["vlbridge"], times["transformers"])),
            max(a / b for a, b in zip(times["vlbridge"], times["transformers"])),
        ),
    }


def run_generate(ours, theirs, sizes: Sizes, precision: str, warmup: int, repeats: int) -> dict:
    batch = {key: value.to(ours.device) for key, value in make_generate_batch(sizes).items()}
    expected_shape = (sizes.generate_batch, batch["input_ids"].shape[1] + sizes.new_tokens)

    def check(index: int, outputs: dict[str, torch.Tensor]) -> None:
        shapes = {name: tuple(out.shape) for name, out in outputs.items()}
        if set(shapes.values()) != {expected_shape}:
            raise RuntimeError(f"generate returned {shapes}; expected {expected_shape} (the prompt + new tokens)")
        if not torch.equal(outputs["vlbridge"], outputs["transformers"]):
            raise RuntimeError(
                f"{precision} greedy outputs differ in round {index}:\n"
                f"vlbridge:\n{outputs['vlbridge']}\ntransformers:\n{outputs['transformers']}"
            )

    runs = {
        "vlbridge": make_generate(ours, batch, sizes, precision),
        "transformers": make_generate(theirs, batch, sizes, precision),
    }
    times, outputs = time_alternating(runs, warmup, repeats, check, ours.device.type)
    summary = summarize(times, sizes.generate_batch * sizes.new_tokens)
    summary["identical"] = all(torch.equal(a, b) for a, b in zip(outputs["vlbridge"], outputs["transformers"]))
    # FlopCounterMode's module tracker fails on a parameter that requires grad given as a module input inside
    # `no_grad` (both models pass their query tokens so): generate trains nothing, so none requires grad meanwhile.
    trainable = [p for model in (ours, theirs) for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    summary["flops"] = {name: count_flops(lambda run=run: run(warmup + repeats)) for name, run in runs.items()}
    for param in trainable:
        param.requires_grad_(True)
    summary["sequences"] = outputs["vlbridge"][0]
    return summary


def run_train(
    ours, theirs, sizes: Sizes, precision: str, warmup: int, repeats: int, tolerance: float | None = None
) -> dict:
    """Times training steps; the first step (same weights, same dropout masks) must give the same loss in both."""
    # bf16 rounds differently where the two models cast (ours at the bridge's boundaries): 1% of the loss, far below
    # what a wrong weight mapping gives.
    tolerance = tolerance if tolerance is not None else {"fp32": 1e-5, "bf16": 1e-2}[precision]
    batch = {key: value.to(ours.device) for key, value in make_train_batch(sizes).items()}

    def check(index: int, losses: dict[str, float]) -> None:
        difference = abs(losses["vlbridge"] - losses["transformers"])
        if index == 0 and not difference <= tolerance * max(1.0, abs(losses["transformers"])):
            raise RuntimeError(f"{precision} first-step losses differ by {difference:.2e} (> {tolerance}): {losses}")

    runs = {
        "vlbridge": make_train_step(ours, batch, precision),
        "transformers": make_train_step(theirs, batch, precision),
    }
    times, losses = time_alternating(runs, warmup, repeats, check, ours.device.type)
    summary = summarize(times, sizes.train_batch)
    summary["first_loss"] = {name: values[0] for name, values in losses.items()}
    # One more step each, counted: the frozen tower's forward, the LM's forward and backward (no weight gradients),
    # the Q-Former's forward and backward.
    summary["flops"] = {name: count_flops(lambda run=run: run(warmup + repeats)) for name, run in runs.items()}
    summary["loss_difference"] = abs(losses["vlbridge"][0] - losses["transformers"][0])
    # Later steps start from the weights each optimizer produced, which may drift apart by rounding only.
    summary["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["vlbridge"], losses["transformers"]))
    return summary


def print_table(results: dict[tuple[str, str], dict], sizes: Sizes) -> None:
    print(
        "| task | precision | implementation | median (ms) | min (ms) | throughput "
        "| vlbridge / transformers (paired median, per-round range) |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for (task, precision), summary in results.items():
        unit = "samples/s" if task == "train" else "tokens/s"
        label = "stage-2 train step" if task == "train" else f"generate {sizes.new_tokens} tokens"
        for name in ("vlbridge", "transformers"):
            ratio = ""
            if name == "vlbridge":
                low, high = summary["spread"]
                ratio = f"{summary['ratio']:.3f} (paired {summary['paired_ratio']:.3f}, {low:.3f}-{high:.3f})"
            print(
                f"| {label} | {precision} | {name} | {summary['median_s'][name] * 1e3:.0f} | "
                f"{summary['min_s'][name] * 1e3:.0f} | {summary['throughput'][name]:.1f} {unit} | {ratio} |"
            )
    print()
    for (task, precision), summary in results.items():
        verdict = "met" if summary["ratio"] <= 1.0 else "missed"
        if task == "train":
            check = (
                f"first-step losses {summary['first_loss']['vlbridge']:.6f} / "
                f"{summary['first_loss']['transformers']:.6f} (|diff| {summary['loss_difference']:.1e}, "
                f"max over rounds {summary['max_loss_difference']:.1e})"
            )
        else:
            check = f"greedy outputs identical in every round: {summary['identical']}"
        print(
            f"{task} {precision}: ratio {summary['ratio']:.3f} (goal <= 1.0: {verdict}), CPU-time ratio "
            f"{summary['cpu_ratio']:.3f}; {check}"
        )


def print_utilisation(results: dict[tuple[str, str], dict], device: str, peak_override: float | None) -> None:
    """Achieved TFLOP/s of each call (FLOPs counted by `FlopCounterMode`) and, on a GPU whose bf16 peak is known,
    model FLOPs utilisation against it."""
    peak, name = device_peak_tflops(device, peak_override)
    print(f"\nmodel FLOPs utilisation on {name} (bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown'})")
    print("| task | precision | implementation | GFLOP per call | achieved TFLOP/s | MFU |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for (task, precision), summary in results.items():
        for implementation in ("vlbridge", "transformers"):
            flops = summary["flops"][implementation]
            achieved = flops / summary["median_s"][implementation] / 1e12
            utilisation = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
            print(f"| {task} | {precision} | {implementation} | {flops / 1e9:.1f} | {achieved:.2f} | {utilisation} |")


def main(args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Runs the benchmark and prints its table; returns `{(task, precision): summary}` for the tests."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else (args.size or "small")
    sizes = SIZES[size]
    repeats = args.repeats if args.repeats is not None else (2 if size == "quick" else 5)
    weights_dtype = args.weights_dtype or ("bf16" if size == "blip2" else "fp32")
    precisions = [p.strip() for p in args.precisions.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",")]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights_dtype]
    ours, theirs = build_models(sizes, args.dropout, args.device, dtype)
    trainable = freeze_for_stage2(ours, theirs)
    total = sum(p.numel() for p in theirs.parameters())
    attention = f"{ours.config._attn_implementation}/{theirs.config._attn_implementation}"
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"transformers={transformers.__version__} "
        f"size={size} weights={weights_dtype} warmup={args.warmup} repeats={repeats} dropout={args.dropout} "
        f"attention={attention} "
        f"parameters={total / 1e6:.1f}M trainable={trainable / 1e6:.2f}M load average={os.getloadavg()[0]:.2f}"
    )
    print(
        f"sizes: {sizes}; {(sizes.image_size // sizes.patch_size) ** 2 + 1} image features; train batch "
        f"{sizes.train_batch} x {sizes.num_queries + 1 + sizes.caption_length} tokens; generate batch "
        f"{sizes.generate_batch} x ({sizes.num_queries + 1 + sizes.prompt_length} + {sizes.new_tokens}) tokens"
    )

    results = {}
    # generate first: training changes the weights, and greedy outputs are compared on the converted weights.
    for task in ("generate", "train"):
        if task not in tasks:
            continue
        set_mode(ours, theirs, training=task == "train")
        for precision in precisions:
            run = run_generate if task == "generate" else run_train
            results[task, precision] = run(ours, theirs, sizes, precision, args.warmup, repeats)
    print(f"load average after the runs: {os.getloadavg()[0]:.2f}\n")
    print_table(results, sizes)
    print_utilisation(results, args.device, args.peak_tflops)
    return results


if __name__ == "__main__":
    # The converter warns that the random checkpoint has no processor (nothing here needs one); no progress bars.
    logging.getLogger("vlbridge").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    main(make_parser().parse_args())
