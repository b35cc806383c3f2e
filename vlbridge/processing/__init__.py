"""Processing: [`BridgeProcessor`] (images + text -> model inputs) and its default chat template."""

from .processing_bridge import BridgeProcessor, default_chat_template


__all__ = ["BridgeProcessor", "default_chat_template"]
