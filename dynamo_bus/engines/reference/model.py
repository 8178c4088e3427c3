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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere
    oneDNN emulates bfloat16 matmuls, slower than float32 ones."""
    return (torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


class PackedLinear(nn.Module):
    """A linear layer whose weight oneDNN has reordered once into its blocked layout, so
    each call streams the weight without repacking it: on CPU the fast path for decode
    batches (measured 2x ``F.linear`` per float32 decode step at batch 8).

    ``compute`` is the dtype the weight is packed and multiplied in: the model's own, or
    float32 for a bfloat16 model on a CPU without native bfloat16 matmuls, where oneDNN's
    emulated bfloat16 is slower than widening. A product of two bfloat16 values is exact
    in float32 and both ways accumulate in float32 and round the result to bfloat16, so
    only the order of the sums differs from a native bfloat16 matmul. Widened, it keeps
    the bfloat16 weight as well, packed for single rows (batch-1 decode), which are bound
    by memory bandwidth and read half the bytes from it: three times the weights' bfloat16
    size in memory, for 1.7x at batch 8 and 1.1x at batch 1 per decode step (measured on
    a 2-core AVX-512 machine without AVX512-BF16)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, batch_hint: int,
                 compute: torch.dtype | None = None) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.dtype = weight.dtype
        self.compute = compute or weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(self.compute), batch_hint)
        self.bias = None if bias is None else bias.detach().to(self.compute)
        self.narrow = self.narrow_bias = None
        if self.compute != self.dtype:
            self.narrow = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            self.narrow_bias = None if bias is None else bias.detach()

    @staticmethod
    def plan(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, int] | None:
        """How a ``dtype`` model's linears are packed on ``device``: (compute dtype, batch
        hint for oneDNN's layout), or None where they stay plain (CUDA, no oneDNN)."""
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return None
        if dtype == torch.bfloat16 and cpu_has_native_bf16():
            return torch.bfloat16, 8
        if dtype in (torch.bfloat16, torch.float32):
            # Hints of 32 and more pick one float32 layout, faster than the smaller
            # hints' at decode batches 1 to 32.
            return torch.float32, 32
        return None

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, "none")

    def silu(self, x: Tensor) -> Tensor:
        """``silu(self(x))``, oneDNN applying silu to the matmul's float32 result before
        rounding: one call instead of two, one rounding."""
        return self._run(x, "swish")

    def _run(self, x: Tensor, post_op: str) -> Tensor:
        if self.narrow is not None and x.shape[0] == 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.narrow, self.narrow_bias,
                                                      post_op, [], "")
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.compute), self.packed, self.bias,
                                                 post_op, [], "")
        return out.to(self.dtype)


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


@dataclass
class ForwardBatch:
    """One forward's flat varlen batch: each sequence owns a run of consecutive rows,
    whose K/V go to ``slot_mapping`` (``block_id * block_size + offset``) and which attend
    to the sequence's cached positions (the new ones included) through its block table.

    Attention runs in two groups: every single-token (decode) sequence together in one
    batched call over K/V gathered block by block through ``decode_blocks`` (padded to
    the longest context; ``decode_mask`` hides the padding, ``None`` when all contexts
    are equally long), and each multi-token (prefill) sequence on its own."""

    input_ids: Tensor      # [T] int64
    positions: Tensor      # [T] int64
    slot_mapping: Tensor   # [T] int64
    logits_indices: Tensor  # [N] int64 rows of the flat batch to compute logits for
    decode_rows: Tensor | None   # [D] rows of the flat batch that decode; None: all, in order
    decode_blocks: Tensor | None  # [D, blocks] block table of each decoding row, 0-padded
    decode_width: int            # the longest decoding row's context
    decode_mask: Tensor | None   # [D, 1, 1, width] bool, True where attended
    prefills: list[tuple[int, int, int, Tensor]]  # (start, query_len, context_len, blocks)

    @classmethod
    def build(cls, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], block_size: int,
              device: torch.device | str = "cpu",
              want_logits: Sequence[bool] | None = None) -> ForwardBatch:
        """From ``(new_token_ids, num_cached, block_table)`` per sequence: the new tokens
        take positions ``num_cached, num_cached + 1, ...``; logits for each last token
        (only for the sequences ``want_logits`` marks, if given)."""
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
        lens = [len(new) for new, _, _ in seqs]
        ctxs = [start + n for (_, start, _), n in zip(seqs, lens, strict=True)]
        starts = [0, *accumulate(lens[:-1])]
        last = [s + n - 1 for s, n, w in zip(starts, lens, want_logits or [True] * len(lens),
                                             strict=True) if w]

        def t(values: Any) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        dec = [i for i, n in enumerate(lens) if n == 1]
        decode_rows = decode_blocks = decode_mask = None
        decode_width = 0
        if dec:
            decode_width = max(ctxs[i] for i in dec)
            n_blocks = -(-decode_width // block_size)
            tables = [list(seqs[i][2][:-(-ctxs[i] // block_size)]) for i in dec]
            decode_blocks = t([tb + [0] * (n_blocks - len(tb)) for tb in tables])
            # All rows in batch order (a pure decode step): no gather/scatter of rows.
            decode_rows = None if dec == list(range(len(lens))) else t([starts[i] for i in dec])
            if any(ctxs[i] != decode_width for i in dec):
                offsets = torch.arange(decode_width, device=device)
                dec_ctx = torch.tensor([ctxs[i] for i in dec], device=device)
                decode_mask = (offsets[None, :] < dec_ctx[:, None])[:, None, None, :]
        prefills = [(starts[i], lens[i], ctxs[i], t(list(seqs[i][2][:-(-ctxs[i] // block_size)])))
                    for i in range(len(lens)) if lens[i] > 1]
        return cls(t(ids), t(positions), t(slots), t(last),
                   decode_rows, decode_blocks, decode_width, decode_mask, prefills)


@dataclass
class KVCache:
    """The paged KV cache: per layer one ``[num_blocks, block_size, 2, kv_heads, dim]``
    tensor, each token's K heads next to its V heads (as the fused projection emits them,
    so a step writes both with one copy and a decode step gathers both with one), in the
    model's dtype."""

    layers: list[Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        shape = (num_blocks, block_size, 2, cfg.num_kv_heads, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device)
                    for _ in range(cfg.num_layers)])

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.layers[0].shape[1]


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
                batch: ForwardBatch) -> Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x).unflatten(1, (self.heads + 2 * self.kv_heads, self.dim))
        # RoPE on q and k together ([n, heads + kv_heads, dim]), in place; sin carries the
        # sign of rotate_half, so rotating is one roll: x * cos + roll(x) * sin.
        qk = qkv[:, :self.heads + self.kv_heads]
        rolled = qk.roll(self.dim // 2, -1).mul_(sin)
        qk.mul_(cos).add_(rolled)
        q = qkv[:, :self.heads]
        # Write first, then read back: a sequence's new tokens attend to themselves too.
        # qkv[:, heads:] is each token's K heads then V heads: the cache's slot layout.
        cache.view(-1, 2 * self.kv_heads, self.dim).index_copy_(0, batch.slot_mapping,
                                                                qkv[:, self.heads:])
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
                batch: ForwardBatch) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, batch)
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
        for layer, cache in zip(self.model.layers, kv.layers, strict=True):
            x = layer(x, cos, sin, cache, batch)
        x = self.model.norm(x[batch.logits_indices])
        return self.lm_head(x)
