"""The layer's output, RMSNorm(o) * weight * act(gate) (carve_kernel.output_norm_gate): its torch
definition and its Triton kernels (forward and backward, in Triton's interpreter on a CPU, compiled on a
GPU) against a float64 formula written here, forward and every gradient."""
import pytest
import torch

import carve_kernel
from carve_kernel import output_norm_gate, output_norm_gate_torch
from reference import DEVICE, TOL_BF16, TOL_FWD, TOL_GRAD, assert_rel, needs_triton

EPS = 1e-5


def formula(o, gate, weight, activation):
    """float64: o / sqrt(mean(o^2) + eps) * weight * act(gate)."""
    o, gate, weight = o.double(), gate.double(), weight.double()
    normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + EPS)
    act = gate * torch.sigmoid(gate) if activation == "silu" else torch.sigmoid(gate)
    return normed * weight * act


def inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    o = (3 * torch.randn(*shape, generator=gen)).to(dtype)
    gate = (2 * torch.randn(*shape, generator=gen)).to(dtype)
    weight = 1 + 0.3 * torch.randn(shape[-1], generator=gen)
    return [t.to(DEVICE).requires_grad_() for t in (o, gate, weight)]


def check(fn, shape, dtype, activation, tag):
    o, gate, weight = inputs(shape, dtype)
    y = fn(o, gate, weight, EPS, activation)
    assert y.dtype == dtype and y.shape == o.shape
    leaves = [t.detach().cpu().double().requires_grad_() for t in (o, gate, weight)]
    want = formula(*leaves, activation)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, (o, gate, weight), dy.to(DEVICE, dtype))
    want_grads = torch.autograd.grad(want, leaves, dy)
    fp32 = dtype == torch.float32
    assert_rel(y.cpu(), want, TOL_FWD if fp32 else TOL_BF16, f"{tag} y")
    for name, got, ref in zip(("o", "gate", "weight"), grads, want_grads):
        assert got.dtype == (torch.float32 if name == "weight" else dtype)
        assert_rel(got.cpu(), ref, TOL_GRAD if fp32 else TOL_BF16, f"{tag} grad {name}")


# rows (all but the last axis) not a multiple of a program's 32 rows; V = 24 is masked to 32 columns
SHAPES = [pytest.param((2, 5, 3, 16), id="30rows-V16"), pytest.param((1, 40, 2, 24), id="80rows-V24-masked"),
          pytest.param((1, 3, 2, 128), id="6rows-V128")]
if torch.cuda.is_available():  # the 1.3B recipe's micro-batch, 4 x 4096 tokens of 16 heads of 128 (GPU only)
    SHAPES.append(pytest.param((4, 4096, 16, 128), id="1.3B-4x4096"))


@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_definition(shape, dtype, activation):
    check(output_norm_gate_torch, shape, dtype, activation, f"norm gate torch {dtype}")


@needs_triton
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernels(monkeypatch, poisoned_empty, shape, dtype, activation):
    """The kernels against the float64 formula, with every buffer they allocate starting as NaN."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    calls = []
    real = carve_kernel.norm_gate_triton
    monkeypatch.setattr(carve_kernel, "norm_gate_triton", lambda *a: calls.append(1) or real(*a))
    check(output_norm_gate, shape, dtype, activation, f"norm gate triton {dtype}")
    assert calls, "the Triton kernel did not run"
    assert poisoned_empty, "the launchers no longer allocate with torch.empty"


@needs_triton
def test_every_output_element_is_written(poisoned_empty):
    """Every output the launchers allocate (poisoned with NaN) is written: y, rstd, do, dgate and the
    per-program dweight parts."""
    o, gate, weight = inputs((1, 40, 2, 24), torch.float32)
    y, rstd = carve_kernel.norm_gate_triton(o.detach(), gate.detach(), weight.detach(), EPS, True)
    grads = carve_kernel.norm_gate_backward_triton(torch.ones_like(y), o.detach(), gate.detach(), weight.detach(),
                                                   rstd, True)
    assert len(poisoned_empty) >= 5
    for t in (y, rstd, *grads, *poisoned_empty):
        assert torch.isfinite(t).all()


@needs_triton
def test_compiles_without_graph_breaks(monkeypatch):
    """carve::norm_gate is a custom op with registered autograd: torch.compile(fullgraph=True) traces
    the forward and backward through it and computes the same values."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    o, gate, weight = inputs((1, 40, 2, 16), torch.float32)

    def loss(o, gate, weight):
        return output_norm_gate(o, gate, weight, EPS).square().sum()

    want = torch.autograd.grad(loss(o, gate, weight), (o, gate, weight))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(o, gate, weight),
                              (o, gate, weight))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # and the gate as a GateProjection, recomputed in the backward
    x = torch.randn(1, 40, 8, device=DEVICE, requires_grad=True)
    W, bias = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((32, 8), (32,)))

    def projected_loss(o, x, W, bias, weight):
        return output_norm_gate(o, carve_kernel.GateProjection(x, W, bias), weight, EPS).square().sum()

    leaves = (o, x, W, bias, weight)
    want = torch.autograd.grad(projected_loss(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(projected_loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gate_projection(monkeypatch, backend, dtype):
    """The gate given as GateProjection(x, W, b) (the layer's low-rank output gate): the values and every
    gradient (o, x, W, b, weight) of the float64 formula on gate = x W^T + b, the weights rounded to x's
    dtype as autocast rounds them; on the Triton path no tensor of the gate's size is kept for the backward."""
    monkeypatch.setenv("CARVE_BACKEND", backend)
    shape, rank = (2, 20, 3, 16), 8
    gen = torch.Generator().manual_seed(4)
    o = (3 * torch.randn(*shape, generator=gen)).to(DEVICE, dtype).requires_grad_()
    x = torch.randn(*shape[:2], rank, generator=gen).to(DEVICE, dtype).requires_grad_()
    W = (torch.randn(shape[2] * shape[3], rank, generator=gen) / rank ** 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(shape[2] * shape[3], generator=gen).to(DEVICE).requires_grad_()
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(DEVICE).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y = output_norm_gate(o, carve_kernel.GateProjection(x, W, b), weight, EPS)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (o, x, W.to(dtype), b.to(dtype), weight)]
    gate = (leaves[1] @ leaves[2].T + leaves[3]).view(shape)
    want = formula(leaves[0], gate, leaves[4], "silu")
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fp32 = dtype == torch.float32
    assert y.dtype == dtype
    assert_rel(y.cpu(), want, TOL_FWD if fp32 else TOL_BF16, f"norm gate projected {backend} {dtype} y")
    grads = torch.autograd.grad(y, (o, x, W, b, weight), dy.to(DEVICE, dtype))
    for name, got, ref in zip(("o", "x", "W", "b", "weight"), grads, torch.autograd.grad(want, leaves, dy)):
        assert got.dtype == (dtype if name in ("o", "x") else torch.float32)
        assert_rel(got.cpu(), ref, TOL_GRAD if fp32 else TOL_BF16, f"norm gate projected {backend} {dtype} {name}")
    if backend == "triton":
        assert kept and torch.Size(shape) not in kept[1:]   # o itself (the first) is kept; no gate-sized tensor
        assert not any(s[-1] == shape[2] * shape[3] and len(s) == 3 for s in kept)


@needs_triton
def test_gate_projection_with_frozen_weights(monkeypatch):
    """A frozen projection (W and b without gradient: the op skips their products) gives the same
    gradients for o and x as one that learns."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    gen = torch.Generator().manual_seed(6)
    o, x = (torch.randn(*s, generator=gen).to(DEVICE).requires_grad_() for s in ((1, 9, 2, 16), (1, 9, 8)))
    W, b = torch.randn(32, 8, generator=gen).to(DEVICE), torch.randn(32, generator=gen).to(DEVICE)
    weight = torch.ones(16, device=DEVICE)
    grads = []
    for learn in (True, False):
        params = [t.detach().requires_grad_(learn) for t in (W, b)]
        y = output_norm_gate(o, carve_kernel.GateProjection(x, *params), weight, EPS)
        grads.append(torch.autograd.grad(y.square().sum(), (o, x)))
    assert all(torch.equal(a, c) for a, c in zip(*grads))
