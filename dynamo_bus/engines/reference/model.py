"""A compact PyTorch Llama-family causal LM (Llama, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Owns :class:`ModelConfig` (the facts read from an HF ``config.json``), the rotary
frequencies, and :class:`CausalLM` (the network, loaded from ``model.safetensors`` by
:meth:`CausalLM.from_dir`). Its inputs, :class:`~dynamo_bus.engines.reference.batch.ForwardBatch`
and :class:`~dynamo_bus.engines.reference.batch.KVCache`, live in
:mod:`dynamo_bus.engines.reference.batch`; the CPU's packed linears in
:mod:`dynamo_bus.engines.reference.packed`. The same code runs in float32 or bfloat16 on CPU
or CUDA. The arithmetic mirrors transformers' Llama step for step, so float32 greedy output
equals it token for token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from dynamo_bus.engines.reference.batch import ForwardBatch, KVCache
from dynamo_bus.engines.reference.packed import PackedLinear

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in float32 and cast back before the weight, as transformers does
        # (F.rms_norm is its pow-mean-rsqrt-mul in one call, bit for bit the same on CPU).
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q, kv
        # q, k and v in one matmul (the checkpoint's three weights are concatenated on load).
        self.qkv_proj = nn.Linear(h, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=cfg.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Tensor,
                slots: tuple[Tensor, Tensor], batch: ForwardBatch) -> Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x).unflatten(1, (self.heads + 2 * self.kv_heads, self.dim))
        # RoPE on q and k together ([n, heads + kv_heads, dim]), in place; sin carries the
        # sign of rotate_half, so rotating is one roll: x * cos + roll(x) * sin.
        qk = qkv[:, :self.heads + self.kv_heads]
        rolled = qk.roll(self.dim // 2, -1).mul_(sin)
        qk.mul_(cos).add_(rolled)
        q = qkv[:, :self.heads]
        # Write first, then read back: a sequence's new tokens attend to themselves too.
        # qkv[:, heads:] is each token's K heads then V heads: the cache's slot layout;
        # ``slots`` is each token's (block, offset in the block).
        cache.index_put_(slots, qkv[:, self.heads:].unflatten(1, (2, self.kv_heads)))
        if batch.decode_blocks is not None:
            # Every decoding sequence in one call over its past, gathered block by block
            # and padded to the longest; without padding no mask, as transformers.
            rows = batch.decode_rows
            n_dec, width = batch.decode_blocks.shape[0], batch.decode_width
            past = cache.index_select(0, batch.decode_blocks.view(-1)).view(
                n_dec, -1, 2, self.kv_heads, self.dim)[:, :width]
            ks, vs = past[:, :, 0].transpose(1, 2), past[:, :, 1].transpose(1, 2)
            # The query heads that share a KV head act as that head's queries: [D, kv_heads,
            # heads / kv_heads, dim] (no K/V repeated per query head, no causal mask).
            qs = (q if rows is None else q[rows]).view(n_dec, self.kv_heads, -1, self.dim)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=batch.decode_mask)
            if rows is None:
                return self.o_proj(o.reshape(n, self.heads * self.dim))
            out = q.new_empty((n, self.heads, self.dim))
            out[rows] = o.view(n_dec, self.heads, self.dim)
        else:
            out = q.new_empty((n, self.heads, self.dim))
        for start, qlen, ctx, blocks in batch.prefills:
            past = cache.index_select(0, blocks).flatten(0, 1)[:ctx]
            ks, vs = past[:, 0].transpose(0, 1), past[:, 1].transpose(0, 1)
            qs = q[start:start + qlen].transpose(0, 1)
            # 4-D, K/V repeated to every query head: what PyTorch's fused CPU kernel takes.
            rep = self.heads // self.kv_heads
            qs = qs[None]
            ks, vs = ks.repeat_interleave(rep, 0)[None], vs.repeat_interleave(rep, 0)[None]
            if qlen == ctx:
                # A whole prompt: a plain causal mask.
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0]
            else:
                # A chunk after a cached prefix: query j sits at position ctx - qlen + j.
                rows = torch.arange(ctx - qlen, ctx, device=x.device)[:, None]
                mask = torch.arange(ctx, device=x.device)[None, :] <= rows
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)[0]
            out[start:start + qlen] = o.transpose(0, 1)
        return self.o_proj(out.reshape(n, self.heads * self.dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.inter = i
        self.gate_up_proj: nn.Linear | None = nn.Linear(h, 2 * i, bias=b)  # one matmul
        self.down_proj = nn.Linear(i, h, bias=b)
        # Packed (see CausalLM.pack_linears): gate and up apart, silu fused into gate's
        # matmul. Fusing the product and the residual adds as well was a little faster,
        # but its rounding turned the first token of the answer to "What is the capital
        # of France?" (a near tie: float32's two best are 0.08 apart) to the wrong one.
        self.gate: PackedLinear | None = None
        self.up: PackedLinear | None = None

    def pack(self, batch_hint: int, compute: torch.dtype) -> None:
        if self.gate_up_proj is None:
            return
        w, b, i = self.gate_up_proj.weight, self.gate_up_proj.bias, self.inter
        self.gate = PackedLinear(w[:i], None if b is None else b[:i], batch_hint, compute)
        self.up = PackedLinear(w[i:], None if b is None else b[i:], batch_hint, compute)
        self.gate_up_proj = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            assert self.gate is not None and self.up is not None
            h = self.gate.silu(x).mul_(self.up(x))
        else:
            gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
            h = F.silu(gate).mul_(up)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Tensor,
                slots: tuple[Tensor, Tensor], batch: ForwardBatch) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named like transformers' ``model.*`` so safetensors keys load without renaming."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _fuse_projections(state: dict[str, Tensor], num_layers: int) -> None:
    """Concatenate each layer's q/k/v and gate/up checkpoint weights (and biases) into the
    fused projections, in place; tensors that are absent stay absent (reported later)."""
    fused = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    for i in range(num_layers):
        for target, parts in fused.items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{part}.{kind}" for part in parts]
                if all(name in state for name in names):
                    state[f"model.layers.{i}.{target}.{kind}"] = torch.cat(
                        [state.pop(name) for name in names])


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self._inv_freq: Tensor | None = None
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_dir(cls, path: Path | str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> CausalLM:
        """Load ``config.json`` and ``model.safetensors`` (or the shards its
        ``model.safetensors.index.json`` lists) from an HF-format directory."""
        path = Path(path)
        cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text("utf-8")))
        # Build on the meta device so no memory is spent on weights about to be replaced.
        with torch.device("meta"):
            model = cls(cfg)
        index = path / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
                 if index.is_file() else ["model.safetensors"])
        state = {name: tensor.to(dtype) for file in files
                 for name, tensor in load_file(path / file, device=str(device)).items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        _fuse_projections(state, cfg.num_layers)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            missing.remove("lm_head.weight")
            model.lm_head.weight = model.model.embed_tokens.weight
        unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise ValueError(f"the weights in {path} do not fit its config: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()

    def pack_linears(self) -> int:
        """Swap every linear layer for a :class:`PackedLinear` where that is supported
        (on CPU, see :meth:`PackedLinear.plan`); returns how many were swapped. The
        original weights are dropped, except the embedding an LM head is tied to."""
        weight = self.model.embed_tokens.weight
        plan = PackedLinear.plan(weight.dtype, weight.device)
        if plan is None:
            return 0
        compute, batch_hint = plan
        swapped = 0
        for mlp in [m for m in self.modules() if isinstance(m, MLP)]:
            mlp.pack(batch_hint, compute)  # gate and up apart
            swapped += 2
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, PackedLinear(child.weight, child.bias, batch_hint,
                                                       compute))
                    swapped += 1
        return swapped

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> Tensor:
        """Run the batch, writing its K/V into ``kv``; logits ``[N, vocab]`` (in the model's
        dtype) for the rows ``batch.logits_indices``."""
        x = self.model.embed_tokens(batch.input_ids)
        # Rotary angles in float32 (as transformers), cast to the activations' dtype.
        if self._inv_freq is None or self._inv_freq.device != x.device:
            self._inv_freq = rope_inv_freq(self.config, x.device)
        angles = batch.positions.float()[:, None] * self._inv_freq
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        # rotate_half(x) * sin == roll(x, dim / 2) * signed_sin: first half negated.
        sin = torch.cat((-sin[..., :sin.shape[-1] // 2], sin[..., sin.shape[-1] // 2:]), -1)
        bs = kv.block_size
        slots = (batch.slot_mapping // bs, batch.slot_mapping % bs)
        for layer, cache in zip(self.model.layers, kv.layers, strict=True):
            x = layer(x, cos, sin, cache, slots, batch)
        x = self.model.norm(x[batch.logits_indices])
        return self.lm_head(x)
