"""
Using saved checkpoints: captions and answers from a VLM, image-text retrieval with a stage-1 model, and held-out
scores on the built-in test split for whatever a checkpoint is. Behind `vlbridge caption`, `vlbridge retrieve` and
`vlbridge eval`, and the demo's report.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data import group_captions, make_synthetic_image_text, make_synthetic_vqa
from ..evaluation.generation import DEFAULT_CAPTION_PROMPT
from ..processing.image_utils import to_rgb_image


STAGE1_MODEL_TYPE = "vlbridge_qformer_pretraining"
VLM_MODEL_TYPE = "vlbridge"
# BLIP's MED model: a stage-1 checkpoint when it holds the pretraining model (ITC / ITM / LM: `vlbridge stage1
# --model_type blip`, or a converted BLIP retrieval / captioning checkpoint), not when it holds the VQA model.
BLIP_MED_MODEL_TYPE = "vlbridge_blip_med"
BLIP_MED_STAGE1_ARCHITECTURE = "BlipMEDForImageTextPretraining"


@dataclass
class Checkpoint:
    """
    A loaded vlbridge checkpoint.

    Args:
        model ([`BridgeVLMForConditionalGeneration`], [`QFormerForImageTextPretraining`] or
            [`BlipMEDForImageTextPretraining`]): In eval mode.
        processor ([`BridgeProcessor`]): Its processor.
        kind (`str`): `"vlm"` or `"stage1"`.
        stage (`str`, *optional*): The training stage its model card names (`"stage2"`, `"sft"`, ...), if any.
    """

    model: torch.nn.Module
    processor: object
    kind: str
    stage: str | None = None

    @property
    def image_size(self) -> int:
        """The side of the square images the model reads (from its vision config)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template: not for a stage-2 model, which never saw one."""
        return self.stage != "stage2"


def checkpoint_stage(path: str | os.PathLike) -> str | None:
    """
    The training stage named in a checkpoint's model card (`**Training stage:** `sft``), or `None`.

    Example:

    ```python
    >>> from vlbridge.scripts.inference import checkpoint_stage
    >>> checkpoint_stage("no/such/folder") is None
    True
    ```
    """
    card = Path(path, "README.md")
    if not card.is_file():
        return None
    match = re.search(r"\*\*Training stage:\*\* `([^`]+)`", card.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """
    Loads a vlbridge checkpoint saved by any stage (a VLM, or a stage-1 model: BLIP-2's Q-Former or BLIP's MED)
    with its processor.

    Args:
        path (`str` or `os.PathLike`): The folder (`config.json`, weights, processor files).

    Returns:
        [`Checkpoint`]

    Example:

    ```python
    >>> from vlbridge.scripts.inference import load_checkpoint
    >>> checkpoint = load_checkpoint("outputs/demo/sft")  # doctest: +SKIP
    >>> checkpoint.kind, checkpoint.stage  # doctest: +SKIP
    ('vlm', 'sft')
    ```
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    if not Path(path, "config.json").is_file():
        hint = " (a LoRA run: pass its merged/ folder)" if Path(path, "merged", "config.json").is_file() else ""
        raise FileNotFoundError(f"{path} holds no config.json: it is not a saved model{hint}.")
    config = AutoConfig.from_pretrained(path)
    model_type = config.model_type
    if model_type == STAGE1_MODEL_TYPE:
        model, kind = AutoModel.from_pretrained(path), "stage1"
    elif model_type == BLIP_MED_MODEL_TYPE and BLIP_MED_STAGE1_ARCHITECTURE in (config.architectures or []):
        model, kind = AutoModel.from_pretrained(path), "stage1"
    elif model_type == VLM_MODEL_TYPE:
        model, kind = AutoModelForImageTextToText.from_pretrained(path), "vlm"
    else:
        held = f"{model_type!r} model" + (f" ({', '.join(config.architectures)})" if config.architectures else "")
        raise ValueError(
            f"{path} holds a {held}; vlbridge commands take a vlbridge VLM ({VLM_MODEL_TYPE!r}) or a stage-1 model "
            f"({STAGE1_MODEL_TYPE!r}, or {BLIP_MED_MODEL_TYPE!r} holding a {BLIP_MED_STAGE1_ARCHITECTURE}). Convert "
            "a BLIP-2 or BLIP checkpoint first with `vlbridge convert`."
        )
    processor = AutoProcessor.from_pretrained(path)
    return Checkpoint(model.eval(), processor, kind, checkpoint_stage(path))


def _generate(checkpoint: Checkpoint, images: list, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy generations for `(image, text)` pairs, batched with left padding ([`evaluate_generation`]'s layout)."""
    from datasets import Dataset

    from ..evaluation import evaluate_generation

    # evaluate_generation's VQA path generates one answer per (image, text); the empty references score nothing.
    data = Dataset.from_dict({"image": images, "question": texts, "answer": [""] * len(texts)})
    result = evaluate_generation(
        checkpoint.model,
        checkpoint.processor,
        data,
        task="vqa",
        progress=False,
        use_chat_template=checkpoint.chat,
        max_new_tokens=max_new_tokens,
    )
    return [prediction.strip() for prediction in result["predictions"]]


def caption_images(
    checkpoint: Checkpoint, images: list, prompt: str | None = None, max_new_tokens: int = 30
) -> list[str]:
    """
    Greedy captions of `images` by a VLM checkpoint, in the layout it was trained on: `<image> prompt` for a
    stage-2 model, a chat turn (default prompt `"describe the image."`) for the others.

    Args:
        checkpoint ([`Checkpoint`]): A VLM from [`load_checkpoint`].
        images (`list`): PIL images (or paths).
        prompt (`str`, *optional*): The text after the image (stage 2: none; otherwise "describe the image.").
        max_new_tokens (`int`, *optional*, defaults to 30): Most tokens per caption.

    Returns:
        `list[str]`: One caption per image.

    Example:

    ```python
    >>> from vlbridge.scripts.inference import caption_images, load_checkpoint
    >>> caption_images(load_checkpoint("outputs/demo/stage2"), ["image.png"])  # doctest: +SKIP
    ['a large red circle at the top left']
    ```
    """
    if checkpoint.kind != "vlm":
        raise ValueError("Captions come from a VLM checkpoint (stage 2, SFT or DPO); this one is a stage-1 model.")
    if prompt is None:
        prompt = DEFAULT_CAPTION_PROMPT if checkpoint.chat else ""
    return _generate(checkpoint, [load_image(image) for image in images], [prompt] * len(images), max_new_tokens)


def answer_questions(checkpoint: Checkpoint, images: list, questions: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of a VLM checkpoint to one question per image (a chat turn for SFT / DPO models)."""
    return _generate(checkpoint, [load_image(image) for image in images], questions, max_new_tokens)


def load_image(image) -> Image.Image:
    """An 8-bit RGB PIL image from a path, a PIL image or an array (see [`to_rgb_image`] for 16-bit and float data)."""
    return to_rgb_image(image)


def stage1_collator(checkpoint: Checkpoint, max_length: int = 32):
    """The stage-1 collator that tokenizes texts as training did (BOS ... EOS) and processes images."""
    from ..trainers import ImageTextCollator

    return ImageTextCollator(checkpoint.processor.image_processor, checkpoint.processor.tokenizer, max_length)


def rank_matches(
    checkpoint: Checkpoint,
    images: list,
    texts: list[str],
    k_test: int = 16,
    index_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
):
    """
    Scores every image against every text with a stage-1 checkpoint: ITC similarity, then ITM re-ranking of each
    row's best `k_test` (LAVIS' scheme, [`~vlbridge.evaluation.retrieval.ImageTextRetriever`]).

    Args:
        checkpoint ([`Checkpoint`]): A stage-1 model from [`load_checkpoint`].
        images (`list`): PIL images or paths (paths only with `index_dir`).
        texts (`list[str]`): The texts.
        k_test (`int`, *optional*, defaults to 16): Candidates re-ranked by ITM per query.
        index_dir (`str` or `os.PathLike`, *optional*): An on-disk index of the images' embeddings
            ([`~vlbridge.evaluation.retrieval_index.EmbeddingIndex`]): reused when it holds these images, built there
            otherwise. The texts are then searched over it chunk by chunk (large galleries), text -> images only.
        batch_size (`int`, *optional*, defaults to 32): Images or texts per forward.

    Returns:
        `(scores_i2t, scores_t2i)`: `(num_images, num_texts)` and `(num_texts, num_images)` tensors, higher is better
        (ITM logit + ITC cosine on re-ranked pairs, -100 elsewhere); `scores_i2t` is `None` with `index_dir`.

    Example:

    ```python
    >>> from vlbridge.scripts.inference import load_checkpoint, rank_matches
    >>> i2t, t2i = rank_matches(load_checkpoint("outputs/demo/stage1"), ["a.png"], ["a red circle"])  # doctest: +SKIP
    ```
    """
    from ..evaluation.retrieval import ImageTextRetriever

    if checkpoint.kind != "stage1":
        raise ValueError(
            "Retrieval needs a stage-1 checkpoint (QFormerForImageTextPretraining or BlipMEDForImageTextPretraining); "
            "this one is a VLM."
        )
    collator = stage1_collator(checkpoint)
    retriever = ImageTextRetriever(
        checkpoint.model,
        image_processor=collator.image_processor,
        k_test=k_test,
        batch_size=batch_size,
        progress=False,
    )
    if index_dir is not None:
        retriever.progress = True  # indexing and searching a large gallery take a while: show them
        index = _gallery_index(retriever, images, index_dir)
        output = retriever.retrieve_from_index(index, collator.tokenize(list(texts)), image_to_text=False)
        return output.to_dense()
    pixel_values = collator.image_processor([load_image(image) for image in images], return_tensors="pt")
    output = retriever.retrieve(pixel_values["pixel_values"], collator.tokenize(list(texts)))
    return output.scores_i2t, output.scores_t2i


def _gallery_index(retriever, images: list, index_dir: str | os.PathLike):
    """The index of `images` (paths) at `index_dir` for this model: reused when it is one, built when none is there."""
    from ..evaluation.retrieval_index import EmbeddingIndex, model_identity

    if not all(isinstance(image, (str, os.PathLike)) for image in images):
        raise ValueError("An on-disk index is built from image files: pass paths.")
    paths = [os.path.abspath(image) for image in images]
    if not EmbeddingIndex.exists(index_dir):
        return retriever.build_index(paths, index_dir)
    index = EmbeddingIndex.open(index_dir)
    if index.sources != paths or index.metadata.get("model", "") != model_identity(retriever.model):
        raise ValueError(
            f"{index_dir} holds an index of other images or of another model ({index.metadata.get('model')!r}); "
            "remove it or pass another index folder."
        )
    return index


def held_out_images(
    num_images: int, image_size: int, seed: int = 0, max_objects: int = 2, captions_per_image: int = 5
):
    """The first `num_images` images of the built-in test split, one row each with `image`, `captions`, `objects`."""
    data = make_synthetic_image_text(
        {"test": num_images},
        image_size=image_size,
        seed=seed,
        captions_per_image=captions_per_image,
        max_objects=max_objects,
    )
    return group_captions(data["test"])


def evaluate_checkpoint(
    checkpoint: Checkpoint,
    num_images: int = 50,
    seed: int = 0,
    max_objects: int = 2,
    captions_per_image: int = 5,
    progress: bool = True,
    images=None,
) -> dict[str, float]:
    """
    Held-out scores on the built-in test split, as fit the checkpoint: retrieval recall, ITM accuracy and exact
    captions for a stage-1 model; CIDEr and BLEU-4 for a stage-2 model; VQA accuracy and CIDEr for an SFT or DPO model.

    Args:
        checkpoint ([`Checkpoint`]): From [`load_checkpoint`].
        num_images (`int`, *optional*, defaults to 50): Held-out images (the test split's first ones).
        seed (`int`, *optional*, defaults to 0): Seed of the built-in data (the training run's `data_seed_value`).
        max_objects (`int`, *optional*, defaults to 2): Most objects per scene (as in training).
        captions_per_image (`int`, *optional*, defaults to 5): Reference captions per image (as in training: the
            test split's images depend on it).
        progress (`bool`, *optional*, defaults to `True`): Show progress bars.
        images (`datasets.Dataset`, *optional*): Your own images, one row per image with `image` and `captions`
            (`group_captions` of caption pairs): scored on captioning (retrieval for a stage-1 model) instead of the
            built-in test split; no VQA, which needs the built-in questions.

    Returns:
        `dict[str, float]`: Metric name -> value.

    Example:

    ```python
    >>> from vlbridge.scripts.inference import evaluate_checkpoint, load_checkpoint
    >>> evaluate_checkpoint(load_checkpoint("outputs/demo/stage2"), num_images=20)  # doctest: +SKIP
    {'cider': 0.41, 'bleu4': 0.12}
    ```
    """
    from ..evaluation import evaluate_generation, evaluate_stage1

    options = {"image_size": checkpoint.image_size, "seed": seed, "max_objects": max_objects}
    own_images = images is not None
    if own_images:
        images = images.select(range(min(num_images, len(images))))
    else:
        images = held_out_images(num_images, captions_per_image=captions_per_image, **options)
    if checkpoint.kind == "stage1":
        metrics = evaluate_stage1(
            checkpoint.model, images, stage1_collator(checkpoint), k_test=min(16, len(images)), progress=progress
        )
        metrics.pop("samples")
        return metrics
    if not checkpoint.chat or own_images:
        scores = evaluate_generation(
            checkpoint.model,
            checkpoint.processor,
            images,
            task="caption",
            use_chat_template=checkpoint.chat,
            max_new_tokens=20,
            progress=progress,
        )
        return {"cider": scores["cider"], "bleu4": scores["bleu4"]}
    questions = make_synthetic_vqa({"test": num_images}, **options)["test"]
    vqa = evaluate_generation(
        checkpoint.model, checkpoint.processor, questions, task="vqa", max_new_tokens=8, progress=progress
    )
    captions = evaluate_generation(
        checkpoint.model, checkpoint.processor, images, task="caption", max_new_tokens=20, progress=progress
    )
    return {"vqa_accuracy": vqa["vqa_accuracy"], "cider": captions["cider"], "bleu4": captions["bleu4"]}


__all__ = [
    "Checkpoint",
    "answer_questions",
    "caption_images",
    "checkpoint_stage",
    "evaluate_checkpoint",
    "held_out_images",
    "load_checkpoint",
    "rank_matches",
]
