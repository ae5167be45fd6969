"""A test-only stand-in for the Transformer Engine backend that runs without TE (and without a GPU).

Its pieces hold parameters with exactly the names and shapes ``megatron_phi4/layers/te.py`` says TE
allocates (``*_param_shapes``) and declare the layouts ``te.py`` declares for the real TE classes
(``*_layout``); their arithmetic is TE's as read from its source: RMSNorm with a plain (not
zero-centered) gamma, fc1 = [gate; up] with the gate on the first half (``silu(a) * b``), fc2
row-parallel. The math and the collectives are those of the fused test backend. If checkpoints,
TP/SP sharding and HF conversion are right for this stub, they are right for the declarations the
real TE backend uses; what only a GPU with TE can show is that TE computes what the stub computes
(tests/layers/test_te_backend.py, marked ``te``/``gpu``).
"""
from __future__ import annotations

from torch import nn

from megatron_phi4.distributed.tensor_parallel import RowParallelLinear
from megatron_phi4.layers import te as te_layout
from megatron_phi4.layers.local import LocalBackend, RMSNorm
from tests.layers.fused_backend import FusedNormLinear, FusedNormMLP


def _check_shapes(module: nn.Module, expected: dict) -> None:
    got = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    assert got == {n: tuple(s) for n, s in expected.items()}, (type(module).__name__, got, expected)


class StubNormLinear(FusedNormLinear):
    def __init__(self, hidden, outputs, eps, ctx):
        super().__init__(hidden, outputs, eps, ctx)
        self.outputs = dict(outputs)
        _check_shapes(self, te_layout.norm_linear_param_shapes(hidden, outputs, ctx))

    def param_layout(self):
        return te_layout.norm_linear_layout(self.hidden, self.outputs, self.ctx)


class StubNormMLP(FusedNormMLP):
    def __init__(self, hidden, ffn, eps, ctx):
        super().__init__(hidden, ffn, eps, ctx)
        _check_shapes(self, te_layout.norm_mlp_param_shapes(hidden, ffn, ctx))

    def param_layout(self):
        return te_layout.norm_mlp_layout(self.hidden, self.ffn, self.ctx)


class StubRowLinear(RowParallelLinear):
    def __init__(self, in_features, out_features, ctx):
        super().__init__(in_features, out_features, ctx.tp_group, sequence_parallel=ctx.sequence_parallel)
        self.ctx = ctx
        _check_shapes(self, te_layout.row_linear_param_shapes(in_features, out_features, ctx))

    def param_layout(self):
        return te_layout.row_linear_layout(self.global_in_features, self.out_features, self.ctx)


class StubRMSNorm(RMSNorm):
    def __init__(self, hidden, eps, ctx):
        super().__init__(hidden, eps, ctx.sequence_parallel)
        self.ctx, self.hidden = ctx, hidden
        _check_shapes(self, te_layout.rmsnorm_param_shapes(hidden, ctx))

    def param_layout(self):
        return te_layout.rmsnorm_layout(self.hidden, self.ctx)


class TEStubBackend(LocalBackend):
    name = "te_stub"

    def norm(self, hidden, eps):
        return StubRMSNorm(hidden, eps, self.ctx)

    def norm_linear(self, hidden, outputs, eps):
        return StubNormLinear(hidden, outputs, eps, self.ctx)

    def norm_mlp(self, hidden, ffn, eps):
        return StubNormMLP(hidden, ffn, eps, self.ctx)

    def linear(self, in_features, out_features, parallel):
        if parallel == "row":
            return StubRowLinear(in_features, out_features, self.ctx)
        return super().linear(in_features, out_features, parallel)


def register() -> None:
    from megatron_phi4.registry import BACKENDS

    if "te_stub" not in BACKENDS:
        BACKENDS.register("te_stub", TEStubBackend)
