"""Test helper: the largest tensor any operator produces while a block of code runs (forward and
backward), to prove that nothing of size seq x seq or tokens x vocab is ever materialized.

A ``TorchDispatchMode`` sees every ATen call's outputs, including those of autograd's backward and of
custom autograd functions (CPU backward runs on the calling thread). Memory a fused kernel allocates
internally is invisible here -- which is the point: the fused kernels are the O(S) ones.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """``with LargestTensor() as big: ...``; then ``big.numel`` and ``big.op`` (which ATen op made it)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out
