"""LoRA on the language model of a bridged VLM, for `peft.get_peft_model` and TRL's `SFTTrainer` / `DPOTrainer`.

PEFT knows no default target modules for a new `model_type`, and `target_modules="all-linear"` or a list of suffixes
such as `["q_proj", "v_proj"]` also hits the vision tower and the Q-Former, which have layers of the same names (the
LoRA-on-the-vision-tower bug users keep meeting). [`language_model_lora_config`] writes one regular expression
anchored on the language model's module path instead, so adapters can only land there, and checks it against the
model before anything trains.

The bridge and the language projection are new weights that post-training usually keeps learning: with
`train_bridge=True` they train fully as PEFT `modules_to_save` (a trainable copy saved inside the adapter checkpoint),
so one adapter folder holds everything the run changed. While adapters are disabled (TRL's DPO reference model) the
original, untouched bridge runs, so the reference is exactly the model the run started from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn


if TYPE_CHECKING:
    from peft import LoraConfig


# Module paths inside `BridgeVLMForConditionalGeneration`: checkpoint keys and LoRA anchors, fixed once chosen.
LANGUAGE_MODEL_PATH = "model.language_model"
BRIDGE_MODULE_PATHS = ("model.bridge", "model.language_projection")


def _require_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs `peft` (a requirement of vlbridge): `pip install peft`.") from error
    return peft


def _check_vlbridge_model(model: nn.Module) -> None:
    from ..modeling import BridgeVLMForConditionalGeneration

    if isinstance(model, BridgeVLMForConditionalGeneration):
        return
    peft = _require_peft()
    if isinstance(model, peft.PeftModel):
        raise TypeError(
            "The model already carries adapters (it is a PeftModel): build the LoraConfig from the base model, "
            "`language_model_lora_config(peft_model.get_base_model())`, or merge the adapters first "
            "(`peft_model.merge_and_unload()`)."
        )
    raise TypeError(
        f"language_model_lora_config expects a vlbridge BridgeVLMForConditionalGeneration, got "
        f"{type(model).__name__}. For another model, write a LoraConfig whose target_modules names its own layers."
    )


def _bridge_modules(model: nn.Module) -> list[str]:
    """The [`BRIDGE_MODULE_PATHS`] `model` has: one built with `use_language_projection=False` has no projection, so
    PEFT is not asked to save a copy of a module that is not there."""
    present = []
    for path in BRIDGE_MODULE_PATHS:
        try:
            model.get_submodule(path)
        except AttributeError:  # absent, or None (`get_submodule` refuses a non-module)
            continue
        present.append(path)
    # Flamingo's gated blocks, one by one: the hooks on the decoder layers look each block up by key, so PEFT's
    # wrapper (which runs the trained copy) must replace the blocks themselves, not the dictionary holding them.
    blocks = getattr(getattr(model, "model", None), "gated_cross_attention", None)
    if blocks is not None:
        present += [f"model.gated_cross_attention.{index}" for index in blocks.keys()]
    return present


def language_model_linear_names(model: nn.Module) -> list[str]:
    """
    The distinct last names of the `nn.Linear` layers of the model's language model, in order of appearance: what
    `target_projections` of [`language_model_lora_config`] can choose from.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]): The VLM.

    Example:

    ```python
    >>> from vlbridge.trainers.lora import language_model_linear_names
    >>> language_model_linear_names(model)  # doctest: +SKIP
    ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
    ```
    """
    _check_vlbridge_model(model)
    language_model = model.get_submodule(LANGUAGE_MODEL_PATH)
    names = [
        name.rsplit(".", 1)[-1] for name, module in language_model.named_modules() if isinstance(module, nn.Linear)
    ]
    return list(dict.fromkeys(names))


def language_model_target_regex(projections: Sequence[str]) -> str:
    """
    The `target_modules` regular expression for `projections` of the language model: PEFT matches it in full
    (`re.fullmatch`) against module paths such as `model.language_model.layers.0.self_attn.q_proj`.

    Args:
        projections (`Sequence[str]`): Last names of the layers, e.g. `("q_proj", "v_proj")`.

    Example:

    ```python
    >>> import re
    >>> from vlbridge.trainers.lora import language_model_target_regex
    >>> regex = language_model_target_regex(["q_proj", "v_proj"])
    >>> regex
    'model\\\\.language_model\\\\.(?:.*\\\\.)?(?:q_proj|v_proj)'
    >>> bool(re.fullmatch(regex, "model.language_model.layers.0.self_attn.q_proj"))
    True
    >>> bool(re.fullmatch(regex, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"))
    False
    ```
    """
    alternatives = "|".join(re.escape(name) for name in projections)
    return rf"{re.escape(LANGUAGE_MODEL_PATH)}\.(?:.*\.)?(?:{alternatives})"


def language_model_lora_config(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_projections: Sequence[str] | None = None,
    train_bridge: bool = True,
    **lora_kwargs,
) -> LoraConfig:
    r"""
    A `peft.LoraConfig` that puts LoRA adapters on the language model of a vlbridge VLM only, and trains the bridge and
    the language projection fully (or keeps them frozen).

    - `target_modules` is one regular expression anchored on `model.language_model.` (see
      [`language_model_target_regex`]), so the vision tower, the bridge and `lm_head` never get adapters, whatever
      their layers are called. It is checked against `model`: a `ValueError` lists the language model's layers when
      nothing matches or a name is unknown.
    - `train_bridge=True` sets `modules_to_save=["model.bridge", "model.language_projection"]` (only
      `["model.bridge"]` without a language projection, `use_language_projection=False`): PEFT trains a copy of
      each and saves it in the adapter checkpoint (`adapter_model.safetensors`), and `merge_and_unload()` puts the
      trained copies in the merged model. With adapters disabled, as TRL's DPO reference, the original bridge runs.
      `train_bridge=False` freezes both (only the LoRA matrices train).
    - Everything else stays frozen, the vision tower included, whatever `model.freeze(...)` said before.

    Use it with PEFT directly, `peft_model = peft.get_peft_model(model, config)`, or hand it to TRL, which wraps the
    model itself: `SFTTrainer(model=model, peft_config=config, ...)` / `DPOTrainer(model=model, peft_config=config,
    ...)`. With DPO and no `ref_model`, TRL computes the reference log-probabilities with the adapters disabled, i.e.
    with the model as it was before training. The adapter folder loads back with
    `peft.PeftModel.from_pretrained(base_model, folder)`.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]):
            The VLM the adapters go on (not yet wrapped by PEFT).
        r (`int`, *optional*, defaults to 8):
            LoRA rank.
        alpha (`int`, *optional*, defaults to 16):
            LoRA scaling numerator (`lora_alpha`); the update is scaled by `alpha / r`.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the LoRA input (`lora_dropout`).
        target_projections (`Sequence[str]`, *optional*):
            Last names of the language-model layers to adapt, e.g. `("q_proj", "k_proj", "v_proj", "o_proj")`;
            defaults to every linear layer of the language model ([`language_model_linear_names`]: attention and MLP
            projections, e.g. Llama's `q_proj ... down_proj`, OPT's `q_proj ... fc2`, T5's `q ... wo`).
        train_bridge (`bool`, *optional*, defaults to `True`):
            Train the bridge and the language projection fully (as `modules_to_save`); `False` freezes them.
        lora_kwargs:
            Further `LoraConfig` fields (`use_rslora`, `init_lora_weights`, `layers_to_transform`, `bias`, ...).

    Returns:
        `peft.LoraConfig`: with `task_type="CAUSAL_LM"`.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
    >>> from vlbridge.trainers import language_model_lora_config
    >>> config = BridgeVLMConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     bridge_config={"model_type": "vlbridge_mlp", "hidden_size": 32, "drop_cls_token": True},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                  "num_attention_heads": 4, "vocab_size": 100},
    ...     image_token_id=99,
    ... )
    >>> model = BridgeVLMForConditionalGeneration(config)
    >>> lora_config = language_model_lora_config(model, r=4, target_projections=["q_proj", "v_proj"])
    >>> lora_config.modules_to_save
    ['model.bridge', 'model.language_projection']
    >>> peft_model = get_peft_model(model, lora_config)
    >>> sorted({name.split(".")[3] for name, p in peft_model.named_parameters() if p.requires_grad})
    ['bridge', 'language_model', 'language_projection']
    ```
    """
    peft = _require_peft()
    _check_vlbridge_model(model)
    if isinstance(target_projections, str):
        raise TypeError(f"`target_projections` must be a list of layer names, e.g. [{target_projections!r}].")
    available = language_model_linear_names(model)
    projections = list(dict.fromkeys(available if target_projections is None else target_projections))
    unknown = [name for name in projections if name not in available]
    if unknown or not projections:
        raise ValueError(
            f"`target_projections` {projections} must be a non-empty list of the language model's linear layers; "
            f"{unknown or 'none'} not found. This language model ({model.config.text_config.model_type}) has: "
            f"{available}."
        )
    target_modules = language_model_target_regex(projections)
    matched = [name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)]
    outside = [name for name in matched if not name.startswith(LANGUAGE_MODEL_PATH + ".")]
    not_linear = [name for name in matched if not isinstance(model.get_submodule(name), nn.Linear)]
    if not matched or outside or not_linear:
        raise ValueError(
            f"The target regex {target_modules!r} must match linear layers of {LANGUAGE_MODEL_PATH} only; it matched "
            f"{len(matched)} module(s), outside the language model: {outside}, not nn.Linear: {not_linear}."
        )
    return peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=_bridge_modules(model) if train_bridge else None,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )


@dataclass
class LoraArguments:
    """
    Command-line arguments (`HfArgumentParser`) of the LoRA example scripts, turned into a config by `lora_config`.

    Example:

    ```python
    >>> from vlbridge.trainers.lora import LoraArguments
    >>> LoraArguments(lora_target_projections="q_proj,v_proj").lora_config(model).r  # doctest: +SKIP
    16
    ```
    """

    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_projections: str | None = field(
        default=None, metadata={"help": "Comma-separated LM layers to adapt (e.g. q_proj,v_proj); unset: all linear."}
    )
    train_bridge: bool = field(default=True, metadata={"help": "Train the bridge and projection fully (or freeze)."})

    def lora_config(self, model: nn.Module) -> LoraConfig:
        """[`language_model_lora_config`] for `model` with these arguments."""
        projections = self.lora_target_projections
        return language_model_lora_config(
            model,
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_projections=projections.split(",") if projections else None,
            train_bridge=self.train_bridge,
        )


__all__ = [
    "BRIDGE_MODULE_PATHS",
    "LANGUAGE_MODEL_PATH",
    "LoraArguments",
    "language_model_linear_names",
    "language_model_lora_config",
    "language_model_target_regex",
]
