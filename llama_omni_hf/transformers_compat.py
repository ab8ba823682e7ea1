"""Every difference between the transformers releases the remote code supports, in one place.

The remote code runs inside whatever transformers a Hub user has installed, so it must not assume one release's
names. Each shim names the release that made it necessary; delete it when the minimum passes that release.
"""

from __future__ import annotations

import inspect
import re
import warnings

from transformers import __version__ as TRANSFORMERS_VERSION

# The oldest release the suite runs on in CI (vLLM-Omni 0.30 pins transformers >=5.13,<5.15).
MIN_TRANSFORMERS_VERSION = "5.13.0"


def _release(version: str) -> tuple[int, int, int]:
    numbers = [int(n) for n in re.findall(r"\d+", version)[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


def check_transformers_version(version: str = TRANSFORMERS_VERSION) -> None:
    """One clear error instead of an AttributeError deep inside an older transformers."""
    if _release(version) < _release(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"LLaMA-Omni's remote code needs transformers >= {MIN_TRANSFORMERS_VERSION} (tested up to the newest "
            f"release), but transformers {version} is installed: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )


check_transformers_version()  # before any import that an older release may lack

from transformers import LlamaModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

# transformers 5.24 renamed `past_key_values` to `cache`: the argument of every decoder / layer / attention
# `forward` (the old name warns, and goes in 5.40) and the field of every ModelOutput. Read the names from the
# installed release instead of writing either.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache) -> dict:
    """`{name: cache}` for calling transformers' modules under this release's argument name."""
    return {CACHE_ARG: cache}


def resolve_cache(cache, past_key_values):
    """The cache a caller passed to our `forward` under either name. generate passes it under the installed
    release's name; the other name warns as transformers' own models do from 5.24 on (the old name goes in 5.40)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`")
    if past_key_values is not None and CACHE_ARG == "cache":
        warnings.warn("`past_key_values` is deprecated for LlamaOmniForConditionalGeneration.forward: use `cache` "
                      "(transformers >= 5.24)", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def output_cache(outputs):
    """The cache field of a transformers ModelOutput, under either name."""
    return outputs.get(CACHE_FIELD)


__all__ = ["MIN_TRANSFORMERS_VERSION", "CACHE_ARG", "CACHE_FIELD", "cache_kwargs", "resolve_cache", "output_cache",
           "check_transformers_version"]
