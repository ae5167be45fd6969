"""Column/row-parallel linears and the vocab-parallel embedding == nn.Linear / nn.Embedding,
with and without sequence parallelism (outputs and all gradients)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.distributed_utils import run_distributed

B, S, H, F_, V = 2, 4, 8, 12, 16


def _modules():
    torch.manual_seed(0)
    emb, up, down = nn.Embedding(V, H), nn.Linear(H, F_, bias=False), nn.Linear(F_, H, bias=True)
    tokens = torch.randint(0, V, (B, S))
    return emb, up, down, tokens


def _reference():
    emb, up, down, tokens = _modules()
    y = down(torch.relu(up(emb(tokens))))
    (y ** 2).sum().backward()
    return y.detach(), emb.weight.grad, up.weight.grad, down.weight.grad, down.bias.grad


def _parallel(rank, world, sp):
    from megatron_phi4.distributed.tensor_parallel import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, gather_from_sp)

    emb, up, down, tokens = _modules()
    g = dist.group.WORLD
    pemb = VocabParallelEmbedding(V, H, g, sequence_parallel=sp)
    pup = ColumnParallelLinear(H, F_, g, input_mode="gather_seq" if sp else "copy")
    pdown = RowParallelLinear(F_, H, g, bias=True, sequence_parallel=sp)
    pemb.load_full(emb.weight.data)
    pup.load_full(up.weight.data)
    pdown.load_full(down.weight.data, down.bias.data)
    y = pdown(torch.relu(pup(pemb(tokens))))
    (y ** 2).sum().backward()
    if sp:  # y holds this rank's sequence chunk; the bias saw only it -> sum over TP
        dist.all_reduce(pdown.bias.grad)
        y = gather_from_sp(y.detach(), g)
    return y.detach(), pemb.weight.grad, pup.weight.grad, pdown.weight.grad, pdown.bias.grad


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_parallel_layers_match_dense(sp):
    y, g_emb, g_up, g_down, g_bias = _reference()
    for rank, (py, pe, pu, pd, pb) in enumerate(run_distributed(_parallel, 2, sp)):
        torch.testing.assert_close(py, y)
        torch.testing.assert_close(pe, g_emb.chunk(2, 0)[rank])
        torch.testing.assert_close(pu, g_up.chunk(2, 0)[rank])
        torch.testing.assert_close(pd, g_down.chunk(2, 1)[rank])
        torch.testing.assert_close(pb, g_bias)
