"""Image bookkeeping of the composite VLM: any-res tiles (which tiles of `pixel_values` are real, which of their
features see only padding) and the images of each sample (to expand image inputs for beam search).

Any-res inputs come from [`BridgeAnyResImageProcessor`]: `pixel_values` `(num_images, max_tiles, C, H, W)`, tile 0
the resized base view, then the tiles of the image's best-fit canvas row by row, then zero tiles up to `max_tiles`;
and `image_sizes` `(num_images, 2)`, each image's original `(height, width)`. The tile count is derived here from
`image_sizes` with the same transformers helper the image processor uses, so the model and the processor always agree
on it, and padding tiles are dropped before the vision tower: they cost nothing and never reach the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configuration import BridgeVLMConfig
from ..processing.image_processing_anyres import anyres_content_box, anyres_tile_grid


@dataclass
class AnyResTiles:
    """
    The real tiles of a batch of any-res images.

    Args:
        grids (`list[tuple[int, int]]`):
            `(rows, columns)` of each image's high-resolution tiles.
        image_sizes (`list[tuple[int, int]]`):
            Each image's original `(height, width)`.
        grid_pinpoints (`list[list[int]]`):
            The candidate canvases, as in the config.
        tile_size (`int`):
            Side of a tile in pixels.
    """

    grids: list[tuple[int, int]]
    image_sizes: list[tuple[int, int]]
    grid_pinpoints: list[list[int]]
    tile_size: int

    @classmethod
    def from_inputs(
        cls, config: BridgeVLMConfig, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None
    ) -> AnyResTiles:
        """Count each image's tiles from `image_sizes`; raise with the fix if the inputs do not fit the config."""
        if config.image_grid_pinpoints is None:
            raise ValueError(
                f"Got any-res pixel_values of shape {tuple(pixel_values.shape)} (num_images, max_tiles, C, H, W), but "
                "the model's config has image_grid_pinpoints=None: set config.image_grid_pinpoints to the image "
                "processor's (BridgeAnyResImageProcessor.image_grid_pinpoints), or use a single-view image processor."
            )
        if image_sizes is None:
            raise ValueError(
                "Any-res pixel_values (num_images, max_tiles, C, H, W) need `image_sizes` (num_images, 2), the "
                "original (height, width) of each image, to tell real tiles from padding: pass the processor's "
                "`image_sizes` along with `pixel_values` (to forward and to generate)."
            )
        tiles = cls._from_sizes(config, image_sizes)
        sizes = tiles.image_sizes
        if len(sizes) != pixel_values.shape[0]:
            raise ValueError(
                f"Got image_sizes for {len(sizes)} images but pixel_values for {pixel_values.shape[0]}: pass both "
                "from the same processor call."
            )
        tile_size = tiles.tile_size
        most = max(tiles.num_tiles, default=0)
        if most > pixel_values.shape[1] or tuple(pixel_values.shape[-2:]) != (tile_size, tile_size):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not fit image_sizes {sizes}: with the config's "
                f"image_grid_pinpoints and tile size {tile_size}, the images need up to {most} tiles of "
                f"{tile_size}x{tile_size}. Build the image processor with size={{'height': {tile_size}, 'width': "
                f"{tile_size}}} and image_grid_pinpoints=config.image_grid_pinpoints."
            )
        return tiles

    @classmethod
    def from_image_sizes(cls, config: BridgeVLMConfig, image_sizes: torch.Tensor, num_real_tiles: int) -> AnyResTiles:
        """
        The tiles of images already encoded (cached `vision_features`, `(num_real_tiles, P, Dv)`): counted from
        `image_sizes` alone, and checked to add up to the `num_real_tiles` rows given.
        """
        if config.image_grid_pinpoints is None:
            raise ValueError(
                "image_sizes goes with any-res vision_features, but the model's config has image_grid_pinpoints=None: "
                "drop image_sizes (one row of vision_features per image)."
            )
        tiles = cls._from_sizes(config, image_sizes)
        if sum(tiles.num_tiles) != num_real_tiles:
            raise ValueError(
                f"image_sizes {tiles.image_sizes} give {sum(tiles.num_tiles)} tiles ({tiles.num_tiles} per image), "
                f"but vision_features hold {num_real_tiles} rows: pass the features of every real tile of each image, "
                "base view first, image after image, as get_vision_features(pixel_values, image_sizes) returns them."
            )
        return tiles

    @classmethod
    def _from_sizes(cls, config: BridgeVLMConfig, image_sizes: torch.Tensor) -> AnyResTiles:
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        pinpoints, tile_size = config.image_grid_pinpoints, config.anyres_tile_size
        return cls([anyres_tile_grid(size, pinpoints, tile_size) for size in sizes], sizes, pinpoints, tile_size)

    @property
    def num_tiles(self) -> list[int]:
        """Tiles of each image, the base view included: `1 + rows * columns`."""
        return [1 + rows * columns for rows, columns in self.grids]

    def select(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(num_images, max_tiles, C, H, W) -> (num_real_tiles, C, H, W)`: real tiles, image after image."""
        return torch.cat([pixel_values[i, :count] for i, count in enumerate(self.num_tiles)], dim=0)

    def per_tile(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """One row per image -> one row per tile (each tile of an image gets the image's row)."""
        if rows is None or rows.shape[0] != len(self.grids):
            return rows
        return rows.repeat_interleave(torch.tensor(self.num_tiles, device=rows.device), dim=0)

    def feature_mask(
        self, num_features: int, patch_size: int | None, num_prefix_tokens: int | None, device: torch.device
    ) -> torch.Tensor | None:
        """
        `(num_real_tiles, num_features)` mask, 0 where a feature's patch lies wholly in the canvas's black padding.

        The base view and the prefix (CLS-like) tokens are always 1; a tile that is padding only keeps all its
        features (its bridge tokens then describe black, as without the mask, instead of an empty attention). Returns
        None when the features are not `prefix + (tile_size // patch_size) ** 2` patches (a tower this cannot map).
        """
        if patch_size is None or num_prefix_tokens is None:
            return None
        side = self.tile_size // patch_size
        if num_features != num_prefix_tokens + side * side:
            return None
        masks = []
        for (rows, columns), size in zip(self.grids, self.image_sizes):
            top, left, height, width = anyres_content_box(size, self.grid_pinpoints)
            starts_y = torch.arange(rows * side, device=device) * patch_size  # canvas row where each patch starts
            starts_x = torch.arange(columns * side, device=device) * patch_size
            valid_y = (starts_y + patch_size > top) & (starts_y < top + height)
            valid_x = (starts_x + patch_size > left) & (starts_x < left + width)
            grid = valid_y[:, None] & valid_x[None, :]  # (rows * side, columns * side)
            tiles = grid.view(rows, side, columns, side).permute(0, 2, 1, 3).reshape(rows * columns, side * side)
            tiles[~tiles.any(-1)] = True
            base = torch.ones(1, side * side, dtype=torch.bool, device=device)
            masks.append(torch.cat([base, tiles], dim=0))  # (1 + rows * columns, side * side)
        mask = torch.cat(masks, dim=0)
        prefix = mask.new_ones(mask.shape[0], num_prefix_tokens)
        return torch.cat([prefix, mask], dim=1).long()  # (num_real_tiles, num_features)


def images_per_sample(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: list[int]) -> list[int]:
    """How many of the batch's images (in placeholder order) each row of `input_ids` holds, from its image tokens."""
    tokens_per_sample = (input_ids == image_token_id).sum(-1).tolist()
    counts, image = [], 0
    for tokens in tokens_per_sample:
        start = image
        while tokens > 0 and image < len(tokens_per_image):
            tokens -= tokens_per_image[image]
            image += 1
        if tokens != 0:
            raise ValueError(
                "Image features and image tokens do not match: the image tokens of each sample must be whole runs of "
                f"its images' tokens ({tokens_per_image} per image, in order). Build inputs with BridgeProcessor."
            )
        counts.append(image - start)
    return counts


def expand_images_for_generation(image_inputs: dict, counts: list[int], expand_size: int) -> dict:
    """
    Repeat each sample's images `expand_size` times, in sample order, as `generate` repeats each row of `input_ids`
    for beam search and `num_return_sequences` (a plain per-image `repeat_interleave` would pair a sample's copies
    with the wrong images when it holds several).

    Args:
        image_inputs (`dict`): Per-image tensors (`pixel_values`, `image_sizes`, ...), first dimension `sum(counts)`.
        counts (`list[int]`): Images per sample.
        expand_size (`int`): Copies of each sample.
    """
    index = _expanded_image_index(counts, expand_size)
    return {
        key: value.index_select(0, torch.tensor(index, dtype=torch.long, device=value.device))
        for key, value in image_inputs.items()
    }


def expand_tiles_for_generation(
    features: torch.Tensor, tiles_per_image: list[int], counts: list[int], expand_size: int
) -> torch.Tensor:
    """
    [`expand_images_for_generation`] for rows that are tiles (cached any-res `vision_features`, `(num_real_tiles, P,
    Dv)`): each image's `tiles_per_image` rows move together.
    """
    starts = [sum(tiles_per_image[:i]) for i in range(len(tiles_per_image))]
    index = [starts[i] + t for i in _expanded_image_index(counts, expand_size) for t in range(tiles_per_image[i])]
    return features.index_select(0, torch.tensor(index, dtype=torch.long, device=features.device))


def _expanded_image_index(counts: list[int], expand_size: int) -> list[int]:
    """The images of each sample, in order, repeated `expand_size` times sample by sample."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [start + j for start, count in zip(starts, counts) for _ in range(expand_size) for j in range(count)]


__all__ = ["AnyResTiles", "expand_images_for_generation", "expand_tiles_for_generation", "images_per_sample"]
