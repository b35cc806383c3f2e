"""The demo's report: held-out images with the stage-2 captions and SFT answers, a retrieval example, the losses."""

from __future__ import annotations

import random
from pathlib import Path

from ..data.synthetic import Scene
from ..data.synthetic_vqa import write_questions
from ..evaluation.stage1 import retrieval_caption
from ..processing.image_utils import to_rgb_image
from ..scripts.inference import answer_questions, caption_images, held_out_images, load_checkpoint, rank_matches
from ..scripts.utils import ScriptResult
from .render import HeldOutExample, RetrievalExample, render_report


def held_out_examples(
    stage2: ScriptResult,
    sft: ScriptResult,
    settings: dict,
    num_examples: int,
    questions_per_image: int,
    rng: random.Random,
) -> list[HeldOutExample]:
    """
    The first `num_examples` images of stage 2's held-out split with the stage-2 model's caption (its reference
    below it) and the SFT model's answers to `questions_per_image` questions about each (marked right or wrong).

    Args:
        stage2 ([`ScriptResult`]): The stage-2 run (its checkpoint folder).
        sft ([`ScriptResult`]): The SFT run.
        settings (`dict`): The stage-2 preset values (image size, seed, objects and captions per image).
        num_examples (`int`): Images in the grid.
        questions_per_image (`int`): Questions per image (of different types).
        rng (`random.Random`): Which questions.
    """
    images = held_out_images(
        num_examples,
        settings["image_size"],
        seed=settings.get("data_seed_value", 0),
        max_objects=settings["max_objects"],
        captions_per_image=settings.get("captions_per_image", 3),
    )
    pictures = [to_rgb_image(row["image"]) for row in images]
    captioner = load_checkpoint(stage2.output_dir)
    captions = caption_images(captioner, pictures, prompt=settings.get("prompt") or "", max_new_tokens=20)
    asked = []
    for row in images:
        questions = write_questions(Scene.from_objects(row["objects"]), rng)
        asked.append(rng.sample(questions, min(questions_per_image, len(questions))))
    flat = [(index, qa) for index, qas in enumerate(asked) for qa in qas]
    answers = answer_questions(
        load_checkpoint(sft.output_dir), [pictures[index] for index, _ in flat], [qa["question"] for _, qa in flat]
    )
    examples = [
        HeldOutExample(picture, caption=f"stage 2: {caption}", reference=row["captions"][0])
        for picture, caption, row in zip(pictures, captions, images)
    ]
    for (index, qa), answer in zip(flat, answers):
        examples[index].answers.append((qa["question"], answer, qa["answer"]))
    return examples


def retrieval_example(stage1: ScriptResult, settings: dict, top_k: int) -> RetrievalExample:
    """
    Text-to-image retrieval with the stage-1 model over its held-out images: the first image's "positions" caption
    (the one held-out R@1 is measured with) as the query, and the `top_k` images by ITM-re-ranked score.
    """
    images = held_out_images(
        settings["num_eval_images"],
        settings["image_size"],
        seed=settings.get("data_seed_value", 0),
        max_objects=settings["max_objects"],
        captions_per_image=settings.get("captions_per_image", 3),
    )
    pictures = [to_rgb_image(row["image"]) for row in images]
    query = retrieval_caption(images[0])
    _, scores_t2i = rank_matches(
        load_checkpoint(stage1.output_dir), pictures, [query], k_test=min(settings.get("k_test", 16), len(pictures))
    )
    top = scores_t2i[0].topk(min(top_k, len(pictures)))
    ranked = top.indices.tolist()
    return RetrievalExample(
        query=query,
        images=[pictures[index] for index in ranked],
        scores=top.values.tolist(),
        correct=ranked.index(0) if 0 in ranked else None,
    )


def write_report(
    output_dir: Path,
    stages: dict[str, dict],
    results: dict[str, ScriptResult],
    table: dict[str, dict],
    settings: dict,
    rng: random.Random,
) -> Path:
    """
    Renders `<output_dir>/report/report.html` from the demo's stages ([`~vlbridge.demo.render_report`]).

    Args:
        output_dir (`Path`): The demo's output folder.
        stages (`dict[str, dict]`): Stage -> the preset values it ran with.
        results (`dict[str, ScriptResult]`): Stage -> its result.
        table (`dict[str, dict]`): The metric table.
        settings (`dict`): The report's settings (`num_examples`, `questions_per_image`, `retrieval_top_k`).
        rng (`random.Random`): Which questions the grid asks.

    Returns:
        `Path`: The report page.
    """
    examples = held_out_examples(
        results["stage2"],
        results["sft"],
        stages["stage2"],
        settings["num_examples"],
        settings["questions_per_image"],
        rng,
    )
    retrieval = retrieval_example(results["stage1"], stages["stage1"], settings["retrieval_top_k"])
    losses = {stage: result.log_history for stage, result in results.items()}
    return render_report(
        output_dir / "report",
        title="vlbridge demo",
        losses=losses,
        examples=examples,
        retrieval=retrieval,
        metrics=table,
    )


__all__ = ["held_out_examples", "retrieval_example", "write_report"]
