"""The Triton chunk kernels (`chunk_carve_triton`: carve::chunk_fwd and its registered backward,
carve::chunk_bwd) against the float64 per-token reference of tests/reference.py: outputs, every field
of the final state and every gradient (inputs, content projection, initial S and delta), fp32, bf16
and fp16, both forms of the forward (docs/DESIGN.md section 4) and value-block walks of every width,
with and without an initial state at an offset, packed sequences (cu_seqlens), continuation, gates
below the floor, poisoned outputs, torch.compile, and the model on the Triton path.

Without a GPU the kernels run on CPU tensors in the Triton interpreter (conftest.py), so the shapes
are small; with a GPU the same tests run the compiled kernels, and test_parity_fp16 adds longer
sequences and wider heads."""
import operator

import pytest
import torch
import torch.nn.functional as F

import carve_kernel
from carve_kernel import (CarveState, ChunkSchedule, DecayGate, chunk_carve, chunk_carve_torch, chunk_carve_triton,
                          chunk_triton_supports, recurrent_carve_triton)
from model import LM
from reference import (DEVICE, NAMES, TOL_BF16, TOL_FWD, TOL_GRAD, assert_bits_on_gpu, assert_rel, make_inputs,
                       make_state, model_style_gates, needs_triton, perturb, poisoned_allocations, record, reference,
                       rel_err, state_without_content, tiny, tokens)

pytestmark = needs_triton

# The forms a chunk call can be launched in (a ChunkSchedule; chunk_schedule picks one by shape, on
# a CPU always the first; docs/DESIGN.md section 4): the forward as the walk alone, or split around the
# parallel prep kernel (for GDN-2 also a value-block walk and the output kernel); the value-block walks
# (GDN-2's split walk, the backward's reverse walk) over all V columns at once or over several
# narrower blocks; and each sequence walked whole or in pieces of chunks (here three, in both
# directions, as when a GPU has idle SMs):
#   walk          the walk alone; the reverse walk over all V columns, whole
#   split         split forward, GDN-2's walk over all V columns; the reverse walk over V / 2; in pieces
#   split-narrow  split forward, GDN-2's walk over V / 2 columns; the reverse walk over all V; in pieces
FORMS = ["walk", "split", "split-narrow"]


def schedule(form, V):
    """The ChunkSchedule of `form` for value width V (for V = 16, V / 2 is 16: a block has 16 columns or more)."""
    half = V // 2 if V >= 32 else V
    if form == "walk":
        return ChunkSchedule(split_forward=False, walk_columns=V, forward_pieces=1, backward_columns=V,
                             backward_pieces=1)
    narrow = form == "split-narrow"
    return ChunkSchedule(split_forward=True, walk_columns=half if narrow else V, forward_pieces=3,
                         backward_columns=V if narrow else half, backward_pieces=3)


def forms_for(V):
    """FORMS, without split-narrow where V = 16 would make it the split form."""
    return [f for f in FORMS if V >= 32 or f != "split-narrow"]


def run_both(x, state, C, dtype=torch.float32, cu_seqlens=None, used=("o", "S", "delta"), form=None, scale=None,
             kernel=chunk_carve_triton, ref_device="cpu", detach_m=True):
    """The Triton chunk kernel (or `kernel`) on `dtype` leaves (g, D, U fp32), launched in `form`
    (None: chunk_schedule's choice), and the float64 reference on the same rounded values, on
    ref_device, each with a random cotangent on those of o, the final S and the final delta that are
    `used` (the others get none, as when a loss ignores them); detach_m=False: a reference whose
    gradient flows through m (a control: the kernel must not match it). Every buffer the kernel's forward and
    backward allocate starts as NaN (poisoned_allocations), so an element left unwritten fails the
    comparison. Returns (kernel output, final state, reference output, reference final states,
    gradient pairs)."""
    leaves = {n: t.detach().to(DEVICE, torch.float32 if n in ("g", "D", "U") else dtype).requires_grad_()
              for n, t in x.items()}
    content = (leaves["D"], leaves["U"]) if "D" in leaves else None
    if state is not None:
        state = CarveState(state.S.to(DEVICE).requires_grad_(), state.o_sum.to(DEVICE),
                           state.delta.to(DEVICE).requires_grad_(), state.offset)
    kw = {} if form is None else dict(schedule=schedule(form, x["v"].shape[-1]))
    with poisoned_allocations() as forward_buffers:
        o, final = kernel(*(leaves[n] for n in NAMES), content, state, True, scale, C, cu_seqlens, **kw)
    # the reference, one sequence at a time
    ref = {n: t.detach().to(ref_device, torch.float64).requires_grad_() for n, t in leaves.items()}
    ref_content = (ref["D"], ref["U"]) if content is not None else None
    bounds = [0, o.shape[1]] if cu_seqlens is None else list(cu_seqlens)
    rows = o.shape[0] if cu_seqlens is None else len(bounds) - 1
    S0 = state.S.detach().to(ref_device, torch.float64).requires_grad_() if state is not None else None
    delta0 = state.delta.detach().to(ref_device, torch.float64).requires_grad_() if state is not None else None
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        sl = slice(None) if cu_seqlens is None else slice(i, i + 1)
        kw = {}
        if state is not None:
            off = state.offset[i] if isinstance(state.offset, tuple) else state.offset
            kw = dict(S0=S0[sl], o_sum0=state.o_sum[sl].to(ref_device, torch.float64), delta0=delta0[sl], offset=off)
        if a == b:  # an empty sequence: its state passes through
            finals.append((kw["S0"], kw["o_sum0"], kw["delta0"]))
            continue
        o_i, fin = reference(*(ref[n][:, a:b] for n in NAMES), ref_content, chunk_size=C, scale=scale,
                             detach_m=detach_m, **kw)
        outs.append(o_i)
        finals.append(fin[:3])
    o_ref = torch.cat(outs, dim=1)
    S_ref, o_sum_ref, delta_ref = (torch.cat([f[j] for f in finals]) for j in range(3))
    assert o_ref.shape == o.shape and S_ref.shape[0] == rows
    gen = torch.Generator().manual_seed(2)
    do, dS, dd = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(ref_device)
                  for t in (o_ref, S_ref, delta_ref))
    if dtype != torch.float32:
        do = do.to(dtype).double()  # the same cotangent for both
    def loss(o_, S_, d_):
        terms = {"o": (o_, do), "S": (S_, dS), "delta": (d_, dd)}
        return sum((terms[u][0].double() * terms[u][1].to(terms[u][0].device)).sum() for u in used)

    with poisoned_allocations() as backward_buffers:
        loss(o, final.S, final.delta).backward()
    if kernel is not chunk_carve:   # chunk_carve may take the torch path, which allocates otherwise
        assert forward_buffers and backward_buffers, "the Triton launchers no longer allocate with torch.empty"
    loss(o_ref, S_ref, delta_ref).backward()
    pairs = [(n, leaves[n].grad, ref[n].grad) for n in leaves]
    if state is not None:
        pairs += [("initial S", state.S.grad, S0.grad), ("initial delta", state.delta.grad, delta0.grad)]
    return o, final, o_ref, (S_ref, o_sum_ref, delta_ref), pairs


def check(x, state, C, dtype=torch.float32, tag="", **kw):
    o, final, o_ref, (S_ref, o_sum_ref, delta_ref), pairs = run_both(x, state, C, dtype, **kw)
    # bf16 dot operands (a GPU's, for half-precision inputs) touch every result; with fp32 products (fp32
    # inputs, or the interpreter) only the half-precision outputs and gradients are rounded
    fp32_products = carve_kernel._operand_dtype(dtype) == torch.float32

    def tol_for(t, fp32_tol):
        return fp32_tol if fp32_products and t.dtype == torch.float32 else TOL_BF16

    assert o.dtype == dtype and final.S.dtype == final.o_sum.dtype == final.delta.dtype == torch.float32
    assert_rel(o.cpu(), o_ref, tol_for(o, TOL_FWD), f"{tag} o")
    assert_rel(final.S.cpu(), S_ref, tol_for(final.S, TOL_FWD), f"{tag} final S")
    for name, got, want in (("o_sum", final.o_sum, o_sum_ref), ("delta", final.delta, delta_ref)):
        if (want != 0).any():
            assert_rel(got.cpu(), want, tol_for(got, TOL_FWD), f"{tag} final {name}")
        else:  # ended on a chunk boundary (o_sum) or no content update yet (delta): exactly 0
            assert not got.any(), f"{tag} final {name} should be exactly 0"
    for name, got, want in pairs:
        if want is None or not want.any():  # D, U when no chunk finishes: no gradient at all
            assert got is None or not got.any(), f"{tag}: gradient for {name} where the reference has none"
            continue
        assert got is not None, f"{tag}: no gradient reached {name}"
        assert_rel(got.cpu(), want, tol_for(got, TOL_GRAD), f"{tag} grad {name}")
    return o, final


# (B, H, T, K, V, chunk_size): T not a multiple of 16 or of C, K != V, C of one to four blocks
SHAPES = [
    pytest.param(1, 1, 32, 16, 32, 16, id="T=2C"),
    pytest.param(2, 2, 37, 16, 32, 16, id="T=2C+5"),
    pytest.param(2, 1, 5, 16, 16, 16, id="T<16"),
    pytest.param(1, 2, 61, 32, 16, 32, id="C32-T=2C-3-K>V"),
    pytest.param(1, 1, 70, 16, 128, 64, id="C64-V128"),
    pytest.param(1, 1, 40, 64, 64, 32, id="C32-K64-V64"),
]
# each shape in every form it has
SHAPES_AND_FORMS = [pytest.param(*p.values, form, id=f"{p.id}-{form}")
                    for p in SHAPES for form in forms_for(p.values[4])]


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("B,H,T,K,V,C,form", SHAPES_AND_FORMS)
def test_parity_fp32(mode, with_state, B, H, T, K, V, C, form):
    """make_state's prefix is C + 5 tokens, so the call starts 5 tokens into a chunk (and inside a
    16-token block): the first block is partly masked, o_sum and delta carry over."""
    x = make_inputs(B, T, H, K, V, mode)
    state = None
    if with_state:
        state, prefix_content = make_state(B, H, K, V, mode, C)
        if mode == "carve":
            x["D"], x["U"] = prefix_content
    _, final = check(x, state, C, tag=f"triton chunk {mode} fp32", form=form)
    assert final.offset == (state.offset if state else 0) + T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
def test_parity_without_content(form, dtype):
    """CARVE's scalar write strength with no content projection (the model's content_rank=0): the output,
    the final state (delta exactly 0) and every gradient against the reference, in every form, from a
    state after a prefix that ends inside a chunk."""
    B, H, T, K, V, C = 2, 2, 37, 16, 32, 16
    x = make_inputs(B, T, H, K, V, "carve", seed=4)
    del x["D"], x["U"]
    _, final = check(x, state_without_content(B, H, K, V, C, seed=5), C, dtype,
                     tag=f"triton chunk carve without content {form}", form=form)
    assert not final.delta.any()


@pytest.mark.parametrize("used", ["o", "S", "delta"])
def test_gradients_when_one_output_is_used(used):
    """The outputs a loss ignores reach the backward with no cotangent at all (None: autograd makes no
    zero tensors for them): every gradient still matches the reference, and the ones that must be zero
    (q, k, v, ... when only the final delta is used) are."""
    B, H, T, K, V, C = 1, 2, 37, 16, 32, 16
    x = make_inputs(B, T, H, K, V, "carve", seed=12)
    state, (x["D"], x["U"]) = make_state(B, H, K, V, "carve", C)
    check(x, state, C, tag=f"triton chunk, only {used} used", used=(used,))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("prefix", [69, 85, 101, 117, 128])
def test_parity_offsets(mode, prefix, form):
    """From a state at every kind of offset in a 64-token chunk: inside its first block, at a block
    start, in the middle of a later block (the first block of the call does not start the chunk, so
    the chunk's state is stored from there), and on a chunk boundary."""
    B, H, T, K, V, C = 1, 2, 50, 16, 32, 64
    x = make_inputs(B, T, H, K, V, mode, seed=10)
    state, prefix_content = make_state(B, H, K, V, mode, C, prefix=prefix) if prefix % C else \
        _state_on_boundary(B, H, K, V, mode, C, prefix)
    if mode == "carve":
        x["D"], x["U"] = prefix_content
    check(x, state, C, tag=f"triton chunk {mode} offset {prefix}", form=form)


def _state_on_boundary(B, H, K, V, mode, C, prefix):
    """make_state insists on an offset inside a chunk; this one ends exactly on a chunk boundary."""
    x = make_inputs(B, prefix, H, K, V, mode, seed=1)
    content = (x["D"], x["U"]) if mode == "carve" else None
    _, (S, o_sum, delta, offset) = reference(*(x[n] for n in NAMES), content, chunk_size=C)
    assert offset % C == 0 and not o_sum.any()
    return CarveState(S.float(), o_sum.float(), delta.float(), offset), content


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_parity_bf16(mode, form):
    """bf16 q, k, v, b_logit, w: the kernels use them as bf16 dot operands (fp32 accumulation), so
    outputs, states and gradients all carry bf16 rounding, like flash-linear-attention's."""
    B, H, T, K, V, C = 2, 2, 45, 32, 32, 16
    x = make_inputs(B, T, H, K, V, mode, seed=1)
    state, prefix_content = make_state(B, H, K, V, mode, C)
    if mode == "carve":
        x["D"], x["U"] = prefix_content
    check(x, state, C, torch.bfloat16, tag=f"triton chunk {mode} bf16", form=form)


@pytest.mark.parametrize("form", ["walk", "split"])
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decay_gate_inside_the_kernels(mode, dtype, form):
    """Given a DecayGate, the kernels compute g = -exp(max(A_log, a_log_min)) softplus(f + dt_bias) where
    they read it, forward and backward. Against the float64 reference on g computed the same way in
    float64: o, the final state, and the gradients of f, A_log, dt_bias and every other input. Head 0's
    A_log is below a_log_min (no gradient through the floor), some f + dt_bias pass softplus's
    threshold of 20, and some g fall below the gate floor of -5 (no gradient there either)."""
    B, T, H, K, V, C, a_log_min = 2, 40, 2, 16, 16, 16, -5.0
    x = make_inputs(B, T, H, K, V, mode, seed=9)
    gen = torch.Generator().manual_seed(10)
    f = 3 * torch.randn(B, T, H, K, generator=gen)
    f[0, :3, :, :2] = 25.0
    A_log, dt_bias = torch.tensor([-6.0, 0.5]), torch.randn(H, K, generator=gen) - 2
    leaves = {n: t.to(DEVICE, torch.float32 if n in ("D", "U") else dtype).requires_grad_()
              for n, t in {**x, "f": f}.items() if n != "g"}
    params = {"A_log": A_log.to(DEVICE).requires_grad_(), "dt_bias": dt_bias.to(DEVICE).requires_grad_()}
    content = (leaves["D"], leaves["U"]) if mode == "carve" else None
    gate = DecayGate(leaves["f"], params["A_log"], params["dt_bias"], a_log_min)
    o, final = chunk_carve_triton(leaves["q"], leaves["k"], leaves["v"], gate, leaves["b_logit"], leaves["w"],
                                  content, None, True, None, C, schedule=schedule(form, V))
    ref = {n: t.detach().cpu().double().requires_grad_() for n, t in {**leaves, **params}.items()}
    g = -ref["A_log"].clamp(min=a_log_min).exp()[:, None] * F.softplus(ref["f"] + ref["dt_bias"], threshold=20.0)
    assert (g < -5).any() and (g > -5).any()
    o_ref, final_ref = reference(ref["q"], ref["k"], ref["v"], g, ref["b_logit"], ref["w"],
                                 (ref["D"], ref["U"]) if content else None, chunk_size=C)
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o_ref, final_ref[0])]
    ((o_ref * cot[0]).sum() + (final_ref[0] * cot[1]).sum()).backward()
    ((o.double() * cot[0].to(DEVICE)).sum() + (final.S.double() * cot[1].to(DEVICE)).sum()).backward()
    tol_fwd, tol_grad = (TOL_FWD, TOL_GRAD) if dtype == torch.float32 else (TOL_BF16, TOL_BF16)
    got = {"o": o, "S": final.S, **{f"d{n}": t.grad for n, t in {**leaves, **params}.items()}}
    want = {"o": o_ref, "S": final_ref[0], **{f"d{n}": t.grad for n, t in ref.items()}}
    if dtype == torch.bfloat16:
        # bf16 dot operands on a GPU put errors of ~1e-2 into dg, and A_log's and dt_bias's gradients sum
        # it over all tokens, mostly cancelling: there the bar is the g path's own error (torch's
        # decay_gate, then the same kernels), which the parity tests above hold to the reference
        for t in (*leaves.values(), *params.values()):
            t.grad = None
        o2, final2 = chunk_carve_triton(leaves["q"], leaves["k"], leaves["v"], carve_kernel.decay_gate(*gate),
                                        leaves["b_logit"], leaves["w"], content, None, True, None, C,
                                        schedule=schedule(form, V))
        ((o2.double() * cot[0].to(DEVICE)).sum() + (final2.S.double() * cot[1].to(DEVICE)).sum()).backward()
        for name in ("dA_log", "ddt_bias"):
            # the bar is held too, so that an error both paths share cannot raise it without limit: 0.1,
            # where an H200 gives 5.9e-2 for dA_log and 1.2e-2 for dt_bias (CARVE_ERR_REPORT=1; 6.8e-4 in
            # the interpreter); a wrong term in either gradient is of order 1
            bar = assert_rel(params[name[1:]].grad.cpu(), want[name], 0.1, f"decay gate g path {name} bf16")
            assert_rel(got[name].cpu(), want[name], max(tol_grad, 1.5 * bar), f"decay gate in kernel {name} bf16")
    for name, value in got.items():
        if dtype == torch.float32 or name not in ("dA_log", "ddt_bias"):
            assert_rel(value.cpu(), want[name], tol_fwd if name in ("o", "S") else tol_grad,
                       f"decay gate in kernel {name} {mode} {dtype}")
    assert got["dA_log"][0] == 0 and got["dA_log"][1] != 0


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decay_gate_projection(monkeypatch, backend, dtype, mode):
    """A DecayGate whose f is a GateProjection(x, W, None) (the model's low-rank f = f_up(f_low)) computes
    what the DecayGate of f = x W^T made outside computes, forward and every gradient (x's and W's
    included); on the Triton path the chunk op keeps x for the backward instead of f."""
    monkeypatch.setenv("CARVE_BACKEND", backend)
    B, T, H, K, V, C, rank = 2, 40, 2, 16, 16, 16, 8
    x = make_inputs(B, T, H, K, V, mode, seed=13)
    gen = torch.Generator().manual_seed(14)
    leaves = {n: t.to(DEVICE, torch.float32 if n in ("D", "U") else dtype).requires_grad_()
              for n, t in {**x, "f_low": torch.randn(B, T, rank, generator=gen)}.items() if n != "g"}
    params = {"W": (torch.randn(H * K, rank, generator=gen) / rank ** 0.5).to(DEVICE).requires_grad_(),
              "A_log": torch.tensor([0.3, 1.5]).to(DEVICE).requires_grad_(),
              "dt_bias": (torch.randn(H, K, generator=gen) - 2).to(DEVICE).requires_grad_()}
    content = (leaves["D"], leaves["U"]) if mode == "carve" else None
    runs = []
    for projected in (True, False):
        f = carve_kernel.GateProjection(leaves["f_low"], params["W"], None) if projected else \
            F.linear(leaves["f_low"], params["W"].to(dtype)).view(B, T, H, K)
        gate = DecayGate(f, params["A_log"], params["dt_bias"], -5.0)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            o, final = chunk_carve(leaves["q"], leaves["k"], leaves["v"], gate, leaves["b_logit"], leaves["w"],
                                   content, None, True, None, C)
        inputs = [*leaves.values(), *params.values()]
        grads = torch.autograd.grad((o.float().square().sum() + final.S.square().sum()), inputs)
        runs.append(([o, final.S, *grads], kept.count((B, T, H, K))))
    tol = 1e-6 if dtype == torch.float32 else TOL_BF16
    for name, a, b in zip(("o", "S", *[f"d{n}" for n in (*leaves, *params)]), runs[0][0], runs[1][0]):
        assert_rel(a, b, tol, f"decay gate projection {backend} {dtype} {name}")
    if backend == "triton":
        assert runs[0][1] == runs[1][1] - 1   # f [B, T, H, K] is not kept


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("form", ["walk", "split"])
def test_chunk_op_keeps_no_key_sized_tensor_but_its_inputs(mode, form):
    """Of the [B, T, H, K] tensors the chunk op keeps for its backward, every one is an input (q, k, g,
    b_logit): the block tiles Y, gamma q and k_end are made again in the backward (_chunk_bwd_tiles)."""
    B, T, H, K, V, C = 1, 40, 2, 32, 16, 16
    x = make_inputs(B, T, H, K, V, mode, seed=19)
    leaves = {n: t.to(DEVICE).requires_grad_() for n, t in x.items()}
    content = (leaves["D"], leaves["U"]) if mode == "carve" else None
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        o, _ = chunk_carve_triton(*(leaves[n] for n in NAMES), content, None, False, None, C,
                                  schedule=schedule(form, V))
    inputs = [leaves[n] for n in ("q", "k", "g", "b_logit")]
    key_sized = [t for t in kept if t is not None and tuple(t.shape) == (B, T, H, K)]
    assert key_sized and all(any(t is i for i in inputs) for t in key_sized), [tuple(t.shape) for t in key_sized]
    assert torch.isfinite(torch.autograd.grad(o.sum(), leaves["q"])[0]).all()


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_short_conv(monkeypatch, packed, backend, dtype, mode):
    """q, k, v given as a ShortConv (the model's conv input and weight) compute what q, k, v made by
    causal_conv_silu outside compute, bit for bit: o, S and every gradient (the conv input's and weight's
    included), in rows or as packed documents (the conv's doc_start with the chunk's cu_seqlens). On the
    Triton path the chunk op keeps the conv input, which the conv keeps anyway, instead of q, k and v."""
    monkeypatch.setenv("CARVE_BACKEND", backend)
    B, T, H, K, V, C = (1, 40, 2, 16, 32, 16) if packed else (2, 40, 2, 16, 32, 16)
    x = make_inputs(B, T, H, K, V, mode, seed=15)
    gen = torch.Generator().manual_seed(16)
    channels = H * (2 * K + V)
    leaves = {n: t.to(DEVICE, torch.float32 if n in ("D", "U") else dtype).requires_grad_()
              for n, t in {**x, "conv_x": torch.randn(B, T, channels, generator=gen)}.items()
              if n not in ("q", "k", "v")}
    conv_weight = (torch.randn(channels, 1, 4, generator=gen) / 2).to(DEVICE).requires_grad_()
    cu_seqlens = [0, 17, T] if packed else None
    doc_start = torch.tensor([0] * 17 + [17] * (T - 17), device=DEVICE) if packed else None
    content = (leaves["D"], leaves["U"]) if mode == "carve" else None
    runs = []
    for inside in (True, False):
        conv = carve_kernel.ShortConv(leaves["conv_x"], conv_weight, doc_start)
        qkv = (conv, None, None) if inside else carve_kernel.short_conv_qkv(conv, H, K)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            o, final = chunk_carve(*qkv, leaves["g"], leaves["b_logit"], leaves["w"], content, None, True, None, C,
                                   cu_seqlens)
        inputs = [*leaves.values(), conv_weight]
        grads = torch.autograd.grad(o.float().square().sum() + final.S.square().sum(), inputs)
        runs.append(([o, final.S, *grads], kept))
    for name, a, b in zip(("o", "S", *[f"d{n}" for n in leaves], "dconv_weight"), runs[0][0], runs[1][0]):
        assert torch.isfinite(a).all() and torch.equal(a, b), f"short conv {name}"
    if backend == "triton":   # q and k [B, T, H, K] and v [B, T, H, V] are not kept
        for shape, fewer in (((B, T, H, K), 2), ((B, T, H, V), 1)):
            assert runs[0][1].count(shape) == runs[1][1].count(shape) - fewer, shape


def test_short_conv_errors():
    """A ShortConv of the wrong shape, or with k and v given too, is a one-line ValueError."""
    B, T, H, K, V = 1, 8, 2, 16, 16
    b_logit = torch.zeros(B, T, H, K)
    x, weight = torch.zeros(B, T, H * (2 * K + V)), torch.zeros(H * (2 * K + V), 1, 4)
    rest = (torch.zeros(B, T, H, K), b_logit, torch.zeros(B, T, H))
    cases = [((carve_kernel.ShortConv(x, weight, None), torch.zeros(B, T, H, K), None), "pass k and v as None"),
             ((carve_kernel.ShortConv(x[..., :-3], weight, None), None, None), "ShortConv.x has shape"),
             ((carve_kernel.ShortConv(x, weight[:-1], None), None, None), "ShortConv.weight has shape"),
             ((carve_kernel.ShortConv(x, weight, torch.zeros(T - 1, dtype=torch.long)), None, None),
              "ShortConv.doc_start has shape")]
    for qkv, message in cases:
        with pytest.raises(ValueError, match=message):
            chunk_carve(*qkv, *rest)


if torch.cuda.is_available():   # one layer of the 1.3B model: too big for the interpreter
    @pytest.mark.parametrize("mode", ["carve", "gdn2"])
    def test_decay_gate_inside_the_kernels_at_1b3_shapes(mode):
        """A 1.3B layer's shapes (4 x 4096 tokens, 16 heads of 128, chunks of 64), bf16: the chunk kernels
        given a DecayGate against the same kernels given g = decay_gate(...) from torch, forward and every
        gradient (the g path is the one checked against the float64 reference above)."""
        B, T, H, K, V, C = 4, 4096, 16, 128, 128, 64
        x = make_inputs(B, T, H, K, V, mode, rank=16, seed=11, content_scale=0.3)
        gen = torch.Generator().manual_seed(12)
        leaves = {n: t.to(DEVICE, torch.float32 if n in ("D", "U") else torch.bfloat16).requires_grad_()
                  for n, t in {**x, "f": torch.randn(B, T, H, K, generator=gen)}.items() if n != "g"}
        params = {"A_log": torch.empty(H).uniform_(1, 16, generator=gen).log().to(DEVICE).requires_grad_(),
                  "dt_bias": (torch.randn(H, K, generator=gen) - 4).to(DEVICE).requires_grad_()}
        content = (leaves["D"], leaves["U"]) if mode == "carve" else None
        do = torch.randn(B, T, H, V, generator=gen).to(DEVICE, torch.bfloat16)
        results = []
        for in_kernel in (True, False):
            gate = DecayGate(leaves["f"], params["A_log"], params["dt_bias"], -5.0)
            g = gate if in_kernel else carve_kernel.decay_gate(*gate)
            o, _ = chunk_carve_triton(leaves["q"], leaves["k"], leaves["v"], g, leaves["b_logit"], leaves["w"],
                                      content, chunk_size=C)
            tensors = {**leaves, **params}
            grads = torch.autograd.grad(o, list(tensors.values()), do)
            results.append({"o": o.float(), **{f"d{n}": d.float() for n, d in zip(tensors, grads)}})
        for name, value in results[0].items():
            assert torch.isfinite(value).all(), name
            assert_rel(value, results[1][name], TOL_BF16, f"1.3B-shape decay gate in kernel {name} {mode}")


# (B, H, T, K, V, chunk_size, scale, gates, with_state); scale None is K^-1/2; gates "masked" sets half
# of g's entries to -30, far below the floor of -5 (zero gradient there).
FP16_CASES = [
    pytest.param(1, 2, 37, 16, 32, 16, None, "logsigmoid", True, id="T37-C16-init-state"),
    pytest.param(2, 1, 45, 32, 16, 16, 0.1, "logsigmoid", False, id="T45-K32-V16-scale0.1"),
    pytest.param(1, 2, 40, 16, 16, 32, 1.0, "masked", False, id="T40-C32-masked-scale1"),
]
if torch.cuda.is_available():  # the compiled kernels take flash-linear-attention's test shapes too
    FP16_CASES += [
        pytest.param(2, 2, T, D, D, 64, scale, gates, with_state, id=f"gpu-T{T}-D{D}-scale{scale}-{gates}"
                     + ("-init-state" if with_state else ""))
        for T, D, scale, gates, with_state in [
            (63, 64, 1.0, "logsigmoid", False), (500, 64, 0.1, "masked", False),
            (1000, 128, 1.0, "logsigmoid", True), (1500, 128, 0.1, "masked", False),
            (2048, 64, 1.0, "masked", True), (2048, 128, 0.1, "logsigmoid", False),
            (500, 100, 1.0, "logsigmoid", False), (1000, 60, 0.1, "masked", False)]]


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("B,H,T,K,V,C,scale,gates,with_state", FP16_CASES)
def test_parity_fp16(mode, B, H, T, K, V, C, scale, gates, with_state):
    """fp16 q, k, v, b_logit, w (g fp32) through chunk_carve_triton: outputs and gradients in fp16, the
    final state in fp32, within the bf16 tolerance of the float64 reference (the fp32 results within the
    fp32 tolerances where the products are fp32, as in the interpreter: check). On a GPU the chunk kernels
    take bf16 dot operands for fp16 inputs (fp16 cannot hold the block decay factors, up to e^40) and
    chunk_schedule picks the form; in the interpreter the operands are fp32 (docs/DESIGN.md section 7).
    Head widths the kernels do not take (60, 100: powers of two only) go through chunk_carve, which
    sends them to the torch path, and are checked the same way."""
    x = make_inputs(B, T, H, K, V, mode, seed=17)
    if gates == "masked":
        x["g"][torch.rand(x["g"].shape, generator=torch.Generator().manual_seed(18)) < 0.5] = -30.0
    state = None
    if with_state:
        state, prefix_content = make_state(B, H, K, V, mode, C)
        if mode == "carve":
            x["D"], x["U"] = prefix_content
    triton_path = chunk_triton_supports(K, V, C)
    assert triton_path or DEVICE == "cuda"
    o, _ = check(x, state, C, torch.float16, tag=f"{'triton' if triton_path else 'torch'} chunk {mode} fp16",
                 scale=scale, kernel=chunk_carve_triton if triton_path else chunk_carve, ref_device=DEVICE)
    assert o.dtype == torch.float16


@pytest.mark.parametrize("form", forms_for(16))
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_cu_seqlens(mode, form):
    """Packed sequences of 21, 0, 16, 1 and 33 tokens, each from its own state at its own offset
    (a tuple): every sequence equals the reference run on it alone, gradients included."""
    bounds = [0, 21, 21, 37, 38, 71]
    N, T, H, K, V, C = len(bounds) - 1, bounds[-1], 2, 16, 16, 16
    x = make_inputs(1, T, H, K, V, mode, seed=2)
    gen = torch.Generator().manual_seed(3)
    offsets = (0, 3, 7, 16, 30)
    state = CarveState(torch.randn(N, H, K, V, generator=gen), torch.randn(N, H, V, generator=gen),
                       torch.randn(N, H, K, generator=gen), offsets)
    _, final = check(x, state, C, tag=f"triton chunk {mode} cu_seqlens", cu_seqlens=bounds, form=form)
    assert final.offset == tuple(off + b - a for off, a, b in zip(offsets, bounds, bounds[1:]))


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_walk_pieces(mode, n):
    """Each sequence walked in n pieces of whole chunks, forward and backward (the split forward; the
    pieces' sequence tables, docs/DESIGN.md section 4): packed sequences of 150, 10, 0 and 95 tokens from
    offsets 5, 0, 70 and 37 (C = 16: 10, 1, 0 and 7 chunks, so the shorter sequences run out of chunks
    before the last pieces, and most start mid-chunk) equal the reference, every state and gradient
    included."""
    bounds = [0, 150, 160, 160, 255]
    N, T, H, K, V, C = len(bounds) - 1, bounds[-1], 2, 16, 32, 16
    x = make_inputs(1, T, H, K, V, mode, seed=19)
    gen = torch.Generator().manual_seed(20)
    state = CarveState(torch.randn(N, H, K, V, generator=gen), torch.randn(N, H, V, generator=gen),
                       torch.randn(N, H, K, generator=gen), (5, 0, 70, 37))
    pieced = ChunkSchedule(split_forward=True, walk_columns=16, forward_pieces=n, backward_columns=16,
                           backward_pieces=n)
    check(x, state, C, tag=f"triton chunk {mode} {n} pieces", cu_seqlens=bounds,
          kernel=lambda *a, **kw: chunk_carve_triton(*a, **kw, schedule=pieced))


# (K, V, lengths of the packed sequences, their offsets): small heads, one sequence empty; on a GPU also
# the 1.3B heads, whose products take another instruction path (K = V = 128, 64 or 128 columns a walk)
STATE_CASES = [pytest.param(16, 64, (50, 0, 33), (5, 0, 9), id="K16-V64")] + (
    [pytest.param(128, 128, (700, 300), (0, 21), id="K128-V128")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("K, V, lengths, offsets", STATE_CASES)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_backward_reads_the_forward_block_states(monkeypatch, mode, form, dtype, with_state, K, V, lengths, offsets):
    """The forward keeps no state at each block start; the backward walks them again
    (_chunk_rebuild_states, 32 columns a program). What the reverse walk reads equals, bit for bit, what
    the forward walk computed, for packed sequences from zero or initial states at offsets, in every
    form (on a CPU, to the last bit's rounding). (The walks that compute O as they go store no states: here
    they get a buffer to store them.)"""
    written, read = [], []
    for name, seen in (("_chunk_fwd_kernel", written), ("_chunk_fwd_gdn2_walk", written), ("_chunk_bwd_walk", read)):
        kernel = getattr(carve_kernel, name)

        class Recorded:   # kernel[grid](**arguments), keeping the h_store each launch gets
            def __getitem__(self, grid, kernel=kernel, seen=seen):
                def launch(**kw):
                    if kw["h_store"] is None:   # one buffer, poisoned, for every launch of the forward
                        kw["h_store"] = written[0] if written else torch.full(
                            (sum(lengths) // 16 + 2 * len(lengths), 2, K, V), float("nan"),
                            dtype=carve_kernel._operand_dtype(kw["q"].dtype), device=kw["q"].device)
                        kw["STORE_STATES"] = True
                    seen.append(kw["h_store"])
                    return kernel[grid](**kw)
                return launch
        monkeypatch.setattr(carve_kernel, name, Recorded())
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    N, T, H, C = len(lengths), bounds[-1], 2, 16 if K == 16 else 64
    x = {n: t.to(DEVICE, torch.float32 if n in ("g", "D", "U") else dtype)
         for n, t in make_inputs(1, T, H, K, V, mode, seed=22).items()}
    content = (x["D"], x["U"]) if mode == "carve" else None
    gen = torch.Generator().manual_seed(23)
    state = CarveState(*(torch.randn(N, H, *dims, generator=gen).to(DEVICE) for dims in ((K, V), (V,), (K,))),
                       offsets) if with_state else None
    x["q"].requires_grad_()
    o, _ = chunk_carve_triton(*(x[n] for n in NAMES), content, state, True, None, C, bounds,
                              schedule=schedule(form, V))
    o.float().pow(2).sum().backward()
    assert len({t.data_ptr() for t in written}) == 1 and len({t.data_ptr() for t in read}) == 1
    assert written[0].data_ptr() != read[0].data_ptr()
    states = read[0]
    assert states.abs().sum() > 0
    # in the interpreter one float32 ulp apart in 4% of the entries (there the stored states are float32
    # for every input dtype: _operand_dtype)
    assert_bits_on_gpu(written[0].flatten()[:states.numel()].view(states.shape), states, torch.finfo(states.dtype).eps)


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [16] + ([128] if torch.cuda.is_available() else []))
def test_backward_makes_the_forward_block_tiles_again(monkeypatch, mode, dtype, K):
    """The split forward hands gamma q and k_end (and GDN-2's Y) to its walks; the backward makes all three
    again (_chunk_bwd_tiles) with the launch of the kernel that made them: bit for bit the forward's, for
    packed sequences from initial states at offsets. (On a GPU, K = 128 in bf16 takes the wgmma path.)"""
    made = []
    real = carve_kernel._block_tiles_buffers
    monkeypatch.setattr(carve_kernel, "_block_tiles_buffers", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    lengths, offsets, H, V, C = (50, 0, 33), (5, 0, 9), 2, 32, 16
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    x = {n: t.to(DEVICE, torch.float32 if n in ("g", "D", "U") else dtype)
         for n, t in make_inputs(1, bounds[-1], H, K, V, mode, seed=24).items()}
    content = (x["D"], x["U"]) if mode == "carve" else None
    gen = torch.Generator().manual_seed(25)
    state = CarveState(*(torch.randn(len(lengths), H, *dims, generator=gen).to(DEVICE) for dims in ((K, V), (V,), (K,))),
                       offsets)
    x["q"].requires_grad_()
    o, _ = chunk_carve_triton(*(x[n] for n in NAMES), content, state, True, None, C, bounds,
                              schedule=schedule("split", V))
    o.float().pow(2).sum().backward()
    forward, backward = made
    names = ("y", "gamma_q", "k_end") if mode == "gdn2" else ("gamma_q", "k_end")
    assert mode == "gdn2" or forward.y is None
    for name in names:
        a, b = getattr(forward, name), getattr(backward, name)
        assert a.abs().sum() > 0 and torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_initial_state_overwritten_after_the_call(mode):
    """A model's cache writes the new state into the tensor it passed as S0 (model.DeltaMixer): the
    backward, which walks the block states again from S0, still gets the gradients of the S0 that
    was passed."""
    B, H, T, K, V, C = 1, 2, 40, 16, 32, 16
    x = {n: t.to(DEVICE).requires_grad_() for n, t in make_inputs(B, T, H, K, V, mode, seed=4).items()}
    content = (x["D"], x["U"]) if mode == "carve" else None
    grads = []
    for overwrite in (False, True):
        state = make_state(B, H, K, V, mode, C, seed=5)[0]
        state = CarveState(*(t.to(DEVICE, torch.float32) for t in state[:3]), state.offset)
        o, final = chunk_carve_triton(*(x[n] for n in NAMES), content, state, True, None, C)
        if overwrite:
            state.S.copy_(final.S.detach())
        o.float().pow(2).sum().backward()
        grads.append([x[n].grad.clone() for n in NAMES])
        for n in NAMES:
            x[n].grad = None
    for name, plain, overwritten in zip(NAMES, *grads):
        assert torch.equal(plain, overwritten), name


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("T1", [7, 16, 20, 32])
def test_continuation(mode, T1):
    """Triton chunk over T1 tokens, then Triton chunk and (separately) the Triton decode kernel over
    the rest, equal one call over all 40 (C = 16: splits inside, on and after chunk boundaries)."""
    B, H, T, K, V, C = 1, 2, 40, 16, 32, 16
    x = make_inputs(B, T, H, K, V, mode, seed=3)
    content = (x["D"], x["U"]) if mode == "carve" else None
    args = lambda sl: [x[n][:, sl].to(DEVICE) for n in NAMES]  # noqa: E731
    content = tuple(c.to(DEVICE) for c in content) if content else None
    o_full, s_full = chunk_carve_triton(*args(slice(None)), content, output_final_state=True, chunk_size=C)
    o1, s1 = chunk_carve_triton(*args(slice(0, T1)), content, output_final_state=True, chunk_size=C)
    for name, second in (("chunk", chunk_carve_triton), ("decode", recurrent_carve_triton)):
        o2, s2 = second(*args(slice(T1, T)), content, initial_state=s1, output_final_state=True, chunk_size=C)
        tag = f"triton continuation chunk+{name}"
        assert_rel(torch.cat([o1, o2], dim=1), o_full, TOL_FWD, f"{tag} o")
        assert_rel(s2.S, s_full.S, TOL_FWD, f"{tag} S")
        assert_rel(s2.o_sum, s_full.o_sum, TOL_FWD, f"{tag} o_sum")   # 40 = 2C + 8: a chunk under way
        assert s2.offset == s_full.offset == T
        if mode == "carve":
            assert_rel(s2.delta, s_full.delta, TOL_FWD, f"{tag} delta")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_continuation_many_pieces(mode, form):
    """Pieces of 3, 1, 17, 1, 1, 29 and 5 tokens (C = 16), alternating the Triton chunk kernels and the
    Triton decode kernel, most pieces starting and ending inside a chunk and a block: the outputs and
    the final state equal one call over all 57 tokens."""
    B, H, K, V, C = 1, 2, 16, 32, 16
    pieces = [3, 1, 17, 1, 1, 29, 5]
    x = make_inputs(B, sum(pieces), H, K, V, mode, seed=4)
    content = (x["D"].to(DEVICE), x["U"].to(DEVICE)) if mode == "carve" else None
    args = [x[n].to(DEVICE) for n in NAMES]
    chunk = lambda *a, **kw: chunk_carve_triton(*a, **kw, schedule=schedule(form, V))  # noqa: E731
    o_full, s_full = chunk(*args, content, output_final_state=True, chunk_size=C)
    outs, state, start = [], None, 0
    for i, n in enumerate(pieces):
        kernel = chunk if i % 2 == 0 else recurrent_carve_triton
        o, state = kernel(*[a[:, start:start + n] for a in args], content, initial_state=state,
                          output_final_state=True, chunk_size=C)
        outs.append(o)
        start += n
    assert_rel(torch.cat(outs, dim=1), o_full, TOL_FWD, "triton continuation pieces o")
    for name in ("S", "o_sum") + (("delta",) if mode == "carve" else ()):
        assert_rel(getattr(state, name), getattr(s_full, name), TOL_FWD, f"triton continuation pieces {name}")
    assert state.offset == sum(pieces)


def test_caller_autocast(monkeypatch):
    """Under a caller's bf16 autocast the chunk kernels still see fp32 inputs and run in fp32 (the
    state products would otherwise become bf16 dots)."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    x = make_inputs(2, 40, 2, 16, 16, "carve", seed=15)
    args = [x[n].to(DEVICE) for n in NAMES]
    content = (x["D"].to(DEVICE), x["U"].to(DEVICE))
    plain, _ = chunk_carve(*args, content, chunk_size=16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixed, _ = chunk_carve(*args, content, chunk_size=16)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_gates_at_and_below_the_floor(mode):
    """Channels at g = -20 per token (floored at -5: zero gradient) and at exactly -5 (the widest
    range the block factors see, exp(+-40)) stay finite and match the reference."""
    B, H, T, K, V, C = 1, 2, 35, 16, 32, 16
    x = make_inputs(B, T, H, K, V, mode, seed=5)
    x["g"] = model_style_gates(B, T, H, K, seed=6, fast_channels=5)
    x["g"][..., 5:8] = -5.0
    check(x, None, C, tag=f"triton chunk {mode} floor")


def test_l2norm_eps_convention():
    """Tokens whose q or k has norm ~1e-4, ~1e-8 (divided by eps) or exactly 0, as F.normalize."""
    B, H, T, K, V, C = 1, 2, 20, 16, 16, 16
    x = make_inputs(B, T, H, K, V, "carve", seed=8)
    for name, t_scale in (("q", {3: 1e-4, 5: 1e-8, 11: 0.0}), ("k", {2: 1e-4, 6: 1e-8, 12: 0.0, 17: 1e-8})):
        for t, s in t_scale.items():
            x[name][:, t] *= s
    check(x, None, C, tag="triton chunk l2norm")


def test_stop_gradient_through_m():
    """m is a stop-gradient read (docs/DESIGN.md section 2): the kernels' gradients equal the reference with
    m detached, and differ clearly from the reference where gradients flow through m."""
    B, H, T, K, V, C = 1, 2, 48, 16, 16, 16
    x = make_inputs(B, T, H, K, V, "carve", seed=7, content_scale=1.5)

    def flat(pairs, which):   # all gradients but D's and U's (which they get either way) as one vector
        return torch.cat([pair[which].flatten().cpu().double() for pair in pairs if pair[0] not in ("D", "U")])

    _, _, _, _, pairs = run_both(x, None, C)
    got, detached = flat(pairs, 1), flat(pairs, 2)
    attached = flat(run_both(x, None, C, detach_m=False)[4], 2)
    assert_rel(got, detached, TOL_GRAD, "triton chunk stop-grad")
    gap = rel_err(attached, detached)
    record("triton stop-grad: attached vs detached reference grads", gap)
    assert gap > 1e-2, "the two references barely differ: the test would not see a gradient through m"
    assert rel_err(got, attached) > 1e-2


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_every_output_element_is_written(poisoned_empty, mode, form):
    """The launchers allocate every output with torch.empty, NaN-filled here: an element the kernels
    miss (a masked row, a value block, a chunk's stored state, a gradient) shows up as NaN. GDN-2 has
    its own forward kernels (the solve in parallel, a walk over value blocks, then the outputs)."""
    B, H, T, K, V, C = 1, 2, 37, 16, 128, 32
    x = make_inputs(B, T, H, K, V, mode, seed=12)
    state, content = make_state(B, H, K, V, mode, C, prefix=53)  # the call starts mid-chunk
    if mode == "carve":
        x["D"], x["U"] = content
    o, final = check(x, state, C, tag=f"triton chunk poisoned {mode}", form=form)
    assert any(p is o for p in poisoned_empty) and any(p is final.S for p in poisoned_empty)
    assert len(poisoned_empty) >= 10  # forward and backward buffers (o, S, stored states, v_new, dv, dS0, ...)


def test_dispatch(monkeypatch):
    """CARVE_BACKEND=triton sends chunk_carve to the Triton kernels when they take the shapes
    (K, V powers of two up to 128, chunk_size a multiple of 16), else to the torch path."""
    calls = []
    monkeypatch.setattr(carve_kernel, "chunk_carve_triton",
                        lambda *a, **kw: calls.append(1) or chunk_carve_triton(*a, **kw))
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    for (V, C), expect in (((16, 16), 1), ((24, 16), 0), ((16, 8), 0)):
        x = make_inputs(1, 20, 2, 16, V, "gdn2")
        args = [x[n].to(DEVICE) for n in NAMES]
        calls.clear()
        o, _ = chunk_carve(*args, chunk_size=C)
        assert len(calls) == expect
        if not expect:
            assert torch.equal(o, chunk_carve_torch(*args, chunk_size=C)[0])
    with pytest.raises(ValueError, match="chunk_size a multiple of 16"):
        chunk_carve_triton(*args, chunk_size=8)


def test_compiles_without_graph_breaks():
    """carve::chunk_fwd with its registered backward: torch.compile(fullgraph=True) of forward and
    backward gives the eager values; opcheck checks the schema, fake and autograd registration of
    carve::chunk_fwd in both forms of the forward, and of carve::chunk_bwd."""
    x = make_inputs(1, 20, 2, 16, 16, "carve", seed=4)
    leaves = [x[n].to(DEVICE).requires_grad_() for n in NAMES]
    content = (x["D"].to(DEVICE), x["U"].to(DEVICE))

    def step(*tensors):
        o, final = chunk_carve_triton(*tensors, content, None, True, None, 16)
        return (o * o).sum() + final.S.sum()

    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    assert torch.equal(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.equal(a, b)
    # the sequence table (docs/DESIGN.md section 10) of one sequence of 20 tokens from offset 0 in chunks
    # of 16: first token 0, length 20, offset 0, stored chunks from 0, 2 chunks, stored blocks from 0
    table = [0, 20, 0, 0, 2, 0]
    # the schedule's fields: split_forward, walk_columns, forward_pieces, backward_columns, backward_pieces
    # the log-decay as g, or as a DecayGate's f, A_log, dt_bias and a_log_min
    gen = torch.Generator().manual_seed(5)
    decay_gate_inputs = [torch.randn(1, 20, 2, 16, generator=gen).to(DEVICE).requires_grad_(),
                         torch.rand(2, generator=gen).to(DEVICE).requires_grad_(),
                         torch.randn(2, 16, generator=gen).to(DEVICE).requires_grad_(), -5.0]
    for gate in ([leaves[3], None, None, 0.0], decay_gate_inputs):
        inputs = [*leaves[:3], *gate, *leaves[4:]]
        for plan in ((False, 16, 1, 16, 1), (True, 16, 2, 16, 2)):
            torch.library.opcheck(torch.ops.carve.chunk_fwd.default,
                                  (*inputs, *content, None, None, None, table, 0.25, 16, *plan, None, None, None, None))
        with torch.no_grad():
            out = torch.ops.carve.chunk_fwd(*inputs, *content, None, None, None, table, 0.25, 16, False, 16, 1, 16, 1,
                                            None, None, None, None)
        do = torch.randn_like(out[0])
        # inputs in another memory layout (as inductor may pass them): the outputs are still contiguous
        strided = [(t.detach().transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 4 else t.detach())
                   if torch.is_tensor(t) else t for t in inputs]
        for pieces in (1, 2):  # the reverse walk's columns and pieces
            torch.library.opcheck(torch.ops.carve.chunk_bwd.default,
                                  (strided + [do, None, out[4:], table, 0.25, 16, 16, pieces, False, None, None, None]))
    # f made inside from a low-rank input and its weight (a DecayGate whose f is a GateProjection)
    f_low, f_weight = (torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()
                       for shape in ((1, 20, 4), (32, 4)))
    inputs = [*leaves[:3], f_low, *decay_gate_inputs[1:], *leaves[4:]]
    torch.library.opcheck(torch.ops.carve.chunk_fwd.default,
                          (*inputs, *content, None, None, None, table, 0.25, 16, False, 16, 1, 16, 1, f_weight,
                           None, None, None))
    # q, k, v from a short conv whose input the op keeps instead (a ShortConv); doc_start of two documents
    conv_x = torch.randn(1, 20, 96, generator=gen).to(DEVICE).requires_grad_()
    conv_weight = torch.randn(96, 1, 4, generator=gen).to(DEVICE).requires_grad_()
    doc_start = torch.tensor([0] * 7 + [7] * 13, device=DEVICE)
    with torch.no_grad():
        qkv = carve_kernel.short_conv_qkv(carve_kernel.ShortConv(conv_x, conv_weight, doc_start), 2, 16)
    qkv = [t.requires_grad_() for t in qkv]
    conv_inputs = [*qkv, *decay_gate_inputs, *leaves[4:]]
    torch.library.opcheck(torch.ops.carve.chunk_fwd.default,
                          (*conv_inputs, *content, None, None, None, table, 0.25, 16, False, 16, 1, 16, 1, None,
                           conv_x, conv_weight, doc_start))
    with torch.no_grad():
        out = torch.ops.carve.chunk_fwd(*conv_inputs, *content, None, None, None, table, 0.25, 16, False, 16, 1, 16,
                                        1, None, conv_x, conv_weight, doc_start)
    bwd_inputs = [None, None, None, *[t.detach() if torch.is_tensor(t) else t for t in conv_inputs[3:]]]
    torch.library.opcheck(torch.ops.carve.chunk_bwd.default,
                          (bwd_inputs + [torch.randn_like(out[0]), None, out[4:], table, 0.25, 16, 16, 1, False,
                                         conv_x.detach(), conv_weight.detach(), doc_start]))


@pytest.mark.parametrize("mixer", ["carve", "gdn2,attn"])
def test_model_compiles_without_graph_breaks(monkeypatch, mixer):
    """A training step of the model on the Triton path under torch.compile(fullgraph=True): same loss
    and gradients, bit for bit (aot_eager keeps torch's own kernels around the custom ops)."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    torch.manual_seed(0)
    model = perturb(LM(tiny(mixer, head_k_dim=16, head_v_dim=16, chunk_size=16))).to(DEVICE)
    idx = tokens(2, 37, 61).to(DEVICE)

    def step(idx):
        return model(idx, idx)[1]

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        loss = fn(idx)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("mixer", ["carve", "gdn2"])
def test_compiled_step_keeps_no_recomputed_tensor(monkeypatch, mixer):
    """What a compiled training step keeps for its backward (the forward graph's saved tensors, as
    torch.compile's partitioner picks them): nothing made by the conv (q, k, v: the chunk op makes them
    again from the conv's input) and no [.., mlp_hidden] tensor (SiLU(gate) * up: swiglu_linear makes it
    again). Recomputed by torch ops in a backward formula, they would be merged with the forward's and kept."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    cfg = tiny(mixer, d_model=32, head_k_dim=16, head_v_dim=16, chunk_size=16, mlp_hidden=40)
    model = perturb(LM(cfg)).to(DEVICE)
    idx = tokens(2, 32, cfg.vocab_size).to(DEVICE)
    saved = []

    def partition(joint, inputs, **kw):
        forward, backward = min_cut_rematerialization_partition(joint, inputs, **kw)
        saved.extend(next(n for n in forward.graph.nodes if n.op == "output").args[0][kw["num_fwd_outputs"]:])
        return forward, backward

    def source(node):   # through views and splits to the op that made the tensor
        while node.op == "call_function" and (node.target is operator.getitem or "view" in str(node.target)
                                              or "split" in str(node.target) or "slice" in str(node.target)):
            node = node.args[0]
        return node.target

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm, partition_fn=partition)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = torch.compile(lambda idx: model(idx, idx)[1], backend=backend, fullgraph=True)(idx)
    loss.backward()
    tensors = [n for n in saved if n is not None and isinstance(n.meta.get("val"), torch.Tensor)]
    assert tensors and any(source(n) == torch.ops.carve.chunk_fwd.default for n in tensors)
    assert not [n for n in tensors if source(n) == torch.ops.carve.conv_silu.default]
    activations = [n.meta["val"] for n in tensors if n.meta["val"].shape[:-1].numel() == idx.numel()]
    # activations only: the down_proj weight's bf16 cast [d_model, mlp_hidden] may be kept
    assert not [t for t in activations if t.shape[-1] == cfg.mlp_hidden]


# ----------------------------------------------------------------------------- the model on the Triton path

@pytest.mark.parametrize("form", FORMS)
def test_model_identity_at_init(monkeypatch, form):
    """docs/DESIGN.md section 9: fresh GDN-2 weights in a fresh CARVE model give bit-identical logits
    on the Triton path too (on a GPU; in the interpreter to rounding), in every form of the forward
    (GDN-2 and CARVE run different kernels in the split form), the form forced through chunk_schedule."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    forced = schedule(form, 32)
    monkeypatch.setattr(carve_kernel, "chunk_schedule", lambda *args, **kwargs: forced)
    torch.manual_seed(0)
    gdn2 = LM(tiny("gdn2", head_k_dim=16, head_v_dim=32, chunk_size=16)).to(DEVICE)
    torch.manual_seed(1)
    carve = LM(tiny("carve", head_k_dim=16, head_v_dim=32, chunk_size=16)).to(DEVICE)
    carve.load_state_dict(gdn2.state_dict(), strict=False)
    idx = tokens(2, 3 * 16 + 5, 61).to(DEVICE)
    with torch.no_grad():
        assert_bits_on_gpu(carve(idx)[0], gdn2(idx)[0], 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("mixer,rank", [("carve", 4), ("gdn2", 4), ("carve", 0)],
                         ids=["carve", "gdn2", "carve-content_rank0"])
def test_model_training_step_matches_torch_path(monkeypatch, mixer, rank):
    """Loss and every parameter gradient of a perturbed model: Triton path = torch path (fp32)."""
    torch.manual_seed(0)
    model = perturb(LM(tiny(mixer, head_k_dim=16, head_v_dim=32, chunk_size=16, content_rank=rank))).to(DEVICE)
    idx = tokens(2, 41, 61, seed=1).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CARVE_BACKEND", backend)
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert_rel(results["triton"][0], results["torch"][0], TOL_FWD, f"model {mixer} loss triton vs torch")
    for name, grad in results["torch"][1].items():
        # A_log's gradient sums dg * g over every token and channel of a head, largely cancelling, and the two
        # paths sum in other orders (both fp32); test_decay_gate_inside_the_kernels holds the kernels' to
        # TOL_GRAD against float64
        tol = 3 * TOL_GRAD if name.endswith("A_log") else TOL_GRAD
        assert_rel(results["triton"][1][name], grad, tol, f"model {mixer} grad {name} triton vs torch")
    assert results["triton"][1]["blocks.0.mixer.in_proj.weight"].abs().sum() > 0
