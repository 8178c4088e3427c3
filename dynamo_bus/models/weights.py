"""Model weights on disk: turning a llama GGUF into a Hugging Face ``model.safetensors``.

Owns :func:`ensure_weights`, which dequantizes every tensor of a :class:`ModelDir`'s GGUF
once (with gguf-py's numpy dequantizers), renames it to its Hugging Face Llama name, undoes
llama.cpp's rotary permutation of the Q and K projections, and writes ``model.safetensors``
into the model directory atomically. Later calls find the finished file and return at once.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dynamo_bus.errors import ModelUnavailable
from dynamo_bus.models.modeldir import ModelDir, is_built_dir

WEIGHTS_FILE = "model.safetensors"
# Bump when the bytes we write for the same GGUF change, so old files are rebuilt.
WEIGHTS_FORMAT = "1"
DTYPES = {"bfloat16": "BF16", "float32": "F32"}

_TOP = {"token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Precomputed rotary frequencies (llama 3 GGUFs); transformers derives them from the config.
_SKIP = {"rope_freqs.weight"}


def ensure_weights(model_dir: ModelDir, dtype: str = "bfloat16", *,
                   progress: bool = False) -> Path:
    """Return the path of ``model_dir``'s ``model.safetensors``, writing it from the GGUF
    (``model_dir.gguf_path``) first unless a complete file of ``dtype`` is already there.
    A directory without a GGUF keeps its own weights (for shards: their index's path).

    ``dtype`` is ``"bfloat16"`` (round-to-nearest-even, as torch's ``.to(torch.bfloat16)``)
    or ``"float32"`` (the dequantized values exactly). Safe to call concurrently: each writer
    renames its own temp file into place. Raises :class:`ModelUnavailable` when there is no
    GGUF to build from, or the GGUF is not a llama model matching ``config.json``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    target = model_dir.path / WEIGHTS_FILE
    gguf_path = model_dir.gguf_path
    if gguf_path is None:
        index = model_dir.path / f"{WEIGHTS_FILE}.index.json"
        if target.is_file() or index.is_file():
            # A plain HF directory: its weights (one file or shards) are what it shipped.
            return target if target.is_file() else index
        if is_built_dir(model_dir.path):
            fix = ("it was built from the default model's GGUF, which was not found: "
                   "`dynamo-bus model` fetches it again (about 93 MB, once)")
        else:
            fix = (f"put the checkpoint's {WEIGHTS_FILE} (or its shards and "
                   f"{WEIGHTS_FILE}.index.json), or exactly one *.gguf to build it from, "
                   f"in that directory")
        raise ModelUnavailable(f"{str(model_dir.path)!r} has no {WEIGHTS_FILE} and no GGUF to "
                               f"build one from; {fix}.", param="model")
    source = _source_id(gguf_path)
    if _is_complete(target, dtype, source):
        return target
    started = time.monotonic()
    if progress:
        print(f"dynamo-bus: dequantizing {gguf_path.name} into {target} ({dtype}, once) ...",
              file=sys.stderr, flush=True)
    # Heavy import (gguf parses the whole file, ~2 s) only on a cold build.
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    config = json.loads((model_dir.path / "config.json").read_text(encoding="utf-8"))
    plan = _plan(reader, config)
    metadata = {"format": "pt",  # transformers refuses safetensors files without it
                "dynamo_bus_weights": WEIGHTS_FORMAT, "dtype": dtype, "source": source,
                "tensors": str(len(plan))}
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "wb") as out:
            _write(out, plan, metadata, DTYPES[dtype],
                   lambda tensor: _hf_array(gguf, tensor, config, dtype))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if progress:
        print(f"dynamo-bus: wrote {len(plan)} tensors in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
    return target


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (tensor entries plus ``__metadata__``) and the
    offset where its tensor data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(size))
    return header, 8 + size


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a llama GGUF tensor; None for one to skip."""
    if gguf_name in _SKIP:
        return None
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK:
        raise ModelUnavailable(f"Unknown llama GGUF tensor {gguf_name!r}.", param="model")
    return f"model.layers.{match[1]}.{_BLOCK[match[2]]}.weight"


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of a Q or K projection (rows grouped per head as
    interleaved rotary pairs), as transformers' GGUF loader does."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the kept LSB rounds half to even; the carry may bump the exponent,
    # which is right (it rounds up to the next power of two, or to inf).
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaNs NaN (quiet) instead of letting the carry turn them into inf
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    block = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
             "self_attn.q_proj": (heads * head_dim, hidden),
             "self_attn.k_proj": (kv * head_dim, hidden),
             "self_attn.v_proj": (kv * head_dim, hidden),
             "self_attn.o_proj": (hidden, heads * head_dim),
             "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
             "mlp.down_proj": (hidden, inter)}
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden),
              "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for layer in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{k}.weight": v for k, v in block.items()})
    return shapes


def _plan(reader: Any, config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], Any]]:
    """(HF name, HF shape, GGUF tensor) for every tensor, checked against config.json."""
    expected = _expected_shapes(config)
    plan = []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        # GGUF lists dims fastest-first (ne0 = in_features); numpy/HF order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if expected.pop(name, None) != shape:
            raise ModelUnavailable(f"GGUF tensor {tensor.name} ({name}, shape {shape}) does not "
                                   f"fit config.json.", param="model")
        plan.append((name, shape, tensor))
    if expected:
        raise ModelUnavailable(f"GGUF lacks {len(expected)} tensors config.json needs, e.g. "
                               f"{next(iter(expected))}.", param="model")
    return plan


def _hf_array(gguf: Any, tensor: Any, config: dict[str, Any], dtype: str) -> np.ndarray:
    """One tensor dequantized, un-permuted and converted: contiguous, ready to write."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape(tuple(reversed(tensor.shape.tolist())))
    if tensor.name.endswith(".attn_q.weight"):
        values = reverse_permute(values, config["num_attention_heads"])
    elif tensor.name.endswith(".attn_k.weight"):
        values = reverse_permute(values, config.get("num_key_value_heads",
                                                    config["num_attention_heads"]))
    if dtype == "bfloat16":
        return to_bf16_bits(values)
    return np.ascontiguousarray(values, dtype="<f4")


def _write(out: BinaryIO, plan: list[tuple[str, tuple[int, ...], Any]],
           metadata: dict[str, str], st_dtype: str,
           convert: Callable[[Any], np.ndarray]) -> None:
    """Stream a safetensors file: u64 LE header length, JSON header, then raw tensor bytes
    in header order, so only one dequantized tensor is in memory at a time."""
    itemsize = 2 if st_dtype == "BF16" else 4
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in plan:
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
    out.write(len(raw).to_bytes(8, "little") + raw)
    for name, _, tensor in plan:
        data = convert(tensor)
        start, end = header[name]["data_offsets"]
        if data.nbytes != end - start:
            raise AssertionError(f"{name}: wrote {data.nbytes} bytes, header says {end - start}")
        out.write(data.data)  # contiguous, so no copy


def _source_id(gguf_path: Path) -> str:
    """Identifies the GGUF a weights file came from, so a replaced GGUF triggers a rebuild."""
    st = gguf_path.stat()
    return f"{gguf_path.name}:{st.st_size}:{st.st_mtime_ns}"


def _is_complete(target: Path, dtype: str, source: str) -> bool:
    """True when ``target`` is a whole weights file that we wrote from ``source`` as
    ``dtype``: its metadata matches and its size equals header plus the last tensor's end."""
    try:
        header, data_start = read_header(target)
        meta = header.get("__metadata__", {})
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        size_ok = target.stat().st_size == data_start + end
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return (size_ok and meta.get("dynamo_bus_weights") == WEIGHTS_FORMAT
            and meta.get("dtype") == dtype and meta.get("source") == source
            and meta.get("tensors") == str(len(header) - 1))
