"""Processor of the bridged VLMs: an image processor, the language model's tokenizer and, for InstructBLIP-style
models, the Q-Former's own tokenizer."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput, make_flat_list_of_images
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import (
    TOKENIZER_CONFIG_FILE,
    AddedToken,
    PreTrainedTokenizerBase,
    TextInput,
)
from transformers.utils import cached_file, logging

from ..configuration.remote_code import add_auto_map_entries, write_remote_code_shim
from .coordinates import ImageGeometry, has_region_entries, image_size_of, region_text, render_region_entries
from .image_utils import to_rgb_image
from .video_utils import pad_frames, split_videos


try:  # Placeholders that `mark_control_tokens` escaped in user input are text, not images (transformers >= 5.2x).
    from transformers.processing_utils import _UNMARKED
except ImportError:  # pragma: no cover
    _UNMARKED = ""


logger = logging.get_logger(__name__)

DEFAULT_IMAGE_TOKEN = "<image>"
QFORMER_TOKENIZER = "qformer_tokenizer"

# Rendered as: [bos]"system: ...\n" "user: <image>\nWhat is it?\n" "assistant: A cat.</s>" ... ["assistant: "].
# `generation` marks each assistant turn (and its EOS) for `return_assistant_tokens_mask=True`; the template
# starts with BOS so that TRL, which tokenizes rendered chats with `add_special_tokens=False`, keeps it.
_CHAT_TEMPLATE_BODY = (
    "{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Message roles must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + image_token + '\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}"
    "{%- else -%}{{- raise_exception('Content entries must be of type image or text, got ' + item['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- message['role'] + ': ' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ns.text -}}{%- if eos_token is defined and eos_token -%}{{- eos_token -}}{%- endif -%}"
    "{%- endgeneration -%}"
    "{%- else -%}{{- ns.text + '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)


# The role headers default_chat_template writes, at the start of the text or after whitespace (a newline, or an EOS or
# BOS that qformer_text has replaced with a space).
_ROLE_HEADER = re.compile(r"(?:^|(?<=\s))(?:system|user|assistant): ")


def default_chat_template(image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """The chat template [`BridgeProcessor`] uses when given none, with `image_token` for `{"type": "image"}` entries.

    Messages have roles `system`, `user` and `assistant`; `content` is a string or a list of `{"type": "text",
    "text": ...}` / `{"type": "image"}` entries. Each image renders as `image_token` followed by a newline, each
    message as `"<role>: <content>"` followed by a newline (user, system) or by EOS (assistant, inside
    `{% generation %}`), and `add_generation_prompt=True` appends `"assistant: "`. Region entries (`{"type":
    "box"}`, `{"type": "point"}`) never reach a template: [`BridgeProcessor.apply_chat_template`] writes them into text
    entries first, in the coordinates of the image the model sees, so they work with any model's own template too.
    """
    return "{%- set image_token = " + json.dumps(image_token) + " -%}" + _CHAT_TEMPLATE_BODY


def _retype(replacement_offsets: list[list[dict]], kind: str) -> list[list[dict]]:
    """`text_replacement_offsets` typed by what the placeholders stood for: transformers types every match of
    `image_token` as `"image"`, and videos share that token."""
    if kind == "image":
        return replacement_offsets
    return [[{**entry, "type": kind} for entry in sample] for sample in replacement_offsets]


class _SubProcessorNames:
    """`ProcessorMixin.get_attributes`, made aware of the optional Q-Former tokenizer.

    On the class it names every sub-processor slot, which loading and `__init__` rely on; on an instance built
    without a Q-Former tokenizer it leaves that slot out, so that `save_pretrained` and `repr` skip it.
    """

    def __get__(self, instance, owner):
        names = ProcessorMixin.get_attributes.__func__(owner)
        if instance is not None and instance.__dict__.get(QFORMER_TOKENIZER, "unset") is None:
            names = [name for name in names if name != QFORMER_TOKENIZER]
        return lambda: list(names)


class BridgeProcessor(ProcessorMixin):
    r"""
    Processor of [`BridgeVLMForConditionalGeneration`]: images go through `image_processor` into `pixel_values`, and
    each `image_token` in the text is expanded into exactly `num_image_tokens` copies of itself (one per bridge output
    token) before `tokenizer` turns it into `input_ids`. The model scatters the bridge's outputs into those positions,
    so logits stay aligned with `input_ids`.

    Images are matched to the `image_token` placeholders in reading order: `pixel_values` holds every image of the
    batch, sample after sample, shape `(total_images, channels, height, width)`. Pass `images` as one list per text
    (`[[img_a, img_b], [], [img_c]]`) to have the count checked sample by sample, or as a flat list to have only the
    total checked. `images=None` processes text alone. Any number of images per sample works, anywhere in the text
    (interleaved), zero included.

    Any-res: with an image processor that tiles ([`BridgeAnyResImageProcessor`], or any with `image_grid_pinpoints`
    and `get_number_of_image_patches`), `pixel_values` are `(total_images, max_tiles, channels, height, width)`, the
    output also holds `image_sizes`, and each image's placeholder is expanded into its own count: its tiles (base view
    included) x `num_image_tokens`, which the model derives the same way from `image_sizes`.

    Videos: `videos=` takes videos in place of images, one kind per call. Each video (a list of frames, or a
    `(num_frames, height, width, channels)` array) stands for one `image_token` in the text, expanded like an image
    into `num_image_tokens` tokens: a Perceiver bridge with `num_frames` resamples all its frames into that many
    tokens. Its frames go through `image_processor` like images into `pixel_values_videos`, `(num_videos,
    max_frames, channels, height, width)` with all-zero padding frames, and `video_num_frames` gives each video's
    real frame count.

    Padding follows `padding_side=` when passed, else the tokenizer's `padding_side` (use left padding for batched
    generation with a decoder-only language model). Text that already starts with the tokenizer's BOS, as the default
    chat template renders it, is tokenized with `add_special_tokens=False` unless `add_special_tokens` is passed, so
    it never gets a second BOS.

    Nothing passed in is dropped silently; these raise a `ValueError` that names the fix:

    - a different number of images and placeholders (per sample for nested image lists, in total otherwise);
    - text that already holds expanded image tokens (a run of `num_image_tokens` or more placeholders that does not
      match the images): pass one `image_token` per image;
    - truncation that would cut an image: text is truncated as the tokenizer does it (`truncation_side`), but if any
      image token would be removed, the error gives the `max_length` that keeps every image whole. Truncation that
      only removes text before or after the images is fine.

    Args:
        image_processor ([`BaseImageProcessor`]):
            Image processor of the vision tower (e.g. [`CLIPImageProcessor`], [`SiglipImageProcessor`]).
        tokenizer ([`PreTrainedTokenizerBase`]):
            Tokenizer of the language model. `image_token` is added to it as a special token if it is missing, in
            which case the language model's embeddings must be resized (a warning says so, unless `image_token_id`
            shows the model already has it).
        qformer_tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            Tokenizer of an instruction-aware Q-Former (InstructBLIP). When given, the processor also returns
            `qformer_input_ids` and `qformer_attention_mask`, tokenized from the text with the image placeholders and
            the language model's special tokens removed (same `padding`, `truncation` and `max_length`; the Q-Former
            tokenizer's own padding side). It is saved in the `qformer_tokenizer/` subfolder.
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to [`default_chat_template`], which renders `{"type": "image"}` entries as
            `image_token` and marks assistant turns with `{% generation %}`.
        image_token (`str`, *optional*):
            The image placeholder. Defaults to the tokenizer's `image_token` attribute if it has one, else
            `"<image>"`.
        num_image_tokens (`int`, *optional*, defaults to 32):
            Tokens each image (each tile, with any-res) takes in `input_ids`: `BridgeVLMConfig.num_image_tokens`, i.e.
            the bridge's output length (Q-Former queries, Perceiver latents, or MLP-projected patches).
        image_token_id (`int`, *optional*):
            The model's `config.image_token_id`. The tokenizer must encode `image_token` as this id (else a
            `ValueError`); when `image_token` has to be added to the tokenizer, it tells the processor that the model
            already has the token (as after `from_vision_text_pretrained`), so no resize warning is given.

    Example:

    ```python
    >>> from PIL import Image
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast, SiglipImageProcessorPil
    >>> from vlbridge.processing import BridgeProcessor

    >>> backend = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "what": 2, "is": 3, "it": 4}, unk_token="<unk>"))
    >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    >>> image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    >>> processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=3)
    >>> inputs = processor(images=Image.new("RGB", (40, 30)), text="<image> what is it", return_tensors="pt")
    >>> inputs["input_ids"].tolist(), tuple(inputs["pixel_values"].shape)
    ([[5, 5, 5, 2, 3, 4]], (1, 3, 32, 32))
    >>> processor.apply_chat_template(
    ...     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]}],
    ...     add_generation_prompt=True,
    ... )
    'user: <image>\nwhat is it\nassistant: '

    ```"""

    # Language models take no `token_type_ids`; tokenizers that make them by default must not send them along.
    text_kwargs = {"return_token_type_ids": False}

    get_attributes = _SubProcessorNames()

    def __init__(
        self,
        image_processor,
        tokenizer,
        qformer_tokenizer=None,
        chat_template: str | None = None,
        image_token: str | None = None,
        num_image_tokens: int = 32,
        image_token_id: int | None = None,
        **kwargs,
    ):
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"`tokenizer` must be a PreTrainedTokenizerBase, got {type(tokenizer).__name__}.")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(
                f"num_image_tokens must be a positive integer, got {num_image_tokens!r}: pass the model's "
                "`config.num_image_tokens` (the number of tokens the bridge outputs per image)."
            )
        self.image_token = self._ensure_image_token(tokenizer, image_token, image_token_id)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.num_image_tokens = num_image_tokens
        if chat_template is None:
            chat_template = default_chat_template(self.image_token)
        super().__init__(image_processor, tokenizer, qformer_tokenizer, chat_template=chat_template, **kwargs)

    @staticmethod
    def _ensure_image_token(
        tokenizer: PreTrainedTokenizerBase, image_token: str | None, model_image_token_id: int | None = None
    ) -> str:
        """
        Resolve the placeholder string and make sure the tokenizer encodes it as one token.

        When the token has to be added, the model must grow its embeddings and learn the new id; a warning says so,
        unless `model_image_token_id` (the model's `config.image_token_id`) shows that the model already did, as
        `from_vision_text_pretrained` does when it adds `<image>` to the same language model's tokenizer.
        """
        if image_token is None:
            image_token = getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        # A tokenizer may expose its image token as an `AddedToken` or, via `extra_special_tokens`, as a plain string.
        image_token = str(getattr(image_token, "content", image_token))
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        added = len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id)
        if added:
            tokenizer.add_tokens([AddedToken(image_token, normalized=False, special=True)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if model_image_token_id is not None and model_image_token_id != token_id:
            # Placeholders the model does not recognise would put text embeddings where the image should be.
            raise ValueError(
                f"The tokenizer encodes {image_token!r} as id {token_id}, but the model's config.image_token_id is "
                f"{model_image_token_id}: build the processor with the tokenizer the model was built or trained with."
            )
        if added and model_image_token_id is None:
            logger.warning(
                f"Added {image_token!r} to the tokenizer as special token id {token_id} (vocabulary size now "
                f"{len(tokenizer)}): call `model.resize_token_embeddings(len(processor.tokenizer))` and set "
                "`config.image_token_id` to it, or pass the model's `image_token_id` to the processor when the model "
                "already has it (`from_vision_text_pretrained` adds it)."
            )
        elif added:
            logger.info(f"Added {image_token!r} to the tokenizer as id {token_id}, the model's image_token_id.")
        return image_token

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == QFORMER_TOKENIZER and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        [`~ProcessorMixin.save_pretrained`], plus an `auto_map` entry in `processor_config.json` and the
        `vlbridge_auto.py` it points at (see `vlbridge.configuration.remote_code`): without them, in a process that
        has not run `import vlbridge`, `AutoProcessor` would silently return the bare tokenizer; with them it asks for
        `trust_remote_code=True` and then loads this class. Done here, so it holds whichever of the model and the
        processor is saved last. With `push_to_hub=True` the upload happens inside the parent's call, before these
        two files exist: use the model's `push_to_hub(..., processor=processor)` to share a self-describing folder.
        """
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        if (folder / "processor_config.json").is_file():
            write_remote_code_shim(folder)
            add_auto_map_entries(folder / "processor_config.json", {"AutoProcessor": type(self).__name__})
            # A model saved here before keeps its `auto_map` complete, as when the processor is saved first.
            model_config = folder / "config.json"
            if model_config.is_file() and "auto_map" in json.loads(model_config.read_text()):
                add_auto_map_entries(model_config, {"AutoProcessor": type(self).__name__})
        return saved

    @classmethod
    def _load_tokenizer_from_pretrained(
        cls, sub_processor_type, pretrained_model_name_or_path, subfolder="", **kwargs
    ):
        if sub_processor_type != QFORMER_TOKENIZER:
            return super()._load_tokenizer_from_pretrained(
                sub_processor_type, pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            )
        # The Q-Former tokenizer is optional: load it if its subfolder was saved, never fall back to the main one.
        folder = f"{subfolder}/{QFORMER_TOKENIZER}" if subfolder else QFORMER_TOKENIZER
        hub_kwargs = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only")
        found = cached_file(
            pretrained_model_name_or_path,
            TOKENIZER_CONFIG_FILE,
            subfolder=folder,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{key: kwargs[key] for key in hub_kwargs if key in kwargs},
        )
        if found is None:
            return None
        return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=folder, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = [name for name in self.tokenizer.model_input_names if name != "token_type_ids"]
        names += [name for name in self.image_processor.model_input_names if name not in names]
        # Video frames go through the same image processor; these are the keys they come back under.
        names += ["pixel_values_videos", "video_num_frames"]
        if self.qformer_tokenizer is not None:
            names += ["qformer_input_ids", "qformer_attention_mask"]
        return names

    @property
    def is_anyres(self) -> bool:
        """Whether the image processor tiles images (any-res), so each image takes its own number of tokens."""
        image_processor = self.image_processor
        return getattr(image_processor, "image_grid_pinpoints", None) is not None and hasattr(
            image_processor, "get_number_of_image_patches"
        )

    def num_tiles(self, image_sizes, images_kwargs: dict | None = None) -> list[int]:
        """
        Tiles (any-res: base view included; otherwise 1) of images of `image_sizes` `[(height, width), ...]`; each
        takes `num_tiles * num_image_tokens` placeholder tokens.
        """
        sizes = [tuple(int(value) for value in size) for size in image_sizes]
        if not self.is_anyres:
            return [1] * len(sizes)
        count = self.image_processor.get_number_of_image_patches
        return [count(height, width, images_kwargs) for height, width in sizes]

    def _image_token_counts(self, image_inputs: dict, num_images: int, images_kwargs: dict | None = None) -> list[int]:
        """Image tokens of each processed image: `num_image_tokens`, times the image's tiles with any-res."""
        image_sizes = image_inputs.get("image_sizes")
        tiles = self.num_tiles(image_sizes, images_kwargs) if image_sizes is not None else [1] * num_images
        return [count * self.num_image_tokens for count in tiles]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text that stands for image `image_idx`: `num_image_tokens` copies of `image_token`, times the image's
        tiles with any-res (from `image_inputs["image_sizes"]`)."""
        counts = self._image_token_counts(image_inputs, image_idx + 1, kwargs.get("images_kwargs"))
        return self.image_token * counts[image_idx]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        if image_sizes is None:
            return MultiModalData()
        tiles = self.num_tiles(image_sizes, kwargs.get("images_kwargs"))
        return MultiModalData(
            num_image_tokens=[count * self.num_image_tokens for count in tiles], num_image_patches=tiles
        )

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        videos=None,
        audio=None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """
        Process images or videos, and text, for the model.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a (nested) list of them, *optional*):
                The images: one, a flat list matched to the placeholders in order, or one list per text. Each is
                turned into 8-bit RGB by [`~image_utils.to_rgb_image`] first, so 16-bit, 32-bit integer and float
                (in [0, 1]) images are rescaled rather than clipped (arrays are kept as given with `do_rescale=False`).
            text (`str` or `list[str]`, *optional*):
                The text, with one `image_token` where each image (or video) goes.
            videos (`list`, *optional*):
                The videos, instead of images: one, a flat list matched to the placeholders in order, or one list
                per text. A video is a list of frames (PIL images, `(height, width, channels)` arrays or tensors) or
                one `(num_frames, height, width, channels)` array or tensor, already decoded and sampled. Frames are
                handled exactly as images. Not with an any-res image processor.
            kwargs:
                Tokenizer arguments (`padding`, `padding_side`, `truncation`, `max_length`, `add_special_tokens`,
                `return_offsets_mapping`, ...), image processor arguments (also applied to video frames), and
                `return_tensors`.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` (with text), `pixel_values` (with images),
            `pixel_values_videos` and `video_num_frames` (with videos: `(num_videos, max_frames, channels, height,
            width)` floats with all-zero padding frames, and each video's frame count), `qformer_input_ids` and
            `qformer_attention_mask` (with text and a Q-Former tokenizer), plus whatever extra the tokenizer was asked
            for (`offset_mapping`, ...), `text_replacement_offsets` and `mm_token_type_ids` when requested (video
            placeholders are typed `"video"` / 2 there, as in transformers).
        """
        if audio is not None:
            raise ValueError(f"{type(self).__name__} takes images or videos, and text; got audio.")
        if getattr(self, "_chat_images", None) is not None:
            images = self._chat_images  # handed over by `apply_chat_template` (see `_apply_chat_template_with_images`)
        if images is not None and videos is not None:
            raise ValueError(
                "Got both `images` and `videos`: one call takes images or videos, one kind per batch: the model reads "
                f"every {self.image_token!r} of a batch as the same kind. Process image samples and video samples "
                "in separate calls (separate batches), or pass a still image as a video of one frame."
            )
        if images is None and videos is None and text is None:
            raise ValueError(f"Pass `images` or `videos`, `text`, or both to {type(self).__name__}.")
        text = self._as_list_of_strings(text)
        passed = {**kwargs, **kwargs.get("text_kwargs", {})}
        if text and "add_special_tokens" not in passed and self._starts_with_bos(text):
            kwargs["add_special_tokens"] = False  # rendered by the chat template, which wrote the BOS already
        # The kwargs class is passed explicitly: transformers < 5.24 requires it, later releases default to it.
        kwargs_class = getattr(self, "valid_processor_kwargs", ProcessingKwargs)
        merged = self._merge_kwargs(kwargs_class, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = merged["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        # Top-level processor kwargs since transformers 5.24, text kwargs before.
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids"))
        return_replacement_offsets = text_kwargs.pop(
            "return_text_replacement_offsets", merged.get("return_text_replacement_offsets")
        )

        data: dict[str, Any] = {}
        kind = "video" if videos is not None else "image"
        if videos is not None:
            flat_media, media_per_sample = split_videos(videos, None if text is None else len(text))
            if flat_media:
                data.update(self._video_inputs(flat_media, merged["images_kwargs"], return_tensors))
        else:
            flat_media, media_per_sample = self._split_images(images, text)
            if flat_media:
                data.update(
                    self.image_processor(self._to_rgb(flat_media, merged["images_kwargs"]), **merged["images_kwargs"])
                )
        if text is not None:
            placeholders = self._check_placeholders(text, len(flat_media), media_per_sample, kind)
            tokens = self._image_token_counts(data, len(flat_media), merged["images_kwargs"])
            replacements = [self.image_token * count for count in tokens]
            expanded, replacement_offsets = self.get_text_with_replacements(list(text), replacements)
            text_inputs = self.tokenizer(expanded, **text_kwargs)
            self._check_image_tokens_kept(expanded, text_inputs["input_ids"], placeholders, text_kwargs, tokens)
            data.update(text_inputs)
            if return_replacement_offsets:
                data["text_replacement_offsets"] = _retype(replacement_offsets, kind)
            if return_mm_token_type_ids:
                type_ids = self.create_mm_token_type_ids(text_inputs["input_ids"])
                # The placeholder id is shared; a video call's placeholders are all videos (transformers' type 2).
                data["mm_token_type_ids"] = type_ids if kind == "image" else [[2 * t for t in row] for row in type_ids]
            if self.qformer_tokenizer is not None:
                data.update(self._qformer_inputs(text, text_kwargs))
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _to_rgb(self, images: list, images_kwargs: dict) -> list:
        """Images (or video frames) as 8-bit RGB, through [`~image_utils.to_rgb_image`]."""
        # 16-bit and float images are rescaled to 8 bits here: the image processor's own RGB conversion clips
        # them. With rescaling turned off the caller's arrays are already on the scale they want: kept as given.
        rescale = images_kwargs.get("do_rescale", getattr(self.image_processor, "do_rescale", True))
        return [
            to_rgb_image(image) if rescale is not False or isinstance(image, Image.Image) else image
            for image in images
        ]

    def _video_inputs(self, videos: list[list], images_kwargs: dict, return_tensors: str | None) -> dict[str, Any]:
        """`pixel_values_videos` `(num_videos, max_frames, C, H, W)`, zero-padded, and `video_num_frames`."""
        if self.is_anyres:
            raise ValueError(
                f"Videos need an image processor that gives every frame the same {self.num_image_tokens} tokens, but "
                f"{type(self.image_processor).__name__} tiles images (any-res), which has no meaning for video "
                "frames: build the processor with the vision tower's plain image processor (e.g. "
                "`CLIPImageProcessor`, `SiglipImageProcessor`) for videos."
            )
        num_frames = [len(video) for video in videos]
        frames = self._to_rgb([frame for video in videos for frame in video], images_kwargs)
        # NumPy here, whatever was asked for: the frames are split and padded before the final conversion.
        processed = self.image_processor(frames, **{**images_kwargs, "return_tensors": "np"})
        extra = sorted(set(processed) - {"pixel_values"})
        if extra:
            raise ValueError(
                f"{type(self.image_processor).__name__} returns {extra} besides `pixel_values`, which videos do not "
                "carry: use an image processor that returns `pixel_values` only for videos."
            )
        padded = pad_frames(np.asarray(processed["pixel_values"]), num_frames)  # (V, F_max, C, H, W)
        # Without `return_tensors`, one array per video, as images come back one array per image.
        pixel_values_videos = list(padded) if return_tensors is None else padded
        return {"pixel_values_videos": pixel_values_videos, "video_num_frames": num_frames}

    # ----------------------------------------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------------------------------------

    def _as_list_of_strings(self, text) -> list[str] | None:
        if text is None or isinstance(text, str):
            return None if text is None else [text]
        if isinstance(text, (list, tuple)) and all(isinstance(sample, str) for sample in text):
            return list(text)
        raise ValueError(
            f"`text` must be a string or a list of strings, got {type(text).__name__}. Pass the prompt as text with "
            f"one {self.image_token!r} per image; pre-tokenized or pre-expanded ids are not accepted."
        )

    def _starts_with_bos(self, text: list[str]) -> bool:
        bos = self.tokenizer.bos_token
        return bool(bos) and all(sample.startswith(bos) for sample in text)

    def _split_images(self, images, text: list[str] | None) -> tuple[list, list[int] | None]:
        """Flat list of images, and the number per sample when they came as one list per text."""
        if images is None:
            return [], None
        images = self.image_processor.fetch_images(images)
        if isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images):
            if text is not None and len(images) != len(text):
                raise ValueError(
                    f"Got {len(images)} lists of images for {len(text)} texts: pass one list of images per text "
                    "(an empty list for a text without images), or a flat list matched to the placeholders in order."
                )
            return [image for sample in images for image in sample], [len(sample) for sample in images]
        if isinstance(images, (list, tuple)) and len(images) == 0:
            return [], None
        return list(make_flat_list_of_images(images)), None

    def _count_placeholders(self, sample: str) -> int:
        return len(re.findall(_UNMARKED + re.escape(self.image_token), sample))

    def _longest_placeholder_run(self, sample: str) -> int:
        """Most placeholders in a row, with nothing but whitespace between them."""
        token = re.escape(self.image_token)
        runs = re.finditer(f"(?:{_UNMARKED}{token}\\s*)+", sample)
        return max((len(re.findall(token, run.group())) for run in runs), default=0)

    def _check_placeholders(
        self, text: list[str], num_images: int, images_per_sample: list[int] | None, kind: str = "image"
    ) -> list[int]:
        """Check that each image (each video, for `kind="video"`) has one placeholder; return the placeholders per
        sample."""
        placeholders = [self._count_placeholders(sample) for sample in text]
        if images_per_sample is not None:
            for i, (found, given) in enumerate(zip(placeholders, images_per_sample)):
                if found != given:
                    raise ValueError(self._placeholder_error(f"sample {i}", [text[i]], found, given, kind))
        elif sum(placeholders) != num_images:
            subject = f"the text (per sample: {placeholders})" if len(text) > 1 else "the text"
            raise ValueError(self._placeholder_error(subject, text, sum(placeholders), num_images, kind))
        return placeholders

    def _placeholder_error(self, subject: str, samples: list[str], found: int, given: int, kind: str = "image") -> str:
        token = self.image_token
        run = max(self._longest_placeholder_run(sample) for sample in samples)
        if self.num_image_tokens > 1 and run >= self.num_image_tokens:
            return (
                f"Found {found} {token!r} in {subject}, {run} of them in a row, but {given} {kind}(s) for it: the "
                f"text looks already expanded. Pass one {token!r} per {kind}; the processor expands each into the "
                f"{self.num_image_tokens} tokens the bridge outputs."
            )
        if given == 0:
            return (
                f"Found {found} {token!r} placeholder(s) in {subject} but no {kind}s for it: pass `{kind}s` (one per "
                f"placeholder), or remove the {token!r} placeholders from the text."
            )
        return (
            f"Found {found} {token!r} placeholder(s) in {subject} but {given} {kind}(s) for it. Put exactly one "
            f"{token!r} in the text where each {kind} goes (with chat messages, one {{'type': 'image'}} entry per "
            f"{kind}), or pass as many {kind}s as placeholders."
        )

    def _check_image_tokens_kept(
        self, expanded: list[str], input_ids, placeholders: list[int], text_kwargs, tokens_per_image: list[int]
    ) -> None:
        """Raise if tokenization (in practice, truncation) did not keep every image token of every sample.

        `tokens_per_image` are the image tokens each image was expanded into, in placeholder order."""
        starts = [sum(placeholders[:i]) for i in range(len(placeholders))]
        if len(input_ids) != len(expanded):
            raise ValueError(
                f"Got {len(input_ids)} tokenized rows for {len(expanded)} texts: {type(self).__name__} does not "
                "support `return_overflowing_tokens`, which would split images from their text."
            )
        for i, (ids, count) in enumerate(zip(input_ids, placeholders)):
            kept = list(ids).count(self.image_token_id)
            expected = sum(tokens_per_image[starts[i] : starts[i] + count])
            if kept == expected:
                continue
            if kept < expected and text_kwargs.get("truncation") not in (None, False, "do_not_truncate"):
                raise ValueError(self._truncation_error(i, expanded[i], kept, expected, count, text_kwargs))
            raise ValueError(
                f"Sample {i} holds {kept} image tokens (id {self.image_token_id}) after tokenization, but its "
                f"{count} image(s) need exactly {expected}. Make sure the tokenizer encodes {self.image_token!r} as "
                "one special token, and do not write image tokens into the text other than one placeholder per image."
            )

    def _truncation_error(
        self, index: int, expanded: str, kept: int, expected: int, num_images: int, text_kwargs
    ) -> str:
        tokenizer = self.tokenizer
        content = tokenizer(expanded, add_special_tokens=False)["input_ids"]
        specials = tokenizer.num_special_tokens_to_add() if text_kwargs.get("add_special_tokens", True) else 0
        positions = [j for j, token_id in enumerate(content) if token_id == self.image_token_id]
        if tokenizer.truncation_side == "left":
            needed, cut, shorten = len(content) - positions[0] + specials, "start", "after its first image"
        else:
            needed, cut, shorten = positions[-1] + 1 + specials, "end", "before its last image"
        max_length = text_kwargs.get("max_length") or tokenizer.model_max_length
        tiled = expected != num_images * self.num_image_tokens
        per_image = "tiled, any-res" if tiled else f"x {self.num_image_tokens}"
        return (
            f"Truncating to max_length={max_length} would cut the image tokens of sample {index}: truncation "
            f"(truncation_side={tokenizer.truncation_side!r}) removes tokens from the {cut} and would keep {kept} of "
            f"its {expected} image tokens ({num_images} image(s) {per_image}). Pass "
            f"max_length>={needed} to keep every image whole, shorten the text {shorten}, or pass truncation=False."
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Chat
    # ----------------------------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """
        [`~ProcessorMixin.apply_chat_template`]. With a `qformer_tokenizer` (InstructBLIP) and `tokenize=True`,
        `return_dict=True`, the Q-Former text is each image's instruction (`qformer_instructions`), one row per
        image, not the whole rendered chat: that would show the Q-Former every answer of a training conversation
        (TRL's `SFTTrainer` tokenizes through this method), and role words it never sees at inference.

        Region prompts: `{"type": "box", "box": [xmin, ymin, xmax, ymax], "image_index": 0}` (or `"point": [x, y]`
        with `"type": "point"`) content entries, in original pixels of that image of the conversation, are written
        into the text as [`format_region`] does (`"<box>[0.250, ...]</box>"`; `"tags": False` in the entry for
        Shikra's bare brackets) before any chat template renders the messages. The images come from
        `processor_kwargs["images"]` or the image entries' `"image"` / `"path"`.
        """
        if has_region_entries(conversation):
            images = (kwargs.get("processor_kwargs") or {}).get("images") or None
            conversation = render_region_entries(conversation, images, self.image_geometry)
        out = self._apply_chat_template_with_images(conversation, chat_template, **kwargs)
        if self.qformer_tokenizer is None or not isinstance(out, Mapping) or "qformer_input_ids" not in out:
            return out
        single = bool(conversation) and isinstance(conversation[0], dict)
        conversations = [conversation] if single else conversation
        instructions = [text for messages in conversations for text in self.qformer_instructions(messages)]
        del out["qformer_input_ids"], out["qformer_attention_mask"]
        if instructions:
            tensors = "pt" if hasattr(out.get("input_ids"), "shape") else None
            out.update(self.encode_qformer_text(instructions, padding=True, return_tensors=tensors))
        return out

    def _apply_chat_template_with_images(self, conversation, chat_template, **kwargs):
        # Images may come in `processor_kwargs` (TRL and ChatCollator pass them so, beside `{"type": "image"}`
        # entries that hold no image). transformers >= 5.24 takes them from there; earlier releases pass them to
        # `__call__` a second time (TypeError). The same semantics on every release: they are handed to `__call__`
        # here, and override images found in the messages, as 5.24 does.
        kwargs["processor_kwargs"] = processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
        images = processor_kwargs.pop("images", None)
        if not images:
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        batched = bool(conversation) and not isinstance(conversation[0], dict)
        self._chat_images = images if batched else [images]
        try:
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        finally:
            self._chat_images = None

    def image_geometry(self, image, pad_to_square: bool | None = None) -> ImageGeometry:
        """
        The [`ImageGeometry`] of `image` through this processor's image processor: maps boxes and points between the
        image's pixels and the normalised frame of the image the model sees (any-res: its base view).

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or `tuple[int, int]`):
                The image as it will be passed to the processor, or its `(height, width)`.
            pad_to_square (`bool`, *optional*):
                The caller pads the image to a square before the processor (see [`ImageGeometry`]).
        """
        return ImageGeometry(self.image_processor, image_size_of(image), pad_to_square=pad_to_square)

    def format_region(self, region, image, kind: str = "box", tags: bool = True) -> str:
        """
        A region prompt for `image`: a box (or point) in the image's pixels written in the frame of the image the
        model sees, e.g. `"<box>[0.250, 0.250, 0.750, 0.750]</box>"` (ChatSpot), or `"[0.250, ...]"` with
        `tags=False` (Shikra). Put it anywhere in the text, or use a `{"type": "box"}` chat entry.

        Args:
            region (`Sequence[float]`): `[xmin, ymin, xmax, ymax]` (or `[x, y]` with `kind="point"`) in pixels of
                `image`, as passed to the processor.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or `tuple[int, int]`): The image, or its
                `(height, width)`.
            kind (`str`, *optional*, defaults to `"box"`): `"box"` or `"point"`.
            tags (`bool`, *optional*, defaults to `True`): Wrap it in `<box>` / `<point>` tags.
        """
        return region_text(region, self.image_geometry(image), kind=kind, tags=tags)

    def qformer_instructions(self, messages: list[dict]) -> list[str]:
        """
        InstructBLIP's Q-Former text for each image of a conversation, in order: the text of the message that holds
        the image, without placeholders. Later turns are left out: they follow earlier answers and would show them to
        the image tokens, which come first.

        Args:
            messages (`list[dict]`):
                A conversation; `content` is a string with `image_token` placeholders or a list of `{"type": "image"}`
                / `{"type": "text", "text": ...}` entries.

        Returns:
            `list[str]`: one instruction per image.
        """
        texts = []
        for message in messages:
            content = message.get("content") or []
            if isinstance(content, str):
                count, text = content.count(self.image_token), content
            else:
                count = sum(1 for entry in content if entry.get("type") == "image")
                text = " ".join(
                    entry["text"] for entry in content if entry.get("type") == "text" and entry.get("text")
                )
            texts += [self.qformer_text(text)] * count
        return texts

    # ----------------------------------------------------------------------------------------------------------------
    # Q-Former text
    # ----------------------------------------------------------------------------------------------------------------

    def qformer_text(self, sample: str) -> str:
        """The text without image placeholders and language-model special tokens (BOS, EOS, ...), and, with the
        default chat template, without its role headers (`"user: "`, `"assistant: "`): a chat rendered by the
        default template (as TRL's trainers and pipelines pass it) gives the Q-Former the messages' own words, as
        `ChatCollator` does."""
        removed = {self.image_token, *self.tokenizer.all_special_tokens}
        pattern = "|".join(re.escape(token) for token in sorted(removed, key=len, reverse=True) if token)
        text = re.sub(pattern, " ", sample)
        if self.chat_template == default_chat_template(self.image_token):
            text = _ROLE_HEADER.sub(" ", text)
        return re.sub(r"[ \t]+", " ", text).strip()

    def encode_qformer_text(self, texts: list[str], **tokenizer_kwargs) -> dict:
        """`qformer_input_ids` / `qformer_attention_mask` of `texts` (already cleaned by `qformer_text`), from the
        Q-Former tokenizer with `tokenizer_kwargs` (`padding`, `truncation`, `max_length`, `return_tensors`, ...)."""
        encoding = self.qformer_tokenizer(
            texts, return_attention_mask=True, return_token_type_ids=False, **tokenizer_kwargs
        )
        return {"qformer_input_ids": encoding["input_ids"], "qformer_attention_mask": encoding["attention_mask"]}

    def _qformer_inputs(self, text: list[str], text_kwargs: dict) -> dict[str, list]:
        shared = ("padding", "truncation", "max_length", "pad_to_multiple_of")
        return self.encode_qformer_text(
            [self.qformer_text(sample) for sample in text],
            **{key: text_kwargs[key] for key in shared if key in text_kwargs},
        )


__all__ = ["BridgeProcessor", "default_chat_template"]
