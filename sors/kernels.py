"""Kernel choices for backward passes that produce input gradients (SORS training, attacks).

On CPU, oneDNN's backward-data for convolutions with few input channels (the first layer of an
image network) is several times slower than PyTorch's native kernel, while for wide layers it is
the faster one. :class:`input_gradient_kernels` picks the native kernel for exactly those ops.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["input_gradient_kernels"]


class input_gradient_kernels(TorchDispatchMode):
    """Context for a backward that makes input gradients: on CPU, the input gradient of a
    convolution with few input channels (an image network's first layer) is computed with
    PyTorch's native kernel instead of oneDNN's; every other op runs unchanged. A no-op elsewhere.

    Why: oneDNN's backward-data for 1-3 input channels is 3-4x slower than the native kernel
    (LeNet-5 conv1 at batch 256: 20 ms vs 6 ms on one core), while for wider layers oneDNN is the
    faster one; the SORS step (and every gradient attack) needs that first-layer input gradient.
    """

    def __init__(self, device: torch.device | str = "cpu", max_channels: int = 4):
        super().__init__()
        self.active = torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
        self.max_channels = max_channels

    def __enter__(self):
        return super().__enter__() if self.active else self

    def __exit__(self, *exc):
        return super().__exit__(*exc) if self.active else False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.convolution_backward.default and self._narrow_input(args):
            saved = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
            try:
                return func(*args, **kwargs)
            finally:
                torch.backends.mkldnn.enabled = saved
        return func(*args, **kwargs)

    def _narrow_input(self, args) -> bool:
        # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
        #                      transposed, output_padding, groups, output_mask)
        inp, transposed, mask = args[1], args[7], args[10]
        return bool(mask[0]) and not transposed and inp.device.type == "cpu" and inp.dim() == 4 \
            and inp.shape[1] <= self.max_channels
