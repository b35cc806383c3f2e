"""What differs between the transformers releases of the supported window (see setup.cfg), in one place.

transformers 5.24 renamed the KV cache of every model output and `forward` from `past_key_values` to `cache`: output
dataclasses that declare only `past_key_values` can no longer be built there (its `ModelOutput.__init__` renames the
keyword before the dataclass sees it), and `generate` hands the cache to `forward` as `cache=`. Earlier releases know
only `past_key_values`. Everything in vlbridge that names the cache goes through `CACHE_KEY`.
"""

from dataclasses import fields

from transformers.modeling_outputs import BaseModelOutputWithPast


# "cache" on transformers >= 5.24, "past_key_values" before; read from a real output class, not from a version number.
CACHE_KEY = "cache" if "cache" in {field.name for field in fields(BaseModelOutputWithPast)} else "past_key_values"

__all__ = ["CACHE_KEY"]
