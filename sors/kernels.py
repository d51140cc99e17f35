"""Kernel choices for the passes that produce input gradients (SORS training, attacks), and the
CPU allocator setting of training steps.

A network's first convolution sees few input channels (1 grey, 3 RGB). On the CPU, the input
gradient of such a convolution is its slowest op: oneDNN's backward-data for 1-4 input channels
runs 3-5x slower than the forward (LeNet-5 conv1, batch 128, 2 threads: 5.1 ms against 0.5 ms),
and PyTorch's native kernel (im2col-style col2im, one example at a time) is only 2x better.
SORS needs that gradient for every sampled path and differentiates it once more, and every
gradient attack needs it at every step. :func:`conv2d` computes it instead as a depthwise
convolution and a channel sum (one input channel; 0.9 ms) or one matrix product and k*k shifted
adds (more channels), and differentiates that again with ordinary convolutions.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

__all__ = ["conv2d", "conv_transpose_narrow", "fast_input_gradients", "retain_freed_memory", "NARROW_CHANNELS"]

NARROW_CHANNELS = 4  # at most this many input channels: the fast path wins (wider: oneDNN wins)
_ENABLED = [True]


@contextlib.contextmanager
def fast_input_gradients(enabled: bool = True):
    """``with fast_input_gradients(False): ...`` runs :func:`conv2d` as plain ``F.conv2d`` (the
    built-in kernels): for benchmarks and equivalence tests. Not thread-local."""
    saved = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = saved


def conv_transpose_narrow(grad_out: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """The input gradient of a stride-1 convolution: ``conv_transpose2d(grad_out, weight, padding)``.

    Args:
        grad_out: (B, C_out, H_out, W_out), the gradient at the convolution's output.
        weight: (C_out, C_in, kh, kw); padding: (ph, pw), each at most k - 1.
    Returns:
        (B, C_in, H_out + kh - 1 - 2 ph, W_out + kw - 1 - 2 pw).

    One input channel: a depthwise convolution of grad_out with the flipped kernels, summed over
    the output channels. More: one batched matrix product gives, for every kernel tap (p, q), the
    contribution of all output pixels to the input pixel they read at that tap, and k*k shifted
    adds place them (a depthwise form would need a channel multiplier, which oneDNN runs 10-50x
    slower). The two forms measured in the SORS step and alone: BENCHMARKS.md. No autograd graph.
    """
    batch, c_out, h_out, w_out = grad_out.shape
    _, c_in, kh, kw = weight.shape
    if c_in == 1:
        per_channel = F.conv2d(
            grad_out, weight.flip(2, 3), padding=(kh - 1 - padding[0], kw - 1 - padding[1]), groups=c_out
        )
        return per_channel.sum(1, keepdim=True)
    taps = torch.matmul(weight.reshape(c_out, c_in * kh * kw).t(), grad_out.reshape(batch, c_out, h_out * w_out))
    taps = taps.view(batch, c_in, kh, kw, h_out, w_out)
    full = grad_out.new_zeros(batch, c_in, h_out + kh - 1, w_out + kw - 1)
    for p in range(kh):
        for q in range(kw):
            full[:, :, p : p + h_out, q : q + w_out] += taps[:, :, p, q]
    ph, pw = padding
    return full[:, :, ph : full.shape[2] - ph, pw : full.shape[3] - pw]


def _weight_grad(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    padding,
    want_weight: bool = True,
    want_bias: bool = False,
):
    """(dL/dweight, dL/dbias), each None unless wanted, of a stride-1 convolution, by the built-in
    (differentiable) op."""
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out,
        inp,
        weight,
        [weight.shape[0]] if want_bias else None,
        [1, 1],
        list(padding),
        [1, 1],
        False,
        [0, 0],
        1,
        [False, want_weight, want_bias],
    )
    return grad_weight, grad_bias


def _will_run(ctx, index: int) -> bool:
    """Whether the backward pass in progress needs the gradient of input ``index`` of a custom
    Function: ``ctx.needs_input_grad`` says only whether that input requires grad, so a
    ``backward(inputs=params)`` or ``autograd.grad(loss, x)`` would otherwise compute gradients
    nobody asked for. Built-in ops make the same check (the engine's exec_info)."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if node is None or will_execute is None:
        return node is not None
    try:
        return bool(will_execute(node))
    except RuntimeError:
        # Raised only for a leaf that autograd.grad(..., inputs) names (its gradient is captured,
        # not accumulated): wanted. A leaf it does not name answers False.
        return True


class _InputGradient(torch.autograd.Function):
    """grad_out, weight -> the input gradient (:func:`conv_transpose_narrow`); its own derivatives
    are a forward convolution (w.r.t. grad_out) and a weight gradient (w.r.t. weight)."""

    @staticmethod
    def forward(ctx, grad_out, weight, padding):
        ctx.save_for_backward(grad_out, weight)
        ctx.padding = padding
        return conv_transpose_narrow(grad_out, weight, padding)

    @staticmethod
    def backward(ctx, grad_grad_in):
        grad_out, weight = ctx.saved_tensors
        d_grad_out = F.conv2d(grad_grad_in, weight, padding=ctx.padding) if _will_run(ctx, 0) else None
        d_weight = _weight_grad(grad_out, grad_grad_in, weight, ctx.padding)[0] if _will_run(ctx, 1) else None
        return d_grad_out, d_weight, None


class _NarrowConv2d(torch.autograd.Function):
    """F.conv2d (stride 1) whose input gradient is :class:`_InputGradient` (differentiable again)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = _InputGradient.apply(grad_out, weight, ctx.padding) if _will_run(ctx, 0) else None
        grad_weight = grad_bias = None
        want_weight, want_bias = _will_run(ctx, 1), ctx.has_bias and _will_run(ctx, 2)
        if want_weight or want_bias:
            grad_weight, grad_bias = _weight_grad(grad_out, x, weight, ctx.padding, want_weight, want_bias)
        return grad_x, grad_weight, grad_bias, None


def _fast_path_applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> bool:
    """The fast path: CPU, an input that needs its gradient, few input channels, stride 1,
    dilation 1, one group, integer zero padding of at most k - 1."""
    return (
        _ENABLED[0]
        and x.requires_grad
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dim() == 4
        and weight.shape[1] <= NARROW_CHANNELS
        and groups == 1
        and _pair(stride) == (1, 1)
        and _pair(dilation) == (1, 1)
        and not isinstance(padding, str)
        and all(0 <= p <= k - 1 for p, k in zip(_pair(padding), weight.shape[2:]))
    )


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` with the same arguments and values; on the CPU, when ``x`` needs its gradient
    and has at most :data:`NARROW_CHANNELS` channels (stride 1), that gradient and its derivatives
    take the fast path above. x: (B, C_in, H, W); weight: (C_out, C_in, kh, kw)."""
    if _fast_path_applies(x, weight, stride, padding, dilation, groups):
        return _NarrowConv2d.apply(x, weight, bias, _pair(padding))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_RETAINED: list[bool] = []


def retain_freed_memory() -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the OS (glibc:
    blocks below 32 MiB come from the heap, and the heap is not trimmed). Idempotent; returns
    True when the setting is in force, False where it is not available (not Linux/glibc).

    Why: a training step allocates and frees the same buffers every time; by default glibc maps
    every buffer above its (adaptive) threshold fresh from the OS and unmaps it on free, so each
    step page-faults its whole working set in again. The SORS step (double backprop, several
    times the vanilla step's buffers) took ~6,000 minor faults and 13-15 ms of kernel time per
    step on LeNet-5 at batch 128; with this setting, none. Cost: the process keeps its peak heap.
    """
    if _RETAINED:
        return _RETAINED[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):
            ok = False
    _RETAINED.append(ok)
    return ok
