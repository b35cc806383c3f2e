"""The `vlbridge` command: every subcommand has a useful `--help`; `vlbridge demo --fast` runs the whole recipe in a
fresh process (console script, else `python -m vlbridge.cli`), saves every stage, writes a report that renders in
headless Chromium and prints the metric table; the checkpoint commands work on what it saved."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, coloured_share, screenshot
from transformers import AutoModelForImageTextToText

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.cli import main


pytestmark = pytest.mark.usefixtures("single_thread")

STAGE_DIRS = {"stage1": "stage1", "stage2": "stage2", "sft": "sft", "dpo": "dpo/merged"}


def run_main(argv: list[str]) -> int:
    """`vlbridge.cli.main(argv)`'s exit status, whether it returns it or exits with it (argparse's --help)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    "argv,purpose",
    [
        ([], "<command>"),
        (["demo"], "DPO with LoRA"),
        (["stage1"], "ITC + ITM + ITG"),
        (["stage2"], "frozen LM"),
        (["sft"], "supervised fine-tuning"),
        (["sft_trl"], "SFTTrainer"),
        (["lora_sft"], "LoRA SFT"),
        (["dpo"], "preference"),
        (["capfilt"], "CapFilt"),
        (["cache-features"], "frozen vision tower"),
        (["caption"], "captions of images"),
        (["retrieve"], "every image against every text"),
        (["classify"], "every image against every label"),
        (["eval"], "held-out"),
        (["convert"], "BLIP-2"),
    ],
)
def test_every_command_explains_itself(capsys, argv, purpose):
    assert run_main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: vlbridge") and purpose.lower() in text.lower(), text[:800]
    if argv:
        assert "example" in text, text[:800]


def test_training_commands_show_their_preset_values_in_help(capsys):
    # The defaults --help shows are the default preset's, which is what a run without flags uses.
    assert run_main(["stage2", "--help"]) == 0
    text = capsys.readouterr().out
    assert "outputs/stage2-builtin" in text and "'stage2_builtin'" in text


def test_one_name_per_method_in_module_preset_and_command():
    from vlbridge.cli import TRAINING_COMMANDS
    from vlbridge.scripts.utils import preset_names

    for command, (preset, *_) in TRAINING_COMMANDS.items():
        assert preset == f"{command}_builtin" and preset in preset_names()
        assert (ROOT / "vlbridge" / "scripts" / f"{command}.py").is_file()
        assert (ROOT / "examples" / f"{command}.py").is_file()


def test_old_command_lines_still_work_with_a_warning(capsys):
    assert run_main(["pretrain", "--help"]) == 0
    captured = capsys.readouterr()
    assert "`vlbridge pretrain` is deprecated" in captured.err and "use `vlbridge stage1`" in captured.err
    assert captured.out.startswith("usage: vlbridge stage1")
    assert run_main(["train", "--stage", "sft-trl", "--help"]) == 0
    captured = capsys.readouterr()
    assert "`vlbridge train --stage sft-trl` is deprecated" in captured.err
    assert captured.out.startswith("usage: vlbridge sft_trl")


def test_bad_command_lines_fail_with_a_reason(capsys):
    assert run_main(["train", "--max_steps", "1"]) == 2
    assert "one command per method" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--<section>.<key>"):
        main(["demo", "--max_steps", "3"])


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    """One `vlbridge demo --fast` in a fresh process, shared by the tests below."""
    output_dir = tmp_path_factory.mktemp("demo")
    executable = shutil.which("vlbridge")
    command = [executable] if executable else [sys.executable, "-m", "vlbridge.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [*command, "demo", "--fast", "--output_dir", str(output_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def test_demo_saves_every_stage_and_prints_the_metric_table(fast_demo):
    output_dir, stdout = fast_demo
    for stage, folder in STAGE_DIRS.items():
        card = (output_dir / folder / "README.md").read_text()
        assert (output_dir / folder / "config.json").is_file(), folder
        assert f"**Training stage:** `{stage}`" in card and "library_name: vlbridge" in card, folder
        assert (output_dir / "configs" / f"{stage}.yaml").is_file()
    assert (output_dir / "dpo" / "adapter" / "adapter_config.json").is_file()
    for index in range(1, 5):
        assert f"[{index}/4]" in stdout  # a header line per stage
    table = stdout[stdout.index("| stage | metric | value |") :]
    for row in [
        "stage1 | R@1 image->text",
        "stage1 | R@1 text->image",
        "stage2 | CIDEr",
        "sft | VQA accuracy",
        "dpo | preference accuracy before",
        "dpo | preference accuracy after",
    ]:
        assert re.search(rf"\| {re.escape(row)} \| [0-9.e-]+ \|", table), row
    assert f"report: {(output_dir / 'report' / 'report.html').resolve()}" in stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert {"i2t_r1", "t2i_r1", "itm_accuracy"} <= set(metrics["stage1"]) and "vqa_accuracy" in metrics["sft"]


def test_demo_report_has_its_plots_and_renders_in_headless_chromium(fast_demo, tmp_path):
    output_dir, _ = fast_demo
    page = output_dir / "report" / "report.html"
    text = page.read_text()
    sources = re.findall(r'<img[^>]*src="([^"]+)"', text)
    pngs = sorted(path.name for path in page.parent.glob("*.png"))
    assert sorted(sources) == pngs
    assert {f"loss_{stage}.png" for stage in STAGE_DIRS} <= set(pngs)
    assert sum(name.startswith("example_") for name in pngs) == 4 and "retrieval_03.png" in pngs
    assert "stage 2: " in text and "Query: " in text
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium package (`apt-get install chromium`), which .ci/run installs")
    pixels = screenshot(page, tmp_path / "shot.png", tmp_path / "profile")
    _, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert counts.max() / counts.sum() < 0.9, "the screenshot is almost all one colour"
    assert len(counts) > 500 and coloured_share(pixels) > 0.004, (len(counts), coloured_share(pixels))


def test_caption_retrieve_and_eval_on_the_demo_checkpoints(fast_demo, tmp_path, capsys):
    from vlbridge.scripts.inference import held_out_images

    output_dir, _ = fast_demo
    paths = []
    for index, row in enumerate(held_out_images(2, image_size=48)):
        paths.append(str(tmp_path / f"scene{index}.png"))
        row["image"].save(paths[-1])
    assert run_main(["caption", str(output_dir / "stage2"), *paths, "--max_new_tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == paths

    argv = ["retrieve", str(output_dir / "stage1"), "--images", *paths, "--texts", "a red circle", "two stars"]
    assert run_main([*argv, "--top_k", "2"]) == 0
    out = capsys.readouterr().out
    assert "text -> images" in out and "'two stars': 1. " in out and "image -> texts" in out

    expected = {"stage1": "i2t_r1", "stage2": "cider", "sft": "vqa_accuracy"}
    for stage, metric in expected.items():
        assert run_main(["eval", str(output_dir / stage), "--num_images", "3"]) == 0
        assert re.search(rf"\| {stage} \| {metric} \| [0-9.e-]+ \|", capsys.readouterr().out), stage
    # The DPO folder holds the adapter; the error is one line that names the merged model beside it.
    assert main(["eval", str(output_dir / "dpo")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "vlbridge eval: error:" in error and "merged" in error, error

    # A YAML preset gives the options; a flag on the command line overrides it; an unknown key is refused.
    config = tmp_path / "caption.yaml"
    config.write_text("max_new_tokens: 2\nprompt: ''\n")
    assert run_main(["caption", str(output_dir / "stage2"), paths[0], "--config", str(config)]) == 0
    short = capsys.readouterr().out.split(": ", 1)[1].split()
    assert len(short) <= 2
    argv = ["caption", str(output_dir / "stage2"), paths[0], "--config", str(config), "--max_new_tokens", "4"]
    assert run_main(argv) == 0
    assert len(capsys.readouterr().out.split(": ", 1)[1].split()) >= len(short)
    config.write_text("num_beams: 3\n")
    with pytest.raises(SystemExit):
        main(["caption", str(output_dir / "stage2"), paths[0], "--config", str(config)])
    assert "does not take" in capsys.readouterr().err


def test_training_commands_delegate_to_the_scripts(tmp_path, capsys):
    # No --config: the command's built-in preset; every flag overrides it.
    tiny = ["--max_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"]
    argv = ["stage1", "--output_dir", str(tmp_path / "stage1"), "--num_train_images", "16", "--num_eval_images", "4"]
    assert run_main([*argv, "--vision_layers", "1", "--k_test", "2", *tiny]) == 0
    assert "| i2t_r1 |" in capsys.readouterr().out
    argv = ["sft", "--config", "sft_builtin", "--output_dir", str(tmp_path / "sft")]
    assert run_main([*argv, "--num_train_images", "4", "--per_device_train_batch_size", "2", *tiny]) == 0
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path / "sft"), BridgeVLMForConditionalGeneration)


def test_convert_command(tmp_path, capsys):
    from helpers import NUM_QUERY, make_source

    _, source_dir = make_source(tmp_path, "blip2", "opt")
    assert run_main(["convert", str(source_dir), str(tmp_path / "converted")]) == 0
    assert f"{NUM_QUERY} image tokens, with its processor" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "converted")
    assert type(model) is BridgeVLMForConditionalGeneration


def test_convert_refuses_an_architecture_it_does_not_convert(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    assert main(["convert", str(tmp_path / "bert"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "'bert' checkpoint" in error and "Blip2ForConditionalGeneration" in error, error
