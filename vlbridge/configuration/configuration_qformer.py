"""Configuration of the BLIP-2 Q-Former bridge. Imports no torch."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class QFormerConfig(PreTrainedConfig):
    r"""
    Configuration of [`QFormerModel`], BLIP-2's querying transformer: a BERT encoder whose learned query tokens
    attend to image features through cross-attention every `cross_attention_frequency` layers.

    Args:
        vocab_size (`int`, *optional*, defaults to 30523):
            Vocabulary of the text branch (bert-base-uncased plus BLIP-2's `[DEC]` token).
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the queries, the text tokens and the output.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer layers.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads of the self- and cross-attention.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Width of the feed-forward blocks.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the feed-forward blocks.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on embeddings and residual branches.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Longest text the position embeddings cover. Queries take no position embedding.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation, the query tokens included.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            Epsilon of the layer norms.
        cross_attention_frequency (`int`, *optional*, defaults to 2):
            Layer `i` cross-attends to the image features when `i % cross_attention_frequency == 0`.
        encoder_hidden_size (`int`, *optional*, defaults to 1408):
            Width of the image features. [`BridgeVLMConfig`] sets it to the vision tower's hidden size.
        num_query_tokens (`int`, *optional*, defaults to 32):
            Number of learned queries, hence of output tokens per image; at least 1.
        use_text_input (`bool`, *optional*, defaults to `True`):
            Build the text branch (word / position embeddings and the text feed-forward blocks). Stage 1 and
            InstructBLIP need it; BLIP-2's stage 2 drops it. Inside a VLM it follows
            `BridgeVLMConfig.use_qformer_text_input`.

    Example:

    ```python
    >>> from vlbridge import QFormerConfig
    >>> config = QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    >>> config.num_output_tokens()
    32
    ```"""

    model_type = "vlbridge_qformer"
    base_config_key = "bridge_config"

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    use_text_input: bool = True

    def num_output_tokens(self, num_input_tokens: int | None = None) -> int:
        """Tokens produced per image: the number of queries, whatever the number of image features."""
        return self.num_query_tokens

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}.")
        self._check_num_query_tokens()

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Raised here as a plain ValueError at build; `validate_architecture` repeats it when the config is saved.
        self._check_num_query_tokens()

    def _check_num_query_tokens(self) -> None:
        if self.num_query_tokens < 1:
            raise ValueError(
                f"num_query_tokens must be >= 1 (each query gives one image token), got {self.num_query_tokens}."
            )


__all__ = ["QFormerConfig"]
