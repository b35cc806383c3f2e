"""The `>>>` examples in the public docstrings run and print what they say."""

import doctest
import importlib
import re

import pytest


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
    "vlbridge.trainers.distributed",
    "vlbridge.trainers.collators",
    "vlbridge.evaluation.generation",
    "vlbridge.scripts.utils",
    "vlbridge.hub.checkpoint",
    "vlbridge.data.user",
    "vlbridge.trainers.text_warmup",
    "vlbridge.metrics.metric_info",
    "vlbridge.scripts.utils",
    "vlbridge.scripts.tiny",
    "vlbridge.scripts.stage1",
    "vlbridge.scripts.stage2",
    "vlbridge.scripts.sft",
    "vlbridge.demo.demo",
    "vlbridge.scripts.inference",
    "vlbridge.cli",
]


class MarkdownDocTestParser(doctest.DocTestParser):
    """HF docstrings fence their examples in ```python ... ```; the fences are not expected output."""

    def parse(self, string, name="<string>"):
        return super().parse(re.sub(r"^[ \t]*```.*$", "", string, flags=re.M), name)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(parser=MarkdownDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module.__name__):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
