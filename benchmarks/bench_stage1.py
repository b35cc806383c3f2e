"""Speed of one BLIP-2 stage-1 training step (ITC + ITM + ITG, forward + backward + AdamW) of vlbridge's
`QFormerForImageTextPretraining`.

The Q-Former has BLIP-2's real size (hidden 768, 12 layers, 12 heads, FFN 3072, 32 queries, cross-attention every
2 layers, text length 32, vocabulary 30523, embed_dim 256) and trains as in BLIP-2: train mode (dropout 0.1), all
three losses, AdamW (lr 1e-4, weight decay 0.05; fused by default, the HF Trainer's default `adamw_torch_fused`).

The vision tower is frozen in BLIP-2 and runs without gradient, so it is left out: the model is built with a
one-layer stand-in tower of width 1408 (only so that the config wires the Q-Former's `encoder_hidden_size` to 1408),
and the step gets precomputed image features of BLIP-2's real shape, `(batch, 257, 1408)` (ViT-g/14 at 224 px),
through the model's `vision_features` input (what a feature cache feeds it), so the tower never runs. The cost of the
frozen ViT-g (about 2 x 1.0 B parameters x 257 tokens = 0.5 TFLOP per image, forward only) is therefore excluded from
every number below.

The step reuses the Q-Former's cross-attention keys / values of each image across ITC, ITM and ITG (the model's
default, `reuse_image_key_values=True`): they are projected from B images per step instead of 5B (ITC B, ITM 3B,
ITG B). `--compare-reuse` measures that step against the old one (`reuse_image_key_values=False`) instead: every
round runs one step of each (precision, reuse) pair in the same process, in an order flipped every other round, after
`--warmup` untimed rounds; it reports the median step of each, the ratio reuse / old per precision and the bf16 / fp32
speed ratio, after checking that both paths give the same loss.

Reported per precision (fp32, and bf16 = `torch.autocast(dtype=torch.bfloat16)`): the median step time, samples/s,
and the achieved GFLOP/s from an analytic count of the step's matmul FLOPs (`step_flops`, cross-checked against
`torch.utils.flop_counter.FlopCounterMode` on one step), against the throughput of a large square matmul in the same
precision. The cores may be shared with other processes, so every round measures the matmul peak right before each
step, alternates the precisions, and "% of peak" is the median over rounds of (step GFLOP/s) / (that round's peak).
With `--profile` (by default for a precision below `--goal` % of its peak) one more step is profiled and its time is
broken down by op.

CPU setup, as for real CPU training: intra-op threads = physical cores (torch's default; `--threads`), sleeping
rather than spinning OpenMP threads (`OMP_WAIT_POLICY=PASSIVE` unless set), glibc malloc told to keep freed memory
(`--malloc tuned`, what jemalloc / tcmalloc give), fused AdamW.

    python benchmarks/bench_stage1.py --repeats 5
    python benchmarks/bench_stage1.py --device cuda --batch-size 32
    python benchmarks/bench_stage1.py --device cuda --batch-size 32 --compare-reuse --warmup 2 --repeats 10
    python benchmarks/bench_stage1.py --quick --compare-reuse      # tiny sizes: checks the code path only (tests/)
"""

import argparse
import ctypes
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


# Read by OpenMP when torch loads it. Idle OpenMP threads spin by default, which collapses throughput (8x measured
# here) as soon as another process shares the cores; PASSIVE makes them sleep. Set OMP_WAIT_POLICY=ACTIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vlbridge import QFormerForImageTextPretraining, QFormerPretrainingConfig  # noqa: E402


# The helpers beside this script, found also when the script is loaded by its path (as the tests do).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_peak_tflops  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import time_rounds  # noqa: E402


ITM_PAIRS = 3  # ITM runs B positives, B texts with a hard negative image and B images with a hard negative text
# Rows of image features whose cross-attention keys / values a step projects, per image of the batch: once with
# reuse, else ITC (1) + ITM (3) + ITG (1).
KEY_VALUE_ROWS = {True: 1, False: 1 + ITM_PAIRS + 1}


@dataclass(frozen=True)
class Sizes:
    """Q-Former, image-feature and text sizes of the benchmarked step."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    queries: int
    frequency: int  # cross-attention every `frequency` layers
    features: int  # image features per image (P)
    vision_width: int  # their width (Dv)
    text_length: int
    vocab: int
    embed_dim: int
    batch_size: int
    peak_size: int  # side of the square matmul that measures the peak (CPU; CUDA uses twice this)

    @property
    def cross_layers(self) -> int:
        return len(range(0, self.layers, self.frequency))


# BLIP-2's Q-Former on ViT-g/14 features at 224 px.
FULL = Sizes(
    hidden=768,
    layers=12,
    heads=12,
    intermediate=3072,
    queries=32,
    frequency=2,
    features=257,
    vision_width=1408,
    text_length=32,
    vocab=30523,
    embed_dim=256,
    batch_size=8,
    peak_size=4096,
)
QUICK = Sizes(
    hidden=32,
    layers=4,
    heads=4,
    intermediate=64,
    queries=4,
    frequency=2,
    features=17,
    vision_width=48,
    text_length=8,
    vocab=128,
    embed_dim=16,
    batch_size=4,
    peak_size=128,
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: checks the code path only")
    parser.add_argument(
        "--compare-reuse",
        action="store_true",
        help="time the step with the cross-attention keys / values reused against the old step, per precision",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="8 (quick: 4)")
    parser.add_argument("--text-length", type=int, default=None, help="32 (quick: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (5; quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); default: torch's")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--dropout", type=float, default=None, help="override the Q-Former's dropout (BLIP-2: 0.1)")
    parser.add_argument(
        "--optimizer",
        default="fused",
        choices=["fused", "foreach", "for-loop"],
        help="AdamW implementation (the HF Trainer's default is fused)",
    )
    parser.add_argument("--goal", type=float, default=70.0, help="target %% of the matmul peak")
    parser.add_argument(
        "--profile",
        default="auto",
        choices=["auto", "all", "none"],
        help="profile one step of every precision (all), of those below --goal (auto), or none",
    )
    parser.add_argument(
        "--malloc",
        default="tuned",
        choices=["tuned", "default"],
        help="CPU: keep freed memory in the heap (tuned, see tune_malloc) or glibc's defaults",
    )
    parser.add_argument("--peak-repeats", type=int, default=3, help="timed matmuls per peak measurement")
    parser.add_argument("--top", type=int, default=15, help="ops listed per profile")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 peak for model FLOPs utilisation (default: data sheet)"
    )
    parser.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode cross-check")
    return parser


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    """Throughput of a large square matmul `a @ b`, the practical ceiling for this machine and dtype: the median of
    `repeats` timings after one untimed (the median, not the best, since a step also sees the machine's load)."""
    device = a.device.type
    a @ b
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(times) / 1e9


def step_flops(sizes: Sizes, batch_size: int, text_length: int, reuse: bool = True) -> dict[str, float]:
    """
    Matmul FLOPs of one training step, counted analytically, per part (element-wise ops, the optimizer, the embedding
    lookups and the row gathers of reused keys / values do no matmul and are not counted).

    One Q-Former pass over `n` sequences of `L = Q + T` tokens (`P` image features of width `Dv`, hidden `H`, FFN
    `I`; SDPA computes the whole `L x L` score matrix whatever the mask) costs, in multiply-accumulates (MACs):

        every layer:        n * (4 L H^2  +  2 L^2 H  +  2 L H I)      q/k/v/out projections, QK^T and AV, FFN
        every cross layer:  n * (2 Q H^2  +  2 Q P H)                  query and output projections, attention
                            m * 2 P Dv H                                image key / value projections

    The passes: ITC (one unimodal pass, n = B), ITM (n = 3B, bidirectional), ITG (n = B, multimodal-causal). The
    image key / value projections run on m = B images per step when they are reused (`reuse`), else on the images of
    every pass, m = 5B. Heads: `vision_proj` (B Q H E) and `text_proj` (B H E) plus the two query-text similarities
    (2 B^2 Q E) for ITC, `itm_head` (3B Q H 2), and for ITG `lm_head`'s dense layer (B T H^2) and its decoder over
    the vocabulary (B T H V). FLOPs = 2 MACs. Backward repeats each matmul twice (input and weight gradients), so a
    step is 3 x forward, except the image key / value projections, whose input (frozen image features) needs no
    gradient: 2 x forward there.
    """
    hidden, queries, length = sizes.hidden, sizes.queries, sizes.queries + text_length

    def qformer_pass(sequences: int) -> int:
        per_layer = 4 * length * hidden**2 + 2 * length**2 * hidden + 2 * length * hidden * sizes.intermediate
        cross = 2 * queries * hidden**2 + 2 * queries * sizes.features * hidden
        return sequences * (sizes.layers * per_layer + sizes.cross_layers * cross)

    b = batch_size
    key_value = b * KEY_VALUE_ROWS[reuse] * sizes.cross_layers * 2 * sizes.features * sizes.vision_width * hidden
    parts = {  # name: (MACs whose input needs a gradient, MACs whose input does not)
        "image keys / values": (0, key_value),
        "ITC Q-Former pass": (qformer_pass(b), 0),
        "ITC heads + similarity": (
            b * queries * hidden * sizes.embed_dim
            + b * hidden * sizes.embed_dim
            + 2 * b * b * queries * sizes.embed_dim,
            0,
        ),
        "ITM Q-Former pass (3B)": (qformer_pass(ITM_PAIRS * b) + ITM_PAIRS * b * queries * hidden * 2, 0),
        "ITG Q-Former pass": (qformer_pass(b), 0),
        "ITG LM head": (b * text_length * hidden**2 + b * text_length * hidden * sizes.vocab, 0),
    }
    return {name: 2 * (3 * grad + 2 * no_grad) for name, (grad, no_grad) in parts.items()}


def build_model(sizes: Sizes, device: str, dropout: float | None = None) -> QFormerForImageTextPretraining:
    rates = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    config = QFormerPretrainingConfig(
        # A one-layer stand-in tower of the features' width: it sets the Q-Former's encoder_hidden_size and never
        # runs (the step reads `vision_features`).
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": sizes.vision_width,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 16,
            "image_size": 28,
            "patch_size": 14,
        },
        qformer_config={
            **rates,
            "hidden_size": sizes.hidden,
            "num_hidden_layers": sizes.layers,
            "num_attention_heads": sizes.heads,
            "intermediate_size": sizes.intermediate,
            "num_query_tokens": sizes.queries,
            "cross_attention_frequency": sizes.frequency,
            "vocab_size": sizes.vocab,
        },
        embed_dim=sizes.embed_dim,
        decoder_start_token_id=sizes.vocab - 1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return QFormerForImageTextPretraining(config).to(device).train()


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **flags)


def make_inputs(sizes: Sizes, batch_size: int, text_length: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, sizes.vocab, (batch_size, text_length), generator=generator)
    features = torch.randn(batch_size, sizes.features, sizes.vision_width, generator=generator)
    return {
        "vision_features": features.to(device),  # the frozen ViT-g's output, (B, 257, 1408)
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
    }


def make_step(
    model, optimizer, inputs: dict, precision: str, phases: dict | None = None, reuse: bool | None = None
) -> Callable[[], float]:
    """One training step; returns the loss. With `phases`, appends the seconds of forward / backward / optimizer;
    `reuse` sets `reuse_image_key_values` for the step (`None`: the model's setting)."""
    device = inputs["input_ids"].device.type

    def mark(name: str, start: float) -> float:
        if phases is not None:
            synchronize(device)
            now = time.perf_counter()
            phases.setdefault(name, []).append(now - start)
            return now
        return start

    def step() -> float:
        start = time.perf_counter()
        if reuse is not None:
            model.config.reuse_image_key_values = reuse
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**inputs).loss
        start = mark("forward", start)
        loss.backward()
        start = mark("backward", start)
        optimizer.step()
        mark("optimizer", start)
        return loss.item()

    return step


def sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode has no formula for the CPU flash-attention kernel (used without dropout): QK^T and AV.
    b, h, s_q, d = query_shape
    return 2 * 2 * b * h * s_q * key_shape[2] * d


def sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = query_shape
    return 2 * 4 * b * h * s_q * key_shape[2] * d


def counted_flops(step: Callable[[], float]) -> tuple[int, dict]:
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flops,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        step()
    by_op = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


CATEGORIES = {
    "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product"),
    "softmax": ("aten::_softmax", "aten::_safe_softmax", "aten::_softmax_backward_data", "aten::_log_softmax"),
    "layernorm": ("aten::native_layer_norm",),
    "gelu": ("aten::gelu",),
    "dropout (bernoulli/native_dropout)": ("aten::bernoulli", "aten::native_dropout", "aten::uniform_"),
    "optimizer (AdamW)": ("aten::_fused_adamw", "aten::_foreach_", "aten::lerp", "aten::addcdiv", "aten::addcmul"),
    "copies / casts / cat": (
        "aten::copy_",
        "aten::_to_copy",
        "aten::cat",
        "aten::clone",
        "aten::index",
        "aten::fill_",
    ),
    "embedding": ("aten::embedding", "aten::index_select", "aten::embedding_dense_backward", "aten::index_add_"),
}


def categorize(name: str) -> str:
    for category, prefixes in CATEGORIES.items():
        if name.startswith(prefixes):
            return category
    return "other element-wise (add/mul/div/where/sum...)" if name.startswith("aten::") else "non-aten (python)"


def profile_step(step: Callable[[], float], top: int, flops: float, peak: float, device: str) -> str:
    """Top ops of one step by self time (CPU time on CPU, kernel time on CUDA), and the time per category."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        synchronize(device)
    averages = profiler.key_averages()
    clock = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    # Only leaf (aten) ops: self times then add up to the step without double counting.
    rows = [(e.key, getattr(e, clock), e.count) for e in averages if e.key.startswith("aten::")]
    total = sum(t for _, t, _ in rows)
    rows.sort(key=lambda row: -row[1])
    lines = [f"top {top} aten ops by self {device.upper()} time (total over aten ops {total / 1e6:.2f} s):"]
    lines += [f"  {name:<52} {t / 1e6:7.3f} s {100 * t / total:5.1f}%  x{count}" for name, t, count in rows[:top]]
    shares: dict[str, float] = {}
    for name, t, _ in rows:
        shares[categorize(name)] = shares.get(categorize(name), 0.0) + t
    # Achieved = (matmul rate) x (matmul share of the time): which of the two loses the throughput.
    matmul_rate = flops / shares.get("matmul (mm/addmm/bmm)", 0.0) * 1e6 / 1e9  # GFLOP/s while in matmuls
    lines.append(
        f"matmul ops run at {matmul_rate:.0f} GFLOP/s ({100 * matmul_rate / peak:.0f}% of the matmul peak, "
        f"{peak:.0f}, measured right before) and take {100 * shares.get('matmul (mm/addmm/bmm)', 0.0) / total:.0f}% "
        f"of the op time: the step runs at {100 * flops / total * 1e6 / 1e9 / peak:.0f}% of the peak"
    )
    lines.append("self time by category:")
    for category, t in sorted(shares.items(), key=lambda item: -item[1]):
        lines.append(f"  {category:<52} {t / 1e6:7.3f} s {100 * t / total:5.1f}%")
    return "\n".join(lines)


def tune_malloc() -> bool:
    """Keeps freed memory in glibc's heap instead of returning it to the OS (`mallopt(M_MMAP_MAX, 0)`,
    `mallopt(M_TRIM_THRESHOLD, 1 GiB)`), as jemalloc / tcmalloc do (`python -m torch.backends.xeon.run_cpu` preloads
    one). Without it every step's large activations and gradients are fresh `mmap`s, zero-filled by page faults."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except OSError:  # not glibc
        return False


def main(args: argparse.Namespace) -> dict:
    """Runs the benchmark `args` ask for; returns its measurements (for the tests)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = "glibc default"
    if args.malloc == "tuned" and args.device == "cpu":
        malloc = "glibc, no mmap / trim" if tune_malloc() else "glibc default (mallopt failed)"
    sizes = QUICK if args.quick else FULL
    batch_size = args.batch_size or sizes.batch_size
    text_length = args.text_length or sizes.text_length
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    device = args.device
    precisions = [p.strip() for p in args.precisions.split(",")]
    model = build_model(sizes, device, args.dropout)
    optimizer = make_optimizer(model, args.optimizer)
    inputs = make_inputs(sizes, batch_size, text_length, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} batch={batch_size} "
        f"text={text_length} warmup={args.warmup} repeats={repeats} quick={args.quick} "
        f"dropout={model.config.qformer_config.hidden_dropout_prob} "
        f"attention={model.qformer.config._attn_implementation} "
        f"optimizer=AdamW({args.optimizer}) malloc={malloc} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
        f"trainable={trainable / 1e6:.1f}M "
        f"load average={os.getloadavg()[0]:.2f}"
    )
    print(
        f"image features: precomputed ({batch_size}, {sizes.features}, {sizes.vision_width}) passed as "
        "vision_features; the frozen ViT-g is excluded"
    )

    flops = {}
    for reuse in (True, False):
        parts = step_flops(sizes, batch_size, text_length, reuse)
        flops[reuse] = sum(parts.values())
        label = "reused keys / values (default)" if reuse else "keys / values projected in every pass (old)"
        print(f"analytic matmul FLOPs per step, {label}: {flops[reuse] / 1e9:.3f} GFLOP")
        for name, value in parts.items():
            print(f"  {name:<24} {value / 1e9:8.3f} GFLOP ({100 * value / flops[reuse]:4.1f}%)")

    result = {"flops": flops}
    if not args.no_flop_check:
        # One fp32 step (forward + backward + optimizer) of each path under the counter; it also warms the model up.
        result["counted_flops"] = {}
        for reuse in (True, False):
            counted, by_op = counted_flops(make_step(model, optimizer, inputs, "fp32", reuse=reuse))
            ops = ", ".join(f"{op} {n / 1e9:.3f}" for op, n in sorted(by_op.items(), key=lambda item: -item[1]))
            print(
                f"FlopCounterMode on one step ({'reuse' if reuse else 'old'}): {counted / 1e9:.3f} GFLOP ({ops}); "
                f"analytic {flops[reuse] / 1e9:.3f} GFLOP; analytic / counted = {flops[reuse] / counted:.4f}"
            )
            result["counted_flops"][reuse] = counted
        model.config.reuse_image_key_values = True
    if args.compare_reuse:
        result.update(compare_reuse(model, optimizer, inputs, precisions, flops, args.warmup, repeats))
        result["mfu"] = print_utilisation(result["median"], flops, device, args.peak_tflops)
        return result
    result.update(measure_against_peak(model, optimizer, inputs, precisions, flops[True], args, sizes, repeats))
    return result


def check_reuse(model, inputs: dict) -> float:
    """Largest gap between the losses of the two paths on one fp32 forward (the same dropout masks: reuse draws no
    random numbers); raises when they disagree, so that the timings compare two steps that compute the same."""
    found = []
    for reuse in (True, False):
        model.config.reuse_image_key_values = reuse
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(**inputs, sampling_seed=0)
        found.append(torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_itg]))
    gap = float((found[0] - found[1]).abs().max())
    if gap > 1e-4 * float(found[1].abs().max()):
        raise RuntimeError(f"The step with reused keys / values gives other losses: {found[0]} against {found[1]}.")
    return gap


def compare_reuse(model, optimizer, inputs, precisions, flops: dict, warmup: int, repeats: int) -> dict:
    """Median step of every (precision, reuse) pair, timed in interleaved rounds; reuse / old per precision and the
    bf16 / fp32 speed ratio."""
    device = inputs["input_ids"].device.type
    gap = check_reuse(model, inputs)
    print(f"\nloss gap between the two paths on one fp32 forward: {gap:.2e}")
    steps = {
        (precision, reuse): make_step(model, optimizer, inputs, precision, reuse=reuse)
        for precision in precisions
        for reuse in (True, False)
    }
    calls = {key: (lambda index, step=step: step()) for key, step in steps.items()}  # time_rounds passes the round
    wall, _, losses = time_rounds(calls, warmup, repeats, device)
    model.config.reuse_image_key_values = True
    median = {key: statistics.median(times) for key, times in wall.items()}
    print(f"{warmup} warm-up and {repeats} timed rounds, every (precision, reuse) pair once per round\n")
    print("| precision | keys / values | median step (s) | min (s) | samples/s | GFLOP/s | reuse / old |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    batch_size = inputs["input_ids"].shape[0]
    for (precision, reuse), seconds in median.items():
        ratio = seconds / median[precision, False]
        print(
            f"| {precision} | {'reused' if reuse else 'every pass (old)'} | {seconds:.4f} | "
            f"{min(wall[precision, reuse]):.4f} | {batch_size / seconds:.2f} | {flops[reuse] / seconds / 1e9:.1f} | "
            f"{ratio:.3f} |"
        )
    print()
    ratios = {precision: median[precision, True] / median[precision, False] for precision in precisions}
    for precision, ratio in ratios.items():
        print(f"{precision}: the step with reused keys / values takes {ratio:.3f} x the old step's time")
    speedups = {}
    if {"fp32", "bf16"} <= set(precisions):
        for reuse in (True, False):
            speedups[reuse] = median["fp32", reuse] / median["bf16", reuse]
            print(f"bf16 autocast step is {speedups[reuse]:.2f}x faster than fp32 ({'reuse' if reuse else 'old'})")
    return {"median": median, "ratio": ratios, "bf16_speedup": speedups, "losses": losses, "loss_gap": gap}


def print_utilisation(median: dict, flops: dict, device: str, peak_override: float | None) -> dict:
    """Model FLOPs utilisation of each timed step against the device's bf16 data-sheet peak (`_timing`). Model FLOPs
    are those of the step with reuse (the work the step must do); the old step does more for the same result."""
    peak, name = device_peak_tflops(device, peak_override)
    if peak is None:
        print(f"\nmodel FLOPs utilisation: no bf16 peak known for {name} (pass --peak-tflops)")
        return {}
    utilisation = {key: flops[True] / seconds / 1e12 / peak for key, seconds in median.items()}
    print(f"\nmodel FLOPs utilisation on {name}, against its bf16 peak of {peak:.0f} TFLOP/s:")
    for (precision, reuse), value in utilisation.items():
        print(f"  {precision} {'reused' if reuse else 'old'}: {100 * value:.1f}%")
    return utilisation


def measure_against_peak(model, optimizer, inputs, precisions, flops: float, args, sizes: Sizes, repeats: int) -> dict:
    """The step of every precision against the matmul peak measured right before it, in alternating rounds; the
    table, and profiles of the precisions that miss `--goal` (or as `--profile` says)."""
    device = inputs["input_ids"].device.type
    batch_size = inputs["input_ids"].shape[0]
    # Every round measures, for each precision, the matmul peak and then one step, and alternates the order of the
    # precisions: the ratio step / peak is taken under the same machine load (other processes share the CPU).
    peak_size = sizes.peak_size if device == "cpu" else 2 * sizes.peak_size
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak_inputs = {
        p: [torch.randn(peak_size, peak_size, device=device, dtype=dtypes[p]) for _ in "ab"] for p in precisions
    }
    records = {p: {} for p in precisions}  # precision: {"step", "peak", "forward", ..., "sys", "faults": [per round]}
    steps = {p: make_step(model, optimizer, inputs, p, records[p]) for p in precisions}
    last = {}
    for index in range(args.warmup + repeats):
        for precision in precisions if index % 2 == 0 else precisions[::-1]:
            peak = matmul_peak_gflops(*peak_inputs[precision], repeats=args.peak_repeats)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            synchronize(device)
            start = time.perf_counter()
            loss = steps[precision]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            last[precision] = elapsed, peak
            after = resource.getrusage(resource.RUSAGE_SELF)
            record = records[precision]
            if index < args.warmup:
                record.clear()
                continue
            record.setdefault("step", []).append(elapsed)
            record.setdefault("peak", []).append(peak)
            record.setdefault("sys", []).append(after.ru_stime - usage.ru_stime)
            record.setdefault("faults", []).append(after.ru_minflt - usage.ru_minflt)
        print(
            f"round {index}{' (warm-up)' if index < args.warmup else ''}: "
            + ", ".join(
                f"{p} {last[p][0]:.2f} s ({100 * flops / last[p][0] / 1e9 / last[p][1]:.0f}% of {last[p][1]:.0f})"
                for p in precisions
            )
            + f"; loss {loss:.3f}; load {os.getloadavg()[0]:.2f}"
        )
    print(f"load average after the runs: {os.getloadavg()[0]:.2f}\n")

    achieved = print_table(records, flops, batch_size, args.goal)

    wanted = {"all": precisions, "none": [], "auto": [p for p in precisions if achieved[p] < args.goal]}[args.profile]
    for precision in wanted:
        print(f"\nprofile of one {precision} step (load {os.getloadavg()[0]:.2f}):")
        peak = matmul_peak_gflops(*peak_inputs[precision], repeats=args.peak_repeats)
        print(profile_step(make_step(model, optimizer, inputs, precision), args.top, flops, peak, device))
    return {"achieved": achieved, "records": records}


def print_table(records: dict, flops: float, batch_size: int, goal: float) -> dict:
    """Markdown table; % of peak is the median over rounds of (step GFLOP/s) / (that round's matmul peak)."""
    print(
        "| precision | median step (s) | min (s) | samples/s | GFLOP/s | matmul peak (GFLOP/s) | % of peak "
        "| forward / backward / optimizer (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    achieved = {}
    for precision, record in records.items():
        median = statistics.median(record["step"])
        gflops = flops / median / 1e9
        peak = statistics.median(record["peak"])
        achieved[precision] = statistics.median(
            100 * flops / t / 1e9 / p for t, p in zip(record["step"], record["peak"])
        )
        split = " / ".join(f"{statistics.median(record[name]):.2f}" for name in ("forward", "backward", "optimizer"))
        print(
            f"| {precision} | {median:.2f} | {min(record['step']):.2f} | {batch_size / median:.2f} | {gflops:.0f} | "
            f"{peak:.0f} | {achieved[precision]:.0f}% | {split} |"
        )
    print()
    for precision, record in records.items():
        median = statistics.median(record["step"])
        verdict = "met" if achieved[precision] >= goal else "missed"
        print(
            f"{precision}: {median:.2f} s/step, {batch_size / median:.2f} samples/s, "
            f"{flops / median / 1e9:.0f} GFLOP/s = {achieved[precision]:.0f}% of the {precision} matmul peak "
            f"(median {statistics.median(record['peak']):.0f}, best {max(record['peak']):.0f} GFLOP/s); "
            f"goal >= {goal:.0f}%: {verdict}; per step {statistics.median(record['sys']):.2f} s system CPU, "
            f"{statistics.median(record['faults']):.0f} page faults"
        )
    if {"fp32", "bf16"} <= records.keys():
        speedup = statistics.median(records["fp32"]["step"]) / statistics.median(records["bf16"]["step"])
        print(f"bf16 autocast step is {speedup:.2f}x faster than fp32")
    return achieved


if __name__ == "__main__":
    main(make_parser().parse_args())
