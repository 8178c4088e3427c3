"""Linear layers packed once into oneDNN's blocked layout: the reference model's CPU
fast path.

Owns :class:`PackedLinear` (a linear layer over a pre-reordered weight, and the plan of
which dtype and layout a model's linears are packed in) and :func:`cpu_has_native_bf16`
(whether this CPU multiplies bfloat16 natively, which decides that plan and the engine's
default dtype). :meth:`dynamo_bus.engines.reference.model.CausalLM.pack_linears` swaps
them in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
    a 2-core AVX-512 machine without AVX512-BF16). That narrow copy exists only where
    oneDNN supports bfloat16 at all (``_is_mkldnn_bf16_supported()``: AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT); elsewhere (an AVX2-only CPU) it cannot pack a bfloat16 weight, and
    single rows use the widened float32 one like every other batch."""

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
        if self.compute != self.dtype and torch.ops.mkldnn._is_mkldnn_bf16_supported():
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
