"""Self-describing checkpoints (Auto-class `auto_map`, model card naming the stage, data and metrics) and one-commit
sharing of a VLM with its processor.

Why `auto_map`, when `import vlbridge` already registers every vlbridge `model_type` with the Auto classes: after that
import, transformers resolves the registered classes and ignores `auto_map` (it prefers registered non-transformers
classes to remote code). `auto_map` serves the processes that cannot run `import vlbridge` first (TRL's command line,
`pipeline(...)` in someone else's script): with `trust_remote_code=True` they load the checkpoint through it.
Pointing `auto_map` at the vlbridge classes by their package path would not work (transformers reads `module.Class`
as a file in the checkpoint), and copying vlbridge's modeling files into every checkpoint would fork the code. So the
checkpoint carries `vlbridge_auto.py`, a few import lines that re-export the installed vlbridge classes; without
vlbridge installed, transformers' error names the missing package.

`save_pretrained` of the VLM and of the stage-1 model writes the same folder ([`SelfDescribingMixin`]): `auto_map` in
`config.json` (and in `processor_config.json` when a processor is saved there first), `vlbridge_auto.py` and a model
card, so that a folder from a plain `save_pretrained` loads everywhere a pushed one does. `auto_map` also keeps a
process without `import vlbridge` from loading the folder wrongly: without `auto_map` in `processor_config.json`,
`AutoProcessor` does not recognise `BridgeProcessor` and silently returns the bare tokenizer, and `AutoConfig` says
the `vlbridge` model type is unknown to an "out of date" transformers. With it, both refuse with transformers'
"contains custom code ... pass `trust_remote_code=True`" error (after a y/N prompt in a terminal), and
`trust_remote_code=True` loads the installed vlbridge classes; if vlbridge is not installed, `vlbridge_auto.py` raises
an `ImportError` naming `pip install vlbridge` and `import vlbridge`. The wording of the first error is
transformers': nothing of the folder's reaches it.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils.hub import hf_api

from ..configuration.remote_code import AUTO_MAP_FILE, add_auto_map_entries, auto_map_entry, write_remote_code_shim


CARD_TEMPLATE = """---
{card_data}
---

# {title}

A vision-language model built with [vlbridge](https://pypi.org/project/vlbridge/): a `{vision}` vision tower
linked to a `{text}` language model by a **{bridge}** bridge ({fusion}).

| part | type | parameters |
| --- | --- | --- |
{parts}

{details}
## Usage

```python
import vlbridge  # registers the vlbridge classes with the transformers Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
inputs = processor(images=image, text="<image> Describe the image.", return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs, max_new_tokens=30), skip_special_tokens=True))
```
"""

BRIDGE_NAMES = {
    "vlbridge_qformer": "Q-Former (BLIP-2)",
    "vlbridge_perceiver": "Perceiver Resampler (BLIP-3 / Flamingo)",
    "vlbridge_mlp": "MLP projector (LLaVA-1.5)",
}


def build_model_card(model, repo_id: str, details: str = "", tags: list[str] | None = None) -> ModelCard:
    """
    A model card naming the vision tower, bridge and language model, their sizes, and how to load the checkpoint.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]):
            The model the card describes.
        repo_id (`str`):
            Where it is shared; used in the usage snippet.
        details (`str`, *optional*):
            Markdown added before the usage section (training stage, data, measured metrics).
        tags (`list[str]`, *optional*):
            Extra Hub tags.
    """
    config = model.config
    base = model.model
    parts = [
        ("vision tower", config.vision_config.model_type, base.vision_tower),
        ("bridge", config.bridge_config.model_type, base.bridge),
        ("language projection", "linear", getattr(base, "language_projection", None)),
        ("gated cross-attention", "tanh-gated blocks", getattr(base, "gated_cross_attention", None)),
        ("language model", config.text_config.model_type, base.language_model),
    ]
    parts = [part for part in parts if part[2] is not None]  # no projection row with use_language_projection=False
    rows = "\n".join(f"| {name} | `{kind}` | {sum(p.numel() for p in m.parameters()):,} |" for name, kind, m in parts)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["vlbridge", config.bridge_config.model_type, *(tags or [])],
    )
    text = CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=repo_id.split("/")[-1],
        vision=config.vision_config.model_type,
        text=config.text_config.model_type,
        bridge=BRIDGE_NAMES.get(config.bridge_config.model_type, config.bridge_config.model_type),
        fusion=_fusion_phrase(config),
        parts=rows,
        details=f"{details}\n" if details else "",
        repo_id=repo_id,
    )
    return ModelCard(text)


def push_to_hub_with_processor(
    model,
    repo_id: str,
    processor=None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    card_details: str = "",
    tags: list[str] | None = None,
):
    """See [`BridgeVLMForConditionalGeneration.push_to_hub`]."""
    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir)
        if processor is not None:
            processor.save_pretrained(tmp_dir)  # processor config, tokenizer files, chat template
        add_auto_map(tmp_dir)  # `trust_remote_code=True` loads it without `import vlbridge` (see the module docstring)
        build_model_card(model, repo_id, card_details, tags).save(Path(tmp_dir) / "README.md")
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message or "Upload vlbridge model and processor",
            token=token,
            create_pr=create_pr,
            revision=revision,
        )


# The Auto classes a vlbridge checkpoint can resolve through, most specific first: the card's usage snippet shows the
# first one that gives the saved architecture.
VQA_AUTO_CLASS = "AutoModelForVisualQuestionAnswering"
MODEL_AUTO_CLASSES = ("AutoModelForImageTextToText", VQA_AUTO_CLASS, "AutoModelForPreTraining", "AutoModel")

STAGES = {
    "stage1": "BLIP-2 stage 1 / BLIP pretraining, representation learning: the model learns to match images with "
    "captions and to caption them (ITC + ITM + ITG, BLIP's LM).",
    "stage2": "BLIP-2 stage 2, generative pretraining: the bridge learns to give the language model image tokens "
    "it can caption from.",
    "sft": "supervised fine-tuning on image-grounded chats (loss on the assistant's answers).",
    "dpo": "preference optimisation (DPO) on chosen / rejected answers.",
}

PIPELINE_TAGS = {
    "vlbridge": "image-text-to-text",
    "vlbridge_qformer_pretraining": "zero-shot-image-classification",
    "vlbridge_blip_med": "image-to-text",
}


def _pipeline_tag(config: dict) -> str | None:
    """The Hub's pipeline tag of a saved config (a BLIP VQA folder answers questions; its pretraining sibling
    captions)."""
    model_type = config.get("model_type")
    if "BlipMEDForQuestionAnswering" in (config.get("architectures") or []):
        return "visual-question-answering"
    return PIPELINE_TAGS.get(model_type, "feature-extraction" if model_type in BRIDGE_NAMES else None)


def format_value(value) -> str:
    """
    One metric value as the tables print it: 4 significant digits for floats, integers whole, `n/a` for missing.

    Example:

    ```python
    >>> from vlbridge.modeling.saving import format_value
    >>> format_value(0.123456), format_value(12), format_value(1234.5678), format_value(None), format_value("72 s")
    ('0.1235', '12', '1235', 'n/a', '72 s')

    ```"""
    if value is None or (isinstance(value, Real) and math.isnan(float(value))):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, Real):
        return str(value)
    if isinstance(value, Integral):
        return str(int(value))
    return f"{float(value):.4g}"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _exported_class(name: str) -> type | None:
    """The class `vlbridge.<name>`, if the package exports one by that name (its configs, processors and models)."""
    # The public classes are those of the core packages, read here without importing the top-level package.
    import importlib

    for subpackage in ("configuration", "processing", "modeling"):
        package = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.{subpackage}")
        if name in getattr(package, "__all__", ()):
            candidate = getattr(package, name)
            return candidate if isinstance(candidate, type) else None
    return None


def auto_classes(output_dir: str | Path) -> dict[str, type]:
    """
    The vlbridge class each Auto class resolves the checkpoint in `output_dir` to once vlbridge is imported:
    `AutoConfig`, the `AutoModel*` classes its config is registered with, and `AutoProcessor` when a vlbridge
    processor is saved there. Empty for a checkpoint that is no vlbridge model (e.g. a PEFT adapter).

    Args:
        output_dir (`str` or `Path`): A saved checkpoint (`config.json`, optionally `processor_config.json`).

    Example:

    ```python
    >>> import tempfile
    >>> from vlbridge import QFormerConfig
    >>> from vlbridge.modeling.saving import auto_classes
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     QFormerConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp)
    ...     {auto: cls.__name__ for auto, cls in auto_classes(tmp).items()}
    {'AutoConfig': 'QFormerConfig', 'AutoModel': 'QFormerModel'}

    ```"""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(output_dir)
    try:
        config_class = CONFIG_MAPPING[(_read_json(folder / "config.json") or {}).get("model_type")]
    except KeyError:
        return {}
    # `vlbridge_auto.py` re-exports `vlbridge`'s public names: only those can stand in `auto_map`.
    if _exported_class(config_class.__name__) is not config_class:
        return {}
    classes = {"AutoConfig": config_class}
    names = ["AutoModel", "AutoModelForPreTraining", "AutoModelForImageTextToText"]
    names += ["AutoModelForZeroShotImageClassification", VQA_AUTO_CLASS]
    architectures = (_read_json(folder / "config.json") or {}).get("architectures") or []
    for name in names:
        try:
            model_class = getattr(transformers, name)._model_mapping[config_class]
        except KeyError:
            continue
        if _exported_class(model_class.__name__) is model_class:
            classes[name] = model_class
    # One config, two BLIP models: a VQA folder resolves through the VQA Auto class only, never to the pretraining
    # model that AutoModel / AutoModelForPreTraining build for this config.
    if VQA_AUTO_CLASS in classes and classes[VQA_AUTO_CLASS].__name__ in architectures:
        classes = {key: value for key, value in classes.items() if key in ("AutoConfig", VQA_AUTO_CLASS)}
    else:
        classes.pop(VQA_AUTO_CLASS, None)
    processor_class = _exported_class((_read_json(folder / "processor_config.json") or {}).get("processor_class", ""))
    if processor_class is not None:
        classes["AutoProcessor"] = processor_class
    return classes


def add_auto_map(output_dir: str | Path) -> dict[str, str]:
    """
    Writes `auto_map` into the checkpoint's `config.json`, pointing every Auto class of [`auto_classes`] at
    `vlbridge_auto.py`, which it writes beside it: a few lines that import those classes from the installed vlbridge.
    With `import vlbridge` the registered classes load the checkpoint and `auto_map` is not read; without it,
    `trust_remote_code=True` loads it through `auto_map` (see the module docstring for why no model code is copied).

    Args:
        output_dir (`str` or `Path`): A checkpoint written by `save_pretrained`.

    Returns:
        `dict[str, str]`: The `auto_map` written (empty, and nothing written, for a checkpoint that is no vlbridge
        model).

    Example:

    ```python
    >>> import tempfile
    >>> from vlbridge import QFormerConfig
    >>> from vlbridge.modeling.saving import add_auto_map
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     QFormerConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp)
    ...     add_auto_map(tmp)
    {'AutoConfig': 'vlbridge_auto.QFormerConfig', 'AutoModel': 'vlbridge_auto.QFormerModel'}

    ```"""
    folder = Path(output_dir)
    classes = auto_classes(folder)
    if not classes:
        return {}
    write_remote_code_shim(folder)
    names = {auto: cls.__name__ for auto, cls in classes.items()}
    add_auto_map_entries(folder / "config.json", names)
    if "AutoProcessor" in names:
        # AutoProcessor reads `processor_class` from processor_config.json first and never reaches config.json's
        # `auto_map`: without its own entry it returns the bare tokenizer in a process that has not imported vlbridge.
        add_auto_map_entries(folder / "processor_config.json", {"AutoProcessor": names["AutoProcessor"]})
    auto_map = {auto: auto_map_entry(name) for auto, name in names.items()}
    return auto_map


def _architecture(config: dict | None, adapter: dict | None) -> str:
    """One sentence on what the checkpoint holds, from its saved config."""
    if config is None:
        base = (adapter or {}).get("base_model_name_or_path") or "a vlbridge model"
        return f"A PEFT adapter (`{(adapter or {}).get('peft_type', 'unknown')}`) for `{base}`."
    model_type = config.get("model_type")
    vision = config.get("vision_config", {}).get("model_type")
    if model_type == "vlbridge":
        bridge = config["bridge_config"]["model_type"]
        fusion = f"{config.get('num_image_tokens')} image tokens per image"
        if config.get("image_fusion") == "gated_cross_attention":
            fusion = "read by gated cross-attention beside the language model, as Flamingo"
        return (
            f"A vision-language model: a `{vision}` vision tower linked to a `{config['text_config']['model_type']}` "
            f"language model by a **{BRIDGE_NAMES.get(bridge, bridge)}** bridge ({fusion})."
        )
    if model_type == "vlbridge_qformer_pretraining":
        queries = config.get("qformer_config", {}).get("num_query_tokens")
        return (
            f"A BLIP-2 stage-1 model: a `{vision}` vision tower and a Q-Former ({queries} queries) with its text "
            "branch and the ITC / ITM / ITG heads. Its vision tower and Q-Former start the stage-2 VLM "
            "(`vlbridge.modeling.from_pretrained_parts.vlm_from_stage1`)."
        )
    if model_type == "vlbridge_blip_med" and "BlipMEDForQuestionAnswering" in (config.get("architectures") or []):
        return (
            f"A BLIP visual question answering model: a `{vision}` vision tower, a BERT question encoder that reads "
            "the image, and an answer decoder that reads the question (`generate`)."
        )
    if model_type == "vlbridge_blip_med":
        parts = [
            part
            for part, flag in (
                ("text encoder (ITC / ITM)", "with_text_encoder"),
                ("decoder (LM)", "with_text_decoder"),
            )
            if config.get(flag, True)
        ]
        shared = config.get("share_encoder_decoder") and len(parts) == 2
        return (
            f"A BLIP multimodal mixture of encoder-decoder: a `{vision}` vision tower and a BERT "
            f"{' and '.join(parts)}"
            + (", sharing every parameter but self-attention" if shared else "")
            + ". It captions (`generate_captions`) and matches images and texts (`compute_itm_logits`) as its "
            "parts allow."
        )
    if model_type in BRIDGE_NAMES:
        return f"A {BRIDGE_NAMES[model_type]} bridge on its own, to drop into a vlbridge VLM."
    return f"A `{model_type}` model."


def _fusion_phrase(config) -> str:
    """How the images reach the language model, for the card's first sentence."""
    if getattr(config, "uses_cross_attention", False):
        return (
            f"{config.num_media_tokens} image tokens per image, read by gated cross-attention before every "
            f"{config.cross_attention_every_n_layers} decoder layer(s), as Flamingo"
        )
    return f"{config.num_image_tokens} image tokens per image"


def _parameter_rows(folder: Path) -> str:
    """`| part | parameters |` rows from the safetensors headers (no weights are read), parts by top-level name."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():
                parts = key.split(".")
                part = parts[1] if parts[0] == "model" and len(parts) > 2 else parts[0]
                counts[part] = counts.get(part, 0) + math.prod(weights.get_slice(key).get_shape())
    if not counts:
        return ""
    order = (
        "vision_tower",
        "qformer",
        "text_encoder",
        "text_decoder",
        "bridge",
        "language_projection",
        "gated_cross_attention",
        "language_model",
        "lm_head",
    )
    parts = sorted(counts, key=lambda part: (order.index(part) if part in order else len(order), part))
    rows = [f"| {part} | {counts[part]:,} |" for part in parts]
    return "\n".join(["| part | parameters |", "| --- | --- |", *rows, f"| **total** | {sum(counts.values()):,} |"])


def _usage(model_id: str, config: dict | None, classes: dict[str, type], adapter: dict | None) -> str:
    architectures = (config or {}).get("architectures") or []
    auto = next(
        (name for name in MODEL_AUTO_CLASSES if name in classes and classes[name].__name__ in architectures),
        "AutoModel",
    )
    if config is None and adapter is not None:
        base = adapter.get("base_model_name_or_path") or "<base model>"
        return (
            "```python\nimport vlbridge\nfrom peft import PeftModel\nfrom transformers import "
            f'AutoModelForImageTextToText\n\nbase = AutoModelForImageTextToText.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{model_id}")\n```'
        )
    processor = "AutoProcessor" in classes
    lines = [
        "import vlbridge  # registers the vlbridge classes with the transformers Auto classes",
        f"from transformers import {auto}" + (", AutoProcessor" if processor else ""),
        "",
        f'model = {auto}.from_pretrained("{model_id}")',
        *([f'processor = AutoProcessor.from_pretrained("{model_id}")'] if processor else []),
    ]
    remote = (
        "\n\nWithout `import vlbridge` (vlbridge must still be installed), pass `trust_remote_code=True`: the "
        f"`auto_map` in `config.json` points at `{AUTO_MAP_FILE}`, which only imports the installed vlbridge classes."
    )
    return "```python\n" + "\n".join(lines) + "\n```" + (remote if (config or {}).get("auto_map") else "")


STAGE_CARD_TEMPLATE = """---
{card_data}
---

# {title}

**Training stage:** {stage}{stage_description}

{architecture}

## Data

{data}

## Metrics

{metrics}

{parameters}## How to load

{usage}
{extra}"""


def _metric_table(metrics: Mapping[str, object] | None) -> str:
    if not metrics:  # a plain save_pretrained
        return "No metrics were measured by the run that saved this checkpoint."
    # Scalars and short strings only: sample lists and nested results belong in the run's own output.
    rows = [
        f"| {name} | {format_value(value)} |"
        for name, value in (metrics or {}).items()
        if value is None or isinstance(value, (Real, str))
    ]
    if not rows:
        return "No metrics were measured by the run that saved this checkpoint."
    return "Measured by the run that saved this checkpoint.\n\n| metric | value |\n| --- | --- |\n" + "\n".join(rows)


def write_model_card(
    output_dir: str | Path,
    *,
    stage: str | None,
    data: str,
    metrics: Mapping[str, object] | None,
    base_models: str | list[str] | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    extra: str = "",
    model_id: str | None = None,
) -> Path:
    """
    Writes `README.md` into a saved checkpoint: YAML front matter (`library_name: vlbridge`, tags, pipeline tag, base
    models, datasets) and a body naming the training stage, the data and the measured metrics, the parts and their
    parameter counts (read from the safetensors headers), and how to load it. Overwrites an existing `README.md`
    (e.g. the one TRL's trainers write).

    Args:
        output_dir (`str` or `Path`):
            The checkpoint folder (`config.json` and weights written by `save_pretrained`, or a PEFT adapter).
        stage (`str`, *optional*):
            The training stage that produced it: `"stage1"`, `"stage2"`, `"sft"`, `"dpo"` (described in the card)
            or any other name; `None` says it was not recorded (a plain `save_pretrained`).
        data (`str`):
            What it was trained on, in words (markdown).
        metrics (`dict[str, float]`):
            Metric name -> value as measured by the run (`None` or NaN print as `n/a`; non-scalars are left out).
        base_models (`str` or `list[str]`, *optional*):
            Hub ids of the checkpoints it was built from (vision tower, language model, earlier stage).
        datasets (`list[str]`, *optional*):
            Hub ids of the training datasets, for the front matter (describe local data in `data`).
        tags (`list[str]`, *optional*):
            Extra Hub tags.
        extra (`str`, *optional*):
            Markdown appended at the end.
        model_id (`str`, *optional*):
            The name the usage snippet loads; defaults to `output_dir`.

    Returns:
        `Path`: The path of `README.md`.

    Example:

    ```python
    >>> import tempfile
    >>> from vlbridge import QFormerConfig
    >>> from vlbridge.modeling.saving import write_model_card
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     QFormerConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp)
    ...     card = write_model_card(tmp, stage="stage1", data="2,000 built-in scenes", metrics={"i2t_r1": 0.61})
    ...     text = card.read_text()
    >>> "library_name: vlbridge" in text, "**Training stage:** `stage1`" in text, "| i2t_r1 | 0.61 |" in text
    (True, True, True)

    ```"""
    folder = Path(output_dir)
    config = _read_json(folder / "config.json")
    adapter = _read_json(folder / "adapter_config.json")
    model_type = (config or {}).get("model_type")
    bridge = (config or {}).get("bridge_config", {}).get("model_type")
    card_data = ModelCardData(
        library_name="vlbridge",
        pipeline_tag=_pipeline_tag(config or {}),
        tags=list(dict.fromkeys(tag for tag in ("vlbridge", model_type, bridge, stage, *(tags or [])) if tag)),
        base_model=base_models or None,
        datasets=datasets or None,
    )
    parameters = _parameter_rows(folder)
    text = STAGE_CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=folder.resolve().name,
        stage=f"`{stage}`" if stage else "not recorded",
        stage_description=f". {STAGES[stage]}" if stage in STAGES else ".",
        architecture=_architecture(config, adapter),
        data=data.strip() or "Not recorded.",
        metrics=_metric_table(metrics),
        parameters=f"## Parts\n\n{parameters}\n\n" if parameters else "",
        usage=_usage(model_id or str(output_dir), config, auto_classes(folder), adapter),
        extra=f"\n{extra.strip()}\n" if extra.strip() else "",
    )
    path = folder / "README.md"
    path.write_text(text)
    return path


def make_self_describing(output_dir: str | Path) -> dict[str, str]:
    """
    What `save_pretrained` of a vlbridge model adds to the folder it wrote: `auto_map` and `vlbridge_auto.py`
    ([`add_auto_map`]), and a model card ([`write_model_card`], stage and metrics "not recorded") unless the folder
    already has a `README.md` (a richer card from [`describe_checkpoint`], which the training scripts call next and
    which overwrites this one). Cheap: it reads JSON files and the safetensors headers, never the weights.

    Args:
        output_dir (`str` or `Path`): The folder `save_pretrained` wrote.

    Returns:
        `dict[str, str]`: The `auto_map` written.
    """
    folder = Path(output_dir)
    auto_map = add_auto_map(folder)
    if auto_map and not (folder / "README.md").exists():
        write_model_card(folder, stage=None, data="", metrics=None)
    return auto_map


class SelfDescribingMixin:
    """
    Makes `save_pretrained` write a self-describing folder, the same one `push_to_hub` uploads: `auto_map` in
    `config.json` (and `processor_config.json`, when the processor was saved there first), `vlbridge_auto.py` and a
    model card with `library_name: vlbridge` ([`make_self_describing`]). In a process that has not run
    `import vlbridge`, the Auto classes then load the folder with `trust_remote_code=True`, and without it they refuse
    with transformers' custom-code error instead of returning a bare tokenizer for the processor (see the module
    docstring). Put it first among the bases of a vlbridge `PreTrainedModel`. With `save_pretrained(...,
    push_to_hub=True)` transformers uploads before these files are written: use the model's `push_to_hub`.
    """

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # Under distributed training only the main process writes, as the parent class does.
        if kwargs.get("is_main_process", True):
            make_self_describing(save_directory)
        return result
