"""`vlbridge capfilt`: every web (and synthetic) caption scored and decided, shards with provenance, a summary with the
filter's precision and recall on the built-in noisy data, resuming after a kill, and the errors that name the fix;
any model that says it can caption / match as captioner / filter (BLIP's MED too); the clean fine-tune of copies of
both; .tar shards streamed one chunk at a time into the in-memory path's rows; the HTML report."""

import json

import pytest
import torch
from tiny import make_tokenizer, stage1_config
from transformers import CLIPImageProcessor

from vlbridge import BridgeProcessor, QFormerForImageTextPretraining, QFormerPretrainingConfig
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


@pytest.mark.parametrize("clean", [False, True], ids=["plain", "clean_fine_tune"])
def test_two_processes_split_the_chunks_and_give_the_one_process_result(stage1, tmp_path, monkeypatch, clean):
    # As under `accelerate launch`: RANK / WORLD_SIZE in the environment; the second process runs beside this one.
    # With --clean_dataset the first process fine-tunes alone while the second waits for the saved models.
    import os
    import subprocess
    import sys

    extra = [*CLEAN, "--num_synthetic", "1", "--max_new_tokens", "4"] if clean else []
    assert capfilt(stage1, tmp_path / "one", *extra) == 0
    argv = ["capfilt", "--captioner", str(stage1), "--filter", str(stage1), "--output_dir", str(tmp_path / "two")]
    argv += ["--num_images", "12", "--image_size", "32", "--chunk_images", "5", "--num_synthetic", "0", *extra]
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
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["web_kept"] + summary.get("synthetic_kept", 0) == sum(one["kept"])
    assert ("clean_finetune" in summary) == clean


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


# ------------------------------------------------------------------------------------------ captioner and filter


def test_a_model_that_cannot_do_the_job_is_refused_naming_what_is_needed(stage1, tmp_path, capsys):
    from helpers import make_model, make_processor

    vlm = tmp_path / "vlm"
    make_model("llama").save_pretrained(vlm)
    make_processor("llama").save_pretrained(vlm)
    argv = ["capfilt", "--captioner", str(stage1), "--filter", str(vlm), "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "BridgeVLMForConditionalGeneration" in error and "ITM head" in error
    assert "BlipMEDForImageTextPretraining" in error
    no_decoder = tmp_path / "no_decoder"
    QFormerForImageTextPretraining(stage1_config(decoder_start_token_id=None)).save_pretrained(no_decoder)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        if (stage1 / name).is_file():
            (no_decoder / name).write_bytes((stage1 / name).read_bytes())
    argv = ["capfilt", "--captioner", str(no_decoder), "--filter", str(stage1), "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "supports_captioning is False" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # refused before writing anything


class _OtherStage1Config(QFormerPretrainingConfig):
    model_type = "test_capfilt_other_stage1"


class _OtherStage1Model(QFormerForImageTextPretraining):
    """A stage-1 style model of another type than vlbridge's (as BLIP's MED is): found by its Auto class, with a
    tokenizer and an image processor beside it but no processor."""

    config_class = _OtherStage1Config


def test_any_model_that_says_it_can_caption_and_match_serves(stage1, tmp_path):
    from transformers import AutoConfig, AutoModelForPreTraining

    AutoConfig.register(_OtherStage1Config.model_type, _OtherStage1Config, exist_ok=True)
    AutoModelForPreTraining.register(_OtherStage1Config, _OtherStage1Model, exist_ok=True)
    other = tmp_path / "other"
    torch.manual_seed(0)
    _OtherStage1Model(_OtherStage1Config(**stage1_config().to_dict())).save_pretrained(other)
    make_tokenizer(image_token=False).save_pretrained(other)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(other)
    assert capfilt(other, tmp_path / "out", "--num_synthetic", "1", "--max_new_tokens", "4") == 0
    data = load(tmp_path / "out")
    assert len(data) == 24 and sorted(set(data["source"])) == ["synthetic", "web"]


# ------------------------------------------------------------------------------------------ --clean_dataset


def _file_hashes(folder) -> dict[str, str]:
    import hashlib

    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


CLEAN = ["--clean_dataset", "builtin", "--clean_images", "12", "--clean_captions_per_image", "2", "--clean_steps"]
CLEAN += ["2", "--clean_batch_size", "4", "--clean_eval_fraction", "0.25", "--clean_learning_rate", "0.001"]


def test_clean_fine_tunes_copies_of_captioner_and_filter_and_resume_reuses_them(stage1, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import vlbridge.scripts.capfilt_clean as capfilt_clean
    from vlbridge.scripts.capfilt_models import load_model

    original = _file_hashes(stage1)
    out = tmp_path / "out"
    assert capfilt(stage1, out, *CLEAN, "--num_synthetic", "1", "--max_new_tokens", "4") == 0
    assert _file_hashes(stage1) == original  # the checkpoint fine-tuned from is untouched
    for role in ("captioner", "filter"):
        names = {path.name for path in (out / role).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "capfilt_finetune.json"} <= names
        saved = load_model(out / role, role)  # with its tokenizer and image processor
        assert saved.image_processor.crop_size == {"height": 32, "width": 32} and len(saved.tokenizer) > 50
    captioner = json.loads((out / "captioner" / "config.json").read_text())
    assert captioner["itc_weight"] == captioner["itm_weight"] == 0 and captioner["itg_weight"] == 1
    assert json.loads((out / "filter" / "config.json").read_text())["itg_weight"] == 0
    before, after = load_file(stage1 / "model.safetensors"), load_file(out / "captioner" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith("qformer."))
    summary = json.loads((out / "summary.json").read_text())
    finetune = summary["clean_finetune"]
    assert finetune["captioner"]["path"] == str(out / "captioner") and finetune["filter"]["steps"] == 2
    assert {"itg_exact", "itm_accuracy", "i2t_r1"} <= set(finetune["filter"]["after"]) and "before" in finetune[
        "filter"
    ]
    assert finetune["captioner"]["held_out_images"] == 3 and finetune["captioner"]["train_captions"] == 18

    # A resumed run reuses both fine-tuned models: nothing is trained again, and CapFilt gives the same rows.
    trained = _file_hashes(out / "captioner")
    (out / "shard-00001.parquet").unlink()
    monkeypatch.setattr(capfilt_clean, "finetune_role", lambda *args: pytest.fail("fine-tuned again on --resume"))
    assert capfilt(stage1, out, *CLEAN, "--num_synthetic", "1", "--max_new_tokens", "4", "--resume") == 0
    assert _file_hashes(out / "captioner") == trained
    assert json.loads((out / "summary.json").read_text()) == summary


def test_the_builtin_clean_set_never_shows_a_web_image():
    from vlbridge.data import Scene
    from vlbridge.data.synthetic import describe_positions
    from vlbridge.scripts.capfilt import CapFiltArguments
    from vlbridge.scripts.capfilt_clean import load_clean_data
    from vlbridge.scripts.capfilt_data import builtin_web_pairs

    # One object per scene: few distinct scenes, so two seeds' images meet often and some must be replaced.
    args = CapFiltArguments(num_images=200, image_size=32, max_objects=1, clean_dataset="builtin", clean_images=200)
    args.clean_captions_per_image = 1
    web = builtin_web_pairs(args)
    clean = load_clean_data(args, web)

    def scenes(objects) -> set[str]:
        return {describe_positions(Scene.from_objects(scene)) for scene in objects}

    held_out = set(clean.held_out["image_id"])
    assert len(set(clean.train["image_id"]) | held_out) == 200 and len(held_out) == 20
    assert not scenes(web["objects"]) & (scenes(clean.train["objects"]) | scenes(clean.held_out["objects"]))


def test_bad_clean_settings_are_refused_naming_the_fix(stage1, tmp_path, capsys):
    from PIL import Image

    assert capfilt(stage1, tmp_path / "a", "--clean_dataset", "builtin", "--clean_steps", "0") == 2
    assert "--clean_steps must be >= 1" in capsys.readouterr().err
    assert capfilt(stage1, tmp_path / "b", "--clean_dataset", "builtin", "--clean_seed_value", "1") == 2
    assert "--clean_seed_value" in capsys.readouterr().err
    chats = tmp_path / "chats"
    chats.mkdir()
    Image.new("RGB", (32, 32), "red").save(chats / "1.png")
    chat = {"images": ["1.png"], "messages": [{"role": "user", "content": "<image> what?"}]}
    chat["messages"].append({"role": "assistant", "content": "a red square"})
    (chats / "chats.jsonl").write_text(json.dumps(chat) + "\n")
    assert capfilt(stage1, tmp_path / "c", "--clean_dataset", str(chats / "chats.jsonl")) == 2
    error = capsys.readouterr().err
    assert "--clean_dataset takes captions" in error and "images, messages" in error
    assert not any((tmp_path / name).exists() for name in "abc")


# ------------------------------------------------------------------------------------------ .tar shards, streamed

CAPTIONS = ["a red circle", "two blue squares", "a small green star", "<script>alert(1)</script> a yellow square"]


def _write_web_data(folder, num_images: int = 11, corrupt_last: bool = True) -> tuple[str, str]:
    """The same images and captions as two tar shards (a corrupt image last) and as a .jsonl with PNG files; every
    third image has two captions. Returns the shard pattern and the .jsonl path."""
    import io
    import tarfile

    from tiny import make_images

    folder.mkdir()
    images, lines = make_images(num_images, size=32, seed=3), []
    samples = []
    for number, image in enumerate(images):
        captions = [CAPTIONS[number % len(CAPTIONS)]] + (["a large white triangle"] if number % 3 == 0 else [])
        image.save(folder / f"{number}.png")
        lines.append(json.dumps({"image": f"{number}.png", "captions": captions, "image_id": number}))
        samples.append((number, (folder / f"{number}.png").read_bytes(), captions))
    if corrupt_last:
        samples.append((num_images, b"not a png", ["a broken image"]))
    (folder / "web.jsonl").write_text("\n".join(lines) + "\n")
    half = len(samples) // 2
    for shard, part in enumerate((samples[:half], samples[half:])):
        with tarfile.open(folder / f"web-{shard}.tar", "w") as archive:
            for number, png, captions in part:
                for name, data in (
                    (f"{number:04d}.png", png),
                    (f"{number:04d}.json", json.dumps({"captions": captions, "image_id": number}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(folder / "web-{0..1}.tar"), str(folder / "web.jsonl")


class _Tracked(dict):
    """A row the test can see die (plain dicts cannot be weakly referenced)."""


class _Held:
    """Counts the live objects handed out, and the most alive at once."""

    def __init__(self):
        self.alive = self.most = self.made = 0

    def track(self, thing):
        import weakref

        self.alive, self.made = self.alive + 1, self.made + 1
        self.most = max(self.most, self.alive)
        weakref.finalize(thing, self._died)
        return thing

    def _died(self):
        self.alive -= 1


def _track_rows_and_decodes(monkeypatch) -> tuple[_Held, _Held]:
    """Every row the tar stream hands capfilt, and every image capfilt decodes, counted while alive."""
    import vlbridge.scripts.capfilt as capfilt_module
    import vlbridge.scripts.capfilt_data as capfilt_data
    from vlbridge.data.shards import ShardRows

    rows, decoded = _Held(), _Held()
    stream, decode = capfilt_data.stream_user_shards, capfilt_module.to_rgb_image

    def tracked_stream(*args, **kwargs):
        shards = stream(*args, **kwargs)
        return ShardRows((rows.track(_Tracked(row)) for row in shards.rows), shards.chat, shards.report)

    monkeypatch.setattr(capfilt_data, "stream_user_shards", tracked_stream)
    monkeypatch.setattr(capfilt_module, "to_rgb_image", lambda image: decoded.track(decode(image)))
    return rows, decoded


def test_tar_shards_are_streamed_one_chunk_at_a_time_and_give_the_in_memory_rows(stage1, tmp_path, monkeypatch):
    shards, jsonl = _write_web_data(tmp_path / "web")
    extra = ["--num_synthetic", "1", "--max_new_tokens", "4", "--chunk_images", "3", "--batch_size", "2"]
    assert capfilt(stage1, tmp_path / "memory", "--dataset", jsonl, *extra) == 0
    rows, decoded = _track_rows_and_decodes(monkeypatch)
    assert capfilt(stage1, tmp_path / "stream", "--dataset", shards, *extra) == 0
    # 16 rows of 12 images (the last one corrupt) in 4 chunks of 3 images: at most one chunk (5 rows) and the row
    # that starts the next one are ever held, and at most one chunk of images is decoded at a time, each image once.
    assert rows.made == 16 and rows.most <= 5 + 1 and rows.alive == 0
    assert decoded.made == 11 and decoded.most <= 3 and decoded.alive == 0
    memory, stream = load(tmp_path / "memory"), load(tmp_path / "stream")
    assert len(stream) == 15 + 11 and stream["image_id"] == memory["image_id"] and stream["text"] == memory["text"]
    assert stream["source"] == memory["source"] and stream["itm_score"] == pytest.approx(memory["itm_score"])
    summary = json.loads((tmp_path / "stream" / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["skipped"][0]["image_id"] == 11

    # --resume decodes only the images of the chunk whose shard is missing, and writes the same rows.
    (tmp_path / "stream" / "shard-00002.parquet").unlink()
    rows, decoded = _track_rows_and_decodes(monkeypatch)
    assert capfilt(stage1, tmp_path / "stream", "--dataset", shards, *extra, "--resume") == 0
    assert decoded.made == 3 and rows.most <= 5 + 1
    resumed = load(tmp_path / "stream")
    assert resumed["text"] == stream["text"] and resumed["itm_score"] == pytest.approx(stream["itm_score"])


def test_each_process_streams_every_nth_chunk_of_the_in_memory_order(tmp_path):
    from vlbridge.data.user import load_user_dataset, stream_user_shards
    from vlbridge.scripts.capfilt_data import ImageChunks

    shards, jsonl = _write_web_data(tmp_path / "web", num_images=14, corrupt_last=False)

    def ids(chunks: ImageChunks, wanted) -> dict[int, list[int]]:
        return {number: [image_id for image_id, _ in images] for number, images in chunks.iter_wanted(wanted)}

    memory = ImageChunks(load_user_dataset(jsonl, "captions", "test"), chunk_images=4)
    whole = ids(memory, lambda number: True)
    assert memory.num_chunks == 4 and list(whole.values())[-1] == [12, 13]
    merged = {}
    for rank in range(2):
        chunks = ImageChunks(stream_user_shards(shards, "captions", "test"), chunk_images=4)
        merged.update(ids(chunks, lambda number, rank=rank: number % 2 == rank))
        assert chunks.num_chunks == 4
    assert dict(sorted(merged.items())) == whole


# ------------------------------------------------------------------------------------------ report.html


def test_the_report_shows_examples_with_escaped_captions(stage1, tmp_path):
    shards, _ = _write_web_data(tmp_path / "web")
    out = tmp_path / "out"
    extra = ["--num_synthetic", "1", "--max_new_tokens", "4", "--report_examples", "5", "--dataset", shards]
    assert capfilt(stage1, out, *extra) == 0
    page = (out / "report.html").read_text()
    assert page.count('<div class="example">') == 5 and page.count("data:image/png;base64,") == 5
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "web_kept" in page and "skipped_images" in page and 'src="http' not in page


def test_the_report_shows_every_case_the_run_holds(tmp_path):
    from tiny import make_images

    from vlbridge.scripts.capfilt import _write_shard
    from vlbridge.scripts.capfilt_report import write_report

    # Eight images; the first four only hold kept web captions, so every other case must be looked for further on.
    cases = [("web", True, False, "")] * 4 + [("web", False, True, "swap"), ("synthetic", True, None, None)]
    cases += [("web", False, True, "attribute"), ("synthetic", False, None, None)]
    rows = []
    for image_id, (image, (source, kept, noisy, kind)) in enumerate(zip(make_images(8), cases)):
        rows.append(
            {
                "image": image,
                "image_id": image_id,
                "text": f"caption {image_id}",
                "source": source,
                "itm_score": 0.9 if kept else 0.1,
                "kept": kept,
                "noisy": noisy,
                "noise_kind": kind,
            }
        )
    shards = [tmp_path / "shard-00000.parquet", tmp_path / "shard-00001.parquet"]
    _write_shard(rows[:4], shards[0])
    _write_shard(rows[4:], shards[1])
    page = write_report(tmp_path, shards, {"web_kept": 4}, {"threshold": 0.5}, count=4).read_text()
    assert page.count('<div class="example">') == 4
    for case in ("web-kept", "web-dropped", "synthetic-kept", "synthetic-dropped"):
        assert f'class="{case.split("-")[1]} {case}"' in page, case
    assert "swap" in page and "attribute" not in page  # four examples: the cases first, then the noise kinds
    assert "true caption" in page


def _tiny_blip_med_config(**kwargs):
    from tiny import EOS_ID, PAD_ID, VOCAB_SIZE

    from vlbridge import BlipMEDConfig

    return BlipMEDConfig(
        vision_config={
            "model_type": "blip_vision_model",
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "vocab_size": VOCAB_SIZE,
            "max_position_embeddings": 64,
        },
        embed_dim=16,
        decoder_start_token_id=VOCAB_SIZE - 1,
        enc_token_id=VOCAB_SIZE - 2,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        queue_size=8,
        **kwargs,
    )


def test_blip_med_serves_as_captioner_and_filter_and_fine_tunes(tmp_path, capsys):
    import vlbridge.modeling

    med_class = getattr(vlbridge.modeling, "BlipMEDForImageTextPretraining", None)
    vqa_class = getattr(vlbridge.modeling, "BlipMEDForQuestionAnswering", None)
    if med_class is None or vqa_class is None:
        pytest.skip("BLIP's MED model is not in vlbridge.modeling")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vqa = {"share_encoder_decoder": False, "use_momentum_distillation": False}
    for name, model_class, config in (("med", med_class, {}), ("vqa", vqa_class, vqa)):
        torch.manual_seed(0)
        model_class(_tiny_blip_med_config(**config)).save_pretrained(tmp_path / name)
        make_tokenizer(image_token=False).save_pretrained(tmp_path / name)
        image_processor.save_pretrained(tmp_path / name)
    med = tmp_path / "med"
    assert capfilt(med, tmp_path / "out", "--num_synthetic", "1", "--max_new_tokens", "4", *CLEAN) == 0
    assert len(load(tmp_path / "out")) == 24
    assert json.loads((tmp_path / "out" / "filter" / "config.json").read_text())["itg_weight"] == 0
    # A BLIP VQA folder has the MED config too, but not the pretraining model's heads: it is not loaded as one.
    argv = ["capfilt", "--captioner", str(med), "--filter", str(tmp_path / "vqa"), "--output_dir", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "is a BlipMEDForQuestionAnswering" in capsys.readouterr().err
