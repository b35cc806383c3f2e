"""What attention implementations the composite VLM can honestly declare.

The composite has no attention of its own: its vision tower, bridge and language model each run through transformers'
attention interface (`ALL_ATTENTION_FUNCTIONS`) with their own `config._attn_implementation`. eager, SDPA and flex
attention work everywhere. Flash attention does not work in the bridges that attend: the Q-Former's masks (padded
image features, the UniLM query / text structure) are not the padding-only masks flash attention takes, and both the
Q-Former and the Perceiver stay in fp32 (`_keep_in_fp32_modules_strict`), which flash kernels refuse. So the composite
declares flash attention only when its bridge does (the MLP projector, which has no attention), and a request for
flash attention everywhere is answered with the per-part form that gives it to the language model and the tower:

    BridgeVLMForConditionalGeneration.from_pretrained(
        path, attn_implementation={"text_config": "flash_attention_2", "vision_config": "flash_attention_2",
                                   "bridge_config": "sdpa"})
"""

from __future__ import annotations

from transformers.models.auto.modeling_auto import MODEL_MAPPING


FLASH_PREFIX = "flash_attention"


def bridge_supports_flash_attention(config) -> bool:
    """Whether the bridge class registered for `config.bridge_config` declares flash attention (unknown: no)."""
    bridge_config = getattr(config, "bridge_config", None)
    if bridge_config is None:
        return False
    try:
        bridge_class = MODEL_MAPPING[type(bridge_config)]
    except KeyError:
        return False
    return bool(getattr(bridge_class, "_supports_flash_attn", False))


class AttentionSupportMixin:
    """Mixed into `BridgeVLMPreTrainedModel`: `_supports_flash_attn` follows the bridge (see the module docstring), and
    a flash request the bridge cannot run gets an error naming the per-part form instead of transformers' generic
    "does not support Flash Attention yet"."""

    @property
    def _supports_flash_attn(self) -> bool:
        return bridge_supports_flash_attention(self.config)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if (
            isinstance(requested_attention, str)
            and requested_attention.startswith(FLASH_PREFIX)
            and not self._supports_flash_attn
        ):
            bridge_type = getattr(getattr(self.config, "bridge_config", None), "model_type", None)
            raise ValueError(
                f"{requested_attention} cannot run in this model's {bridge_type} bridge: its attention masks are not "
                "padding-only and it stays in fp32, and flash attention takes neither. Give flash attention to the "
                "language model and the vision tower and SDPA to the rest: attn_implementation="
                f'{{"text_config": "{requested_attention}", "vision_config": "{requested_attention}", '
                '"bridge_config": "sdpa"}.'
            )
        return super().get_correct_attn_implementation(requested_attention, is_init_check)
