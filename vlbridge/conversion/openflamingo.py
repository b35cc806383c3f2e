"""Turn an OpenFlamingo checkpoint (`checkpoint.pt`) into a vlbridge VLM with gated cross-attention.

OpenFlamingo saves only what it trains: the Perceiver Resampler, the gated cross-attention blocks and the language
model's input embeddings (which hold its new `<|endofchunk|>` and `<image>` rows). The frozen vision encoder and
language model come from their own releases, so the converter takes their paths too and builds the VLM around them
with [`BridgeVLMForConditionalGeneration.from_vision_text_pretrained`]: a [`PerceiverResamplerModel`] bridge as
wide as the vision tower (OpenFlamingo's has no input or output projection) and `image_fusion="gated_cross_attention"`.

What maps where (OpenFlamingo key -> vlbridge key):

```
perceiver.*                                           model.bridge.*  (vlbridge.conversion.openflamingo_perceiver)
lang_encoder.gated_cross_attn_layers.{i}.*            model.gated_cross_attention.{i}.*  (the key table of
  or lang_encoder.<layers>.{i}.gated_cross_attn_layer.*   vlbridge.modeling.gated_cross_attention; attn.to_kv split)
lang_encoder.<input embeddings>.weight                the language model's input embeddings (and the tied head)
lang_encoder.lm_head.weight (GPT-NeoX: embed_out)     lm_head.weight, when the head is not tied
lang_encoder.<layers>.{i}.decoder_layer.*,            the frozen language model: checked equal to text_path's,
  lang_encoder.old_decoder_blocks.{i}.*, the rest       not loaded
vision_encoder.* (open_clip names)                    ignored: the tower is loaded from vision_path
```

Things OpenFlamingo fixes that the conversion keeps:

- Tokens. OpenFlamingo adds `<|endofchunk|>` then `<image>` to the tokenizer, then `<PAD>` if it has no pad token,
  and resizes the embeddings to `len(tokenizer)`; the converter does the same, in that order, so the checkpoint's
  embedding rows line up. Each `<image>` is one token (`num_image_tokens == 1`), and generation stops at
  `<|endofchunk|>`, OpenFlamingo's default end of sequence in `Flamingo.generate`.
- Vision features: open_clip's `visual(x)[1]`, the patch tokens of the last layer, CLS dropped
  (`vision_feature_select="patches"`). Whether open_clip's final layer norm (`ln_post`, transformers'
  `post_layernorm`) is applied to them depends on the open_clip version: up to 2.22 it normed only the pooled token,
  from 2.23 (October 2023) every token. The released OpenFlamingo v2 models were trained before that change, so
  `vision_feature_post_layernorm` defaults to `False`; pass `True` to reproduce OpenFlamingo run with open_clip >=
  2.23.
- Cross-attention: `Flamingo` always builds its blocks with OpenFlamingo's defaults (8 heads of 64, feed-forward x4,
  each text token reading only the image immediately before it), and its Perceiver with 64 latents, 6 layers and 8
  heads of 64; the arguments below exist for forks that changed them.

The released models (OpenFlamingo's README), all with `openai/clip-vit-large-patch14`:
`openflamingo/OpenFlamingo-3B-vitl-mpt1b` (language model `anas-awadalla/mpt-1b-redpajama-200b`,
`cross_attention_every_n_layers=1`), `OpenFlamingo-3B-vitl-mpt1b-langinstruct`
(`anas-awadalla/mpt-1b-redpajama-200b-dolly`, 1), `OpenFlamingo-4B-vitl-rpj3b`
(`togethercomputer/RedPajama-INCITE-Base-3B-v1`, 2), `OpenFlamingo-4B-vitl-rpj3b-langinstruct`
(`togethercomputer/RedPajama-INCITE-Instruct-3B-v1`, 2), `OpenFlamingo-9B-vitl-mpt7b` (`mosaicml/mpt-7b`, 4). The
language model is loaded by `from_vision_text_pretrained`, without remote code: RedPajama-INCITE (GPT-NeoX) and
MPT-7B are transformers architectures, MPT-1B (`mosaic_gpt`) exists only as remote code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.utils import logging

from ..configuration import PerceiverResamplerConfig
from ..modeling import BridgeVLMForConditionalGeneration
from ..modeling.gated_cross_attention import find_decoder_layers
from ..processing import BridgeProcessor
from .openflamingo_perceiver import openflamingo_perceiver_state_dict
from .state import load_state_strict


logger = logging.get_logger(__name__)

CHECKPOINT_FILENAME = "checkpoint.pt"
# OpenFlamingo's `factory.create_model_and_transforms` adds these, in this order, then the pad token if missing.
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<PAD>"

# OpenFlamingo `GatedCrossAttentionBlock` key -> vlbridge `GatedCrossAttentionBlock` key; `attn.to_kv` is split.
BLOCK_KEYS = {
    "attn.norm.weight": "attention_layernorm.weight",
    "attn.norm.bias": "attention_layernorm.bias",
    "attn.to_q.weight": "attention.q_proj.weight",
    "attn.to_out.weight": "attention.o_proj.weight",
    "attn_gate": "attention_gate",
    "ff.0.weight": "mlp_layernorm.weight",
    "ff.0.bias": "mlp_layernorm.bias",
    "ff.1.weight": "mlp.fc1.weight",
    "ff.3.weight": "mlp.fc2.weight",
    "ff_gate": "mlp_gate",
}
FUSED_KEY_VALUE = "attn.to_kv.weight"
# `lang_encoder.gated_cross_attn_layers.{i}.{name}`, or `lang_encoder.<layers>.{i}.gated_cross_attn_layer.{name}`
_BLOCK = re.compile(r"^lang_encoder\.(?:gated_cross_attn_layers\.(\d+)|.+\.(\d+)\.gated_cross_attn_layer)\.(.+)$")
# Wrappers that DDP / FSDP / activation checkpointing put into parameter names.
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def load_openflamingo_state_dict(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """
    The state dict of an OpenFlamingo checkpoint, with the names a plain `Flamingo` model has.

    Args:
        checkpoint (`str`, `os.PathLike` or `Mapping[str, torch.Tensor]`):
            A `checkpoint.pt` file, a folder holding one, a Hub repository holding one (e.g.
            `"openflamingo/OpenFlamingo-3B-vitl-mpt1b"`), or a state dict already loaded. A training checkpoint that
            nests the weights under `"model_state_dict"` is unwrapped, and the `module.` prefix of DDP and the
            wrapper names of FSDP / activation checkpointing are dropped.

    Returns:
        `dict[str, torch.Tensor]`: `perceiver.*`, `lang_encoder.*` (and `vision_encoder.*` if saved) keys.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.conversion.openflamingo import load_openflamingo_state_dict
    >>> state = {"model_state_dict": {"module.perceiver.latents": torch.zeros(4, 8)}, "epoch": 3}
    >>> list(load_openflamingo_state_dict(state))
    ['perceiver.latents']
    ```
    """
    if not isinstance(checkpoint, Mapping):
        path = Path(checkpoint)
        if path.is_dir():
            path = path / CHECKPOINT_FILENAME
        elif not path.exists():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(checkpoint), CHECKPOINT_FILENAME))
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in checkpoint:  # OpenFlamingo's training checkpoints (optimizer and epoch beside it)
        checkpoint = checkpoint["model_state_dict"]
    state = {}
    for key, tensor in checkpoint.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{key!r} in the OpenFlamingo checkpoint is a {type(tensor).__name__}, not a tensor: pass the "
                "model's state dict (a checkpoint.pt, or its 'model_state_dict')."
            )
        key = key.removeprefix("module.")
        for fragment in _WRAPPER_FRAGMENTS:
            key = key.replace(fragment, "")
        state[key] = tensor
    return state


def openflamingo_gated_cross_attention_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """
    The gated cross-attention blocks of an OpenFlamingo state dict, renamed to the keys of
    `BridgeVLMModel.gated_cross_attention` (`{layer}.attention.q_proj.weight`, ...).

    Blocks are read from `lang_encoder.gated_cross_attn_layers.{i}.*` and from their alias
    `lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.*` (OpenFlamingo's `FlamingoLayer` holds the same
    module, so a full state dict has both, and a released `checkpoint.pt` only the alias); `attn.to_kv` is split into
    `k_proj` (first half of its rows) and `v_proj`.

    Raises:
        `ValueError`: for a block key OpenFlamingo's `GatedCrossAttentionBlock` does not have, a block lacking some
        of its keys, or the two aliases of a block holding different weights.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.conversion.openflamingo import openflamingo_gated_cross_attention_state_dict
    >>> block = {"attn.norm.weight": torch.ones(4), "attn.norm.bias": torch.zeros(4), "attn.to_q.weight":
    ...          torch.zeros(8, 4), "attn.to_kv.weight": torch.zeros(16, 3), "attn.to_out.weight": torch.zeros(4, 8),
    ...          "attn_gate": torch.zeros(1), "ff.0.weight": torch.ones(4), "ff.0.bias": torch.zeros(4),
    ...          "ff.1.weight": torch.zeros(16, 4), "ff.3.weight": torch.zeros(4, 16), "ff_gate": torch.zeros(1)}
    >>> state = {f"lang_encoder.model.layers.1.gated_cross_attn_layer.{k}": v for k, v in block.items()}
    >>> converted = openflamingo_gated_cross_attention_state_dict(state)
    >>> tuple(converted["1.attention.k_proj.weight"].shape), tuple(converted["1.attention.v_proj.weight"].shape)
    ((8, 3), (8, 3))
    ```
    """
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = _BLOCK.match(key)
        if match is None:
            continue
        index, name = int(match.group(1) or match.group(2)), match.group(3)
        if name not in BLOCK_KEYS and name != FUSED_KEY_VALUE:
            unknown.append(key)
            continue
        block = blocks.setdefault(index, {})
        if name in block and not torch.equal(block[name], tensor):
            raise ValueError(
                f"The checkpoint holds two different {name!r} for the gated block before layer {index} (under "
                "gated_cross_attn_layers and under the decoder layers' gated_cross_attn_layer, which OpenFlamingo "
                "shares): it was edited after saving. Keep one of them."
            )
        block[name] = tensor
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) of the checkpoint's gated cross-attention blocks are not OpenFlamingo "
            f"GatedCrossAttentionBlock weights, e.g. {unknown[:5]}; known: {sorted([*BLOCK_KEYS, FUSED_KEY_VALUE])}. "
            "Convert a checkpoint of OpenFlamingo's Flamingo model."
        )
    converted = {}
    for index, block in sorted(blocks.items()):
        missing = sorted(set([*BLOCK_KEYS, FUSED_KEY_VALUE]) - set(block))
        if missing:
            raise ValueError(
                f"The checkpoint's gated cross-attention block before layer {index} lacks {missing}: the checkpoint "
                "is incomplete; save the whole block (lang_encoder.gated_cross_attn_layers)."
            )
        for name, ours in BLOCK_KEYS.items():
            converted[f"{index}.{ours}"] = block[name]
        # `to_kv(media).chunk(2, dim=-1)`: the first half of the output rows are the keys, the second the values.
        key_weight, value_weight = block[FUSED_KEY_VALUE].chunk(2, dim=0)
        converted[f"{index}.attention.k_proj.weight"] = key_weight
        converted[f"{index}.attention.v_proj.weight"] = value_weight
    return converted


def _block_indices(converted_blocks: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(key.split(".", 1)[0]) for key in converted_blocks})


def _check_block_placement(found: list[int], depth: int, every: int) -> None:
    """Raises a `ValueError` naming the right `cross_attention_every_n_layers` when the blocks sit elsewhere."""
    expected = [index for index in range(depth) if (index + 1) % every == 0]
    if found == expected:
        return
    fits = [n for n in range(1, depth + 1) if [i for i in range(depth) if (i + 1) % n == 0] == found]
    fix = (
        f"pass cross_attention_every_n_layers={fits[0]}, the interval it was trained with"
        if fits
        else "no cross_attention_every_n_layers places blocks there; was it trained with this language model?"
    )
    raise ValueError(
        f"The checkpoint's gated cross-attention blocks sit before decoder layers {found}, but "
        f"cross_attention_every_n_layers={every} puts them before {expected} of the language model's {depth}: {fix}."
    )


def _load_strict(target: nn.Module, state: Mapping[str, torch.Tensor], part: str, hint: str) -> None:
    load_state_strict(target, state, "OpenFlamingo", part, hint)


def _perceiver_hint(perceiver_state: Mapping[str, torch.Tensor]) -> str:
    """What the checkpoint's Perceiver is, as the converter's arguments, for an error message."""
    latents = perceiver_state.get("latents")
    layers = {key.split(".")[1] for key in perceiver_state if key.startswith("layers.")}
    size = f"num_latents={latents.shape[0]}, " if latents is not None else ""
    return (
        f"The checkpoint's Perceiver has {size}perceiver_depth={len(layers)}: pass those (and its heads: "
        "perceiver_num_heads * perceiver_head_dim is the rows of to_q), and a vision tower as wide as its latents."
    )


def _lower_precision(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    if not (a.is_floating_point() and b.is_floating_point()):
        return a.dtype
    return a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(b.dtype).eps else b.dtype


def _check_language_model_copies(
    model: BridgeVLMForConditionalGeneration, state: Mapping[str, torch.Tensor], skip: set[str], text_path
) -> tuple[int, list[str]]:
    """
    The frozen language-model weights a checkpoint may carry (a full `Flamingo.state_dict()` has the decoder layers
    under `<decoder layers>.{i}.decoder_layer` and `old_decoder_blocks.{i}`) must be `text_path`'s: they are not
    loaded, so a checkpoint whose language model changed would otherwise convert silently into another model.

    Returns:
        `(number checked equal, keys that name nothing in the language model)`.
    """
    language_model = model.model.language_model
    ours = language_model.state_dict()
    layers = find_decoder_layers(language_model, model.config.text_num_layers)
    layers_path = next(name for name, module in language_model.named_modules() if module is layers)
    prefix = f"{language_model.base_model_prefix}."  # the causal LM's base model: `model.` (Llama), `transformer.` ...
    checked, unknown, different = 0, [], []
    for key, tensor in state.items():
        if not key.startswith("lang_encoder.") or key in skip or _BLOCK.match(key):
            continue
        name = key.removeprefix("lang_encoder.")
        name = re.sub(r"^old_decoder_blocks\.", f"{prefix}{layers_path}.", name)
        name = re.sub(r"\.(\d+)\.decoder_layer\.", r".\1.", name).removeprefix(prefix)
        if name not in ours:
            unknown.append(key)
            continue
        target = ours[name]
        dtype = _lower_precision(target, tensor)
        if target.shape != tensor.shape or not torch.equal(target.to(dtype), tensor.to(dtype)):
            different.append(key)
        checked += 1
    if different:
        raise ValueError(
            f"{len(different)} frozen language-model weight(s) of the OpenFlamingo checkpoint differ from those of "
            f"{text_path}, e.g. {different[:5]}: the checkpoint was trained on another language model (or changed "
            "it). Pass as text_path the language model it was trained with."
        )
    return checked, unknown


def _add_openflamingo_tokens(tokenizer) -> tuple[int, int]:
    """Adds `<|endofchunk|>`, `<image>` (and `<PAD>` without a pad token) as OpenFlamingo does; returns their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK_TOKEN, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _embedding_key(model: BridgeVLMForConditionalGeneration) -> str:
    """The checkpoint key of the language model's input embeddings: `lang_encoder.<base model>.<embeddings>.weight`."""
    language_model = model.model.language_model
    embeddings = language_model.get_input_embeddings()
    name = next(name for name, module in language_model.named_modules() if module is embeddings)
    return f"lang_encoder.{language_model.base_model_prefix}.{name}.weight"


def _output_embedding_key(
    model: BridgeVLMForConditionalGeneration, state: Mapping[str, torch.Tensor], rows: int
) -> str | None:
    """The checkpoint key of the causal LM's output embeddings, if saved: a weight right under `lang_encoder.`
    (Llama / OPT / MPT `lm_head`, GPT-NeoX `embed_out`, which OpenFlamingo's training script keeps for its name) of
    shape `(rows, hidden)`."""
    prefix = model.model.language_model.base_model_prefix
    shape = (rows, model.lm_head.weight.shape[1])
    candidates = [
        key
        for key, tensor in state.items()
        if re.fullmatch(r"lang_encoder\.[^.]+\.weight", key)
        and key != f"lang_encoder.{prefix}.weight"
        and tuple(tensor.shape) == shape
    ]
    if len(candidates) > 1:
        raise ValueError(
            f"Several weights of the checkpoint could be the language model's output embeddings: {candidates}. "
            "Keep the one of the head (e.g. lang_encoder.lm_head.weight)."
        )
    return candidates[0] if candidates else None


def _build_processor(vision_path, tokenizer, image_token_id: int) -> BridgeProcessor | None:
    try:
        image_processor = AutoImageProcessor.from_pretrained(vision_path)
    except (OSError, ValueError) as error:
        logger.warning(
            f"No processor converted: {vision_path} has no loadable image processor ({error}). Build "
            "BridgeProcessor(image_processor, tokenizer, image_token='<image>', num_image_tokens=1) with "
            "OpenFlamingo's image transform (CLIP's) and the tokenizer with its tokens added."
        )
        return None
    return BridgeProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_token=IMAGE_TOKEN,
        num_image_tokens=1,
        image_token_id=image_token_id,
    )


def convert_openflamingo_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    vision_path: str | os.PathLike,
    text_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    cross_attention_every_n_layers: int,
    tokenizer_path: str | os.PathLike | None = None,
    num_latents: int = 64,
    perceiver_depth: int = 6,
    perceiver_num_heads: int = 8,
    perceiver_head_dim: int = 64,
    perceiver_ff_mult: int = 4,
    cross_attention_num_heads: int = 8,
    cross_attention_head_dim: int = 64,
    cross_attention_ff_mult: int = 4,
    vision_feature_post_layernorm: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[BridgeVLMForConditionalGeneration, BridgeProcessor | None]:
    r"""
    Converts an OpenFlamingo checkpoint into a [`BridgeVLMForConditionalGeneration`] with a Perceiver Resampler bridge
    and gated cross-attention (`image_fusion="gated_cross_attention"`), and builds its [`BridgeProcessor`]. Logits and
    greedy generations match OpenFlamingo's `Flamingo` for the same vision features (see the module docstring for
    the features and what maps where).

    Args:
        checkpoint (`str`, `os.PathLike` or `Mapping[str, torch.Tensor]`):
            OpenFlamingo's `checkpoint.pt`, a folder or Hub repository holding it, or its state dict (see
            [`load_openflamingo_state_dict`]).
        vision_path (`str` or `os.PathLike`):
            The CLIP model OpenFlamingo's open_clip vision encoder was (same weights), e.g.
            `"openai/clip-vit-large-patch14"` for open_clip's `ViT-L-14` / `openai`; its image processor is used.
        text_path (`str` or `os.PathLike`):
            The language model OpenFlamingo was trained on (`lang_encoder_path`), loadable with transformers' Auto
            classes.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where the converted model and processor are saved (`save_pretrained`); nothing is saved when `None`.
        cross_attention_every_n_layers (`int`):
            OpenFlamingo's `cross_attn_every_n_layers`: a block before every n-th decoder layer. A checkpoint whose
            blocks sit elsewhere is refused, with the interval that fits it.
        tokenizer_path (`str` or `os.PathLike`, *optional*):
            OpenFlamingo's `tokenizer_path`; defaults to `text_path`.
        num_latents (`int`, *optional*, defaults to 64):
            Latents of the Perceiver Resampler, hence image tokens per image.
        perceiver_depth (`int`, *optional*, defaults to 6):
            Layers of the Perceiver Resampler.
        perceiver_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the Perceiver Resampler.
        perceiver_head_dim (`int`, *optional*, defaults to 64):
            Width of each Perceiver head.
        perceiver_ff_mult (`int`, *optional*, defaults to 4):
            Feed-forward expansion of the Perceiver.
        cross_attention_num_heads (`int`, *optional*, defaults to 8):
            Heads of the gated cross-attention.
        cross_attention_head_dim (`int`, *optional*, defaults to 64):
            Width of each cross-attention head.
        cross_attention_ff_mult (`int`, *optional*, defaults to 4):
            Feed-forward expansion of the gated blocks.
        vision_feature_post_layernorm (`bool`, *optional*, defaults to `False`):
            Apply CLIP's final layer norm to every patch token, as open_clip >= 2.23 does; the released models were
            trained with open_clip versions that did not.
        dtype (`torch.dtype`, *optional*):
            Dtype of the vision tower and the language model; the bridge stays fp32.

    Returns:
        `(model, processor)`; `processor` is `None` (with a warning) when `vision_path` holds no image processor.

    Raises:
        `ValueError`: for a checkpoint that does not fit the model those arguments describe, naming the fix: no or
        incomplete Perceiver / gated-block weights, blocks at other layers than `cross_attention_every_n_layers`
        places them, shapes that differ, an embedding matrix that is not the tokenizer's size with OpenFlamingo's
        tokens, or frozen language-model weights that are not `text_path`'s.

    Example:

    ```python
    >>> from vlbridge.conversion import convert_openflamingo_checkpoint
    >>> model, processor = convert_openflamingo_checkpoint(  # doctest: +SKIP
    ...     "openflamingo/OpenFlamingo-3B-vitl-mpt1b",  # its checkpoint.pt
    ...     "openai/clip-vit-large-patch14",
    ...     "anas-awadalla/mpt-1b-redpajama-200b",
    ...     "OpenFlamingo-3B-vitl-mpt1b-vlbridge",
    ...     cross_attention_every_n_layers=1,
    ... )
    >>> prompt = "<image>An image of two cats.<|endofchunk|><image>An image of"  # doctest: +SKIP
    ```
    """
    state = load_openflamingo_state_dict(checkpoint)
    perceiver_state = openflamingo_perceiver_state_dict(state, prefix="perceiver.")
    if not perceiver_state:
        raise ValueError(
            f"The checkpoint has no Perceiver weights (perceiver.*; its keys start with "
            f"{sorted({key.split('.', 1)[0] for key in state})[:5]}): pass an OpenFlamingo checkpoint.pt."
        )
    block_state = openflamingo_gated_cross_attention_state_dict(state)
    if not block_state:
        raise ValueError(
            "The checkpoint has no gated cross-attention blocks (lang_encoder.gated_cross_attn_layers.* or "
            "lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.*): pass an OpenFlamingo checkpoint.pt."
        )
    text_config = AutoConfig.from_pretrained(text_path)
    depth = getattr(text_config, "num_hidden_layers", None)
    if isinstance(depth, int):  # before the models load (unknown depth: the strict load below still refuses it)
        _check_block_placement(_block_indices(block_state), depth, cross_attention_every_n_layers)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or text_path)
    end_of_chunk_id, image_token_id = _add_openflamingo_tokens(tokenizer)
    vision_config = AutoConfig.from_pretrained(vision_path)
    vision_config = getattr(vision_config, "vision_config", None) or vision_config
    bridge_config = PerceiverResamplerConfig(
        hidden_size=vision_config.hidden_size,
        num_latents=num_latents,
        num_hidden_layers=perceiver_depth,
        num_attention_heads=perceiver_num_heads,
        head_dim=perceiver_head_dim,
        ff_mult=perceiver_ff_mult,
        hidden_act="gelu",  # OpenFlamingo's nn.GELU (exact)
    )
    # The config refuses an `<image>` id past the language model's vocabulary, which grows only below (to the
    # checkpoint's rows); until then the model holds an id it has.
    provisional_id = image_token_id if image_token_id < text_config.vocab_size else 0
    model = BridgeVLMForConditionalGeneration.from_vision_text_pretrained(
        vision_path,
        text_path,
        bridge_config,
        image_token_id=provisional_id,
        dtype=dtype,
        image_fusion="gated_cross_attention",
        cross_attention_every_n_layers=cross_attention_every_n_layers,
        only_attend_immediate_media=True,
        cross_attention_num_heads=cross_attention_num_heads,
        cross_attention_head_dim=cross_attention_head_dim,
        cross_attention_ff_mult=cross_attention_ff_mult,
        vision_feature_select="patches",
        vision_feature_post_layernorm=vision_feature_post_layernorm,
    )

    # Embeddings: OpenFlamingo resized them to len(tokenizer) and trained them; a checkpoint saved with
    # `freeze_lm_embeddings` has none, and the new rows are then as untrained as OpenFlamingo's were.
    embedding_key = _embedding_key(model)
    embeddings = state.get(embedding_key)
    rows = len(tokenizer) if embeddings is None else embeddings.shape[0]
    if rows != len(tokenizer):
        raise ValueError(
            f"The checkpoint's input embeddings ({embedding_key}) have {rows} rows, but the tokenizer of "
            f"{tokenizer_path or text_path} with OpenFlamingo's {END_OF_CHUNK_TOKEN!r} / {IMAGE_TOKEN!r} (and pad) "
            f"tokens has {len(tokenizer)}: its ids would not line up. Pass the tokenizer it was trained with "
            "(tokenizer_path)."
        )
    model.resize_token_embeddings(rows, mean_resizing=embeddings is None)
    model.config.image_token_id = image_token_id
    loaded = [f"perceiver ({len(perceiver_state)} tensors)"]
    if embeddings is not None:
        _load_strict(
            model.get_input_embeddings(),
            {"weight": embeddings},
            "input embeddings",
            "Pass the language model it was trained with (text_path).",
        )
        loaded.append(f"input embeddings {tuple(embeddings.shape)}")
    else:
        logger.warning(
            f"The checkpoint has no input embeddings ({embedding_key}): the rows of {END_OF_CHUNK_TOKEN!r} and "
            f"{IMAGE_TOKEN!r} are new, untrained ones."
        )
    output_key = _output_embedding_key(model, state, rows)
    if output_key is not None and not model.config.tie_word_embeddings:
        hint = "Pass the language model it was trained with."
        _load_strict(model.lm_head, {"weight": state[output_key]}, "lm_head", hint)
        loaded.append(f"lm_head ({output_key}) {tuple(state[output_key].shape)}")
    elif not model.config.tie_word_embeddings and rows > text_config.vocab_size:
        logger.warning(
            "The language model's head is not tied to its embeddings and the checkpoint has no lm_head: its rows "
            f"for the {rows - text_config.vocab_size} added tokens are new, as OpenFlamingo's were (it never trains "
            "them)."
        )
    _load_strict(model.model.bridge, perceiver_state, "Perceiver Resampler", _perceiver_hint(perceiver_state))
    _load_strict(
        model.model.gated_cross_attention,
        block_state,
        "gated cross-attention",
        "Pass cross_attention_num_heads / cross_attention_head_dim / cross_attention_ff_mult as trained, and the "
        "language model and vision tower it was trained with.",
    )
    loaded.append(f"{len(_block_indices(block_state))} gated blocks before layers {_block_indices(block_state)}")

    checked, unknown = _check_language_model_copies(model, state, {embedding_key, output_key}, text_path)
    vision_keys = sum(key.startswith("vision_encoder.") for key in state)
    others = [key for key in state if key.split(".", 1)[0] not in ("perceiver", "lang_encoder", "vision_encoder")]
    logger.info(
        f"Loaded from the OpenFlamingo checkpoint: {', '.join(loaded)}. Left: {checked} frozen language-model "
        f"tensors, equal to {text_path}'s; {vision_keys} vision-encoder tensors (the tower comes from {vision_path})."
    )
    if unknown or others:
        logger.warning(
            f"Ignored {len(unknown) + len(others)} checkpoint key(s) that name nothing in the converted model, e.g. "
            f"{(unknown + others)[:5]}."
        )

    model.generation_config.eos_token_id = end_of_chunk_id  # `Flamingo.generate` stops at <|endofchunk|>
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    processor = _build_processor(vision_path, tokenizer, image_token_id)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        if processor is not None:
            processor.save_pretrained(output_dir)
        logger.info(f"Converted OpenFlamingo checkpoint -> {output_dir}")
    return model, processor


__all__ = [
    "convert_openflamingo_checkpoint",
    "load_openflamingo_state_dict",
    "openflamingo_gated_cross_attention_state_dict",
]
