"""MXFP4 experts (OCP microscaling, FP4 e2m1 values), as gpt-oss's published checkpoints store them, and
the engine's 4-bit expert pages.

A [R, C] weight (x W^T, as nn.Linear) is stored as `blocks` uint8 [R, C/32, 16] and `scales` uint8
[R, C/32]: 32 values share one E8M0 scale 2^(s - 127); byte j of a block holds value 2j in its low nibble
and 2j+1 in its high one; nibble bit 3 is the sign, bits 0-2 index 0, .5, 1, 1.5, 2, 3, 4, 6. Every such
value is exact in bf16 and fp32, so dequantizing loses nothing.

A streamed expert's page is its four arrays' bytes back to back, [w13 blocks | w13 scales | w2 blocks |
w2 scales] with w13 = [gate rows | up rows] [2F, H] and w2 [H, F]: 4.25 bits a weight, 3.76x fewer than
bf16 across the link. `Dequantizer` expands a layer's pages on the device into its compute-dtype scratch
in place, through a workspace of fixed size carved from the same pool (no allocation of its own).
"""

from __future__ import annotations

import math

import torch

from moe_lightning.memory import MXFP4_BLOCK as BLOCK
from moe_lightning.memory import mxfp4_chunk

__all__ = ["BLOCK", "Dequantizer", "dequantize", "expert_parts", "largest_scale", "matrix_shapes"]
SCALE_BIAS = 127      # E8M0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [.., R, G, 16], scales uint8 [.., R, G] -> [.., R, G * 32] in `dtype` (exact)."""
    lut = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)   # [.., G, 16, 2]
    values = values.reshape(*blocks.shape[:-1], BLOCK)                                       # [.., R, G, 32]
    out = torch.ldexp(values, (scales.to(torch.int32) - SCALE_BIAS)[..., None].float())
    return out.reshape(*blocks.shape[:-2], -1).to(dtype)


def matrix_shapes(rows: int, cols: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """Shapes of the blocks and scales of a [rows, cols] matrix."""
    return (rows, cols // BLOCK, BLOCK // 2), (rows, cols // BLOCK)


def expert_parts(hidden: int, ffn: int) -> list[tuple[int, tuple[int, ...]]]:
    """(byte offset, shape) in a page of w13's blocks and scales, then w2's."""
    (b13, s13), (b2, s2) = matrix_shapes(2 * ffn, hidden), matrix_shapes(hidden, ffn)
    out, at = [], 0
    for shape in (b13, s13, b2, s2):
        out.append((at, shape))
        at += math.prod(shape)
    return out


def largest_scale(dtype: torch.dtype) -> int:
    """The largest E8M0 scale whose values (up to 6 x 2^(s - 127)) stay finite in `dtype`."""
    return SCALE_BIAS + math.floor(math.log2(torch.finfo(dtype).max / 6))


class Dequantizer:
    """Expands 4-bit pages into compute-dtype experts on their device, chunk by chunk, with nothing but
    its workspace (`take(shape, dtype)`: a carver, e.g. `DevicePools.take` of a planned pool)."""

    def __init__(self, hidden: int, ffn: int, dtype: torch.dtype, device: torch.device, take):
        self.hidden, self.ffn, self.dtype = hidden, ffn, dtype
        n, s = mxfp4_chunk(hidden, ffn)
        self.chunk = n
        self.index, self.values = take((n,), torch.int32), take((n,), dtype)
        self.scale32, self.scale = take((s,), torch.float32), take((s,), dtype)
        self.lut = torch.tensor(E2M1, dtype=dtype, device=device)

    def expert(self, page: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """page uint8 [page_bytes] -> w13 [2F, H], w2 [H, F] (in place)."""
        (o1, b1), (o2, s1), (o3, b2), (o4, s2) = expert_parts(self.hidden, self.ffn)
        view = lambda at, shape: page[at:at + math.prod(shape)].view(shape)   # noqa: E731
        self._matrix(view(o1, b1), view(o2, s1), w13)
        self._matrix(view(o3, b2), view(o4, s2), w2)

    def _matrix(self, blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        rows, groups = scales.shape
        per_row = groups * BLOCK // 2                        # block bytes a row
        step = max(1, self.chunk // per_row)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n, m = (r1 - r0) * per_row, (r1 - r0) * groups
            b = blocks[r0:r1].reshape(-1)
            pairs = out[r0:r1].view(n, 2)                    # values 2j and 2j+1 of the rows, by byte j
            for half, nibble in ((0, lambda x, o: torch.bitwise_and(x, 0x0F, out=o)),       # value 2j
                                 (1, lambda x, o: torch.bitwise_right_shift(x, 4, out=o))):  # value 2j + 1
                nibble(b, self.index[:n])                    # uint8 -> int32 indices, no temporary
                torch.index_select(self.lut, 0, self.index[:n], out=self.values[:n])
                pairs[:, half].copy_(self.values[:n])
            s32 = self.scale32[:m]
            s32.copy_(scales[r0:r1].reshape(-1))
            torch.exp2(s32.sub_(SCALE_BIAS), out=s32)
            self.scale[:m].copy_(s32)                        # a power of two: exact in the dtype
            out[r0:r1].view(m, BLOCK).mul_(self.scale[:m, None])
