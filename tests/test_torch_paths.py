"""The torch paths of carve_kernel (chunk_carve_torch behind chunk_carve, recurrent_carve_torch
behind recurrent_carve, and the decay gate decay_gate) against the independent float64 per-token
recurrence `reference` of tests/reference.py (docs/DESIGN.md sections 1-3).

`recurrent_carve_torch` is also the decode path, so it is tested here, not trusted. Both torch paths
(chunk_carve, recurrent_carve) are compared with the reference on the output, every field of the final
state, and every input gradient.
"""
import pytest
import torch

from carve_kernel import CarveState, DecayGate, chunk_carve, decay_gate, recurrent_carve
from reference import (TOL_BF16, TOL_FWD, TOL_GRAD, assert_error, assert_rel, gate_sweep, make_inputs,
                       make_state, model_style_gates, record, reference, rel_err, run_reference)

KERNELS = {"chunk": chunk_carve, "recurrent": recurrent_carve}


# ----------------------------------------------------------------------------- running a path

def run_kernel(kernel, x, state, chunk_size, dtype=torch.float32):
    """Leaves of `dtype` (g stays fp32, as documented), the kernel's output and final state."""
    leaves = {n: t.detach().to(torch.float32 if n in ("g", "D", "U") else dtype).requires_grad_()
              for n, t in x.items()}
    if state is not None:
        state = state._replace(S=state.S.detach().clone().requires_grad_(),
                               delta=state.delta.detach().clone().requires_grad_())
    content = (leaves["D"], leaves["U"]) if "D" in leaves else None
    o, final = kernel(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["b_logit"], leaves["w"],
                      content, initial_state=state, output_final_state=True, chunk_size=chunk_size)
    return leaves, state, o, final


def cotangents(o, S, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)


def loss_of(o, S, do, dS, delta=None, d_delta=None):
    """<o, do> + <S, dS> (+ <delta, d_delta>): random cotangents on the output and the final state at once."""
    dt = torch.float64 if S.dtype == torch.float64 else torch.float32
    loss = (o.to(dt) * do.to(dt)).sum() + (S * dS.to(S.dtype)).sum()
    return loss if delta is None else loss + (delta * d_delta.to(delta.dtype)).sum()


def grads(leaves, state, ref_leaves):
    """(name, kernel grad, reference grad) for every input, initial_state.S and .delta included."""
    out = [(n, leaves[n].grad, ref_leaves[n].grad) for n in leaves]
    if state is not None:
        out.append(("initial_state.S", state.S.grad, ref_leaves["S0"].grad))
        out.append(("initial_state.delta", state.delta.grad, ref_leaves["delta0"].grad))
    return out


def check_zero_state_parity(kernel, x, chunk_size, tag):
    """From a zero state: the output, the final S and every input gradient against the reference."""
    leaves, _, o, final = run_kernel(kernel, x, None, chunk_size)
    ref, o_ref, final_ref = run_reference(leaves, None, chunk_size)
    assert_rel(o, o_ref, TOL_FWD, f"{tag} o")
    assert_rel(final.S, final_ref[0], TOL_FWD, f"{tag} final S")
    do, dS = cotangents(o, final.S)
    loss_of(o, final.S, do, dS).backward()
    loss_of(o_ref, final_ref[0], do.double(), dS.double()).backward()
    for name, got, want in grads(leaves, None, ref):
        assert_rel(got, want, TOL_GRAD, f"{tag} grad {name}")


# (B, H, T, K, V, chunk_size)
SHAPES = [
    pytest.param(1, 1, 32, 16, 24, 16, id="T=2C"),
    pytest.param(2, 2, 37, 16, 24, 16, id="T=2C+5"),
    pytest.param(2, 1, 5, 16, 24, 16, id="T<C"),
    pytest.param(1, 2, 29, 16, 24, 8, id="C8-T=3C+5"),
    pytest.param(2, 2, 24, 32, 8, 8, id="C8-T=3C-K>V"),
    # chunks longer than 16 tokens: the chunk path may split a chunk into sub-chunks internally
    pytest.param(1, 2, 61, 16, 24, 32, id="C32-T=2C-3"),
    pytest.param(2, 1, 50, 16, 24, 24, id="C24-T=2C+2"),
]


# ----------------------------------------------------------------------------- parity, fp32

@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("B,H,T,K,V,C", SHAPES)
def test_parity_fp32(kernel, mode, with_state, B, H, T, K, V, C):
    x = make_inputs(B, T, H, K, V, mode)
    state = None
    if with_state:
        state, prefix_content = make_state(B, H, K, V, mode, C)
        if mode == "carve":  # the state came from this content projection; keep the test consistent
            x["D"], x["U"] = prefix_content
    leaves, state, o, final = run_kernel(KERNELS[kernel], x, state, C)
    ref, o_ref, final_ref = run_reference(leaves, state, C)

    assert o.dtype == torch.float32 and o.shape == (B, T, H, V)
    tag = f"{kernel} fp32"
    assert_rel(o, o_ref, TOL_FWD, f"{tag} o")
    assert_rel(final.S, final_ref[0], TOL_FWD, f"{tag} final S")
    assert final.S.dtype == final.o_sum.dtype == final.delta.dtype == torch.float32
    if (final_ref[1] != 0).any():
        assert_rel(final.o_sum, final_ref[1], TOL_FWD, f"{tag} final o_sum")
    else:  # the sequence ended on a chunk boundary: o_sum must be exactly reset
        assert torch.equal(final.o_sum, torch.zeros_like(final.o_sum))
    if (final_ref[2] != 0).any():
        assert_rel(final.delta, final_ref[2], TOL_FWD, f"{tag} final delta")
    else:
        assert torch.equal(final.delta, torch.zeros_like(final.delta))
    assert final.offset == final_ref[3] == (state.offset if state else 0) + T

    do, dS = cotangents(o, final.S)
    d_delta = torch.randn(final.delta.shape, generator=torch.Generator().manual_seed(4))
    loss_of(o, final.S, do, dS, final.delta, d_delta).backward()
    loss_of(o_ref, final_ref[0], do.double(), dS.double(), final_ref[2], d_delta.double()).backward()
    for name, got, want in grads(leaves, state, ref):
        if want is None:  # not used at all (D, U when no chunk finishes): nor by the kernel
            assert got is None or not got.any(), f"{name}: gradient where the reference has none"
            continue
        assert got is not None, f"no gradient reached {name}"
        assert_rel(got, want, TOL_GRAD, f"{tag} grad {name}")


def test_content_path_is_exercised():
    """Guard against vacuous CARVE parity: with the test's U, D the content gate changes the output
    of every chunk after the first by a lot, so an error in Delta could not hide under the tolerance."""
    B, H, T, K, V, C = 2, 2, 37, 16, 24, 16
    x = make_inputs(B, T, H, K, V, "carve")
    o, _ = chunk_carve(x["q"], x["k"], x["v"], x["g"], x["b_logit"], x["w"], (x["D"], x["U"]), chunk_size=C)
    o0, _ = chunk_carve(x["q"], x["k"], x["v"], x["g"], x["b_logit"], x["w"], (x["D"], 0 * x["U"]), chunk_size=C)
    assert torch.equal(o[:, :C], o0[:, :C])         # chunk 0 has m_{-1} = 0: Delta_0 = 0
    diff = rel_err(o[:, C:], o0[:, C:])
    record("content path changes o (rel)", diff)
    assert diff > 1e-2


@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
def test_explicit_scale_and_no_final_state(kernel):
    B, H, T, K, V, C = 1, 2, 19, 16, 24, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=9)
    args = [x[n] for n in ("q", "k", "v", "g", "b_logit", "w")]
    o, final = KERNELS[kernel](*args, (x["D"], x["U"]), scale=0.3, chunk_size=C)
    assert final is None
    o_ref, _ = reference(*[a.double() for a in args], (x["D"].double(), x["U"].double()), chunk_size=C, scale=0.3)
    assert_rel(o, o_ref, TOL_FWD, f"{kernel} fp32 o (scale=0.3)")
    assert rel_err(o, o_ref * K ** 0.5 / 0.3) > 0.1  # the default scale K^-1/2 would not pass


# ----------------------------------------------------------------------------- parity, bf16 inputs

@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("B,H,T,K,V,C", [SHAPES[1], SHAPES[3]])
def test_parity_bf16(kernel, mode, B, H, T, K, V, C):
    """bf16 q, k, v, b_logit, w (g fp32): the kernel upcasts and runs in fp32, so the reference is fed
    the same bf16-rounded values; only the bf16 output and bf16 gradients carry rounding error.
    The final state and the fp32 inputs' gradients never go through bf16 and keep the fp32 tolerances."""
    x = make_inputs(B, T, H, K, V, mode)
    state, prefix_content = make_state(B, H, K, V, mode, C)
    if mode == "carve":
        x["D"], x["U"] = prefix_content
    leaves, state, o, final = run_kernel(KERNELS[kernel], x, state, C, dtype=torch.bfloat16)
    ref, o_ref, final_ref = run_reference(leaves, state, C)
    assert o.dtype == torch.bfloat16 and final.S.dtype == torch.float32
    tag = f"{kernel} bf16"
    assert_rel(o, o_ref, TOL_BF16, f"{tag} o")
    assert_rel(final.S, final_ref[0], TOL_FWD, f"{tag} final S (fp32)")
    assert_rel(final.o_sum, final_ref[1], TOL_FWD, f"{tag} final o_sum (fp32)")
    if mode == "carve":
        assert_rel(final.delta, final_ref[2], TOL_FWD, f"{tag} final delta (fp32)")
    do, dS = cotangents(o, final.S)
    do = do.bfloat16().float()  # the same cotangent for both
    loss_of(o.float(), final.S, do, dS).backward()
    loss_of(o_ref, final_ref[0], do.double(), dS.double()).backward()
    for name, got, want in grads(leaves, state, ref):
        assert got.dtype == leaves.get(name, state.S).dtype
        # only bf16 leaves' gradients are rounded to bf16; g, D, U and the initial state's stay fp32
        tol = TOL_BF16 if got.dtype == torch.bfloat16 else TOL_GRAD
        assert_rel(got, want, tol, f"{tag} grad {name} ({str(got.dtype)[6:]})")


# ----------------------------------------------------------------------------- continuation

@pytest.mark.parametrize("second", ["chunk", "recurrent"])
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("T1", [1, 7, 8, 9, 16, 20, 39])
def test_continuation(second, mode, T1):
    """chunk_carve over T1 tokens, then `second` over the rest from the returned state, equals one
    chunk_carve call over all T tokens (C = 8, T = 40: splits before, on and after chunk boundaries)."""
    B, H, T, K, V, C = 2, 2, 40, 16, 24, 8
    x = make_inputs(B, T, H, K, V, mode, seed=3)
    content = (x["D"], x["U"]) if mode == "carve" else None
    args = lambda sl: [x[n][:, sl] for n in ("q", "k", "v", "g", "b_logit", "w")]  # noqa: E731
    o_full, s_full = chunk_carve(*args(slice(None)), content, output_final_state=True, chunk_size=C)
    o1, s1 = chunk_carve(*args(slice(0, T1)), content, output_final_state=True, chunk_size=C)
    assert s1.offset == T1
    o2, s2 = KERNELS[second](*args(slice(T1, T)), content, initial_state=s1, output_final_state=True,
                             chunk_size=C)
    tag = f"continuation chunk+{second}"
    assert_rel(torch.cat([o1, o2], dim=1), o_full, TOL_FWD, f"{tag} o")
    assert_rel(s2.S, s_full.S, TOL_FWD, f"{tag} S")
    assert s2.offset == s_full.offset == T
    assert torch.equal(s2.o_sum, torch.zeros_like(s2.o_sum))  # T = 40 ends on a chunk boundary
    if mode == "carve":
        assert_rel(s2.delta, s_full.delta, TOL_FWD, f"{tag} delta")
    # and both against the gold standard
    ref = {n: t.double() for n, t in x.items()}
    o_ref, _ = reference(ref["q"], ref["k"], ref["v"], ref["g"], ref["b_logit"], ref["w"],
                         (ref["D"], ref["U"]) if mode == "carve" else None, chunk_size=C)
    assert_rel(torch.cat([o1, o2], dim=1), o_ref, TOL_FWD, f"{tag} o vs reference")


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_continuation_many_pieces(mode):
    """Pieces of 3, 1, 9, 1, 1, 13, 5 tokens (C = 8), alternating chunk and recurrent calls, partial
    chunks at both ends of most pieces: the final state and all outputs equal one call."""
    B, H, K, V, C = 1, 2, 16, 24, 8
    pieces = [3, 1, 9, 1, 1, 13, 5]
    T = sum(pieces)
    x = make_inputs(B, T, H, K, V, mode, seed=4)
    content = (x["D"], x["U"]) if mode == "carve" else None
    names = ("q", "k", "v", "g", "b_logit", "w")
    o_full, s_full = chunk_carve(*[x[n] for n in names], content, output_final_state=True, chunk_size=C)
    outs, state, start = [], None, 0
    for i, n in enumerate(pieces):
        kernel = chunk_carve if i % 2 == 0 else recurrent_carve
        o, state = kernel(*[x[m][:, start:start + n] for m in names], content, initial_state=state,
                          output_final_state=True, chunk_size=C)
        outs.append(o)
        start += n
    assert_rel(torch.cat(outs, dim=1), o_full, TOL_FWD, "continuation pieces o")
    assert_rel(state.S, s_full.S, TOL_FWD, "continuation pieces S")
    assert_rel(state.o_sum, s_full.o_sum, TOL_FWD, "continuation pieces o_sum")
    if mode == "carve":
        assert_rel(state.delta, s_full.delta, TOL_FWD, "continuation pieces delta")
    assert state.offset == T


# ----------------------------------------------------------------------------- realistic gates

@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("gates", ["fast-decay", "near-zero"])
@pytest.mark.parametrize("C", [16, 64])
def test_gates_realistic(mode, gates, C):
    """Fast-decaying channels (g = -20 per token, below the floor of -5, which every path applies: G
    still falls to -5*C inside a chunk, and gamma^-1 would overflow fp32 after ~18 tokens) must give
    finite outputs and gradients (zero for g below the floor) that match the reference; so must g ~ 0
    (no decay: the state only grows through writes)."""
    B, H, T, K, V = 1, 2, 2 * C + 3, 16, 24
    x = make_inputs(B, T, H, K, V, mode, seed=5)
    if gates == "fast-decay":
        x["g"] = model_style_gates(B, T, H, K, seed=6, fast_channels=5)
        assert x["g"].min() <= -20 and x["g"].max() > -0.1
    else:
        x["g"] = -1e-4 * torch.rand(B, T, H, K, generator=torch.Generator().manual_seed(6))
    for kernel in ("chunk", "recurrent"):
        check_zero_state_parity(KERNELS[kernel], x, C, f"gates {gates} {kernel}")


# ----------------------------------------------------------------------------- the decay gate

def test_decay_gate_formula():
    """decay_gate (model.py's log-decay, in fp32) against g = -exp(max(A_log, a_log_min)) * log1p(exp(x)),
    x = f + dt_bias, written here in float64: within 1e-6 relative element by element, from softplus
    ~ e^-30 to past the threshold 20 where it is x itself (log1p(exp(x)) - x < 3e-9 there); heads
    whose A_log lies below a_log_min decay at the floor's rate exactly."""
    f, A_log, dt_bias, a_log_min = gate_sweep()
    g = decay_gate(f, A_log, dt_bias, a_log_min)
    assert g.dtype == torch.float32 and g.shape == f.shape
    x = (f + dt_bias).double()  # exact: multiples of 1/16 for the most part
    want = -A_log.double().clamp(min=a_log_min).exp()[:, None] * torch.log1p(torch.exp(x))
    assert_error(((g.double() - want).abs() / want.abs()).max().item(), 1e-6,
                 "decay_gate vs float64 formula, elementwise rel")
    assert torch.equal(g[:, 0], g[:, 2]) and torch.equal(g[:, 1], g[:, 2])  # A_log = -9, -5.5 floored at -5
    assert not torch.equal(g[:, 3], g[:, 2])


# ----------------------------------------------------------------------------- L2 norm convention

@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
def test_l2norm_eps_convention(kernel):
    """q and k are normalised as x / max(||x||, 1e-6) (F.normalize, eps 1e-6): tokens whose q or k has
    norm ~1e-4 (normalised to unit length), ~1e-8 (divided by eps instead), or exactly 0."""
    B, H, T, K, V, C = 1, 2, 20, 16, 24, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=8)
    for name, t_scale in (("q", {3: 1e-4, 5: 1e-8, 11: 0.0}), ("k", {2: 1e-4, 6: 1e-8, 12: 0.0, 13: 1e-8})):
        for t, s in t_scale.items():
            x[name][:, t] *= s
    check_zero_state_parity(KERNELS[kernel], x, C, f"l2norm {kernel}")


# ----------------------------------------------------------------------------- stop-gradient on m

@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
def test_stop_gradient_through_m(kernel):
    """m is a stop-gradient read (docs/DESIGN.md section 2): the kernel's gradients equal the reference with m
    detached, and differ clearly from the reference where gradients flow through m."""
    B, H, T, K, V, C = 1, 2, 24, 16, 24, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=7, content_scale=1.5)
    leaves, _, o, final = run_kernel(KERNELS[kernel], x, None, C)
    do, dS = cotangents(o, final.S)
    loss_of(o, final.S, do, dS).backward()
    ref_grads = {}
    for detach_m in (True, False):
        ref, o_ref, final_ref = run_reference(leaves, None, C, detach_m=detach_m)
        loss_of(o_ref, final_ref[0], do.double(), dS.double()).backward()
        ref_grads[detach_m] = ref
    names = [n for n in leaves if n not in ("D", "U")]  # D, U get gradients either way
    got = torch.cat([leaves[n].grad.flatten() for n in names])
    detached = torch.cat([ref_grads[True][n].grad.flatten() for n in names])
    attached = torch.cat([ref_grads[False][n].grad.flatten() for n in names])
    assert_rel(got, detached, TOL_GRAD, f"stop-grad {kernel} grads vs detached-m reference")
    gap = rel_err(attached, detached)
    record("stop-grad: attached vs detached reference grads", gap)
    assert gap > 1e-2, "the two references barely differ: the test would not see a gradient through m"
    assert rel_err(got, attached) > 1e-2


# ----------------------------------------------------------------------------- input validation

def _valid(B=2, T=5, H=2, K=4, V=6, r=3):
    return dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                g=-torch.rand(B, T, H, K), b_logit=torch.randn(B, T, H, K), w=torch.rand(B, T, H),
                content=(torch.randn(H, r, V), torch.randn(H, K, r)),
                initial_state=CarveState(torch.zeros(B, H, K, V), torch.zeros(B, H, V), torch.zeros(B, H, K), 3))


BAD = [
    ("k", lambda a: a.update(k=torch.randn(2, 5, 2, 5)), r"\bk\b"),
    ("v-T", lambda a: a.update(v=torch.randn(2, 4, 2, 6)), r"\bv\b"),
    ("g", lambda a: a.update(g=-torch.rand(2, 5, 2, 6)), r"\bg\b"),
    ("b_logit", lambda a: a.update(b_logit=torch.randn(2, 5, 1, 4)), "b_logit"),
    ("w-4d", lambda a: a.update(w=torch.rand(2, 5, 2, 4)), r"\bw\b"),
    ("w-2d", lambda a: a.update(w=torch.rand(2, 5)), r"\bw\b"),
    ("content-D", lambda a: a.update(content=(torch.randn(2, 3, 4), torch.randn(2, 4, 3))), "content"),
    ("content-U", lambda a: a.update(content=(torch.randn(2, 3, 6), torch.randn(2, 6, 3))), "content"),
    ("initial_state.S", lambda a: a.update(initial_state=a["initial_state"]._replace(S=torch.zeros(2, 2, 6, 4))),
     r"initial_state\.S"),
    ("DecayGate.dt_bias", lambda a: a.update(g=DecayGate(torch.randn(2, 5, 2, 4), torch.randn(2), torch.randn(8), -5)),
     r"DecayGate\.dt_bias has shape \(8,\), expected \(2, 4\)"),
    ("DecayGate.A_log", lambda a: a.update(g=DecayGate(torch.randn(2, 5, 2, 4), torch.randn(1), torch.randn(2, 4), -5)),
     r"DecayGate\.A_log"),
]


@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_input_validation(kernel, bad):
    args = _valid()
    KERNELS[kernel](**args, chunk_size=4)  # the valid set runs
    _, mutate, pattern = bad
    mutate(args)
    with pytest.raises(ValueError, match=pattern):
        KERNELS[kernel](**args, chunk_size=4)


@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
def test_caller_autocast_does_not_lower_the_recurrence_precision(kernel):
    """Under a caller's bf16 autocast (train.py on GPU) the recurrence must still run in fp32: autocast
    would otherwise turn the state products into bf16 matmuls (relative error ~1e-2)."""
    x = make_inputs(2, 40, 2, 16, 24, "carve")
    args = (x["q"], x["k"], x["v"], x["g"], x["b_logit"], x["w"], (x["D"], x["U"]))
    plain, _ = KERNELS[kernel](*args, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = KERNELS[kernel](*args, chunk_size=16)
    assert mixed.dtype == torch.float32
    assert_rel(mixed, plain, 1e-6, "autocast-invariance")
