"""Kernel choices for backward passes that produce input gradients (SORS training, attacks).

On CPU, oneDNN's backward-data for a convolution with few input channels (the first layer of an
image network) is several times slower than PyTorch's native kernel, while for wide layers oneDNN
is the faster one. :class:`input_gradient_kernels` picks the native kernel for exactly those ops.
"""

from __future__ import annotations

import torch

__all__ = ["input_gradient_kernels"]


class input_gradient_kernels:
    """``with input_gradient_kernels(loss): torch.autograd.grad(loss, x, ...)``: during backward
    passes from ``roots`` (the outputs you differentiate), each CPU convolution with at most
    ``max_channels`` input channels computes its gradients with PyTorch's native kernel instead of
    oneDNN's, on one thread; every other op is untouched. A no-op for graphs on other devices.

    Why: oneDNN's backward-data for 1-3 input channels is 3-4x slower than the native kernel
    (LeNet-5 conv1, batch 256, one core: 20 ms vs 6 ms), and the SORS step and every gradient
    attack need that first-layer input gradient. The native kernel loops over the batch and gains
    nothing from a second thread, and on busy cores its threads stall each other (batch 128, two
    threads on 2 loaded cores: median 100-130 ms vs 6-7 ms on one). The switch is flipped by hooks
    on just those graph nodes (set on entry, removed on exit), so the rest of the backward pays nothing.
    """

    def __init__(self, *roots: torch.Tensor, max_channels: int = 4):
        self.roots = [r for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
        self.max_channels = max_channels
        self.handles: list = []
        self.saved: bool | None = None
        self.threads = torch.get_num_threads()

    def __enter__(self):
        self.saved, self.threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
        for node in self._narrow_convolutions():
            self.handles.append(node.register_prehook(self._native))
            self.handles.append(node.register_hook(self._restore))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._restore()
        return False

    def _native(self, grad_outputs):
        torch.backends.mkldnn.enabled = False
        if self.threads > 1:
            torch.set_num_threads(1)

    def _restore(self, *unused):
        torch.backends.mkldnn.enabled = self.saved
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _narrow_convolutions(self) -> list:
        """ConvolutionBackward0 nodes of a CPU 2-d convolution with few input channels."""
        found, seen, stack = [], set(), [r.grad_fn for r in self.roots]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "ConvolutionBackward0" and self._narrow(node):
                found.append(node)
            stack.extend(child for child, _ in node.next_functions)
        return found

    def _narrow(self, node) -> bool:
        weight = node._saved_weight
        return (weight.device.type == "cpu" and weight.dim() == 4 and not node._saved_transposed
                and weight.shape[1] * node._saved_groups <= self.max_channels)
