"""`vlbridge capfilt`: every web (and synthetic) caption scored and decided, shards with provenance, a summary with the
filter's precision and recall on the built-in noisy data, resuming after a kill, and the errors that name the fix."""

import json

import pytest
import torch
from tiny import make_tokenizer, stage1_config
from transformers import CLIPImageProcessor

from vlbridge import BridgeProcessor, QFormerForImageTextPretraining
from vlbridge.cli import main
from vlbridge.hub.checkpoint import describe_checkpoint


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny stage-1 folder as `vlbridge stage1` writes one (model, tokenizer, image processor)."""
    path = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    model = QFormerForImageTextPretraining(stage1_config())
    tokenizer = make_tokenizer(image_token=False)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    processor = BridgeProcessor(
        image_processor, tokenizer, num_image_tokens=model.config.qformer_config.num_query_tokens
    )
    describe_checkpoint(path, stage="stage1", data="tiny", processor=processor)
    return path


def capfilt(stage1, output, *extra) -> int:
    argv = ["capfilt", "--captioner", str(stage1), "--filter", str(stage1), "--output_dir", str(output)]
    argv += ["--num_images", "12", "--image_size", "32", "--chunk_images", "5", "--num_synthetic", "0"]
    return main([*argv, *extra])


def load(output):
    from datasets import Dataset

    return Dataset.from_parquet(sorted(str(path) for path in output.glob("shard-*.parquet")))


def test_every_web_caption_is_scored_and_decided(stage1, tmp_path):
    assert capfilt(stage1, tmp_path / "out", "--threshold", "0.5", "--noise", "0.5") == 0
    shards = sorted((tmp_path / "out").glob("shard-*.parquet"))
    assert [path.name for path in shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    data = load(tmp_path / "out")
    assert len(data) == 12 and set(data["source"]) == {"web"} and sum(data["noisy"]) == 6
    assert all(row["kept"] == (row["itm_score"] >= 0.5) and 0.0 <= row["itm_score"] <= 1.0 for row in data)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["web_kept"] + summary["web_dropped"] == 12 and summary["skipped_images"] == 0
    assert "filter_precision" in summary and "filter_recall" in summary


def test_a_killed_run_resumes_without_duplicates_or_losses(stage1, tmp_path):
    assert capfilt(stage1, tmp_path / "whole") == 0
    assert capfilt(stage1, tmp_path / "killed") == 0
    (tmp_path / "killed" / "shard-00002.parquet").unlink()  # as if killed while writing the last shard
    (tmp_path / "killed" / "summary.json").unlink()
    assert capfilt(stage1, tmp_path / "killed", "--resume") == 0
    whole, resumed = load(tmp_path / "whole"), load(tmp_path / "killed")
    assert resumed["image_id"] == whole["image_id"] and resumed["text"] == whole["text"]
    assert resumed["itm_score"] == pytest.approx(whole["itm_score"])


def test_bad_runs_are_refused_naming_the_fix(stage1, tmp_path, capsys):
    assert capfilt(stage1, tmp_path / "out", "--threshold", "1.5") == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert capfilt(stage1, tmp_path / "out") == 0
    assert capfilt(stage1, tmp_path / "out") == 2  # the folder holds a run: --resume or another folder
    assert "--resume" in capsys.readouterr().err
    assert capfilt(stage1, tmp_path / "out", "--resume", "--threshold", "0.9") == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["capfilt", "--filter", str(stage1), "--output_dir", str(tmp_path / "x")]) == 2
    assert "--captioner" in capsys.readouterr().err


def test_synthetic_captions_are_sampled_and_scored(stage1, tmp_path):
    assert capfilt(stage1, tmp_path / "out", "--num_synthetic", "2", "--max_new_tokens", "5") == 0
    data = load(tmp_path / "out")
    synthetic = [row for row in data if row["source"] == "synthetic"]
    assert len(synthetic) == 24 and all(row["noisy"] is None for row in synthetic)
    assert all(0.0 <= row["itm_score"] <= 1.0 for row in synthetic)


def test_two_processes_split_the_chunks_and_give_the_one_process_result(stage1, tmp_path, monkeypatch):
    # As under `accelerate launch`: RANK / WORLD_SIZE in the environment; the second process runs beside this one.
    import os
    import subprocess
    import sys

    assert capfilt(stage1, tmp_path / "one") == 0
    argv = ["capfilt", "--captioner", str(stage1), "--filter", str(stage1), "--output_dir", str(tmp_path / "two")]
    argv += ["--num_images", "12", "--image_size", "32", "--chunk_images", "5", "--num_synthetic", "0"]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    other = subprocess.Popen([sys.executable, "-m", "vlbridge.cli", *argv], env=env, stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        assert main(argv) == 0
    finally:
        _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-2000:]
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    assert two["image_id"] == one["image_id"] and two["text"] == one["text"]
    assert two["itm_score"] == pytest.approx(one["itm_score"])
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["web_kept"] == sum(one["kept"])


def test_the_kept_captions_feed_the_next_pretraining_round(stage1, tmp_path):
    from vlbridge.data.user import load_user_dataset

    assert capfilt(stage1, tmp_path / "out", "--num_synthetic", "1", "--max_new_tokens", "5") == 0
    shards = load(tmp_path / "out")
    pairs = load_user_dataset(tmp_path / "out", "captions", "vlbridge stage1")
    assert len(pairs) == sum(shards["kept"]) and {"image", "caption", "image_id", "source"} <= set(pairs.column_names)
    assert pairs["caption"] == [row["text"] for row in shards if row["kept"]]
    argv = ["stage1", "--dataset", str(tmp_path / "out"), "--output_dir", str(tmp_path / "next"), "--max_steps", "1"]
    argv += ["--image_size", "32", "--vision_layers", "1", "--k_test", "2", "--eval_fraction", "0.25"]
    assert main([*argv, "--disable_tqdm", "true"]) == 0
