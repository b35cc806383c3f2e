"""The frozen vision-feature cache: an fp32 cache trains bit for bit as the tower would (stage 1, stage 2, SFT,
any-res); bad caches are refused naming what is wrong; writing resumes and splits over processes."""

import hashlib
import inspect
import pickle

import numpy as np
import pytest
import torch
from helpers import chat_rows, make_model, make_processor
from PIL import Image
from tiny import make_tokenizer, stage1_config, vlm_config
from transformers import CLIPImageProcessor, SiglipImageProcessorPil

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.data import feature_cache, make_synthetic_image_text
from vlbridge.data.feature_cache import (
    MissingImageFeatures,
    VisionFeatureCache,
    image_key,
    tower_fingerprint,
    write_feature_cache,
)
from vlbridge.modeling import QFormerForImageTextPretraining
from vlbridge.processing import BridgeAnyResImageProcessor, BridgeProcessor
from vlbridge.scripts.utils import load_vision_features
from vlbridge.trainers import CaptionCollator, ChatCollator, ImageTextCollator


pytestmark = pytest.mark.usefixtures("single_thread")

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # as tests/modeling/test_anyres.py


def caption_rows(num_images: int = 6, captions_per_image: int = 2, seed: int = 0) -> list[dict]:
    data = make_synthetic_image_text(
        {"train": num_images}, image_size=32, captions_per_image=captions_per_image, seed=seed
    )
    return list(data["train"])


def stage2_model(seed: int = 0) -> BridgeVLMForConditionalGeneration:
    model = make_model("llama", seed=seed)
    model.freeze("stage2")
    return model


def write(model, image_processor, rows, folder, **kwargs):
    return write_feature_cache(model, image_processor, rows, folder, progress=False, **{"dtype": "fp32", **kwargs})


def train(model, collator, batches: list[list[dict]], **forward_kwargs) -> tuple[list, dict]:
    """A few AdamW steps, dropout seeded per step: the losses and the trained weights."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step, rows in enumerate(batches):
        torch.manual_seed(step)
        loss = model(**collator(rows), **forward_kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_run(plain: tuple[list, dict], cached: tuple[list, dict]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(plain[0], cached[0])), (plain[0], cached[0])
    assert plain[1].keys() == cached[1].keys()
    assert all(torch.equal(plain[1][name], cached[1][name]) for name in plain[1])


# ---------------------------------------------------------------------------------------------------------------------
# Bit-identical training from an fp32 cache
# ---------------------------------------------------------------------------------------------------------------------


def test_stage2_trains_bit_identically_from_an_fp32_cache(tmp_path):
    processor, rows = make_processor("llama"), caption_rows()
    # Another batch size and shard split than training: a feature does not depend on the images beside it.
    summary = write(stage2_model(), processor.image_processor, rows, tmp_path, batch_size=3, shard_size=4)
    assert (summary.num_images, summary.num_shards, summary.complete) == (6, 2, True)
    cache = VisionFeatureCache(tmp_path).check(stage2_model(), processor.image_processor)
    batches = [rows[:4], rows[4:10]]

    model = stage2_model()
    plain = train(model, CaptionCollator.from_model(model, processor), batches)
    model = stage2_model()
    collator = CaptionCollator.from_model(model, processor, vision_features=cache)
    batch = collator(rows[:4])
    assert "pixel_values" not in batch and tuple(batch["vision_features"].shape) == (4, 17, 32)
    assert_same_run(plain, train(model, collator, batches))


def test_sft_trains_bit_identically_from_an_fp32_cache(tmp_path, monkeypatch):
    processor, rows = make_processor("llama"), chat_rows(6)
    model = make_model("llama")
    model.freeze("finetune")  # the language model trains too; the tower stays frozen
    write(model, processor.image_processor, rows, tmp_path)
    cache = VisionFeatureCache(tmp_path).check(model, processor.image_processor)
    batches = [rows[:3], rows[3:]]
    plain = train(model, ChatCollator.from_model(model, processor), batches)

    model = make_model("llama")
    model.freeze("finetune")
    collator = ChatCollator.from_model(model, processor, vision_features=cache)
    # The image processor's pixel path never runs for cached images.
    monkeypatch.setattr(type(processor.image_processor), "__call__", lambda *a, **k: pytest.fail("pixels made"))
    assert_same_run(plain, train(model, collator, batches))


def test_stage1_trains_bit_identically_from_an_fp32_cache(tmp_path):
    if "vision_features" not in inspect.signature(QFormerForImageTextPretraining.forward).parameters:
        pytest.skip("QFormerForImageTextPretraining.forward(vision_features=...) is not there yet")

    def stage1_model():
        torch.manual_seed(0)
        return QFormerForImageTextPretraining(stage1_config(freeze_vision_tower=True))

    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rows = caption_rows(num_images=4, captions_per_image=2)
    write(stage1_model(), image_processor, rows, tmp_path, batch_size=3)
    cache = VisionFeatureCache(tmp_path).check(stage1_model(), image_processor)
    batches = [rows[:4], rows[4:]]
    collator = ImageTextCollator(image_processor, make_tokenizer())
    plain = train(stage1_model(), collator, batches, sampling_seed=0)
    cached_collator = ImageTextCollator(image_processor, make_tokenizer(), vision_features=cache)
    batch = cached_collator(rows[:4])
    assert "pixel_values" not in batch and batch["image_ids"].tolist() == [row["image_id"] for row in rows[:4]]
    assert_same_run(plain, train(stage1_model(), cached_collator, batches, sampling_seed=0))


def test_anyres_cache_holds_every_real_tile_and_trains_and_generates_identically(tmp_path):
    processor = BridgeProcessor(
        BridgeAnyResImageProcessor(size={"height": 32, "width": 32}), make_tokenizer(), num_image_tokens=4
    )

    def anyres_model():
        torch.manual_seed(0)
        model = BridgeVLMForConditionalGeneration(
            vlm_config("clip", "perceiver", "llama", image_grid_pinpoints=PINPOINTS)
        )
        model.freeze("stage2")
        return model

    rng = np.random.default_rng(0)
    sizes = [(30, 100), (64, 64), (100, 30), (20, 20)]  # 1 + 3, 1 + 4, 1 + 3 and 1 + 2 tiles
    rows = [
        {"image": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "caption": "a red circle"}
        for h, w in sizes
    ]
    write(anyres_model(), processor.image_processor, rows, tmp_path, batch_size=3, shard_size=3)
    cache = VisionFeatureCache(tmp_path).check(anyres_model(), processor.image_processor)
    assert cache.is_anyres
    keys = [image_key(row["image"]) for row in rows]
    assert cache.image_sizes(keys).tolist() == [list(size) for size in sizes]
    assert tuple(cache.features(keys).shape) == (4 + 5 + 4 + 3, 17, 32)

    model = anyres_model()
    plain = train(model, CaptionCollator.from_model(model, processor), [rows[:2], rows[2:]])
    model = anyres_model()
    collator = CaptionCollator.from_model(model, processor, vision_features=cache)
    assert_same_run(plain, train(model, collator, [rows[:2], rows[2:]]))

    model.eval()
    prompts = processor(
        images=[[row["image"]] for row in rows[:2]], text=["<image> a", "<image> a red"], return_tensors="pt",
        padding=True, padding_side="left",
    )  # fmt: skip
    text = {key: prompts[key] for key in ("input_ids", "attention_mask", "image_sizes")}
    options = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2)
    from_pixels = model.generate(**text, pixel_values=prompts["pixel_values"], **options)
    from_cache = model.generate(**text, vision_features=cache.features(keys[:2]).float(), **options)
    assert torch.equal(from_pixels, from_cache)


def test_bf16_cache_is_close_and_half_the_size(tmp_path):
    model, processor, rows = stage2_model(), make_processor("llama"), caption_rows(4, 1)
    write(model, processor.image_processor, rows, tmp_path / "fp32")
    write(model, processor.image_processor, rows, tmp_path / "bf16", dtype="bf16")
    fp32, bf16 = VisionFeatureCache(tmp_path / "fp32"), VisionFeatureCache(tmp_path / "bf16")
    keys = [image_key(row["image"]) for row in rows]
    assert bf16.features(keys).dtype == torch.bfloat16
    torch.testing.assert_close(bf16.features(keys).float(), fp32.features(keys), rtol=1e-2, atol=2e-2)
    size = {name: (tmp_path / name / "features-00000.safetensors").stat().st_size for name in ("fp32", "bf16")}
    assert size["bf16"] < 0.55 * size["fp32"]


# ---------------------------------------------------------------------------------------------------------------------
# What is refused, and how it is named
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def stage2_cache(tmp_path):
    model, processor, rows = stage2_model(), make_processor("llama"), caption_rows(4, 1)
    write(model, processor.image_processor, rows, tmp_path, shard_size=2)
    return VisionFeatureCache(tmp_path), model, processor, rows


def test_images_missing_from_the_cache_are_named(stage2_cache):
    cache, model, processor, rows = stage2_cache
    other = caption_rows(3, 1, seed=7)
    collator = CaptionCollator.from_model(model, processor, vision_features=cache)
    with pytest.raises(MissingImageFeatures, match=r"3 of 4 images are not in the vision-feature cache") as error:
        collator([rows[0], *other])
    for i, row in enumerate(other, start=1):
        assert f"batch row {i} (image_id {row['image_id']}) ({image_key(row['image'])})" in str(error.value)
    many = [image_key(image) for image in make_images(8)]
    with pytest.raises(MissingImageFeatures, match="and 3 more"):
        cache.features(many)


def make_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_a_truncated_shard_is_named_and_nothing_is_read_from_it(stage2_cache):
    cache, _, _, rows = stage2_cache
    shard = cache.directory / "features-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    fresh = VisionFeatureCache(cache.directory)
    assert fresh.features([image_key(rows[0]["image"])]).shape[0] == 1  # shard 0 is fine
    with pytest.raises(ValueError, match=r"features-00001\.safetensors of the vision-feature cache is truncated"):
        fresh.features([image_key(rows[3]["image"])])


def test_another_towers_cache_is_refused_naming_both_fingerprints(stage2_cache):
    cache, _, processor, _ = stage2_cache
    other = stage2_model(seed=1)
    with pytest.raises(ValueError, match="not made from this model's vision tower") as error:
        cache.check(other, processor.image_processor)
    assert cache.config["tower_fingerprint"] in str(error.value) and tower_fingerprint(other) in str(error.value)
    with pytest.raises(ValueError, match="vision tower fingerprint"):
        load_vision_features(str(cache.directory), other, processor.image_processor)


def test_other_image_processor_settings_and_feature_settings_are_refused(stage2_cache):
    cache, model, _, _ = stage2_cache
    changed = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="image processor fingerprint: cache [0-9a-f]{16}, processor [0-9a-f]{16}"):
        cache.check(model, changed)
    model.config.vision_feature_layer = -2
    with pytest.raises(ValueError, match="feature settings"):
        cache.check(model, make_processor("llama").image_processor)


def test_wrong_shapes_and_a_training_tower_are_refused(stage2_cache):
    cache, model, processor, rows = stage2_cache
    batch = CaptionCollator.from_model(model, processor, vision_features=cache)(rows[:2])
    with pytest.raises(ValueError, match=r"vision_features must have shape \(num_images, 17, 32\).*got \(2, 17, 16\)"):
        model(**{**batch, "vision_features": batch["vision_features"][..., :16]})
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**{**batch, "vision_features": batch["vision_features"][:1]})
    cache.feature_shape = (17, 64)  # as a cache of a wider tower would hold (its fingerprint aside)
    with pytest.raises(ValueError, match=r"holds features of shape \(17, 64\).*reads \(17, 32\)"):
        cache.check(model, processor.image_processor)
    model.freeze("full-finetune")
    with pytest.raises(ValueError, match="the vision tower trains"):
        model(**batch)
    with pytest.raises(ValueError, match="this run trains the vision tower"):
        load_vision_features(str(cache.directory), model, processor.image_processor)
    with torch.no_grad():  # nothing trains without gradients: evaluation may use the cache
        model(**batch)


def test_unfinished_or_other_settings_caches_are_refused(tmp_path):
    model, processor, rows = stage2_model(), make_processor("llama"), caption_rows(4, 1)
    summary = write(model, processor.image_processor, rows, tmp_path, shard_size=2, num_processes=2)
    assert summary.written == [0] and not summary.complete
    with pytest.raises(ValueError, match="unfinished: 1 of 2 shards written"):
        VisionFeatureCache(tmp_path)
    with pytest.raises(ValueError, match="other settings.*dtype: 'fp32' there, 'bf16' now"):
        write(model, processor.image_processor, rows, tmp_path, shard_size=2, dtype="bf16")
    with pytest.raises(FileNotFoundError, match="holds no vision-feature cache"):
        VisionFeatureCache(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------------------------
# Resume, several processes, DataLoader workers
# ---------------------------------------------------------------------------------------------------------------------


def count_encoded(model) -> list[int]:
    """Images per `get_vision_features` call of `model`, appended as they run."""
    calls, original = [], model.get_vision_features
    model.get_vision_features = lambda pixel_values, *args: (
        calls.append(len(pixel_values)) or original(pixel_values, *args)
    )
    return calls


def shard_digests(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.safetensors"))}


def test_an_interrupted_run_resumes_without_re_encoding_finished_shards(tmp_path, monkeypatch):
    model, processor, rows = stage2_model(), make_processor("llama"), caption_rows(5, 2)
    write(model, processor.image_processor, rows, tmp_path / "clean", shard_size=2)

    real_write = feature_cache._write_shard

    def crash_after_shard_0(directory, number, tensors, sizes):
        if number == 1:
            raise KeyboardInterrupt("interrupted")
        real_write(directory, number, tensors, sizes)

    monkeypatch.setattr(feature_cache, "_write_shard", crash_after_shard_0)
    with pytest.raises(KeyboardInterrupt):
        write(model, processor.image_processor, rows, tmp_path / "run", shard_size=2)
    monkeypatch.setattr(feature_cache, "_write_shard", real_write)
    assert not (tmp_path / "run" / "features-00001.json").exists()

    calls = count_encoded(model)
    summary = write(model, processor.image_processor, rows, tmp_path / "run", shard_size=2)
    assert (summary.skipped, summary.written, summary.complete) == ([0], [1, 2], True)
    assert sum(calls) == 3  # shards 1 and 2 (2 + 1 images); shard 0 was not encoded again
    assert shard_digests(tmp_path / "run") == shard_digests(tmp_path / "clean")

    calls.clear()  # a finished cache: nothing to do
    assert write(model, processor.image_processor, rows, tmp_path / "run", shard_size=2).skipped == [0, 1, 2]
    assert calls == []


def test_two_processes_write_disjoint_shards_and_the_merged_cache_reads(tmp_path):
    model, processor, rows = stage2_model(), make_processor("llama"), chat_rows(5)
    single = write(model, processor.image_processor, rows, tmp_path / "single", shard_size=2)
    first = write(model, processor.image_processor, rows, tmp_path / "split", shard_size=2, num_processes=2)
    second = write(
        model, processor.image_processor, rows, tmp_path / "split", shard_size=2, process_index=1, num_processes=2
    )
    assert (first.written, first.complete) == ([0, 2], False)
    assert (second.written, second.complete) == ([1], True)
    assert shard_digests(tmp_path / "split") == shard_digests(tmp_path / "single")
    merged, reference = VisionFeatureCache(tmp_path / "split"), VisionFeatureCache(tmp_path / "single")
    keys = [image_key(image) for row in rows for image in row["images"]]
    assert len(merged) == single.num_images == len(set(keys))
    assert torch.equal(merged.features(keys), reference.features(keys))


def test_a_cache_with_open_shards_pickles_for_dataloader_workers(stage2_cache):
    cache, _, _, rows = stage2_cache
    keys = [image_key(row["image"]) for row in rows]
    features = cache.features(keys)  # both shards open
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy.features(keys), features)
