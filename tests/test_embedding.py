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


@pytest.mark.parametrize("shape,dim", [((3, 37), 40), ((2, 64), 300)], ids=["3x37x40", "2x64x300"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@needs_triton
def test_embedding_against_float64(monkeypatch, poisoned_empty, backend, shape, dim):
    """Rows looked up and the weight gradient (a sum over each token's positions) against float64; unused
    tokens get exactly zero; every element the launcher allocates is written (they start as NaN)."""
    monkeypatch.setenv("CARVE_BACKEND", backend)
    idx = token_ids(shape, seed=dim)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, dim, generator=gen)
    dy = torch.randn(*shape, dim, generator=gen, dtype=torch.float64)
    leaf = weight.to(DEVICE).requires_grad_()
    x = embedding(idx.to(DEVICE), leaf)
    grad, = torch.autograd.grad(x, leaf, dy.to(DEVICE, torch.float32))
    assert torch.equal(x.detach().cpu(), weight[idx])
    want = torch.zeros(VOCAB, dim, dtype=torch.float64).index_add_(0, idx.view(-1), dy.view(-1, dim))
    assert grad.dtype == torch.float32 and grad.shape == weight.shape
    assert_rel(grad.cpu(), want, TOL_GRAD, f"embedding {backend} weight gradient")
    assert torch.all(grad[VOCAB - VOCAB // 10:] == 0)


@needs_triton
def test_embedding_gradient_repeats_bit_for_bit(monkeypatch):
    """Five backward passes of one lookup give the same bits. On a GPU this is the point of the kernel:
    F.embedding's own backward there adds a repeated token's rows with atomics, in a different order each
    pass. 4,096 positions, a third of them one token, as a frequent byte or word would be."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    idx = token_ids((4, 1024), seed=2).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, 256, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(4, 1024, 256, generator=gen).to(DEVICE)
    grads = [torch.autograd.grad(embedding(idx, weight), weight, dy)[0] for _ in range(5)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])

