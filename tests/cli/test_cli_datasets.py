"""`--dataset` on every training and evaluation command, one-line errors (`--debug` for the traceback), `--help`
showing the preset's values, and TRL's trainers refusing an encoder-decoder language model up front."""

import json

import pytest
import torch
from PIL import Image
from tiny import make_tokenizer, vlm_config
from transformers import CLIPImageProcessor

from vlbridge import BridgeProcessor, BridgeVLMForConditionalGeneration
from vlbridge.cli import main
from vlbridge.scripts.utils import check_decoder_only_language_model


pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--max_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true", "--per_device_train_batch_size", "2"]
COLOURS = ("red", "blue", "green", "yellow")


def error_line(err: str) -> str:
    """The one error line of stderr (progress bars aside), and no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("vlbridge")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four images, as a caption folder, a chat jsonl and a preference jsonl."""
    root = tmp_path_factory.mktemp("data")
    captions, chats, preferences = [], [], []
    for colour in COLOURS:
        Image.new("RGB", (32, 32), colour).save(root / f"{colour}.png")
        captions.append({"file_name": f"{colour}.png", "text": f"a {colour} square"})
        chats.append(
            {
                "images": [f"{colour}.png"],
                "messages": [
                    {"role": "user", "content": "<image> what colour is it?"},
                    {"role": "assistant", "content": colour},
                ],
            }
        )
        preferences.append(
            {
                "images": [f"{colour}.png"],
                "prompt": "<image> what colour is it?",
                "chosen": colour,
                "rejected": "purple",
            }
        )
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in captions))
    (root / "chats.jsonl").write_text("\n".join(json.dumps(line) for line in chats))
    (root / "preferences.jsonl").write_text("\n".join(json.dumps(line) for line in preferences))
    return root


@pytest.mark.parametrize(
    "command,dataset",
    [
        (["sft"], "chats.jsonl"),
        (["sft_trl"], "chats.jsonl"),
        (
            ["lora_sft", "--model_name_or_path", "none", "--num_preference_images", "2"],
            "chats.jsonl",
        ),
        (
            ["dpo", "--model_name_or_path", "none", "--num_eval_images", "2", "--sft_num_train_images", "0"],
            "preferences.jsonl",
        ),
    ],
)
def test_training_commands_take_a_dataset(data, tmp_path, capsys, command, dataset):
    argv = [*command, "--dataset", str(data / dataset), "--output_dir", str(tmp_path / "out"), *TINY]
    assert run_main(argv) == 0, capsys.readouterr().err[-2000:]
    saved = tmp_path / "out" / ("merged" if command[0] == "dpo" or "lora_sft" in command else "")
    card = (saved / "README.md").read_text()
    assert "4 training examples" in card, card


def test_stage2_and_eval_take_a_caption_dataset(data, tmp_path, capsys):
    output = tmp_path / "stage2"
    argv = ["stage2", "--dataset", str(data), "--output_dir", str(output), *TINY]
    assert run_main([*argv, "--num_eval_images", "1", "--eval_max_new_tokens", "2"]) == 0
    assert "held-out captions (1 images)" in capsys.readouterr().out
    assert "3 training examples" in (output / "README.md").read_text()  # one of the four images held out
    assert run_main(["eval", str(output), "--dataset", str(data), "--num_images", "2"]) == 0
    assert "| cider |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command,dataset,expected",
    [
        (["sft"], "", "takes chats (columns images, messages)"),
        (["stage2"], "chats.jsonl", "takes captions (columns image, caption)"),
        (["dpo", "--model_name_or_path", "none"], "chats.jsonl", "takes preference rows (columns images, prompt"),
        (["eval", "unused"], "preferences.jsonl", "takes captions (columns image, caption)"),
    ],
)
def test_a_dataset_of_the_wrong_kind_is_refused_in_one_line(data, tmp_path, capsys, command, dataset, expected):
    argv = [*command, "--dataset", str(data / dataset)]
    if command[0] != "eval":
        argv += ["--output_dir", str(tmp_path), *TINY]
    assert run_main(argv) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"vlbridge {command[0]}: error: ") and expected in err, err


def test_errors_are_one_line_and_debug_shows_the_traceback(data, tmp_path, capsys):
    # A flag typo, a missing image, a LoRA adapter folder where a model is expected.
    assert run_main(["sft", "--max_stepz", "3"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "vlbridge sft: error: " in err and "--max_stepz" in err, err
    (tmp_path / "prefs.jsonl").write_text(
        json.dumps({"images": ["gone.png"], "prompt": "p", "chosen": "a", "rejected": "b"})
    )
    assert run_main(["dpo", "--model_name_or_path", "none", "--dataset", str(tmp_path / "prefs.jsonl"), *TINY]) == 2
    err = error_line(capsys.readouterr().err)
    assert "image 'gone.png' not found" in err, err
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    for argv in (["eval", str(adapter)], ["sft", "--model_name_or_path", str(adapter), *TINY]):
        assert run_main(argv) == 2
        err = error_line(capsys.readouterr().err)
        assert "LoRA adapter" in err and "vlbridge dpo" in err and "merge" in err, err
    with pytest.raises(ValueError, match="LoRA adapter"):
        main(["eval", str(adapter), "--debug"])


@pytest.mark.parametrize(
    "command,line",
    [
        (["stage2"], {"file_name": "../outside.png", "text": "a red square"}),
        (
            ["dpo", "--model_name_or_path", "none"],
            {"images": ["../outside.png"], "prompt": "p", "chosen": "a", "rejected": "b"},
        ),
    ],
)
def test_dataset_paths_outside_its_folder_need_the_flag(tmp_path, capsys, command, line):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    metadata = tmp_path / "data" / ("metadata.jsonl" if command[0] == "stage2" else "prefs.jsonl")
    metadata.write_text(json.dumps(line))
    dataset = str(metadata.parent if command[0] == "stage2" else metadata)
    assert run_main([*command, "--dataset", dataset, "--output_dir", str(tmp_path / "out"), *TINY]) == 2
    err = error_line(capsys.readouterr().err)
    assert "leaves the dataset folder" in err and "--allow_outside_paths" in err, err


def test_help_shows_the_values_of_the_preset(capsys):
    assert run_main(["stage1", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    # stage1_builtin overrides the dataclass defaults (64, 2,000 images, patch 8).
    for flag, value in (("image_size", 48), ("num_train_images", 5000), ("patch_size", 16)):
        assert f"--{flag.replace('_', '-')} {flag.upper()} " in text
        section = text[text.index(f"--{flag.replace('_', '-')} {flag.upper()} ") :]
        assert f"(default: {value})" in section[:400], (flag, section[:400])
    assert run_main(["dpo", "--help"]) == 0
    assert "chosen" in capsys.readouterr().out


@pytest.fixture(scope="module")
def t5_vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_vlm")
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "qformer", "t5"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = BridgeProcessor(image_processor, make_tokenizer(), num_image_tokens=model.config.num_image_tokens)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder, model


def test_trl_commands_refuse_an_encoder_decoder_language_model(t5_vlm, data, tmp_path, capsys):
    folder, model = t5_vlm
    with pytest.raises(ValueError, match="language model is t5 \\(encoder-decoder\\).*vlbridge sft"):
        check_decoder_only_language_model(model)
    for command in (["sft_trl"], ["lora_sft"], ["dpo"]):
        argv = [*command, "--model_name_or_path", str(folder), "--output_dir", str(tmp_path), *TINY]
        assert run_main(argv) == 2
        err = error_line(capsys.readouterr().err)
        assert "decoder-only" in err and "vlbridge sft" in err, (command, err)
