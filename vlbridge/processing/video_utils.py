"""Videos for [`BridgeProcessor`]: telling one video from a list of them, and padding their frames into one batch.

A video is a list of frames (PIL images, `(H, W, C)` / `(C, H, W)` arrays or tensors) or one `(T, H, W, C)` /
`(T, C, H, W)` array or tensor. Frames are decoded images: reading video files is left to the caller (decord, PyAV,
torchvision), who also chooses which frames to sample.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image


VIDEO_FORMS = (
    "a video is a list of frames (PIL images or (height, width, channels) arrays) or one (num_frames, height, "
    "width, channels) array; pass one video, a flat list of videos matched to the placeholders in order, or one list "
    "of videos per text"
)


def _rank(value: Any) -> int | None:
    """Number of dimensions of an array or tensor, `None` for anything else (no torch import needed)."""
    shape = getattr(value, "shape", None)
    return len(shape) if shape is not None and hasattr(value, "dtype") else None


def is_frame(value: Any) -> bool:
    """A single decoded image: a PIL image, a 2-D / 3-D array or tensor, or an undecoded `datasets.Image` cell."""
    if isinstance(value, Image.Image) or _rank(value) in (2, 3):
        return True
    return isinstance(value, dict) and (value.get("bytes") is not None or value.get("path") is not None)


def is_video(value: Any) -> bool:
    """A 4-D array / tensor, or a list of frames (an empty list counts, and is reported as a video without frames)."""
    if _rank(value) == 4:
        return True
    return isinstance(value, (list, tuple)) and all(is_frame(frame) for frame in value)


def split_videos(videos: Any, num_texts: int | None) -> tuple[list[list], list[int] | None]:
    """
    The videos of a processor call, each as a list of frames, and the number per sample when they came as one list
    per text.

    A single video (a 4-D array, or a list of frames) is one video, as in transformers' `make_batched_videos`.

    Args:
        videos (`Any`):
            One video, a flat list of videos, or one list of videos per text (see [`VIDEO_FORMS`]).
        num_texts (`int`, *optional*):
            Number of texts, checked against the number of per-text lists; `None` without text.

    Returns:
        `tuple[list[list], list[int] | None]`: one list of frames per video, in placeholder order, and the videos per
        sample (`None` for a flat list).

    Raises:
        `TypeError`: for file paths (decode them first) or anything that is not a video.
        `ValueError`: for a video without frames, or a number of per-text lists that differs from the texts.
    """
    if isinstance(videos, (str, os.PathLike)) or (
        isinstance(videos, (list, tuple)) and any(isinstance(item, (str, os.PathLike)) for item in videos)
    ):
        raise TypeError(
            "`videos` holds a file path: decode the video into frames first (decord, PyAV, torchvision.io), sample "
            f"the frames to use, and pass them; {VIDEO_FORMS}."
        )
    if isinstance(videos, (list, tuple)) and len(videos) == 0:
        return [], None
    per_sample = None
    if _rank(videos) == 4 or (isinstance(videos, (list, tuple)) and all(is_frame(item) for item in videos)):
        flat = [videos]
    elif isinstance(videos, (list, tuple)) and all(
        isinstance(sample, (list, tuple)) and all(is_video(item) for item in sample) for sample in videos
    ):
        # Checked before the flat form: only there do they overlap, on empty lists, which are then texts without
        # videos (as for images) rather than videos without frames.
        if num_texts is not None and len(videos) != num_texts:
            raise ValueError(
                f"Got {len(videos)} lists of videos for {num_texts} texts: pass one list of videos per text (an empty "
                "list for a text without videos), or a flat list matched to the placeholders in order."
            )
        flat, per_sample = [video for sample in videos for video in sample], [len(sample) for sample in videos]
    elif isinstance(videos, (list, tuple)) and all(is_video(item) for item in videos):
        flat = list(videos)
    else:
        raise TypeError(f"Could not read `videos` ({type(videos).__name__}) as videos: {VIDEO_FORMS}.")
    frames = [list(video) for video in flat]  # a 4-D array iterates over its frames
    empty = [index for index, video in enumerate(frames) if not video]
    if empty:
        raise ValueError(f"Video(s) {empty} have no frames: every video needs at least one frame.")
    return frames, per_sample


def pad_frames(pixel_values: np.ndarray, num_frames: list[int]) -> np.ndarray:
    """
    Split processed frames by video and pad each video with all-zero frames to the longest.

    Args:
        pixel_values (`np.ndarray` of shape `(total_frames, channels, height, width)`):
            Every frame of every video, video after video.
        num_frames (`list[int]`):
            Frames of each video; they sum to `total_frames`.

    Returns:
        `np.ndarray` of shape `(num_videos, max(num_frames), channels, height, width)`, in the dtype of
        `pixel_values`.
    """
    if sum(num_frames) != len(pixel_values):
        raise ValueError(f"{len(pixel_values)} processed frames for videos of {num_frames} frames.")
    padded = np.zeros((len(num_frames), max(num_frames), *pixel_values.shape[1:]), dtype=pixel_values.dtype)
    start = 0
    for index, count in enumerate(num_frames):
        padded[index, :count] = pixel_values[start : start + count]  # (count, C, H, W)
        start += count
    return padded


__all__ = ["VIDEO_FORMS", "is_frame", "is_video", "pad_frames", "split_videos"]
