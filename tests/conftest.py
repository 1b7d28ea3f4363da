"""Test set-up and fixtures. Run the suite from the repository root: `python -m pytest -q tests`.
What the test files share (the float64 oracle, inputs, tolerances, rel_err / assert_rel) is in
reference.py.

`CARVE_ERR_REPORT=1 python -m pytest -q tests` prints the largest relative error observed per
check at the end of the run, which is what the tolerances in the tests are set against."""
import os
import subprocess
import sys

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in the Triton interpreter, which has to be
# selected before triton (or carve_kernel, which imports it) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for path in (TESTS, ROOT):  # the repository's modules, and tests/reference.py for the test files
    if path not in sys.path:
        sys.path.insert(0, path)

# The tests use tiny tensors: one intra-op thread is as fast, and with the default (one per core) a
# busy machine makes OpenMP's spinning threads 10-50x slower (measured on 2 cores with 2 busy processes).
torch.set_num_threads(1)

from reference import OBSERVED, poisoned_allocations  # noqa: E402  (after the environment and sys.path above)


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get("CARVE_ERR_REPORT") or not OBSERVED:
        return
    terminalreporter.write_sep("-", "largest relative error observed per check")
    for what in sorted(OBSERVED):
        terminalreporter.write_line(f"{OBSERVED[what]:10.3e}  {what}")


@pytest.fixture
def triton_installed():
    """The Triton tests run the real kernels (in Triton's interpreter on a CPU); without triton they
    fail rather than skip."""
    import carve_kernel
    assert carve_kernel.triton is not None, ("triton is not installed: these tests run the real kernels "
                                             "(in its interpreter on a CPU); pip install triton==3.9.0")


@pytest.fixture
def poisoned_empty():
    """For the whole test, torch.empty makes NaN-filled tensors and lists them here
    (reference.poisoned_allocations)."""
    with poisoned_allocations() as made:
        yield made


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The embedded default corpus, byte-tokenised, exactly as the README's first command makes it."""
    out = tmp_path_factory.mktemp("data") / "shakespeare_byte"
    subprocess.run([sys.executable, "prepare_data.py", "--out_dir", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return str(out)
