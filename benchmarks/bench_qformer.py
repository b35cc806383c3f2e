"""Forward + backward speed of vlbridge's `QFormerModel` against transformers' `Blip2QFormerModel`.

Both models have BLIP-2's real Q-Former size (hidden 768, 12 layers, 12 heads, FFN 3072, 32 queries, cross-attention
every 2 layers, 257 image features of width 1408) and the same weights (converted with
`vlbridge.conversion.qformer_state_dict_from_blip2`), with the text branch off, so that both compute the same
thing. A training step is timed: forward in train mode, a scalar loss, backward into the weights and the query
tokens (the image features come from a frozen vision tower and need no gradient). Runs alternate between the two
implementations; the median after warm-up is reported, in fp32 and under bf16 autocast.

    python benchmarks/bench_qformer.py --repeats 10
    python benchmarks/bench_qformer.py --device cuda --batch-size 32
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vlbridge.conversion import qformer_config_from_blip2, qformer_state_dict_from_blip2
from vlbridge.modeling.modeling_qformer import QFormerModel


# The timing helpers beside this script, found also when the script is loaded by its path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import synchronize, time_rounds  # noqa: E402


HIDDEN, LAYERS, HEADS, INTERMEDIATE, QUERIES, FREQUENCY, FEATURES, VISION_WIDTH = 768, 12, 12, 3072, 32, 2, 257, 1408


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per implementation and precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation and precision")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); default: torch's")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument(
        "--dropout", type=float, default=None, help="override both dropout rates of both models (BLIP-2: 0.1)"
    )
    return parser


def matmul_peak_gflops(dtype: torch.dtype, device: str, size: int) -> float:
    """Throughput of one large square matmul, the practical ceiling for this machine and dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def train_step_flops(batch_size: int) -> float:
    """Matmul FLOPs of one forward + backward, counted analytically (element-wise ops are ignored).

    Backward costs two matmuls per forward matmul (input and weight gradients), except the cross-attention key /
    value projections of the image features, whose input needs no gradient (one matmul).
    """
    tokens, image_tokens = batch_size * QUERIES, batch_size * FEATURES
    cross_layers = len(range(0, LAYERS, FREQUENCY))
    self_attention = 4 * tokens * HIDDEN * HIDDEN + 2 * batch_size * QUERIES * QUERIES * HIDDEN
    feed_forward = 2 * tokens * HIDDEN * INTERMEDIATE
    cross_query_side = 2 * tokens * HIDDEN * HIDDEN + 2 * batch_size * QUERIES * FEATURES * HIDDEN
    cross_key_value = 2 * image_tokens * VISION_WIDTH * HIDDEN
    forward_macs = LAYERS * (self_attention + feed_forward) + cross_layers * cross_query_side
    key_value_macs = cross_layers * cross_key_value
    return 2 * (3 * forward_macs + 2 * key_value_macs)


def build_models(
    device: str, dropout: float | None = None
) -> tuple[QFormerModel, Blip2QFormerModel, torch.nn.Parameter]:
    rates = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    hf_config = Blip2QFormerConfig(
        **rates,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        cross_attention_frequency=FREQUENCY,
        encoder_hidden_size=VISION_WIDTH,
        use_qformer_text_input=False,
    )
    torch.manual_seed(0)
    hf_model = Blip2QFormerModel(hf_config)
    query_tokens = torch.nn.Parameter(torch.randn(1, QUERIES, HIDDEN) * hf_config.initializer_range)
    ours = QFormerModel(qformer_config_from_blip2(hf_config, num_query_tokens=QUERIES, use_text_input=False))
    result = ours.load_state_dict(
        qformer_state_dict_from_blip2(hf_model.state_dict(), prefix="", query_tokens=query_tokens.detach())
    )
    assert not result.missing_keys and not result.unexpected_keys, result
    # Both run their default attention implementation (SDPA) and train mode (dropout on), as in training.
    return ours.to(device).train(), hf_model.to(device).train(), query_tokens.to(device)


def make_steps(ours, hf_model, query_tokens, image_embeds, precision: str) -> dict[str, Callable[[], None]]:
    device = image_embeds.device.type
    autocast = precision == "bf16"

    def run(forward: Callable[[], torch.Tensor], model: torch.nn.Module, extra: list) -> Callable[[], None]:
        def step():
            model.zero_grad(set_to_none=True)
            for param in extra:
                param.grad = None
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = forward().float().pow(2).mean()
            loss.backward()

        return step

    def ours_forward() -> torch.Tensor:
        return ours(image_embeds=image_embeds).image_tokens

    def hf_forward() -> torch.Tensor:
        query_embeds = query_tokens.expand(image_embeds.shape[0], -1, -1)
        return hf_model(query_embeds=query_embeds, encoder_hidden_states=image_embeds).last_hidden_state

    return {"vlbridge": run(ours_forward, ours, []), "transformers": run(hf_forward, hf_model, [query_tokens])}


def check_parity(ours, hf_model, query_tokens, image_embeds) -> float:
    ours.eval(), hf_model.eval()
    with torch.no_grad():
        expected = hf_model(
            query_embeds=query_tokens.expand(image_embeds.shape[0], -1, -1), encoder_hidden_states=image_embeds
        ).last_hidden_state
        difference = (ours(image_embeds=image_embeds).image_tokens - expected).abs().max().item()
    ours.train(), hf_model.train()
    return difference


def time_alternating(steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: str) -> dict:
    """Seconds per step of each implementation over `repeats` after `warmup` (`time_rounds`)."""
    calls = {name: (lambda index, step=step: step()) for name, step in steps.items()}
    return time_rounds(calls, warmup, repeats, device)[0]


def main(args: argparse.Namespace):
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    precisions = [p.strip() for p in args.precisions.split(",")]
    ours, hf_model, query_tokens = build_models(device, args.dropout)
    image_embeds = torch.randn(args.batch_size, FEATURES, VISION_WIDTH, device=device)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} batch={args.batch_size} "
        f"warmup={args.warmup} repeats={args.repeats} dropout={ours.config.hidden_dropout_prob} "
        f"attention={ours.config._attn_implementation}/{hf_model.config._attn_implementation} "
        f"load average={os.getloadavg()[0]:.2f}"
    )
    difference = check_parity(ours, hf_model, query_tokens, image_embeds)
    print(f"parity (eval, fp32): max |vlbridge - transformers| = {difference:.2e}")

    flops = train_step_flops(args.batch_size)
    peak_size = 4096 if device == "cpu" else 8192
    peaks = {"fp32": matmul_peak_gflops(torch.float32, device, peak_size)}
    if "bf16" in precisions:
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16, device, peak_size)
    peak_text = ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items())
    print(f"matmul FLOPs per step: {flops / 1e9:.1f} GFLOP; matmul peak ({peak_size}^3): {peak_text}")

    results = {}
    for precision in precisions:
        steps = make_steps(ours, hf_model, query_tokens, image_embeds, precision)
        results[precision] = time_alternating(steps, args.warmup, args.repeats, device)
    print(f"load average after the runs: {os.getloadavg()[0]:.2f}\n")
    print_table(results, flops, peaks)


def print_table(results: dict, flops: float, peaks: dict):
    print("| precision | implementation | median step (ms) | min (ms) | GFLOP/s | % of peak | ours / transformers |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for precision, times in results.items():
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratio = medians["vlbridge"] / medians["transformers"]
        for name, median in medians.items():
            fastest = min(times[name])
            gflops = flops / median / 1e9
            ratio_cell = f"{ratio:.3f}" if name == "vlbridge" else ""
            print(
                f"| {precision} | {name} | {median * 1e3:.0f} | {fastest * 1e3:.0f} | {gflops:.0f} | "
                f"{100 * gflops / peaks[precision]:.0f}% | {ratio_cell} |"
            )
    print()
    for precision, times in results.items():
        # Each round runs both back to back, so the per-round ratio cancels slow drifts in machine load.
        paired = statistics.median(ours / theirs for ours, theirs in zip(times["vlbridge"], times["transformers"]))
        print(f"{precision}: median over rounds of (vlbridge / transformers) = {paired:.3f}")
    if {"fp32", "bf16"} <= results.keys():
        for name in ("vlbridge", "transformers"):
            speedup = statistics.median(results["fp32"][name]) / statistics.median(results["bf16"][name])
            print(f"{name}: bf16 autocast step is {speedup:.2f}x faster than fp32")


if __name__ == "__main__":
    main(make_parser().parse_args())
