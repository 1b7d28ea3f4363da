"""The MLP's second product F.linear(SiLU(gate) * up, weight) (carve_kernel.swiglu_linear): its torch
definition and its Triton path (a kernel each way, in Triton's interpreter on a CPU, compiled on a GPU)
against a float64 formula written here, forward and every gradient; the Triton path keeps gate_up and
not the product h for the backward, eagerly and under torch.compile."""
import pytest
import torch

from carve_kernel import swiglu_linear
from reference import DEVICE, TOL_BF16, TOL_FWD, TOL_GRAD, assert_rel, needs_triton

# rows and hidden widths that leave partial tiles (16 rows, 128 columns a tile) next to whole ones
SHAPES = [(3, 7, 40), (2, 16, 300)]


def formula(gate_up, weight):
    """float64: (gate sigmoid(gate) up) weight^T."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up) @ weight.double().t()


def inputs(rows, cols, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(rows, cols, 2 * hidden, generator=gen)).to(dtype)
    weight = (torch.randn(24, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    return gate_up.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@needs_triton
def test_swiglu_linear(monkeypatch, poisoned_empty, backend, dtype, shape):
    """Output, d gate_up and d weight against float64, in the input dtype; every element the launchers
    allocate is written (they start as NaN)."""
    monkeypatch.setenv("CARVE_BACKEND", backend)
    gate_up, weight = inputs(*shape, dtype)
    y = swiglu_linear(gate_up, weight)
    assert y.dtype == dtype and y.shape == (*shape[:2], 24)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, (gate_up, weight), dy.to(DEVICE, dtype))
    leaves = [t.detach().cpu().double().requires_grad_() for t in (gate_up, weight)]
    want = formula(*leaves)
    want_grads = torch.autograd.grad(want, leaves, dy)
    fp32 = dtype == torch.float32
    assert_rel(y.cpu(), want, TOL_FWD if fp32 else TOL_BF16, f"swiglu {backend} {dtype} y")
    for name, got, ref in zip(("d_gate_up", "d_weight"), grads, want_grads):
        assert got.dtype == dtype
        assert_rel(got.cpu(), ref, TOL_GRAD if fp32 else TOL_BF16, f"swiglu {backend} {dtype} {name}")
    assert poisoned_empty or backend == "torch", "the launchers no longer allocate with torch.empty"


if torch.cuda.is_available():  # the 1.3B recipe's MLP: 4 x 4096 tokens, hidden 6208, d_model 2304 (GPU only)
    def test_swiglu_linear_at_the_1b3_shape(monkeypatch):
        """bf16 at the 1.3B shape (int32 offsets and every tile at full size), against float64 on the GPU."""
        monkeypatch.setenv("CARVE_BACKEND", "triton")
        gen = torch.Generator(device="cuda").manual_seed(0)
        gate_up = (2 * torch.randn(4, 4096, 2 * 6208, device="cuda", generator=gen)).bfloat16().requires_grad_()
        weight = (torch.randn(2304, 6208, device="cuda", generator=gen) / 6208 ** 0.5).bfloat16().requires_grad_()
        y = swiglu_linear(gate_up, weight)
        dy = torch.randn(y.shape, device="cuda", generator=gen).bfloat16()
        grads = torch.autograd.grad(y, (gate_up, weight), dy)
        leaves = [t.detach().double().requires_grad_() for t in (gate_up, weight)]
        want = formula(*leaves)
        assert_rel(y, want, TOL_BF16, "swiglu 1.3B shape bf16 y")
        for name, got, ref in zip(("d_gate_up", "d_weight"), grads, torch.autograd.grad(want, leaves, dy.double())):
            assert_rel(got, ref, TOL_BF16, f"swiglu 1.3B shape bf16 {name}")


@needs_triton
def test_triton_path_keeps_gate_up_not_the_product(monkeypatch):
    """The Triton path keeps only gate_up and the weight for the backward (the torch path also keeps h);
    a frozen weight gets no gradient and the product for it is not made; the torch path's values (fp32:
    the interpreter truncates where it rounds to bf16, so bf16 is checked against float64 above)."""
    gate_up, weight = inputs(2, 5, 40, torch.float32)
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CARVE_BACKEND", backend)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            y = swiglu_linear(gate_up, weight)
        outputs[backend] = [y, *torch.autograd.grad(y.float().square().sum(), (gate_up, weight))]
        assert ((2, 5, 40) in kept or (10, 40) in kept) == (backend == "torch"), (backend, kept)
    for name, a, b in zip(("y", "d_gate_up", "d_weight"), outputs["triton"], outputs["torch"]):
        assert_rel(a, b, TOL_GRAD, f"swiglu triton vs torch fp32 {name}")
    calls = []
    real = torch.ops.carve.swiglu_linear_bwd
    monkeypatch.setattr(torch.ops.carve, "swiglu_linear_bwd", lambda *args: calls.append(args[-1]) or real(*args))
    frozen = weight.detach()
    (d_gate_up,) = torch.autograd.grad(swiglu_linear(gate_up, frozen).sum(), (gate_up,))
    assert calls == [False] and torch.isfinite(d_gate_up).all()


@needs_triton
def test_compiles_and_passes_opcheck(monkeypatch):
    """torch.compile(fullgraph=True) gives the eager values and gradients bit for bit; opcheck of both ops."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    gate_up, weight = inputs(2, 5, 40, torch.float32)

    def step(gate_up, weight):
        return swiglu_linear(gate_up, weight).square().sum()

    eager = step(gate_up, weight)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(gate_up, weight)
    assert torch.equal(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, (gate_up, weight)), torch.autograd.grad(eager, (gate_up, weight))):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.carve.swiglu_linear.default, (gate_up, weight))
    dy = torch.randn(2, 5, 24, device=DEVICE)
    strided_weight = weight.detach().t().contiguous().t()   # the product's gradient is contiguous all the same
    for w in (weight.detach(), strided_weight):
        for weight_grad in (True, False):
            torch.library.opcheck(torch.ops.carve.swiglu_linear_bwd.default, (dy, gate_up.detach(), w, weight_grad))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):   # the op runs in the given dtype, autocast or not
        assert swiglu_linear(gate_up, weight).dtype == torch.float32


def test_swiglu_linear_rejects_mismatched_weight():
    """A weight of the wrong width or dtype is a one-line ValueError naming both."""
    gate_up = torch.zeros(2, 3, 16)
    for weight in (torch.zeros(4, 7), torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(8)):
        with pytest.raises(ValueError, match="swiglu_linear: gate_up"):
            swiglu_linear(gate_up, weight)
