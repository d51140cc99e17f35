"""Input transforms of Table 7, in torch, on batches of pixels in [0, 1], shape (B, C, H, W).

- median smoothing (Xu et al. 2018, feature squeezing), differentiable almost everywhere;
- bit-depth squeezing (Xu et al. 2018): quantisation, zero gradient -> BPDA;
- JPEG (Das et al. 2017): colour conversion, 8x8 DCT, IJG quantisation tables scaled by quality,
  rounding to 8-bit pixels -> BPDA;
- DNN-oriented JPEG (Liu et al. 2018, "Feature Distillation"): the same pipeline with their
  two-band table: low-frequency coefficients (u + v < ``band``) quantised with step 1, the rest
  with step 1 + ``qs``, then scaled by quality like a JPEG table -> BPDA.

The JPEG pipeline models the lossy stages of a baseline JPEG codec (Huffman coding is lossless):
8-bit input, YCbCr for colour images with optional 4:2:0 chroma subsampling, edge-replicated
padding to whole 8x8 blocks (as libjpeg does), quantisation, 8-bit output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# JPEG standard (ITU T.81 Annex K) base tables.
LUMA_TABLE = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
CHROMA_TABLE = torch.full((8, 8), 99.0)
CHROMA_TABLE[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32
)


def quality_scaled(table: torch.Tensor, quality: int) -> torch.Tensor:
    """IJG scaling of a base table to ``quality`` in 1..100 (50 keeps the table), clipped to 1..255."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.clamp(torch.floor((table * scale + 50) / 100), 1, 255)


def dnn_oriented_table(band: int = 5, qs: float = 40.0) -> torch.Tensor:
    """Feature Distillation's base table: 1 where u + v < ``band`` (the accuracy-sensitive low
    frequencies, kept almost exactly), 1 + ``qs`` elsewhere (where adversarial noise lives)."""
    u = torch.arange(8)
    return 1.0 + qs * ((u[:, None] + u[None, :]) >= band).float()


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): coefficients = D @ block @ D.T."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


_DCT = dct_matrix()


def median_smooth(x: torch.Tensor, kernel: int = 2) -> torch.Tensor:
    """Per-channel median over ``kernel`` x ``kernel`` windows, edge-replicated, same size out.

    Matches ``scipy.ndimage.median_filter(size=kernel, mode='nearest')``: for even kernels the
    window covers offsets -k/2..k/2-1 and the upper of the two middle values is taken.
    """
    if kernel <= 1:
        return x
    before, after = kernel // 2, (kernel - 1) // 2
    padded = F.pad(x, (before, after, before, after), mode="replicate")
    windows = padded.unfold(2, kernel, 1).unfold(3, kernel, 1).flatten(-2)  # (B, C, H, W, k*k)
    return windows.sort(dim=-1).values[..., (kernel * kernel) // 2]


def bit_depth(x: torch.Tensor, bits: int = 5) -> torch.Tensor:
    """Squeeze to 2**bits levels: round(x * (2**bits - 1)) / (2**bits - 1)."""
    levels = 2 ** int(bits) - 1
    return torch.round(x * levels) / levels


_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCBCR_OFFSET = torch.tensor([0.0, 128.0, 128.0])


def _to_blocks(plane: torch.Tensor) -> torch.Tensor:
    """(B, H, W) with H, W multiples of 8 -> (B, H/8, W/8, 8, 8)."""
    b, h, w = plane.shape
    return plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    b, nh, nw, _, _ = blocks.shape
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, nh * 8, nw * 8)


def _quantise_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT-quantise-IDCT one channel (B, H, W) on the 0..255 scale, any H, W (edge-padded to 8)."""
    h, w = plane.shape[-2:]
    pad_h, pad_w = (-h) % 8, (-w) % 8
    if pad_h or pad_w:
        plane = F.pad(plane[:, None], (0, pad_w, 0, pad_h), mode="replicate")[:, 0]
    d = _DCT.to(plane.device)
    table = table.to(plane.device)
    coeffs = d @ _to_blocks(plane - 128.0) @ d.T
    restored = d.T @ (torch.round(coeffs / table) * table) @ d
    return (_from_blocks(restored) + 128.0)[:, :h, :w]


def jpeg_compress(
    x: torch.Tensor,
    quality: int = 75,
    table: torch.Tensor | None = None,
    chroma_table: torch.Tensor | None = None,
    subsample: bool = True,
) -> torch.Tensor:
    """JPEG round trip of (B, C, H, W) pixels in [0, 1] (C = 1 or 3); returns 8-bit levels / 255.

    ``table``/``chroma_table``: base tables before quality scaling (default: the standard ones;
    DNN-oriented JPEG passes its own for both). ``subsample``: 4:2:0 chroma for colour images.
    """
    luma = quality_scaled(LUMA_TABLE if table is None else table, quality)
    chroma = quality_scaled(CHROMA_TABLE if chroma_table is None else chroma_table, quality)
    pixels = torch.round(x.clamp(0, 1) * 255.0)
    if x.shape[1] == 1:
        out = _quantise_plane(pixels[:, 0], luma)[:, None]
    elif x.shape[1] == 3:
        out = _jpeg_colour(pixels, luma, chroma, subsample)
    else:
        raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
    return torch.round(out).clamp(0, 255) / 255.0


def _jpeg_colour(pixels: torch.Tensor, luma: torch.Tensor, chroma: torch.Tensor, subsample: bool) -> torch.Tensor:
    matrix, offset = _RGB_TO_YCBCR.to(pixels.device), _YCBCR_OFFSET.to(pixels.device)
    ycc = torch.einsum("ij,bjhw->bihw", matrix, pixels) + offset[None, :, None, None]
    h, w = pixels.shape[-2:]
    planes = [_quantise_plane(ycc[:, 0], luma)]
    for c in (1, 2):
        plane = ycc[:, c]
        if subsample:
            small = F.avg_pool2d(F.pad(plane[:, None], (0, w % 2, 0, h % 2), mode="replicate"), 2)[:, 0]
            small = _quantise_plane(small, chroma)
            plane = F.interpolate(small[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0, :h, :w]
        else:
            plane = _quantise_plane(plane, chroma)
        planes.append(plane)
    ycc = torch.stack(planes, dim=1) - offset[None, :, None, None]
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(matrix), ycc)


def dnn_jpeg(
    x: torch.Tensor, quality: int = 50, band: int = 5, qs: float = 40.0, subsample: bool = False
) -> torch.Tensor:
    """DNN-oriented JPEG (Feature Distillation): :func:`jpeg_compress` with the two-band table of
    :func:`dnn_oriented_table` for every channel (no chroma subsampling, as in their code)."""
    table = dnn_oriented_table(band, qs)
    return jpeg_compress(x, quality, table=table, chroma_table=table, subsample=subsample)
