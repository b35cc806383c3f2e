"""The `>>>` examples in the public docstrings run and print what they say."""

import pytest
from helpers import run_docstring_examples


MODULES = [
    "vlbridge.configuration.configuration_qformer",
    "vlbridge.configuration.configuration_perceiver",
    "vlbridge.configuration.configuration_mlp",
    "vlbridge.configuration.configuration_bridge_vlm",
    "vlbridge.modeling.modeling_qformer",
    "vlbridge.modeling.modeling_perceiver",
    "vlbridge.modeling.modeling_mlp",
    "vlbridge.modeling.modeling_bridge_vlm",
    "vlbridge.processing.processing_bridge",
    "vlbridge.conversion.qformer",
    "vlbridge.data.tokenizer",
    "vlbridge.data.synthetic_vqa",
    "vlbridge.data.synthetic_noisy",
    "vlbridge.trainers.distributed",
    "vlbridge.trainers.collators",
    "vlbridge.evaluation.generation",
    "vlbridge.scripts.utils",
    "vlbridge.hub.checkpoint",
    "vlbridge.data.user",
    "vlbridge.trainers.text_warmup",
    "vlbridge.metrics.metric_info",
    "vlbridge.scripts.tiny",
    "vlbridge.scripts.stage1",
    "vlbridge.scripts.stage2",
    "vlbridge.scripts.sft",
    "vlbridge.demo.demo",
    "vlbridge.scripts.inference",
    "vlbridge.cli",
    "vlbridge.modeling.language_projection",
    "vlbridge.modeling.qformer_features",
    "vlbridge.modeling.modeling_qformer_zero_shot",
    "vlbridge.modeling.qformer_captioning",
    "vlbridge.conversion.llava",
    "vlbridge.conversion.dispatch",
    "vlbridge.modeling.gated_cross_attention",
    "vlbridge.conversion.openflamingo_perceiver",
    "vlbridge.data.synthetic_interleaved",
    "vlbridge.trainers.interleaved",
    "vlbridge.evaluation.few_shot",
    "vlbridge.modeling.vision_features",
    "vlbridge.data.feature_cache",
    "vlbridge.scripts.cache_features",
    "vlbridge.processing.coordinates",
    "vlbridge.data.synthetic_grounding",
    "vlbridge.metrics.grounding_metrics",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    run_docstring_examples(name)  # fences stripped, ELLIPSIS and NORMALIZE_WHITESPACE (tests/helpers.py)
