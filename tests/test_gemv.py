"""carve_kernel.linear: F.linear, except that one row without gradient (a batch-1 decode step) runs the
Triton GEMV (in Triton's interpreter on a CPU, compiled on a GPU). The GEMV against a float64 product,
and the dispatch: which calls take it."""
import pytest
import torch
import torch.nn.functional as F

import carve_kernel
from carve_kernel import GemvSettings, linear
from reference import DEVICE, TOL_BF16, TOL_FWD, assert_rel, needs_triton

# N not a multiple of a program's rows, K below, at and not a multiple of its 256 columns
SHAPES = [(70, 40), (33, 256), (130, 300), (5, 1)]
if torch.cuda.is_available():  # the 1.3B decode step's in_proj and SwiGLU down-projection
    SHAPES += [(8448, 2304), (2304, 6208)]


def operands(N, K, dtype, bias, lead=(1, 1)):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    x = torch.randn(*lead, K, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(N, K, generator=gen) / K ** 0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=gen).to(DEVICE, dtype) if bias else None
    return x, weight, b


@pytest.fixture
def calls(monkeypatch):
    """The Triton backend, and a list that gets an entry each time the GEMV runs."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    made, real = [], carve_kernel.gemv_triton
    monkeypatch.setattr(carve_kernel, "gemv_triton", lambda *a: made.append(1) or real(*a))
    return made


@needs_triton
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N, K", SHAPES)
def test_gemv_against_float64(calls, poisoned_empty, N, K, dtype, bias):
    x, weight, b = operands(N, K, dtype, bias)
    with torch.no_grad():
        y = linear(x, weight, b)
    assert calls, "the GEMV did not run"
    assert poisoned_empty, "the launcher no longer allocates with torch.empty"
    assert y.dtype == dtype and y.shape == (1, 1, N)
    ref = x.double() @ weight.double().T + (b.double() if bias else 0)
    assert_rel(y, ref, TOL_BF16 if dtype == torch.bfloat16 else TOL_FWD, f"gemv {dtype}")


@needs_triton
@pytest.mark.parametrize("settings", [GemvSettings(2, 1024, 4), GemvSettings(4, 256, 4), GemvSettings(1, 2048, 8),
                                      GemvSettings(16, 256, 4)], ids=str)
def test_gemv_settings_against_float64(poisoned_empty, settings):
    """Launch settings of gemv_settings' two kinds and of the sweep's extremes, with rows and columns left
    over."""
    x, weight, b = operands(37, 2100, torch.bfloat16, True)
    with torch.no_grad():
        y = carve_kernel.gemv_triton(x, weight, b, settings)
    assert poisoned_empty, "the launcher no longer allocates with torch.empty"
    assert_rel(y, x.double() @ weight.double().T + b.double(), TOL_BF16, f"gemv {settings}")


@needs_triton
def test_gemv_only_for_one_row_without_gradient(calls):
    """More rows, a gradient, or a weight not in the compute dtype go to F.linear; autocast casts x."""
    x, weight, _ = operands(24, 40, torch.float32, False, lead=(2, 1))
    with torch.no_grad():
        assert torch.equal(linear(x, weight), F.linear(x, weight)) and not calls
    w = weight.clone().requires_grad_()
    y = linear(x[:1], w)
    y.sum().backward()
    assert not calls and w.grad is not None
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        linear(x[:1], weight)   # an fp32 weight under bf16 autocast: F.linear casts it, the GEMV does not run
        assert not calls
        y = linear(x[:1], weight.bfloat16())   # fp32 x, bf16 weight: x cast as F.linear would
    assert calls and y.dtype == torch.bfloat16
    assert_rel(y, x[:1].bfloat16().double() @ weight.bfloat16().double().T, TOL_BF16, "gemv autocast")
    calls.clear()
    with torch.no_grad():   # F.linear's other cases: no features, a weight vector
        assert linear(x[:1, :, :0], weight[:, :0]).shape == (1, 1, 24) and linear(x[:1], weight[0]).shape == (1, 1)
        assert not calls
        bias = torch.randn(48)[::2].to(DEVICE)   # a strided bias, read at its stride
        assert_rel(linear(x[:1], weight, bias), x[:1].double() @ weight.double().T + bias.double(), TOL_FWD,
                   "gemv strided bias")
    assert calls


@needs_triton
def test_compiles_without_graph_breaks(calls):
    """carve::gemv is a custom op: torch.compile(fullgraph=True) traces a one-row step through it (as
    sample.py's compiled decode step does) and computes the same values."""
    x, weight, b = operands(24, 40, torch.float32, True)
    with torch.no_grad():
        want = linear(x, weight, b)
        got = torch.compile(linear, fullgraph=True, backend="aot_eager")(x, weight, b)
    assert len(calls) >= 2 and torch.equal(got, want)
