"""BridgeProcessor with `videos=`: frames through the image processor, zero-padded into `pixel_values_videos`, frame
counts in `video_num_frames`, one placeholder per video expanded like an image, and the errors that name the fix."""

import numpy as np
import pytest
import torch
from tiny import IMAGE_ID, make_images, make_tokenizer
from transformers import SiglipImageProcessorPil

from vlbridge.processing import BridgeAnyResImageProcessor, BridgeProcessor
from vlbridge.processing.video_utils import split_videos


N = 4  # image tokens per image (and per video)
SIZE = 16  # processed frame side


def make_processor(image_processor=None, num_image_tokens: int = N) -> BridgeProcessor:
    image_processor = image_processor or SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return BridgeProcessor(image_processor, make_tokenizer(), num_image_tokens=num_image_tokens)


def make_video(num_frames: int, seed: int = 0) -> list:
    """A video as a list of PIL frames (of another size than the processed one, so that resizing is exercised)."""
    return make_images(num_frames, size=24, seed=seed)


def image_runs(ids) -> list[int]:
    """Lengths of the runs of consecutive image tokens in one row."""
    runs, current = [], 0
    for token in list(ids) + [None]:
        if token == IMAGE_ID:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_videos_are_zero_padded_to_the_longest_and_their_frame_counts_returned():
    processor = make_processor()
    videos = [make_video(3, seed=1), make_video(1, seed=2), make_video(2, seed=3)]
    out = processor(videos=videos, text=["<image> red", "<image> blue <image>"], padding=True, return_tensors="pt")

    assert set(out) == {"input_ids", "attention_mask", "pixel_values_videos", "video_num_frames"}
    pixels, counts = out["pixel_values_videos"], out["video_num_frames"]
    assert pixels.shape == (3, 3, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert counts.dtype == torch.int64 and counts.tolist() == [3, 1, 2]
    # Padding frames are exactly zero; real frames are what the image processor makes of each frame.
    assert torch.all(pixels[1, 1:] == 0) and torch.all(pixels[2, 2:] == 0)
    frames = [frame for video in videos for frame in video]
    expected = processor.image_processor(frames, return_tensors="pt")["pixel_values"]  # (6, C, H, W)
    real = torch.cat([pixels[0, :3], pixels[1, :1], pixels[2, :2]])
    assert torch.equal(real, expected)
    assert all(pixels[v, f].abs().sum() > 0 for v, n in enumerate(counts.tolist()) for f in range(n))


def test_each_video_placeholder_expands_like_an_image():
    processor = make_processor(num_image_tokens=5)
    out = processor(videos=[make_video(2), make_video(4)], text="<image> what is it <image>")
    assert image_runs(out["input_ids"][0]) == [5, 5]
    assert out["input_ids"][0] == processor(images=make_images(2), text="<image> what is it <image>")["input_ids"][0]


def test_a_one_frame_video_gives_the_pixels_of_the_image_path():
    processor = make_processor()
    image = make_images(1, size=24, seed=7)[0]
    as_image = processor(images=[image], text="<image> red", return_tensors="pt")
    as_video = processor(videos=[[image]], text="<image> red", return_tensors="pt")
    assert as_video["pixel_values_videos"].shape == (1, 1, 3, SIZE, SIZE)
    assert torch.equal(as_video["pixel_values_videos"][:, 0], as_image["pixel_values"])
    assert torch.equal(as_video["input_ids"], as_image["input_ids"])


def test_video_forms_arrays_lists_nesting_and_no_return_tensors():
    processor = make_processor()
    rng = np.random.default_rng(0)
    array_video = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)  # (T, H, W, C)
    listed = [frame for frame in array_video]

    from_array = processor(videos=array_video, text="<image> red", return_tensors="pt")  # one video
    from_list = processor(videos=[listed], text="<image> red", return_tensors="pt")
    from_tensor = processor(videos=[torch.from_numpy(array_video)], text="<image> red", return_tensors="pt")
    assert torch.equal(from_array["pixel_values_videos"], from_list["pixel_values_videos"])
    assert torch.equal(from_tensor["pixel_values_videos"], from_list["pixel_values_videos"])

    # One list of videos per text: counts checked sample by sample.
    nested = processor(videos=[[listed], [], [listed[:1]]], text=["<image> a", "red", "<image> b"], padding=True)
    assert [len(image_runs(row)) for row in nested["input_ids"]] == [1, 0, 1]
    # Without return_tensors: one (max_frames, C, H, W) array per video and a list of counts, as images come back.
    assert isinstance(nested["pixel_values_videos"], list) and len(nested["pixel_values_videos"]) == 2
    assert all(video.shape == (3, 3, SIZE, SIZE) for video in nested["pixel_values_videos"])
    assert list(nested["video_num_frames"]) == [3, 1]
    with pytest.raises(ValueError, match="sample 0 but 2 video"):
        processor(videos=[[listed, listed], []], text=["<image> a", "red"])

    numpy_out = processor(videos=[listed], text="<image> red", return_tensors="np")
    assert numpy_out["pixel_values_videos"].shape == (1, 3, 3, SIZE, SIZE)
    assert numpy_out["video_num_frames"].tolist() == [3]


def test_video_offsets_and_token_types_say_video():
    processor = make_processor()
    out = processor(
        videos=[make_video(2)],
        text="<image> red",
        return_text_replacement_offsets=True,
        return_mm_token_type_ids=True,
    )
    assert [entry["type"] for entry in out["text_replacement_offsets"][0]] == ["video"]
    assert out["mm_token_type_ids"][0] == [2 if token == IMAGE_ID else 0 for token in out["input_ids"][0]]


def test_placeholder_counts_are_checked_for_videos():
    processor = make_processor()
    with pytest.raises(ValueError, match=r"Found 2 '<image>' placeholder\(s\) in the text but 1 video\(s\)"):
        processor(videos=[make_video(2)], text="<image> red <image>")
    with pytest.raises(ValueError, match=r"but no videos for it: pass `videos`"):
        processor(videos=[], text="<image> red")
    with pytest.raises(ValueError, match="looks already expanded. Pass one '<image>' per video"):
        processor(videos=[make_video(2)], text="<image>" * N + " red")


def test_mixed_images_and_videos_raise():
    with pytest.raises(ValueError, match="one call takes images or videos, one kind per batch"):
        make_processor()(images=make_images(1), videos=[make_video(2)], text="<image> a <image>")


def test_any_res_image_processor_refuses_videos():
    processor = make_processor(BridgeAnyResImageProcessor(size={"height": SIZE, "width": SIZE}))
    assert processor.is_anyres
    with pytest.raises(ValueError, match=r"tiles images \(any-res\).*plain image processor"):
        processor(videos=[make_video(2)], text="<image> red")


def test_bad_videos_and_audio_raise_clear_errors():
    processor = make_processor()
    with pytest.raises(ValueError, match="got audio"):
        processor(text="red", audio=[np.zeros(16)])
    with pytest.raises(TypeError, match="decode the video into frames first"):
        processor(videos=["clip.mp4"], text="<image> red")
    with pytest.raises(TypeError, match="Could not read `videos`"):
        processor(videos=[1], text="<image> red")
    with pytest.raises(ValueError, match=r"Video\(s\) \[1\] have no frames"):
        processor(videos=[make_video(2), []], text="<image> a <image>")
    with pytest.raises(ValueError, match="2 lists of videos for 1 texts"):
        split_videos([[make_video(1)], []], num_texts=1)


def test_video_keys_are_model_inputs():
    names = make_processor().model_input_names
    assert "pixel_values_videos" in names and "video_num_frames" in names
