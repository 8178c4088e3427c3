"""Models: ``modeldir`` (resolving ``--model`` to a Hugging Face-format directory; the
default SmolLM2 fetched once into the user's cache), ``gguf`` (building that directory
from a GGUF's metadata), ``tokenizer`` (encode, decode, chat templates, incremental
detokenizing) and ``weights`` (dequantizing a GGUF into ``model.safetensors``).

The names below are the package's public surface. The tokenizer and weights are imported
on first use: resolving a model directory loads neither tokenizers nor numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dynamo_bus.models.modeldir import (
    DEFAULT_MODEL,
    ModelDir,
    default_cache_dir,
    load_model_dir,
    resolve_model,
    tokenizer_digest,
)

if TYPE_CHECKING:
    from dynamo_bus.models.tokenizer import IncrementalDetokenizer, Tokenizer
    from dynamo_bus.models.weights import ensure_weights

_LAZY = {"IncrementalDetokenizer": "tokenizer", "Tokenizer": "tokenizer",
         "ensure_weights": "weights"}
__all__ = ["DEFAULT_MODEL", "IncrementalDetokenizer", "ModelDir", "Tokenizer",
           "default_cache_dir", "ensure_weights", "load_model_dir", "resolve_model",
           "tokenizer_digest"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
