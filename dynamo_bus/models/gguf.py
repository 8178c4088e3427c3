"""A Hugging Face-format model directory from a llama GGUF's metadata.

Owns :func:`write_hf_files`: ``config.json``, ``generation_config.json``, a byte-level BPE
``tokenizer.json`` (:func:`build_byte_level_bpe`), ``tokenizer_config.json`` (with the chat
template) and ``special_tokens_map.json``. The weights are not written here
(:mod:`dynamo_bus.models.weights` dequantizes them when an engine first needs them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from dynamo_bus.errors import ModelUnavailable

_CONTROL = 3  # llama.cpp's token type of a special (control) token


class _Metadata:
    """A GGUF's key/value metadata, tokenizer arrays apart."""

    def __init__(self, gguf_path: Path) -> None:
        # Heavy import (gguf parses the whole file, ~2 s): only on a cold build.
        import gguf

        reader = gguf.GGUFReader(gguf_path)
        self.path = gguf_path
        self.meta = {key: field.contents() for key, field in reader.fields.items()
                     if not key.startswith("tokenizer.ggml.")}
        self._fields = reader.fields
        self.tokens: list[str] = reader.fields["tokenizer.ggml.tokens"].contents()
        # llama.cpp drops output.weight when the LM head shares the embedding matrix.
        self.tied = not any(t.name == "output.weight" for t in reader.tensors)

    def tok(self, key: str) -> Any:
        field = self._fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else field.contents()

    def f32(self, key: str) -> float:
        import numpy as np

        # GGUF stores float32; print the shortest decimal that is the same float32 (1e-05).
        return float(str(np.float32(self.meta[key])))


def write_hf_files(gguf_path: Path, out: Path) -> None:
    """Write config, generation config and tokenizer files from a llama GGUF's metadata
    into the directory ``out``."""
    md = _Metadata(gguf_path)
    arch = md.meta["general.architecture"]
    if arch != "llama" or md.tok("model") != "gpt2":
        raise ModelUnavailable(f"{str(gguf_path)!r} is a {arch}/{md.tok('model')} GGUF; only "
                               f"llama with a byte-level BPE tokenizer is supported.",
                               param="model")
    config = _config(md)
    special = [i for i, t in enumerate(md.tok("token_type")) if t == _CONTROL]
    tokenizer = build_byte_level_bpe(md.tokens, md.tok("merges"), special, pre=md.tok("pre"))
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos, pad = config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]
    names = {key: md.tokens[i] for key, i in
             (("bos_token", bos), ("eos_token", eos), ("pad_token", pad),
              ("unk_token", md.tok("unknown_token_id")))
             if i is not None}
    extra = [md.tokens[i] for i in (bos, eos) if i is not None]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
        "add_bos_token": bool(md.tok("add_bos_token")), "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"], **names,
        "additional_special_tokens": extra,
        "chat_template": md.meta.get("tokenizer.chat_template"),
        "added_tokens_decoder": {str(i): {"content": md.tokens[i], "lstrip": False,
                                          "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i in special},
    }
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    for file, data in (("config.json", config), ("generation_config.json", generation),
                       ("tokenizer_config.json", tokenizer_config),
                       ("special_tokens_map.json", {**names, "additional_special_tokens": extra})):
        (out / file).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")


def _config(md: _Metadata) -> dict[str, Any]:
    """transformers' LlamaConfig as ``config.json`` holds it."""
    meta = md.meta
    heads = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.rope.dimension_count", hidden // heads),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rms_norm_eps": md.f32("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": md.f32("llama.rope.freq_base"), "rope_scaling": None,
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(md.tokens)),
        "tie_word_embeddings": md.tied,
        "bos_token_id": md.tok("bos_token_id"), "eos_token_id": md.tok("eos_token_id"),
        "pad_token_id": md.tok("padding_token_id"),
        "torch_dtype": "bfloat16", "use_cache": True,
    }


def build_byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], special_ids: Sequence[int],
                         *, pre: str | None) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer from a GGUF vocabulary, shaped like the ``tokenizer.json``
    the model was trained with (``pre`` is llama.cpp's ``tokenizer.ggml.pre``)."""
    if pre != "smollm":
        # Each pre-tokenizer name stands for a split regex; only the one we ship is mapped.
        raise ModelUnavailable(f"Unsupported GGUF pre-tokenizer {pre!r} (supported: 'smollm').")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[_pair(m) for m in merges])
    tok = tokenizers.Tokenizer(bpe)
    # SmolLM2 (like StarCoder) splits every digit before the GPT-2 regex: llama.cpp's
    # "smollm" is regexes [\p{N}, gpt2], which is this pair.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in special_ids])
    return tok


def _pair(merge: str) -> tuple[str, str]:
    left, right = merge.split(" ", 1)  # byte-level symbols never hold a space (it is Ġ)
    return left, right
