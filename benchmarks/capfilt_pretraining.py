"""Does CapFilt pay? Stage-1 pretraining on noisy captions, on their CapFilt output, and on the true captions.

BLIP's bootstrapping, on the built-in scenes with a known share of "web" captions made wrong
(`vlbridge stage1 --caption_noise`: another scene's caption, or one colour / shape word changed):

1. (a) pretrain on the noisy web set;
2. (c) pretrain on the same images with their true captions (the ceiling);
3. fine-tune (a) on a small clean set of other images, five true captions each (BLIP's COCO step);
4. CapFilt the web set with the fine-tuned model as captioner and filter;
5. (b) pretrain from scratch on the CapFilt output (kept web and synthetic captions);
6. the same with the filter alone (`--num_synthetic 0`: the kept web captions only), to tell filtering from the
   synthetic captions;

then score every arm on the same held-out built-in test images as `vlbridge eval` does: R@1 both ways (after ITM
re-ranking, and by ITC alone), ITM accuracy and exact captions, and how much of the gap between (a) and (c) each
bootstrapped run closes. Every step is the `vlbridge` command
printed before it runs, at equal pretraining budget (the `stage1_builtin` preset's steps and batch); a step whose
output exists is not run again, so an interrupted run continues.

    python benchmarks/capfilt_pretraining.py --workdir outputs/capfilt-pretraining
    python benchmarks/capfilt_pretraining.py --workdir outputs/capfilt-seed1 --seed 1
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/capfilt-pretraining", help="Where every step writes.")
    parser.add_argument("--noise", type=float, default=0.4, help="Share of the web captions made wrong.")
    parser.add_argument("--num_images", type=int, default=10000, help="Web images, one caption each.")
    parser.add_argument("--clean_images", type=int, default=1000, help="Clean images (five captions each).")
    parser.add_argument("--clean_steps", type=int, default=500, help="Fine-tuning steps on the clean set.")
    parser.add_argument("--clean_learning_rate", type=float, default=1e-4, help="Its learning rate.")
    parser.add_argument("--max_steps", type=int, default=3000, help="Pretraining steps of (a), (b) and (c).")
    parser.add_argument("--eval_images", type=int, default=200, help="Held-out test images scored.")
    parser.add_argument("--seed", type=int, default=0, help="Training seed of every step (data seeds stay fixed).")
    return parser


def run(command: list[str], done: Path) -> None:
    """Runs one `vlbridge` command unless `done` exists (the step finished before)."""
    print("$ " + " ".join(command), flush=True)
    if done.exists():
        print(f"  (done before: {done})", flush=True)
        return
    subprocess.run(command, check=True)


def evaluate(folder: Path, args) -> dict:
    """Held-out scores on the built-in test images (one caption each, as in training), cached beside the model:
    what `vlbridge eval` reports (R@1 after ITM re-ranking of the ITC top 16, ITM accuracy, exact captions), and
    R@1 by ITC alone (`k_test=1`), which does not depend on whether the ITM head learnt."""
    out = folder / "heldout_eval.json"
    if not out.exists():
        from vlbridge.evaluation import evaluate_stage1
        from vlbridge.scripts.inference import evaluate_checkpoint, held_out_images, load_checkpoint, stage1_collator

        checkpoint = load_checkpoint(str(folder))
        metrics = evaluate_checkpoint(checkpoint, num_images=args.eval_images, captions_per_image=1)
        images = held_out_images(args.eval_images, captions_per_image=1, image_size=checkpoint.image_size)
        itc = evaluate_stage1(checkpoint.model, images, stage1_collator(checkpoint), k_test=1, progress=False)
        metrics.update({f"itc_{key}": itc[key] for key in ("i2t_r1", "t2i_r1")})
        out.write_text(json.dumps(metrics, indent=2))
    return json.loads(out.read_text())


def capfilt_command(args, captioner: Path, filter_: Path, out: Path, extra: list[str]) -> list[str]:
    """`vlbridge capfilt` over the web pairs `vlbridge stage1` trained (a) on."""
    data = ["--num_images", str(args.num_images), "--num_eval_images", str(args.eval_images)]
    data += ["--captions_per_image", "1", "--data_seed_value", "0", "--noise", str(args.noise)]
    models = ["--captioner", str(captioner), "--filter", str(filter_), "--output_dir", str(out)]
    return ["vlbridge", "capfilt", *models, *data, "--seed", str(args.seed), *extra]


def pretrain_command(args, out: Path, data: list[str]) -> list[str]:
    """`vlbridge stage1` at the equal budget every arm gets."""
    budget = ["--max_steps", str(args.max_steps), "--seed", str(args.seed), "--output_dir", str(out)]
    return ["vlbridge", "stage1", "--config", "stage1_builtin", *data, *budget]


def main(args) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    web = ["--captions_per_image", "1", "--num_train_images", str(args.num_images)]
    web += ["--num_eval_images", str(args.eval_images)]
    arms = {"noisy": work / "noisy", "clean": work / "clean"}
    run(
        pretrain_command(args, arms["noisy"], [*web, "--caption_noise", str(args.noise)]),
        arms["noisy"] / "stage1_metrics.json",
    )
    run(pretrain_command(args, arms["clean"], web), arms["clean"] / "stage1_metrics.json")
    capfilt, filter_only = work / "capfilt", work / "filter_only"
    clean_finetune = ["--clean_dataset", "builtin", "--clean_images", str(args.clean_images)]
    clean_finetune += ["--clean_steps", str(args.clean_steps), "--clean_learning_rate", str(args.clean_learning_rate)]
    run(capfilt_command(args, arms["noisy"], arms["noisy"], capfilt, clean_finetune), capfilt / "summary.json")
    # The same fine-tuned filter without synthetic captions: what the filtering alone is worth.
    no_synthetic = ["--num_synthetic", "0"]
    run(
        capfilt_command(args, capfilt / "captioner", capfilt / "filter", filter_only, no_synthetic),
        filter_only / "summary.json",
    )
    for name, data in (("capfilt", capfilt), ("filter_only", filter_only)):
        arms[name] = work / f"{name}_pretrained"
        run(
            pretrain_command(args, arms[name], ["--dataset", str(data), "--eval_fraction", "0.01"]),
            arms[name] / "stage1_metrics.json",
        )
    scores = {name: evaluate(folder, args) for name, folder in arms.items()}
    summary = json.loads((capfilt / "summary.json").read_text())
    names = ("noisy", "filter_only", "capfilt", "clean")
    rows = {}
    for key in ("i2t_r1", "t2i_r1", "itc_i2t_r1", "itc_t2i_r1", "itm_accuracy", "itg_exact"):
        rows[key] = {name: scores[name].get(key) for name in names}
        a, c = rows[key]["noisy"], rows[key]["clean"]
        for name in ("filter_only", "capfilt"):
            b = rows[key][name]
            rows[key][f"{name}_gap_closed"] = None if None in (a, b, c) or c == a else (b - a) / (c - a)
    result = {"args": vars(args), "scores": rows, "capfilt": summary}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print("| metric | (a) noisy | filter only | (b) CapFilt | (c) clean | gap closed: filter only / CapFilt |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, row in rows.items():
        cells = " | ".join(f"{row[name]:.3f}" for name in names)
        closed = " / ".join(
            "-" if row[f"{name}_gap_closed"] is None else f"{100 * row[f'{name}_gap_closed']:.0f}%"
            for name in ("filter_only", "capfilt")
        )
        print(f"| {key} | {cells} | {closed} |")
    for key in ("filter_precision", "filter_recall", "web_kept", "web_dropped", "synthetic_kept", "synthetic_dropped"):
        print(f"{key}: {summary.get(key)}")
    return result


if __name__ == "__main__":
    main(make_parser().parse_args(sys.argv[1:]))
