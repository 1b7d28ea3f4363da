"""The token embedding (carve_kernel.embedding): F.embedding forward; on the Triton path a backward that
adds each token's gradient rows in one fixed order (in Triton's interpreter on a CPU, compiled on a GPU).
Checked against a float64 sum written here, and for the same bits over repeated backward passes."""
import pytest
import torch

from carve_kernel import EMBED_ROWS, embedding
from reference import DEVICE, TOL_GRAD, assert_rel, needs_triton

VOCAB = 50


def token_ids(shape, seed):
    """Random ids with token 0 repeated more than EMBED_ROWS times (a program's loop runs several steps and
    ends on a partial one) and the top tenth of the vocabulary never used (its rows' gradient must be zero)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB - VOCAB // 10, shape, generator=gen)
    idx.view(-1)[::3] = 0
    assert (idx == 0).sum() > 2 * EMBED_ROWS
    return idx


@pytest.mark.parametrize("shape,dim,id_dtype", [((3, 37), 40, torch.int64), ((2, 64), 300, torch.int32)],
                         ids=["3x37x40", "2x64x300-int32"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@needs_triton
def test_embedding_against_float64(monkeypatch, poisoned_empty, backend, shape, dim, id_dtype):
    """Rows looked up and the weight gradient (a sum over each token's positions) against float64, from a
    gradient that is not contiguous (as a transposed product's can be); unused tokens get exactly zero;
    every element the launcher allocates is written (they start as NaN), and the Triton path allocates."""
    monkeypatch.setenv("CARVE_BACKEND", backend)
    idx = token_ids(shape, seed=dim).to(id_dtype)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, dim, generator=gen)
    dy = torch.randn(dim, *shape, generator=gen, dtype=torch.float64).movedim(0, -1)
    leaf = weight.to(DEVICE).requires_grad_()
    x = embedding(idx.to(DEVICE), leaf)
    grad, = torch.autograd.grad(x, leaf, dy.to(DEVICE, torch.float32))
    assert bool(poisoned_empty) == (backend == "triton")   # the kernel ran, or F.embedding's own backward
    assert torch.equal(x.detach().cpu(), weight[idx])
    want = torch.zeros(VOCAB, dim, dtype=torch.float64).index_add_(0, idx.view(-1), dy.reshape(-1, dim))
    assert grad.dtype == torch.float32 and grad.shape == weight.shape
    assert_rel(grad.cpu(), want, TOL_GRAD, f"embedding {backend} weight gradient")
    assert torch.all(grad[VOCAB - VOCAB // 10:] == 0)


@needs_triton
def test_embedding_of_no_tokens(monkeypatch):
    """An empty batch: no rows, and a weight gradient of zeros."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    weight = torch.randn(VOCAB, 8, device=DEVICE, requires_grad=True)
    x = embedding(torch.zeros(2, 0, dtype=torch.long, device=DEVICE), weight)
    assert x.shape == (2, 0, 8)
    assert torch.equal(torch.autograd.grad(x.sum(), weight)[0], torch.zeros_like(weight))


@needs_triton
def test_compiles_without_graph_breaks(monkeypatch):
    """carve::embedding is a custom op: torch.compile(fullgraph=True) traces the lookup and its backward
    through it and computes the same values as the eager op."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    idx = token_ids((2, 64), seed=5).to(DEVICE)
    weight = torch.randn(VOCAB, 24, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 64, 24, device=DEVICE)
    compiled = torch.compile(embedding, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(idx, weight), weight, dy)[0]
    assert torch.equal(got, torch.autograd.grad(embedding(idx, weight), weight, dy)[0])
