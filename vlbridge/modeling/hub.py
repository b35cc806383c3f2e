"""One-commit sharing of a VLM with its processor and a model card that says what the checkpoint is."""

from __future__ import annotations

import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils.hub import hf_api


CARD_TEMPLATE = """---
{card_data}
---

# {title}

A vision-language model built with [vlbridge](https://pypi.org/project/vlbridge/): a `{vision}` vision tower
linked to a `{text}` language model by a **{bridge}** bridge ({num_image_tokens} image tokens per image).

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
        ("language projection", "linear", base.language_projection),
        ("language model", config.text_config.model_type, base.language_model),
    ]
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
        num_image_tokens=config.num_image_tokens,
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
