"""Turning whatever image a user passes into the 8-bit RGB PIL image every image processor expects."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image


# PIL modes that hold 16-bit unsigned samples (little, big and native endian).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UINT16_MAX = 2**16 - 1
_INT32_MAX = 2**31 - 1


def to_rgb_image(image: Any) -> Image.Image:
    r"""
    Turn an image into an 8-bit RGB PIL image, rescaling high-bit-depth and float data instead of clipping it.

    `PIL.Image.convert("RGB")` clips every value above 255, so a 16-bit PNG (0..65535) comes out almost all white,
    and image processors treat a float array in [0, 1] as unscaled. Every place that turns a user's image into RGB
    goes through this one function, with these rules:

    - PIL modes `I;16`, `I;16L`, `I;16B`, `I;16N` (16-bit): scaled by 255 / 65535.
    - PIL mode `I` (32-bit integers): Pillow opens 16-bit PNG and TIFF files in this mode, so values within
      [0, 65535] are taken as 16-bit data and scaled by 255 / 65535; larger values are scaled by 255 / (2**31 - 1).
      Negative values raise a `ValueError`.
    - PIL mode `F` (32-bit float): values must lie in [0, 1] and are scaled by 255; anything else (NaN, inf, or a
      range such as 0..255 or a normalised [-1, 1]) raises a `ValueError` that says how to convert it.
    - Other PIL modes (`RGB`, `L`, `LA`, `P`, `RGBA`, `CMYK`, `1`, ...): `convert("RGB")` (alpha is dropped).
    - NumPy arrays and torch tensors of shape `(H, W)`, `(H, W, C)` or `(C, H, W)` with 1, 3 or 4 channels (the
      channels-first reading wins when both fit, as in transformers' image utilities): `uint8` as is, `uint16`
      scaled by 255 / 65535, `bool` as 0 / 255, floats in [0, 1] scaled by 255 (otherwise a `ValueError` as for mode
      `F`). Other integer dtypes raise a `ValueError`: their bit depth is ambiguous, cast to `uint8` or `uint16`.
    - A `datasets.Image` cell that was not decoded (`{"bytes": ..., "path": ...}`) and a file path are opened first.

    Scaled values are rounded to the nearest grey level, so an 8-bit image widened to 16 bits (`value * 257`), to
    32-bit mode `I` or to floats (`value / 255`) comes back exactly.

    Args:
        image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `dict`, `str` or `os.PathLike`):
            The image.

    Returns:
        `PIL.Image.Image`: a new image in mode `RGB`.

    Raises:
        `ValueError`: for values that cannot be mapped to 0..255 without guessing (negative, out of [0, 1] for
            floats, NaN / inf, an integer dtype other than `uint8` / `uint16`) or an unsupported array shape.
        `TypeError`: for anything that is not an image.

    Example:

    ```python
    >>> import numpy as np
    >>> from PIL import Image
    >>> from vlbridge.processing.image_utils import to_rgb_image
    >>> sixteen_bit = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    >>> sixteen_bit.mode in ("I;16", "I")
    True
    >>> np.asarray(to_rgb_image(sixteen_bit))[0, :, 0].tolist()
    [0, 128, 255]
    >>> np.asarray(sixteen_bit.convert("RGB"))[0, :, 0].tolist()  # what a plain convert does: clipped to white
    [0, 255, 255]
    >>> to_rgb_image(np.full((2, 2, 3), 0.5, dtype=np.float32)).getpixel((0, 0))
    (128, 128, 128)
    ```
    """
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path") is not None):
        # An undecoded `datasets.Image` cell.
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
        with Image.open(source) as opened:
            return _pil_to_rgb(opened)
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return _pil_to_rgb(opened)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if type(image).__module__.startswith("torch"):  # no torch import for callers that never pass tensors
        import torch

        if isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16
                tensor = tensor.float()
            return _array_to_rgb(tensor.numpy())
    raise TypeError(
        f"Expected an image (PIL image, NumPy array, torch tensor, file path or datasets.Image cell), got "
        f"{type(image).__name__}."
    )


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _UINT16_MODES:
        values = np.asarray(image).astype(np.float64)  # (H, W)
        return _grey_to_rgb(values * (255 / _UINT16_MAX))
    if image.mode == "I":
        values = np.asarray(image).astype(np.float64)  # (H, W)
        if values.size and values.min() < 0:
            raise ValueError(
                f"The image (PIL mode 'I', 32-bit integers) has negative values (min {int(values.min())}), which have "
                "no grey level: shift or clip it to 0..65535 (16-bit) and pass it as a uint16 array, or convert it "
                "to 8-bit yourself."
            )
        peak = _UINT16_MAX if not values.size or values.max() <= _UINT16_MAX else _INT32_MAX
        return _grey_to_rgb(values * (255 / peak))
    if image.mode == "F":
        values = np.asarray(image).astype(np.float64)  # (H, W)
        _check_unit_range(values, "The image (PIL mode 'F', 32-bit float)")
        return _grey_to_rgb(values * 255)
    return image.convert("RGB")


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    """Grey levels already on the 0..255 scale, `(H, W)` -> an RGB image."""
    return Image.fromarray(_to_uint8(values)).convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _check_unit_range(values: np.ndarray, what: str) -> None:
    if not values.size:
        return
    if not np.isfinite(values).all():
        raise ValueError(f"{what} holds NaN or inf values: replace them before passing the image.")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"{what} has values in [{low:g}, {high:g}], but float images must lie in [0, 1]. Divide 0..255 data by "
            "255 (or pass it as uint8); un-normalise normalised data first (x * std + mean); or pass the raw image "
            "file instead."
        )


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    array = _channels_last(array)  # (H, W) or (H, W, C)
    what = f"The {array.dtype} image array"
    if array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = _to_uint8(array.astype(np.float64) * (255 / _UINT16_MAX))
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        _check_unit_range(values, what)
        pixels = _to_uint8(values * 255)
    else:
        raise ValueError(
            f"{what} has an ambiguous bit depth: cast 8-bit data (0..255) to uint8, 16-bit data (0..65535) to uint16, "
            "or pass floats in [0, 1]."
        )
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    # (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA: Pillow reads the mode from the shape.
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


def _channels_last(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        if array.shape[0] in (1, 3, 4):  # (C, H, W)
            return array.transpose(1, 2, 0)
        if array.shape[-1] in (1, 3, 4):  # (H, W, C)
            return array
    raise ValueError(
        f"An image array must be (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels, got shape {array.shape}. "
        "Pass a batch as a list of images."
    )


__all__ = ["to_rgb_image"]
