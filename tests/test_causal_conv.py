"""The layer's short causal conv + SiLU (carve_kernel.causal_conv_silu): its torch definition and its
Triton kernels (forward and backward, in Triton's interpreter on a CPU, compiled on a GPU) against a
float64 formula written here from the definition, forward and every gradient; with a cache (a prompt
continued) and with document starts (packed rows)."""
import pytest
import torch

import carve_kernel
from carve_kernel import causal_conv_silu, causal_conv_silu_torch, runs_in_interpreter
from reference import DEVICE, TOL_BF16, TOL_FWD, TOL_GRAD, assert_rel, needs_triton


def formula(x, weight, history=None, doc_start=None):
    """float64: y[b, t, c] = silu(sum_i weight[c, i] x[b, t - W + 1 + i, c]), where a position before 0
    reads the history (or 0) and one before the token's document start reads 0."""
    B, T, C = x.shape
    width = weight.shape[-1]
    w = weight.reshape(C, width)
    past = history.transpose(1, 2) if history is not None else x.new_zeros(B, width - 1, C)
    padded = torch.cat([past, x], dim=1)                   # row t + W - 1 is token t
    pre = x.new_zeros(B, T, C)
    for i in range(width):
        tap = padded[:, i:i + T]                           # token t reads position t - W + 1 + i
        if doc_start is not None:
            position = torch.arange(T) - (width - 1) + i
            tap = tap * (position >= doc_start.cpu()).to(tap.dtype)[None, :, None]
        pre = pre + w[:, i] * tap
    return pre * torch.sigmoid(pre)


def inputs(B, T, C, width, dtype, seed=0, view_of_wider=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C + 5 if view_of_wider else C, generator=gen).to(dtype)
    weight = 0.5 * torch.randn(C, 1, width, generator=gen)
    x, weight = x.to(DEVICE), weight.to(DEVICE).requires_grad_()
    if view_of_wider:   # a slice of a wider projection: row stride C + 5, as a fused projection's view
        x = x.detach()[..., 2:C + 2].requires_grad_()
    return x.requires_grad_() if not x.requires_grad else x, weight


def check(fn, B, T, C, width, dtype, tag, history=False, docs=False, view_of_wider=False):
    x, weight = inputs(B, T, C, width, dtype, view_of_wider=view_of_wider)
    gen = torch.Generator().manual_seed(7)
    hist = torch.randn(B, C, width - 1, generator=gen).to(dtype).to(DEVICE) if history else None
    doc_start = None
    if docs:  # documents start at 0, 5, 6 (a one-token document) and 2T/3
        starts = torch.zeros(T, dtype=torch.bool)
        starts[[0, 5, 6, 2 * T // 3]] = True
        positions = torch.arange(T)
        doc_start = torch.cummax(torch.where(starts, positions, 0), dim=0).values.to(DEVICE)
    y, new_cache = fn(x, weight, hist, doc_start)
    assert y.dtype == dtype and y.shape == x.shape
    assert (new_cache is None) == (hist is None)
    leaves = [x.detach().cpu().double().requires_grad_(), weight.detach().cpu().double().requires_grad_()]
    # the definition rounds the weights to x's dtype; the formula takes them so rounded
    rounded_weight = leaves[1].detach().to(dtype).double() + (leaves[1] - leaves[1].detach())
    want = formula(leaves[0], rounded_weight, hist.cpu().double() if hist is not None else None,
                   doc_start.cpu() if doc_start is not None else None)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, weight), dy.to(DEVICE, dtype))
    want_grads = torch.autograd.grad(want, leaves, dy)
    fp32 = dtype == torch.float32
    # Triton 3.9's interpreter converts fp32 to bf16 by truncation, not to nearest (the compiled kernels
    # round to nearest): the conv's two roundings then add up to ~1e-2 on a CPU
    half_tol = 2 * TOL_BF16 if fn is causal_conv_silu and runs_in_interpreter() else TOL_BF16
    assert_rel(y.cpu(), want, TOL_FWD if fp32 else half_tol, f"{tag} y")
    for name, got, ref in zip(("x", "weight"), grads, want_grads):
        assert got.dtype == (torch.float32 if name == "weight" else dtype) and got.shape == ref.shape
        assert_rel(got.cpu(), ref, TOL_GRAD if fp32 else half_tol, f"{tag} grad {name}")
    if hist is not None:   # the new cache: the last W - 1 inputs of history followed by x
        want_cache = torch.cat([hist, x.detach().transpose(1, 2)], dim=-1)[..., -(width - 1):]
        assert torch.equal(new_cache.cpu(), want_cache.cpu())


# T not a multiple of a program's 32 rows, C not of its 128 channels; width 4 (the recipe's), 3 (taps
# padded to 4 in the backward) and 2; T 300: the backward's first pass over more than one 256-row group
CASES = [pytest.param(2, 45, 70, 4, {}, id="B2-T45-C70"),
         pytest.param(1, 33, 130, 2, {}, id="B1-T33-C130-W2"),
         pytest.param(2, 45, 70, 4, dict(view_of_wider=True), id="strided-view"),
         pytest.param(2, 3, 40, 4, dict(history=True), id="T3-shorter-than-cache"),
         pytest.param(2, 40, 40, 4, dict(history=True), id="cache"),
         pytest.param(1, 70, 40, 4, dict(docs=True), id="documents"),
         pytest.param(2, 300, 24, 3, dict(docs=True), id="T300-W3-documents"),
         pytest.param(2, 300, 24, 3, dict(history=True), id="T300-W3-cache")]
if torch.cuda.is_available():  # the 1.3B recipe's micro-batch: 4 x 4096 tokens, 2*16*128 + 16*128 channels
    CASES.append(pytest.param(4, 4096, 6144, 4, {}, id="1.3B-4x4096"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, T, C, width, options", CASES)
def test_torch_definition(B, T, C, width, options, dtype):
    # the 1.3B case at its first 300 tokens: the float64 formula over 4 x 4096 x 6144 is slow, and the
    # torch definition has no tiling that a longer T would exercise
    check(causal_conv_silu_torch, B, min(T, 300), C, width, dtype, f"conv torch {dtype}", **options)


def test_torch_documents_round_as_the_plain_conv():
    """The torch definition's doc_start branch sums the taps in fp32 and rounds once, as its conv1d branch
    does: in bf16, a token's output equals, bit for bit, the plain conv over the input with everything
    before the token's document zeroed. doc_start all 0 masks nothing, so the outputs equal the plain conv's
    everywhere; with documents starting at 0, 5, 6 and 40, each document's rows are checked on their own.
    On the CPU only: a GPU's conv1d may add the fp32 products in another order, which can move a rounding."""
    T, C, width = 64, 96, 4
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, T, C, generator=gen).to(torch.bfloat16)
    weight = 0.5 * torch.randn(C, 1, width, generator=gen)
    plain, _ = causal_conv_silu_torch(x, weight)
    nothing_masked, _ = causal_conv_silu_torch(x, weight, doc_start=torch.zeros(T, dtype=torch.long))
    assert torch.equal(nothing_masked, plain)
    starts = [0, 5, 6, 40]
    doc_start = torch.tensor([max(s for s in starts if s <= t) for t in range(T)])
    y, _ = causal_conv_silu_torch(x, weight, doc_start=doc_start)
    for first, end in zip(starts, starts[1:] + [T]):
        document_only = torch.cat([torch.zeros_like(x[:, :first]), x[:, first:]], dim=1)
        want, _ = causal_conv_silu_torch(document_only, weight)
        assert torch.equal(y[:, first:end], want[:, first:end]), f"document {first}..{end - 1}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, T, C, width, options", CASES)
def test_triton_kernels(monkeypatch, poisoned_empty, B, T, C, width, options, dtype):
    """The kernels against the float64 formula, with every buffer they allocate starting as NaN."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    calls = []
    real = carve_kernel.conv_silu_triton
    monkeypatch.setattr(carve_kernel, "conv_silu_triton", lambda *a: calls.append(1) or real(*a))
    check(causal_conv_silu, B, T, C, width, dtype, f"conv triton {dtype}", **options)
    assert calls, "the Triton kernel did not run"
    assert poisoned_empty, "the launchers no longer allocate with torch.empty"


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_continues_a_sequence(monkeypatch, backend):
    """The conv over T1 tokens and then T2 more through the returned cache equals one conv over T1 + T2."""
    monkeypatch.setenv("CARVE_BACKEND", backend)
    x, weight = inputs(2, 50, 40, 4, torch.float32)
    x, weight = x.detach(), weight.detach()
    whole, _ = causal_conv_silu(x, weight)
    cache = torch.zeros(2, 40, 3, device=DEVICE)
    first, cache = causal_conv_silu(x[:, :37], weight, cache)
    second, cache = causal_conv_silu(x[:, 37:], weight, cache)
    assert_rel(torch.cat([first, second], dim=1).cpu(), whole.cpu().double(), TOL_FWD, f"conv {backend} continued")
    assert torch.equal(cache, x[:, -3:].transpose(1, 2))


@needs_triton
def test_every_output_element_is_written(poisoned_empty):
    """Every output the launchers allocate (poisoned with NaN) is written: y, dx and the per-program
    dweight parts, with a masked last row block and channel block."""
    x, weight = inputs(2, 45, 70, 4, torch.float32)
    y = carve_kernel.conv_silu_triton(x.detach(), weight.detach().contiguous(), None, None)
    grads = carve_kernel.conv_silu_backward_triton(torch.ones_like(y), x.detach(), weight.detach(), None, None)
    assert len(poisoned_empty) >= 3
    for t in (y, *grads, *poisoned_empty):
        assert torch.isfinite(t).all()


@needs_triton
def test_compiles_without_graph_breaks(monkeypatch):
    """carve::conv_silu is a custom op with registered autograd: torch.compile(fullgraph=True) traces
    the forward and backward through it and computes the same values."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    x, weight = inputs(1, 40, 40, 4, torch.float32)

    def loss(x, weight):
        return causal_conv_silu(x, weight)[0].square().sum()

    want = torch.autograd.grad(loss(x, weight), (x, weight))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x, weight), (x, weight))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
