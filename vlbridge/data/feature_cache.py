"""
A cache of a frozen vision tower's features: the tower runs once over a dataset, and stage 1, stage 2 and SFT then
train from the stored features, through the same collators and the same model forward (`vision_features` in place of
`pixel_values`). BLIP-2, InstructBLIP and BLIP-3 keep their ViT frozen, yet without a cache every epoch re-runs it on
every image.

What is stored, per image, is exactly what the bridge reads: `model.get_vision_features(pixel_values)`, `(P, Dv)`
(any-res: all the image's real tiles, `(tiles, P, Dv)`, and its original size), in bf16 by default or fp32 (then
bit-identical to running the tower), in safetensors shards read lazily (memory-mapped, one shard at a time).

Layout of a cache folder:

```
cache_config.json          format version, dtype, the tower's feature settings, the tower and image-processor
                           fingerprints, the plan (images, shard size, shards) and a hash of the ordered image keys
features-00000.safetensors one tensor per image, named by the image's key
features-00000.json        the shard's commit record: its sha256, size in bytes, keys (any-res: image sizes)
...
index.json                 every shard's record, written once all shards are there
```

Image keys are content hashes: `sha256:` and the first 32 hex digits of the SHA-256 of the image as 8-bit RGB
(mode, size and pixel bytes). Ids (`image_id`) are not used, although caption data has them: the loaders number
images by position or file order, and built-in data drawn with another seed or size reuses the same ids for other
images, so an id-keyed cache could hand a row another image's features without any error. A content key can only
miss (an error naming the images), never mismatch; the same image under several captions, rows or datasets is
stored once. It costs one hash of the decoded image per row in the collator, which decodes it anyway.

Fingerprints. The tower's is the SHA-256 over its state dict, tensor by tensor in key order (name, dtype, shape and
bytes): about a second per GB of weights, so a few seconds for ViT-g; a tower in another dtype, or fine-tuned by one
step, gets another one. The image processor's is the SHA-256 of its `to_dict()` (sorted JSON), without the name of
the processor class that wraps it. [`VisionFeatureCache.check`] refuses a cache whose fingerprints or feature settings
(`vision_feature_layer`, `vision_feature_select`, `vision_feature_post_layernorm`) differ from the model's.

Writing ([`write_feature_cache`]) is resumable and splits over processes: the images are numbered in dataset order
(first occurrence), shard `s` holds images `s * shard_size` to `(s + 1) * shard_size - 1`, and process `k` of `n`
writes the shards with `s % n == k`. A shard is written under a temporary name and renamed, then its record is
written (the commit); a rerun skips every shard whose record is there and whose file passes its checksum. The
process that finds all shards committed writes `index.json` (any process, any rerun; the content does not depend on
who writes it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..processing.image_utils import to_rgb_image


logger = logging.get_logger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "cache_config.json"
INDEX_FILE = "index.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KEY_SCHEME = "sha256 of the image as 8-bit RGB (mode, size, pixels)"
# Keys of an image processor's `to_dict()` that name the processor wrapping it, not how pixels are made.
_PROCESSOR_NAME_KEYS = ("processor_class", "_processor_class")
# Shards held open at once by a reader (each a memory map and a file descriptor).
_MAX_OPEN_SHARDS = 32
_FIX = "rerun `vlbridge cache-features` with the same arguments (it resumes, rewriting only what is missing or broken)"


def shard_name(number: int) -> str:
    """`features-00012.safetensors` for shard 12."""
    return f"features-{number:05d}.safetensors"


def _record_path(directory: Path, number: int) -> Path:
    return directory / f"features-{number:05d}.json"


# ---------------------------------------------------------------------------------------------------------------------
# Keys and fingerprints
# ---------------------------------------------------------------------------------------------------------------------


def _rgb(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) and image.mode == "RGB" else to_rgb_image(image)


def image_key(image: Any) -> str:
    """
    The cache key of an image: a hash of its content as 8-bit RGB (what the image processor sees), so that a key can
    never name another image.

    Args:
        image (`PIL.Image.Image`, array, tensor, `datasets.Image` cell or path): Anything
            [`~vlbridge.processing.image_utils.to_rgb_image`] takes.

    Example:

    ```python
    >>> from PIL import Image
    >>> from vlbridge.data.feature_cache import image_key
    >>> red = Image.new("RGB", (4, 4), "red")
    >>> image_key(red) == image_key(red.convert("RGBA")), image_key(red) == image_key(Image.new("RGB", (4, 4)))
    (True, False)
    >>> image_key(red)[:7]
    'sha256:'
    ```
    """
    image = _rgb(image)
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def vision_tower_of(model: nn.Module) -> nn.Module:
    """The vision tower of a composite VLM (`model.model.vision_tower`) or a stage-1 model (`model.vision_tower`)."""
    for owner in (model, getattr(model, "model", None)):
        tower = getattr(owner, "vision_tower", None)
        if isinstance(tower, nn.Module):
            return tower
    raise TypeError(
        f"{type(model).__name__} has no vision tower (`vision_tower`): pass a vlbridge VLM or stage-1 model."
    )


def tower_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the vision tower's state dict: every tensor's name, dtype, shape and bytes,
    in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vision_tower_of(model).state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy())  # the raw bytes, whatever the dtype (bf16 included)
    return digest.hexdigest()[:16]


def image_processor_fingerprint(image_processor) -> str:
    """SHA-256 (first 16 hex digits) of the image processor's settings (`to_dict()`, sorted JSON)."""
    settings = {key: value for key, value in image_processor.to_dict().items() if key not in _PROCESSOR_NAME_KEYS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def feature_settings(model: nn.Module) -> dict:
    """How the model turns the tower's outputs into the bridge's input (the same tower gives other features with
    other settings)."""
    config = model.config
    settings = {
        "vision_feature_layer": getattr(config, "vision_feature_layer", None),
        "vision_feature_select": getattr(config, "vision_feature_select", "full"),
        "vision_feature_post_layernorm": bool(getattr(config, "vision_feature_post_layernorm", False)),
    }
    if settings["vision_feature_select"] == "patches":
        settings["vision_num_prefix_tokens"] = config.vision_num_prefix_tokens
    return settings


def _expected_feature_shape(model: nn.Module) -> tuple[int | None, int]:
    """`(P, Dv)` the model's bridge reads; P is None when the config cannot count the tower's features."""
    config = model.config
    num_features = None
    if hasattr(config, "_num_vision_tokens"):
        try:
            num_features = config._num_vision_tokens()
        except ValueError:
            num_features = None
    return num_features, config.vision_config.hidden_size


# ---------------------------------------------------------------------------------------------------------------------
# The images of a dataset
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ImagePlan:
    """
    The distinct images of a dataset in order of first occurrence: their keys, and where each is (`(row, index)` in
    the row's image list, `index` None for a single-image column).
    """

    keys: list[str]
    locations: list[tuple[int, int | None]]
    column: str

    @classmethod
    def from_dataset(cls, dataset, image_column: str | None = None) -> ImagePlan:
        """Caption rows (`image`) or chat rows (`images`: a list, possibly empty, or one image)."""
        column = image_column or _image_column(dataset)
        keys, locations, seen = [], [], set()
        for row, value in enumerate(_column_rows(dataset, column)):
            images = [value] if column == "image" or not isinstance(value, (list, tuple)) else value
            for index, image in enumerate(image for image in images if image is not None):
                key = image_key(image)
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
                    locations.append((row, None if column == "image" else index))
        return cls(keys, locations, column)

    def image(self, dataset, position: int) -> Image.Image:
        """The image at `position` of the plan, as 8-bit RGB."""
        row, index = self.locations[position]
        value = dataset[row][self.column]
        if index is not None and isinstance(value, (list, tuple)):
            value = [image for image in value if image is not None][index]
        return _rgb(value)


def _image_column(dataset) -> str:
    columns = list(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else []))
    for column in ("image", "images"):
        if column in columns:
            return column
    raise ValueError(f"The dataset has no `image` or `images` column (it has {columns}): nothing to cache.")


def _column_rows(dataset, column: str):
    """The values of one column, row by row (a `datasets.Dataset` decodes no other column)."""
    if hasattr(dataset, "select_columns"):
        for row in dataset.select_columns([column]):
            yield row[column]
    else:
        for row in dataset:
            yield row.get(column)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureCacheSummary:
    """
    What [`write_feature_cache`] did.

    Args:
        directory (`str`): The cache folder.
        num_images (`int`): Distinct images in the dataset (the whole cache's).
        num_shards (`int`): Shards of the whole cache.
        written (`list[int]`): Shards this call encoded.
        skipped (`list[int]`): This process's shards already committed (and passing their checksum).
        complete (`bool`): Whether every shard is committed, and `index.json` written: the cache can be read.
    """

    directory: str
    num_images: int
    num_shards: int
    written: list[int]
    skipped: list[int]
    complete: bool


def write_feature_cache(
    model: nn.Module,
    image_processor,
    dataset,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "bf16",
    batch_size: int = 32,
    shard_size: int = 512,
    process_index: int = 0,
    num_processes: int = 1,
    image_column: str | None = None,
    progress: bool = True,
) -> FeatureCacheSummary:
    r"""
    Runs the frozen vision tower once over the distinct images of `dataset` and stores what the bridge reads.

    Args:
        model ([`BridgeVLMForConditionalGeneration`], [`BridgeVLMModel`] or a stage-1 model):
            Anything with `get_vision_features(pixel_values[, image_sizes])` and a `vision_tower`.
        image_processor ([`BaseImageProcessor`]):
            The model's image processor (any-res: [`BridgeAnyResImageProcessor`]).
        dataset (`datasets.Dataset` or a list of rows):
            Caption rows (`image`) or chat rows (`images`), as the recipes load them.
        output_dir (`str` or `os.PathLike`):
            The cache folder; a rerun into it resumes.
        dtype (`str`, *optional*, defaults to `"bf16"`):
            `"bf16"` (half the disk) or `"fp32"` (bit-identical to running an fp32 tower).
        batch_size (`int`, *optional*, defaults to 32):
            Images per tower forward.
        shard_size (`int`, *optional*, defaults to 512):
            Images per shard: the unit of resuming, of the work split, and of what is held in memory while writing.
        process_index, num_processes (`int`, *optional*, defaults to 0 and 1):
            This process writes the shards `s` with `s % num_processes == process_index`.
        image_column (`str`, *optional*):
            `"image"` or `"images"`; found from the dataset when not given.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Returns:
        [`FeatureCacheSummary`]

    Example:

    ```python
    >>> import tempfile, torch
    >>> from PIL import Image
    >>> from transformers import CLIPImageProcessor
    >>> from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
    >>> from vlbridge.data.feature_cache import VisionFeatureCache, write_feature_cache
    >>> config = BridgeVLMConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     bridge_config={"model_type": "vlbridge_mlp", "hidden_size": 32, "drop_cls_token": True},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    ...                  "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100},
    ...     image_token_id=99,
    ... )
    >>> model = BridgeVLMForConditionalGeneration(config)
    >>> image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    >>> rows = [{"image": Image.new("RGB", (40, 40), colour), "caption": "a square"} for colour in ("red", "blue")]
    >>> folder = tempfile.mkdtemp()
    >>> write_feature_cache(model, image_processor, rows, folder, dtype="fp32", progress=False).complete
    True
    >>> cache = VisionFeatureCache(folder).check(model, image_processor)
    >>> cache.batch_inputs([rows[1]["image"]])["vision_features"].shape  # (images, CLS + 16 patches, width)
    torch.Size([1, 17, 32])
    ```
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if batch_size < 1 or shard_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(
            f"Need batch_size >= 1, shard_size >= 1 and 0 <= process_index < num_processes, got {batch_size}, "
            f"{shard_size}, {process_index} and {num_processes}."
        )
    directory = Path(output_dir)
    plan = ImagePlan.from_dataset(dataset, image_column)
    if not plan.keys:
        raise ValueError("The dataset holds no image: nothing to cache.")
    num_shards = -(-len(plan.keys) // shard_size)
    settings = _cache_settings(model, image_processor, plan, dtype, shard_size, num_shards)
    _start(directory, settings)
    mine = [number for number in range(num_shards) if number % num_processes == process_index]
    written, skipped = [], []
    todo = []
    for number in mine:
        (skipped if _committed(directory, number, verify=True) else todo).append(number)
    total = sum(len(plan.keys[number * shard_size : (number + 1) * shard_size]) for number in todo)
    bar = tqdm(total=total, desc="vision features", unit="image", disable=not progress)
    was_training = model.training
    model.eval()  # no dropout: the features are the frozen tower's, deterministic
    try:
        for number in todo:
            positions = range(number * shard_size, min((number + 1) * shard_size, len(plan.keys)))
            tensors, sizes = _encode(model, image_processor, dataset, plan, positions, batch_size, dtype, bar)
            _write_shard(directory, number, tensors, sizes)
            written.append(number)
    finally:
        bar.close()
        model.train(was_training)
    complete = _finalize(directory, settings)
    return FeatureCacheSummary(str(directory), len(plan.keys), num_shards, written, skipped, complete)


def _cache_settings(model, image_processor, plan: ImagePlan, dtype: str, shard_size: int, num_shards: int) -> dict:
    anyres = getattr(image_processor, "image_grid_pinpoints", None) is not None and hasattr(
        image_processor, "get_number_of_image_patches"
    )
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "model_type": model.config.model_type,
        "feature_settings": feature_settings(model),
        "tower_fingerprint": tower_fingerprint(model),
        "image_processor_fingerprint": image_processor_fingerprint(image_processor),
        "anyres": anyres,
        "key": KEY_SCHEME,
        "num_images": len(plan.keys),
        "shard_size": shard_size,
        "num_shards": num_shards,
        "keys_sha256": hashlib.sha256("\n".join(plan.keys).encode()).hexdigest()[:16],
    }


def _write_json(path: Path, value: dict) -> None:
    """Written whole or not at all: a temporary name, then an atomic rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def _start(directory: Path, settings: dict) -> None:
    """Writes the cache's settings, or checks that the folder's are the same (a rerun, or another process)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        # Hidden names are temporary files, such as another process's settings being written.
        if directory.is_dir() and any(not entry.name.startswith(".") for entry in directory.iterdir()):
            raise ValueError(f"{directory} is not empty and holds no vision-feature cache: pick another folder.")
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(path, settings)
    # Read back also after writing: of processes starting together with different settings, all but one stop here.
    recorded = json.loads(path.read_text())
    changed = sorted(key for key in set(settings) | set(recorded) if settings.get(key) != recorded.get(key))
    if changed:
        detail = ", ".join(f"{key}: {recorded.get(key)!r} there, {settings.get(key)!r} now" for key in changed)
        raise ValueError(
            f"{directory} holds a vision-feature cache made with other settings ({detail}). A rerun resumes only the "
            "same model, image processor, data, dtype and shard size: pass another output folder, or delete this one."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _committed(directory: Path, number: int, verify: bool = False) -> bool:
    """Whether shard `number` is committed (its record written after it) and, with `verify`, its file whole."""
    record_path = _record_path(directory, number)
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    shard = directory / record["file"]
    if not shard.is_file() or shard.stat().st_size != record["bytes"]:
        return False
    return not verify or _sha256(shard) == record["sha256"]


@torch.no_grad()
def _encode(model, image_processor, dataset, plan: ImagePlan, positions, batch_size: int, dtype: str, bar):
    """The features of the images at `positions` of the plan: `{key: (P, Dv) or (tiles, P, Dv)}`, and with any-res
    each image's `(height, width)`."""
    device = next(model.parameters()).device
    # One column only: a `datasets.Dataset` row would decode every column.
    source = dataset.select_columns([plan.column]) if hasattr(dataset, "select_columns") else dataset
    tensors, sizes = {}, {}
    positions = list(positions)
    for start in range(0, len(positions), batch_size):
        batch = positions[start : start + batch_size]
        inputs = image_processor([plan.image(source, position) for position in batch], return_tensors="pt")
        pixel_values, image_sizes = inputs["pixel_values"].to(device), inputs.get("image_sizes")
        if image_sizes is None:
            features = model.get_vision_features(pixel_values)  # (B, P, Dv)
            per_image = list(features)
        else:
            features = model.get_vision_features(pixel_values, image_sizes)  # (num_real_tiles, P, Dv)
            counts = [int(image_processor.get_number_of_image_patches(h, w, {})) for h, w in image_sizes.tolist()]
            per_image = list(features.split(counts))
            sizes.update({plan.keys[p]: [int(h), int(w)] for p, (h, w) in zip(batch, image_sizes.tolist())})
        for position, feature in zip(batch, per_image):
            # A copy: safetensors stores no two tensors that share memory (rows of one fp32 batch would).
            tensors[plan.keys[position]] = feature.to(device="cpu", dtype=DTYPES[dtype], copy=True).contiguous()
        bar.update(len(batch))
    return tensors, sizes


def _write_shard(directory: Path, number: int, tensors: dict, sizes: dict) -> None:
    """The shard under a temporary name, renamed, then its record (the commit)."""
    shard = directory / shard_name(number)
    temporary = shard.with_name(f".{shard.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temporary), metadata={"format_version": str(FORMAT_VERSION)})
    os.replace(temporary, shard)
    first = next(iter(tensors.values()))
    record = {
        "file": shard.name,
        "sha256": _sha256(shard),
        "bytes": shard.stat().st_size,
        "keys": list(tensors),
        "feature_shape": list(first.shape[-2:]),
    }
    if sizes:
        record["image_sizes"] = [sizes[key] for key in tensors]
    _write_json(_record_path(directory, number), record)


def _finalize(directory: Path, settings: dict) -> bool:
    """Writes `index.json` once every shard is committed; returns whether it did."""
    records = []
    for number in range(settings["num_shards"]):
        if not _committed(directory, number):
            return False
        records.append(json.loads(_record_path(directory, number).read_text()))
    shapes = {tuple(record["feature_shape"]) for record in records}
    index = {"format_version": FORMAT_VERSION, "feature_shape": list(shapes.pop()), "shards": records}
    if shapes:
        raise ValueError(f"The shards of {directory} hold features of several shapes: rebuild the cache.")
    _write_json(directory / INDEX_FILE, index)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


class MissingImageFeatures(KeyError):
    """Images that are not in a vision-feature cache; the message names them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class VisionFeatureCache:
    r"""
    Reads a cache written by [`write_feature_cache`] (`vlbridge cache-features`): shards are opened lazily,
    memory-mapped (at most a few at a time, never all in memory), and each is checked against its sha256 the first
    time it is opened, so a truncated or corrupted shard is named instead of read.

    Give it to a collator ([`ImageTextCollator`], [`CaptionCollator`], [`ChatCollator`] take `vision_features=`) to
    put `vision_features` in the batches instead of `pixel_values`; check it against the model first ([`check`]).

    Args:
        directory (`str` or `os.PathLike`):
            The cache folder.

    Raises:
        `FileNotFoundError`: No cache in `directory`.
        `ValueError`: An unfinished cache (not every shard written), or another format version.

    Example:

    ```python
    >>> from vlbridge.data.feature_cache import VisionFeatureCache
    >>> cache = VisionFeatureCache("outputs/features")  # doctest: +SKIP
    >>> cache.check(model, processor.image_processor)  # doctest: +SKIP
    >>> collator = CaptionCollator.from_model(model, processor, vision_features=cache)  # doctest: +SKIP
    ```
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        config_path, index_path = self.directory / CONFIG_FILE, self.directory / INDEX_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{self.directory} holds no vision-feature cache (no {CONFIG_FILE}): write one with `vlbridge "
                "cache-features --model MODEL --dataset DATA --out DIR`."
            )
        self.config = json.loads(config_path.read_text())
        if self.config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.directory} holds a vision-feature cache of format {self.config.get('format_version')}, this "
                f"vlbridge reads format {FORMAT_VERSION}: rebuild it with `vlbridge cache-features`."
            )
        if not index_path.is_file():
            done = sum(_committed(self.directory, s) for s in range(self.config["num_shards"]))
            raise ValueError(
                f"The vision-feature cache in {self.directory} is unfinished: {done} of {self.config['num_shards']} "
                f"shards written: {_FIX}; with several processes, run each --process_index, or any one of them "
                "again once all have finished."
            )
        index = json.loads(index_path.read_text())
        self._records = index["shards"]
        self.feature_shape = tuple(index["feature_shape"])  # (P, Dv)
        self._shard_of = {key: s for s, record in enumerate(self._records) for key in record["keys"]}
        self._sizes = {
            key: size for record in self._records for key, size in zip(record["keys"], record.get("image_sizes") or [])
        }
        self._verified: set[int] = set()
        self._open: OrderedDict = OrderedDict()

    # Pickled into DataLoader workers without the open shards (memory maps do not pickle); checksums stay verified.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def __repr__(self) -> str:
        return (
            f"VisionFeatureCache({str(self.directory)!r}, images={len(self)}, dtype={self.config['dtype']}, "
            f"feature_shape={self.feature_shape}, anyres={self.is_anyres})"
        )

    @property
    def is_anyres(self) -> bool:
        """Whether each image holds its any-res tiles `(tiles, P, Dv)` and its original size."""
        return bool(self.config.get("anyres"))

    def check(self, model: nn.Module, image_processor) -> VisionFeatureCache:
        """
        Refuses (`ValueError`) a cache that another vision tower, other feature settings or another image processor
        made, naming both fingerprints of what differs, and features of a shape the model's bridge does not read.

        Returns:
            The cache itself.
        """
        config = self.config
        problems = []
        tower = tower_fingerprint(model)
        if tower != config["tower_fingerprint"]:
            problems.append(f"vision tower fingerprint: cache {config['tower_fingerprint']}, model {tower}")
        processor = image_processor_fingerprint(image_processor)
        if processor != config["image_processor_fingerprint"]:
            problems.append(
                f"image processor fingerprint: cache {config['image_processor_fingerprint']}, processor {processor}"
            )
        settings = feature_settings(model)
        if settings != config["feature_settings"]:
            problems.append(f"feature settings: cache {config['feature_settings']}, model {settings}")
        if problems:
            raise ValueError(
                f"The vision-feature cache {self.directory} was not made from this model's vision tower and image "
                f"processor ({'; '.join(problems)}), so its features are not what this model would compute. Rebuild "
                "it with `vlbridge cache-features --model <this model's folder>` on the same data, or drop "
                "--vision_features."
            )
        num_features, width = _expected_feature_shape(model)
        if self.feature_shape[1] != width or num_features not in (None, self.feature_shape[0]):
            raise ValueError(
                f"The vision-feature cache {self.directory} holds features of shape {self.feature_shape} per image, "
                f"the model's bridge reads ({num_features or 'P'}, {width}): rebuild the cache for this model."
            )
        return self

    def features(self, keys: Sequence[str], names: Sequence[str] | None = None) -> torch.Tensor:
        """
        The features of the images `keys` ([`image_key`]), in order, in the cache's dtype: `(len(keys), P, Dv)`;
        any-res: their tiles, image after image, `(num_real_tiles, P, Dv)`.

        Args:
            keys (`list[str]`): Image keys.
            names (`list[str]`, *optional*): How to name each image in an error (`"image_id 7"`).

        Raises:
            [`MissingImageFeatures`] (a `KeyError`): naming the images missing from the cache (the first few, and
            how many).
        """
        missing = [i for i, key in enumerate(keys) if key not in self._shard_of]
        if missing:
            labels = [f"{names[i]} ({keys[i]})" if names else keys[i] for i in missing]
            shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
            raise MissingImageFeatures(
                f"{len(missing)} of {len(keys)} images are not in the vision-feature cache {self.directory}: {shown}. "
                "Build the cache over the data you train on (`vlbridge cache-features --dataset` with the same "
                "data and data options), or drop --vision_features."
            )
        tensors = [self._shard(self._shard_of[key]).get_tensor(key) for key in keys]
        if not tensors:
            return torch.empty(0, *self.feature_shape, dtype=DTYPES[self.config["dtype"]])
        return torch.cat(tensors) if self.is_anyres else torch.stack(tensors)

    def image_sizes(self, keys: Sequence[str]) -> torch.Tensor | None:
        """Any-res: each image's original `(height, width)` as the image processor saw it, `(len(keys), 2)`."""
        if not self.is_anyres:
            return None
        return torch.tensor([self._sizes[key] for key in keys], dtype=torch.long).reshape(-1, 2)

    def batch_inputs(self, images: Sequence, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """
        What a collator puts in a batch for `images` instead of `pixel_values`: `vision_features` and, any-res,
        `image_sizes`. The images are only hashed, never processed.
        """
        keys = [image_key(image) for image in images]
        inputs = {"vision_features": self.features(keys, names)}
        if self.is_anyres:
            inputs["image_sizes"] = self.image_sizes(keys)
        return inputs

    def _shard(self, number: int):
        """The open shard `number` (opened, and verified the first time, on demand; least recently used closed)."""
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        record = self._records[number]
        path = self.directory / record["file"]
        if number not in self._verified:
            if not path.is_file():
                raise FileNotFoundError(f"Shard {path} of the vision-feature cache is missing: {_FIX}.")
            size, digest = path.stat().st_size, _sha256(path)
            if size != record["bytes"] or digest != record["sha256"]:
                raise ValueError(
                    f"Shard {path} of the vision-feature cache is truncated or corrupted: {size} bytes with sha256 "
                    f"{digest[:16]}, its record says {record['bytes']} bytes with sha256 {record['sha256'][:16]}. "
                    f"Nothing is read from it: {_FIX}."
                )
            self._verified.add(number)
        self._open[number] = safe_open(str(path), framework="pt")
        if len(self._open) > _MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return self._open[number]


__all__ = [
    "FeatureCacheSummary",
    "ImagePlan",
    "MissingImageFeatures",
    "VisionFeatureCache",
    "feature_settings",
    "image_key",
    "image_processor_fingerprint",
    "tower_fingerprint",
    "write_feature_cache",
]
