"""`vlbridge cache-features` writes a cache of a saved model's frozen vision tower over the built-in data (captions or
chats), and `vlbridge stage2` / `vlbridge sft --vision_features DIR` train from it; a run that trains the tower, or a
cache of another model, is refused with a one-line error."""

import json

import pytest
from transformers import CLIPImageProcessor

from vlbridge.cli import main
from vlbridge.data import build_word_tokenizer, chat_vocabulary
from vlbridge.data.feature_cache import VisionFeatureCache
from vlbridge.processing import BridgeProcessor
from vlbridge.scripts.tiny import tiny_vlm


pytestmark = pytest.mark.usefixtures("single_thread")

QUIET = ["--disable_tqdm", "true"]
TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", *QUIET]


def save_tiny_vlm(folder, seed: int = 0) -> None:
    """The recipes' tiny VLM (CLIP-style ViT, Q-Former, Llama) with its processor, saved as a checkpoint."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(chat_vocabulary())
    model = tiny_vlm("qformer", tokenizer)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens).save_pretrained(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache-features")
    save_tiny_vlm(folder / "vlm")
    save_tiny_vlm(folder / "other", seed=1)
    return folder


def test_cache_features_then_stage2_trains_from_the_cache(saved, tmp_path, capsys):
    data = ["--num_train_images", "12", "--captions_per_image", "2"]
    argv = ["cache-features", "--model", str(saved / "vlm"), "--dataset", "builtin", "--out", str(tmp_path / "cache")]
    assert main([*argv, *data, "--shard_size", "5", *QUIET]) == 0
    assert "12 images in 3 shards" in capsys.readouterr().out
    cache = VisionFeatureCache(tmp_path / "cache")
    assert (len(cache), cache.config["dtype"], cache.feature_shape) == (12, "bf16", (17, 64))
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert [shard["file"] for shard in index["shards"]] == [f"features-0000{s}.safetensors" for s in range(3)]

    stage2 = ["stage2", "--model_name_or_path", str(saved / "vlm"), "--num_eval_images", "0", *data, *TRAIN]
    output = tmp_path / "stage2"
    assert main([*stage2, "--vision_features", str(tmp_path / "cache"), "--output_dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "training on cached vision features" in printed and "final train loss" in printed
    assert (output / "config.json").is_file()

    # The tower would train, or the cache is another model's: one line naming the fix, nothing trained.
    refused = [*stage2, "--vision_features", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "no")]
    assert main([*refused, "--freeze", "full-finetune"]) == 2
    assert "this run trains the vision tower" in capsys.readouterr().err
    other = ["--model_name_or_path", str(saved / "other")]
    assert main([*refused, *other]) == 2
    assert "vision tower fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_cache_features_of_chats_then_sft(saved, tmp_path, capsys):
    data = ["--num_train_images", "6"]
    out = tmp_path / "chat-cache"
    argv = ["cache-features", "--model", str(saved / "vlm"), "--kind", "chats", "--out", str(out), "--dtype", "fp32"]
    assert main([*argv, *data, *QUIET]) == 0
    assert VisionFeatureCache(out).config["dtype"] == "fp32"
    sft = ["sft", "--model_name_or_path", str(saved / "vlm"), *data, *TRAIN, "--output_dir", str(tmp_path / "sft")]
    assert main([*sft, "--vision_features", str(out)]) == 0
    assert "training on cached vision features" in capsys.readouterr().out


def test_cache_features_needs_a_model_and_an_output_folder(capsys):
    assert main(["cache-features", "--dataset", "builtin"]) == 2
    assert "needs --model DIR" in capsys.readouterr().err
