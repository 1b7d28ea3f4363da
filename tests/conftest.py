"""Shared test helpers. Run the suite from the repository root: `python -m pytest -q tests`.

`CARVE_ERR_REPORT=1 python -m pytest -q tests` prints the largest relative error observed per
check at the end of the run, which is what the tolerances in the tests are set against."""
import os
import sys
from collections import defaultdict

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in the Triton interpreter, which has to be
# selected before triton (or carve_kernel, which imports it) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests use tiny tensors: one intra-op thread is as fast, and with the default (one per core) a
# busy machine makes OpenMP's spinning threads 10-50x slower (measured on 2 cores with 2 busy processes).
torch.set_num_threads(1)

_OBSERVED = defaultdict(float)  # check name -> largest relative error seen


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64. Fails on any NaN/Inf in either tensor, so NaN never passes.
    A zero reference gives ||out|| / tiny, i.e. anything non-zero fails."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    assert torch.isfinite(ref).all(), "reference has NaN/Inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel(out, ref, tol, what):
    err = rel_err(out, ref)
    _OBSERVED[what] = max(_OBSERVED[what], err)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e}"
    return err


def record(what, value):
    """Record a value that a test requires to be *large* (a control); reported as the smallest seen."""
    key = what + " (min)"
    _OBSERVED[key] = min(_OBSERVED.get(key, float("inf")), value)


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get("CARVE_ERR_REPORT") or not _OBSERVED:
        return
    terminalreporter.write_sep("-", "largest relative error observed per check")
    for what in sorted(_OBSERVED):
        terminalreporter.write_line(f"{_OBSERVED[what]:10.3e}  {what}")


@pytest.fixture
def triton_installed():
    """The Triton tests run the real kernels (in Triton's interpreter on a CPU); without triton they
    fail rather than skip."""
    import carve_kernel
    assert carve_kernel.triton is not None, ("triton is not installed: these tests run the real kernels "
                                             "(in its interpreter on a CPU); pip install triton==3.9.0")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty fills every floating-point tensor it makes with NaN and records it here, so an
    element that a kernel's launcher allocates and the kernel does not write shows up as NaN."""
    real_empty, made = torch.empty, []

    def empty_nan(*shape, **kw):
        t = real_empty(*shape, **kw)
        if t.is_floating_point():
            made.append(t.fill_(float("nan")))
        return t

    monkeypatch.setattr(torch, "empty", empty_nan)
    return made
