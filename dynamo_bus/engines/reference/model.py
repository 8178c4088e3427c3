"""A compact PyTorch Llama-family causal LM (Llama, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Owns :class:`ModelConfig` (the facts read from an HF ``config.json``), :class:`CausalLM` (the
network, loaded from ``model.safetensors`` by :meth:`CausalLM.from_dir`), :class:`KVCache` (one
``[num_blocks, block_size, num_kv_heads, head_dim]`` K and V tensor per layer) and
:class:`ForwardBatch` (a flat varlen batch: prefill chunks and decode tokens of several
sequences mixed). The same code runs in float32 or bfloat16 on CPU or CUDA. The arithmetic
mirrors transformers' Llama step for step, so float32 greedy output equals it token for token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the network needs, from an HF ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise NotImplementedError(f"model_type {model_type!r} is not supported by the "
                                      f"reference engine; supported: {', '.join(SUPPORTED_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r}: only silu is supported")
        if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window")):
            raise NotImplementedError("sliding-window attention is not supported")
        heads = cfg["num_attention_heads"]
        # transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise NotImplementedError(f"rope scaling type {kind!r} is not supported by the "
                                      f"reference engine; supported: {', '.join(ROPE_TYPES)}")
        if kind == "default":
            rope = {}
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope or None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases without saying so; Llama's attention_bias covers o too.
            qkv_bias=bias or model_type == "qwen2", o_bias=bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)))


def rope_inv_freq(cfg: ModelConfig, device: torch.device) -> Tensor:
    """Rotary inverse frequencies, float32, with the config's scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device)
                                    .float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    # Llama 3.1: stretch low frequencies by `factor`, keep high ones, blend in between.
    factor, low, high = (scaling["factor"], scaling["low_freq_factor"],
                         scaling["high_freq_factor"])
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in float32 and cast back before the weight, as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class ForwardBatch:
    """One forward's flat varlen batch: sequence ``i`` owns tokens
    ``query_starts[i]:query_starts[i] + query_lens[i]``, whose K/V go to ``slot_mapping``
    (``block_id * block_size + offset``) and which attend to the first ``context_lens[i]``
    cached positions (the new ones included) through ``block_tables[i]``."""

    input_ids: Tensor      # [T] int64
    positions: Tensor      # [T] int64
    slot_mapping: Tensor   # [T] int64
    block_tables: Tensor   # [B, max_blocks] int64, padded with 0
    query_lens: list[int]
    context_lens: list[int]
    logits_indices: Tensor  # [N] int64 rows of the flat batch to compute logits for

    @property
    def query_starts(self) -> list[int]:
        return [0, *accumulate(self.query_lens[:-1])]

    @classmethod
    def build(cls, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], block_size: int,
              device: torch.device | str = "cpu") -> ForwardBatch:
        """From ``(new_token_ids, num_cached, block_table)`` per sequence: the new tokens
        take positions ``num_cached, num_cached + 1, ...``; logits for each last token."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for new, start, table in seqs:
            end = start + len(new)
            if not new or len(table) * block_size < end:
                raise ValueError(f"sequence needs 1+ new tokens and {math.ceil(end / block_size)}"
                                 f" blocks; got {len(new)} tokens and {len(table)} blocks")
            ids.extend(new)
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(start, end))
        width = max(len(table) for _, _, table in seqs)
        tables = [list(table) + [0] * (width - len(table)) for _, _, table in seqs]
        lens = [len(new) for new, _, _ in seqs]
        last = [sum(lens[:i + 1]) - 1 for i in range(len(lens))]

        def t(values: Any) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(t(ids), t(positions), t(slots), t(tables), lens,
                   [start + n for (_, start, _), n in zip(seqs, lens, strict=True)], t(last))


@dataclass
class KVCache:
    """The paged KV cache: per layer, K and V of ``[num_blocks, block_size, kv_heads, dim]``."""

    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, q, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=cfg.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                batch: ForwardBatch) -> Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, self.dim)
        k = self.k_proj(x).view(n, self.kv_heads, self.dim)
        v = self.v_proj(x).view(n, self.kv_heads, self.dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Write first, then read back: a sequence's new tokens attend to themselves too.
        block_size = k_cache.shape[1]
        k_cache.view(-1, self.kv_heads, self.dim)[batch.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, self.kv_heads, self.dim)[batch.slot_mapping] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        # Correctness first: one SDPA call per sequence over its gathered, contiguous past.
        for i, (start, qlen, ctx) in enumerate(zip(batch.query_starts, batch.query_lens,
                                                   batch.context_lens, strict=True)):
            blocks = batch.block_tables[i, :-(-ctx // block_size)]
            ks = k_cache.index_select(0, blocks).flatten(0, 1)[:ctx].transpose(0, 1)
            vs = v_cache.index_select(0, blocks).flatten(0, 1)[:ctx].transpose(0, 1)
            qs = q[start:start + qlen].transpose(0, 1)
            if qlen == 1 or qlen == ctx:
                # No mask (decode) or a plain causal one (whole prompt): the same kernels
                # transformers picks, so float32 results match it bit for bit.
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=qlen > 1,
                                                   enable_gqa=True)
            else:
                # A chunk after a cached prefix: query j sits at position ctx - qlen + j.
                rows = torch.arange(ctx - qlen, ctx, device=x.device)[:, None]
                mask = torch.arange(ctx, device=x.device)[None, :] <= rows
                rep = self.heads // self.kv_heads
                o = F.scaled_dot_product_attention(qs, ks.repeat_interleave(rep, 0),
                                                   vs.repeat_interleave(rep, 0), attn_mask=mask)
            out[start:start + qlen] = o.transpose(0, 1)
        return self.o_proj(out.reshape(n, self.heads * self.dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                batch: ForwardBatch) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named like transformers' ``model.*`` so safetensors keys load without renaming."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_dir(cls, path: Path | str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> CausalLM:
        """Load ``config.json`` and ``model.safetensors`` from an HF-format directory."""
        path = Path(path)
        cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text("utf-8")))
        # Build on the meta device so no memory is spent on weights about to be replaced.
        with torch.device("meta"):
            model = cls(cfg)
        state = {name: tensor.to(dtype) for name, tensor in
                 load_file(path / "model.safetensors", device=str(device)).items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            missing.remove("lm_head.weight")
            model.lm_head.weight = model.model.embed_tokens.weight
        unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise ValueError(f"{path / 'model.safetensors'} does not fit the config: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> Tensor:
        """Run the batch, writing its K/V into ``kv``; logits (float32) ``[N, vocab]`` for the
        rows ``batch.logits_indices``."""
        x = self.model.embed_tokens(batch.input_ids)
        # Rotary angles in float32 (as transformers), cast to the activations' dtype.
        angles = batch.positions.float()[:, None] * rope_inv_freq(self.config, x.device)
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, k_cache, v_cache in zip(self.model.layers, kv.k, kv.v, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, batch)
        x = self.model.norm(x[batch.logits_indices])
        return self.lm_head(x).float()
