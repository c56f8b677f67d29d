"""What the Triton kernels share: tile sizes rounded to powers of two, and a dot product accumulating in fp32."""

import triton
import triton.language as tl


def pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= n and >= ``least`` (``tl.dot`` needs tiles of at least 16)."""
    return max(least, triton.next_power_of_2(n))


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands in full fp32 (``IEEE``) as torch's matmul takes them by default,
    not rounded to TF32 as ``tl.dot`` does by default on tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
