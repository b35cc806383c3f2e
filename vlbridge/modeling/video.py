"""Videos (and multi-crop images) through the vision tower and a Perceiver with media time: each video's real frames
are encoded one by one, then resampled together into the bridge's `num_latents` tokens, which stand where the video's
`<image>` is (either fusion)."""

from __future__ import annotations

import torch
from torch import nn

from .bridge_utils import check_pixel_values


def video_bridge_tokens(
    model: nn.Module, pixel_values_videos: torch.Tensor, video_num_frames: torch.Tensor | None = None
) -> torch.Tensor:
    """
    The bridge's tokens for a batch of videos: `(num_videos, max_frames, C, H, W)` -> `(num_videos, N, Db)`.

    Args:
        model ([`BridgeVLMModel`]): Gives the vision tower (`_vision_features`) and the bridge.
        pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, max_frames, C, H, W)`):
            The processor's `pixel_values_videos` (zero-padded frames past each video's count).
        video_num_frames (`torch.LongTensor` of shape `(num_videos,)`, *optional*):
            Each video's real frames; all `max_frames` when None. Padding frames are never encoded.

    Raises:
        `ValueError`: naming the fix, for a bridge without media time (videos need a Perceiver with `num_frames`),
        more frames than its table, or frame counts that do not fit the tensor.
    """
    bridge_config = model.config.bridge_config
    max_table = getattr(bridge_config, "num_frames", None)
    if max_table is None:
        raise ValueError(
            f"Videos need a Perceiver bridge with media-time embeddings, but this bridge is "
            f"'{bridge_config.model_type}'{' without num_frames' if hasattr(bridge_config, 'num_frames') else ''}: "
            "build the VLM with bridge_config={'model_type': 'vlbridge_perceiver', 'num_frames': <max frames>, ...}."
        )
    videos = check_pixel_values(pixel_values_videos, check_finite=False)
    if videos.dim() != 5:
        raise ValueError(
            f"pixel_values_videos must have shape (num_videos, max_frames, C, H, W), got {tuple(videos.shape)}: "
            "pass videos through BridgeProcessor(videos=...)."
        )
    num_videos, max_frames = videos.shape[:2]
    if video_num_frames is None:
        video_num_frames = torch.full((num_videos,), max_frames, dtype=torch.long)
    counts = torch.as_tensor(video_num_frames, device=videos.device).long().reshape(-1)  # (V,)
    if counts.shape[0] != num_videos or bool((counts < 1).any()) or bool((counts > max_frames).any()):
        raise ValueError(
            f"video_num_frames {counts.tolist()} must give each of the {num_videos} videos between 1 and "
            f"{max_frames} frames (the padded frame axis of pixel_values_videos)."
        )
    longest = int(counts.max())
    if longest > max_table:
        raise ValueError(
            f"A video has {longest} frames but the Perceiver's media-time table holds num_frames={max_table}: "
            f"sample at most {max_table} frames, or build the bridge with num_frames>={longest}."
        )
    frame_mask = torch.arange(max_frames, device=videos.device)[None, :] < counts[:, None]  # (V, F)
    frames = check_pixel_values(videos[frame_mask])  # (sum of frames, C, H, W); only real frames checked
    features = model._vision_features(frames)  # (sum of frames, P, Dv)
    padded = features.new_zeros(num_videos, max_frames, *features.shape[1:])  # (V, F, P, Dv)
    padded[frame_mask] = features
    feature_mask = frame_mask[:, :, None].expand(-1, -1, features.shape[1]).long()  # (V, F, P)
    return model.bridge(padded, image_attention_mask=feature_mask).image_tokens  # (V, N, Db)


__all__ = ["video_bridge_tokens"]
