"""The Triton decode kernels against the float64 reference of tests/reference.py: the per-token kernel
behind `recurrent_carve` (`recurrent_carve_triton`, custom op carve::recurrent), the fused decode step
of a layer (`decode_step_triton` behind `fused_decode_step`, custom op carve::decode_step) with its
decay gate, the model's prefill + Triton decode against one forward, and the backend dispatch rules
of `backend_for` / `recurrent_carve` (docs/DESIGN.md sections 6 and 8).

Without a GPU the kernels run on CPU tensors in the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so the shapes are small. With a GPU the same tests
run the compiled kernels on CUDA tensors.
"""
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import carve_kernel
from carve_kernel import CarveState, backend_for, causal_conv_silu_torch, chunk_carve, chunk_carve_torch, decay_gate, \
    decode_step_triton, recurrent_carve, recurrent_carve_torch, recurrent_carve_triton, runs_in_interpreter
from model import LM
from reference import (DEVICE, NAMES, TOL_BF16, TOL_FWD, TOL_LOGITS, assert_error, assert_rel, gate_sweep,
                       make_inputs, make_state, needs_triton, perturb, poisoned_allocations, prefill_then_decode,
                       reference, run_reference, state_without_content, tiny, tokens)


def on_device(x, state, dtype):
    """The kernel's arguments on DEVICE: q, k, v, b_logit, w in `dtype`, g fp32 (as documented)."""
    args = [x[n].to(DEVICE, torch.float32 if n == "g" else dtype) for n in NAMES]
    content = (x["D"].to(DEVICE), x["U"].to(DEVICE)) if "D" in x else None
    if state is not None:
        state = CarveState(state.S.to(DEVICE), state.o_sum.to(DEVICE), state.delta.to(DEVICE), state.offset)
    return args, content, state


def poisoned(kernel, *args, **kw):
    """kernel(*args, **kw) with every buffer its launcher allocates starting as NaN (poisoned_allocations):
    an element it does not write fails the comparison with the reference."""
    with poisoned_allocations() as made:
        result = kernel(*args, **kw)
    assert made, "the launcher no longer allocates with torch.empty"
    return result


def check_against_reference(o, final, args, content, state, C, dtype, tag):
    """o and every CarveState field against the float64 reference run on the same (rounded) inputs."""
    leaves = {n: a.detach().cpu() for n, a in zip(NAMES, args)}
    if content is not None:
        leaves["D"], leaves["U"] = (c.cpu() for c in content)
    cpu_state = None if state is None else CarveState(*(t.cpu() for t in state[:3]), state.offset)
    _, o_ref, (S_ref, o_sum_ref, delta_ref, offset_ref) = run_reference(leaves, cpu_state, C)
    o, final = o.cpu(), CarveState(*(t.cpu() for t in final[:3]), final.offset)
    B, T, H, _ = args[0].shape
    assert o.dtype == dtype and tuple(o.shape) == (B, T, H, args[2].shape[-1])
    assert final.S.dtype == final.o_sum.dtype == final.delta.dtype == torch.float32
    assert_rel(o, o_ref, TOL_FWD if dtype == torch.float32 else TOL_BF16, f"{tag} o")
    assert_rel(final.S, S_ref, TOL_FWD, f"{tag} final S")
    for name, got, want in (("o_sum", final.o_sum, o_sum_ref), ("delta", final.delta, delta_ref)):
        if (want != 0).any():
            assert_rel(got, want, TOL_FWD, f"{tag} final {name}")
        else:  # ended on a chunk boundary (o_sum), or GDN-2 / no chunk finished yet (delta): exactly 0
            assert torch.equal(got, torch.zeros_like(want, dtype=torch.float32)), f"{tag} {name} not 0"
    assert final.offset == offset_ref == (state.offset if state is not None else 0) + T


# ----------------------------------------------------------------------------- parity with the reference

# (B, H, T, K, V, C, prefix): prefix = length of the sequence before this call (None: zero state);
# make_state runs the reference over it, so o_sum, and for CARVE delta, are non-zero.
CASES = [
    pytest.param(2, 2, 1, 16, 32, 8, None, id="T1-zero-state"),
    pytest.param(2, 2, 1, 16, 32, 8, 13, id="T1-offset13"),
    pytest.param(2, 2, 1, 32, 16, 8, 15, id="T1-offset15-finishes-chunk-K>V"),
    pytest.param(2, 2, 32, 16, 32, 8, None, id="T32-zero-state-4-chunks"),
    pytest.param(2, 2, 27, 16, 32, 8, 13, id="T27-offset13-ends-on-boundary"),
    pytest.param(1, 2, 37, 32, 16, 16, 21, id="T37-offset21-C16-K>V"),
    pytest.param(1, 2, 13, 16, 24, 8, 13, id="T13-offset13-V24-masked"),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("B,H,T,K,V,C,prefix", CASES)
def test_parity(mode, dtype, B, H, T, K, V, C, prefix):
    x = make_inputs(B, T, H, K, V, mode)
    state = None
    if prefix is not None:
        state, prefix_content = make_state(B, H, K, V, mode, C, prefix=prefix)
        if mode == "carve":  # the state came from this content projection
            x["D"], x["U"] = prefix_content
    args, content, state = on_device(x, state, dtype)
    o, final = poisoned(recurrent_carve_triton, *args, content, initial_state=state, output_final_state=True,
                        chunk_size=C)
    check_against_reference(o, final, args, content, state, C, dtype, f"triton {mode} {str(dtype)[6:]}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_without_content(dtype):
    """CARVE's scalar write strength with no content projection (the model's content_rank=0): Delta stays 0,
    from a zero state and from a state after a prefix that ends inside a chunk."""
    B, H, T, K, V, C = 2, 2, 13, 16, 24, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=5)
    del x["D"], x["U"]
    for state in (None, state_without_content(B, H, K, V, C, seed=6)):
        args, content, state = on_device(x, state, dtype)
        assert content is None
        o, final = poisoned(recurrent_carve_triton, *args, None, initial_state=state, output_final_state=True,
                            chunk_size=C)
        check_against_reference(o, final, args, None, state, C, dtype, f"triton carve without content {dtype}")


@needs_triton
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_decode_steps_equal_one_sequence(mode):
    """T = 2C + 3 single-token calls, each continuing from the last one's state (the decode loop,
    through two content updates), equal the reference over the whole sequence."""
    B, H, K, V, C = 2, 2, 16, 32, 8
    T = 2 * C + 3
    x = make_inputs(B, T, H, K, V, mode, seed=11)
    args, content, _ = on_device(x, None, torch.float32)
    outs, state = [], None
    for t in range(T):
        o, state = poisoned(recurrent_carve_triton, *[a[:, t:t + 1] for a in args], content, initial_state=state,
                            output_final_state=True, chunk_size=C)
        outs.append(o)
    check_against_reference(torch.cat(outs, dim=1), state, args, content, None, C, torch.float32,
                            f"triton {mode} decode steps")


@needs_triton
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
def test_parity_narrow_tiles(mode):
    """V = 24 in value blocks of 8 (value_columns; the default tile covers the small V of these tests
    in one): three programs per head, over four chunk boundaries."""
    B, H, T, K, V, C = 2, 2, 29, 32, 24, 8
    x = make_inputs(B, T, H, K, V, mode, seed=16)
    state, prefix_content = make_state(B, H, K, V, mode, C, prefix=13)
    if mode == "carve":
        x["D"], x["U"] = prefix_content
    args, content, state = on_device(x, state, torch.float32)
    o, final = poisoned(recurrent_carve_triton, *args, content, initial_state=state, output_final_state=True,
                        chunk_size=C, value_columns=8)
    check_against_reference(o, final, args, content, state, C, torch.float32, f"triton {mode} BV=8")


@needs_triton
@pytest.mark.parametrize("projected", [False, True], ids=["f", "GateProjection"])
def test_takes_a_decay_gate(projected):
    """Given a DecayGate (f itself, or a GateProjection(x, W, None) making it), recurrent_carve_triton gives,
    bit for bit, what it gives for the g that decay_gate makes of the same inputs."""
    B, H, T, K, V, C, rank = 2, 2, 11, 16, 16, 8, 4
    x = make_inputs(B, T, H, K, V, "carve", seed=17)
    args, content, _ = on_device(x, None, torch.float32)
    gen = torch.Generator().manual_seed(18)
    f_low, f_weight, dt_bias = (t.to(DEVICE) for t in (torch.randn(B, T, rank, generator=gen),
                                                       torch.randn(H * K, rank, generator=gen),
                                                       torch.randn(H, K, generator=gen) - 2))
    A_log = torch.tensor([0.3, 1.5], device=DEVICE)
    f = F.linear(f_low, f_weight).view(B, T, H, K)
    gate = carve_kernel.DecayGate(carve_kernel.GateProjection(f_low, f_weight, None) if projected else f,
                                  A_log, dt_bias, -5.0)
    g = decay_gate(f, A_log, dt_bias, -5.0)
    results = [recurrent_carve_triton(*args[:3], decay, *args[4:], content, output_final_state=True, chunk_size=C)
               for decay in (gate, g)]
    (o, final), (o_want, final_want) = results
    assert torch.equal(o, o_want)
    for name in ("S", "o_sum", "delta"):
        assert torch.equal(getattr(final, name), getattr(final_want, name)), name


@needs_triton
def test_l2norm_eps_convention():
    """q and k are normalised in the kernel as x / max(||x||, 1e-6) (F.normalize, eps 1e-6): tokens
    whose q or k has norm ~1e-4 (normalised to unit length), ~1e-8 (divided by eps), or exactly 0."""
    B, H, T, K, V, C = 1, 2, 14, 16, 16, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=8)
    for name, t_scale in (("q", {3: 1e-4, 5: 1e-8, 11: 0.0}), ("k", {2: 1e-4, 6: 1e-8, 12: 0.0, 13: 1e-8})):
        for t, s in t_scale.items():
            x[name][:, t] *= s
    args, content, _ = on_device(x, None, torch.float32)
    o, final = recurrent_carve_triton(*args, content, output_final_state=True, chunk_size=C)
    check_against_reference(o, final, args, content, None, C, torch.float32, "triton l2norm")


@needs_triton
def test_every_output_element_is_written(poisoned_empty):
    """The launcher allocates o and the state with torch.empty, NaN-filled here: any element the
    kernel misses (a segment, a value block, the half-masked last block of V = 24 in blocks of 16)
    would show up as NaN."""
    B, H, T, K, V, C = 1, 2, 13, 16, 24, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=12)
    state, (x["D"], x["U"]) = make_state(B, H, K, V, "carve", C, prefix=13)
    args, content, state = on_device(x, state, torch.float32)
    poisoned_empty.clear()
    o, final = recurrent_carve_triton(*args, content, initial_state=state, output_final_state=True, chunk_size=C,
                                      value_columns=16)
    assert any(p is o for p in poisoned_empty) and any(p is final.S for p in poisoned_empty)
    assert any(p is final.o_sum for p in poisoned_empty)
    for t in (o, final.S, final.o_sum, final.delta):
        assert torch.isfinite(t).all()
    check_against_reference(o, final, args, content, state, C, torch.float32, "triton poisoned")


class CloneLog(TorchDispatchMode):
    """Records the storage of every tensor that aten.clone (what Tensor.contiguous calls to copy) copies."""

    def __init__(self):
        super().__init__()
        self.sources = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.clone.default:
            self.sources.add(args[0].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


@needs_triton
def test_strided_inputs():
    """q, k, v as views of one fused projection (as model.py passes them: batch and time strides
    but packed heads) run without a copy; a [B, H, T, D] tensor transposed to [B, T, H, D] is not
    packed and is copied. Both give exactly the result of contiguous inputs. The copies are seen as
    the aten.clone calls the launcher makes (a dispatch mode records them)."""
    B, H, T, K, V, C = 2, 2, 11, 16, 32, 8
    x = make_inputs(B, T, H, K, V, "gdn2", seed=13)
    args, _, _ = on_device(x, None, torch.float32)
    want, want_state = recurrent_carve_triton(*args, output_final_state=True, chunk_size=C)
    q, k, v, g, b_logit, w = args
    fused = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)        # [B, T, H*(2K+V)]
    fq, fk, fv = fused.split([H * K, H * K, H * V], dim=-1)
    fq, fk, fv = fq.view(B, T, H, K), fk.view(B, T, H, K), fv.view(B, T, H, V)
    assert not fq.is_contiguous()
    bhtd = b_logit.transpose(1, 2).contiguous().transpose(1, 2)                   # heads not packed
    with CloneLog() as clones:
        got, got_state = recurrent_carve_triton(fq, fk, fv, g, bhtd, w, output_final_state=True, chunk_size=C)
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage(fused) not in clones.sources, "a view of the fused projection was copied"
    assert storage(bhtd) in clones.sources, "the [B, H, T, D] layout was not made packed"
    assert torch.equal(got, want) and torch.equal(got_state.S, want_state.S)


@needs_triton
def test_explicit_scale_and_no_final_state():
    B, H, T, K, V, C = 1, 2, 9, 16, 16, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=9)
    args, content, _ = on_device(x, None, torch.float32)
    o, final = poisoned(recurrent_carve_triton, *args, content, scale=0.3, chunk_size=C)
    assert final is None
    o_ref, _ = reference(*[x[n].double() for n in NAMES], (x["D"].double(), x["U"].double()),
                         chunk_size=C, scale=0.3)
    assert_rel(o.cpu(), o_ref, TOL_FWD, "triton o (scale=0.3)")


@needs_triton
def test_refuses_inputs_that_need_a_gradient():
    x = make_inputs(1, 3, 2, 16, 16, "gdn2")
    args, _, _ = on_device(x, None, torch.float32)
    args[2].requires_grad_()
    with pytest.raises(RuntimeError, match="inference only"):
        recurrent_carve_triton(*args)
    with torch.no_grad():
        recurrent_carve_triton(*args)


# ----------------------------------------------------------------------------- dispatch

@needs_triton
def test_backend_default_and_override(monkeypatch):
    cpu, cuda = torch.zeros(1), types.SimpleNamespace(is_cuda=True)  # backend_for reads x.is_cuda only
    monkeypatch.delenv("CARVE_BACKEND", raising=False)
    assert backend_for(cpu) == "torch" and backend_for(cuda) == "triton"
    monkeypatch.setenv("CARVE_BACKEND", "torch")
    assert backend_for(cpu) == "torch" and backend_for(cuda) == "torch"
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    assert backend_for(cuda) == "triton"
    if runs_in_interpreter():
        assert backend_for(cpu) == "triton"
    # CPU tensors without the interpreter: a clear error (simulated)
    monkeypatch.setattr(carve_kernel, "runs_in_interpreter", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(cpu)
    monkeypatch.setenv("CARVE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CARVE_BACKEND"):
        backend_for(cpu)


def test_backend_without_triton(monkeypatch):
    monkeypatch.setattr(carve_kernel, "triton", None)
    cpu, cuda = torch.zeros(1), types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("CARVE_BACKEND", raising=False)
    assert backend_for(cpu) == "torch" and backend_for(cuda) == "torch"
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        backend_for(cuda)


def test_module_imports_without_triton(monkeypatch):
    """carve_kernel loads, and its torch paths run, where `import triton` fails: every call dispatches
    to torch, and CARVE_BACKEND=triton says why it cannot be followed."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delenv("CARVE_BACKEND", raising=False)
    spec = importlib.util.spec_from_file_location("carve_kernel_without_triton", carve_kernel.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None and not module.runs_in_interpreter()
    cuda = types.SimpleNamespace(is_cuda=True)  # backend_for reads x.is_cuda only
    assert module.backend_for(cuda) == "torch"
    x = make_inputs(1, 20, 2, 16, 16, "gdn2")
    o, _ = module.recurrent_carve(*[x[n] for n in NAMES])
    assert torch.equal(o, recurrent_carve_torch(*[x[n] for n in NAMES])[0])
    o, _ = module.chunk_carve(*[x[n] for n in NAMES], chunk_size=16)  # a shape the Triton kernels take
    assert torch.equal(o, chunk_carve_torch(*[x[n] for n in NAMES], chunk_size=16)[0])
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        module.chunk_carve(*[x[n] for n in NAMES], chunk_size=16)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the two recurrent implementations behind recurrent_carve."""
    counts = {"torch": 0, "triton": 0}
    for name, fn in (("torch", recurrent_carve_torch),     # called by recurrent_carve
                     ("triton", recurrent_carve_triton)):  # by the custom op carve::recurrent
        def counted(*a, _fn=fn, _name=name, **kw):
            counts[_name] += 1
            return _fn(*a, **kw)
        monkeypatch.setattr(carve_kernel, f"recurrent_carve_{name}", counted)
    return counts


@needs_triton
def test_recurrent_dispatch(monkeypatch, calls):
    """CARVE_BACKEND=triton sends recurrent_carve to the Triton kernel unless a gradient is needed
    (grad mode on and any input, the content projection or the initial state requiring grad);
    chunk_carve with chunk_size 8 (the Triton chunk kernels need a multiple of 16) stays on the torch path."""
    B, H, T, K, V, C = 1, 2, 3, 16, 16, 8
    x = make_inputs(B, T, H, K, V, "carve", seed=14)
    state, (x["D"], x["U"]) = make_state(B, H, K, V, "carve", C, prefix=13)
    args, content, state = on_device(x, state, torch.float32)

    def route(args=args, content=content, state=state, grad=True):
        before = dict(calls)
        with torch.set_grad_enabled(grad):
            o, _ = recurrent_carve(*args, content, initial_state=state, chunk_size=C)
        used = [n for n in calls if calls[n] > before[n]]
        assert len(used) == 1
        return used[0]

    monkeypatch.setenv("CARVE_BACKEND", "torch")
    assert route() == "torch"
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    assert route() == "triton"
    needs = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    assert route(args=[needs(args[0])] + args[1:]) == "torch"
    assert route(args=[needs(args[0])] + args[1:], grad=False) == "triton"
    assert route(content=(content[0], needs(content[1]))) == "torch"
    assert route(state=state._replace(S=needs(state.S))) == "torch"
    # a gradient through the Triton backend is the torch path's gradient
    q = needs(args[0])
    o, _ = recurrent_carve(q, *args[1:], content, initial_state=state, chunk_size=C)
    o.sum().backward()
    q_ref = needs(args[0])
    recurrent_carve_torch(q_ref, *args[1:], content, initial_state=state, chunk_size=C)[0].sum().backward()
    assert torch.equal(q.grad, q_ref.grad)
    o, _ = chunk_carve(*args, content, initial_state=state, chunk_size=C)
    assert torch.equal(o, chunk_carve_torch(*args, content, initial_state=state, chunk_size=C)[0])
    assert calls == {"torch": 5, "triton": 2}


@needs_triton
def test_caller_autocast(monkeypatch):
    """Under a caller's bf16 autocast the content update (an einsum in the launcher) stays fp32."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    x = make_inputs(2, 19, 2, 16, 16, "carve", seed=15)
    args, content, _ = on_device(x, None, torch.float32)
    plain, _ = recurrent_carve(*args, content, chunk_size=8)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixed, _ = recurrent_carve(*args, content, chunk_size=8)
    assert mixed.dtype == torch.float32
    assert_rel(mixed, plain, 1e-6, "triton autocast-invariance")


# ----------------------------------------------------------------------------- model

@needs_triton
@pytest.mark.parametrize("mixer,dims,rank", [("carve", (16, 32), 4), ("gdn2", (16, 32), 4), ("carve,attn", (8, 12), 4),
                                              ("carve", (16, 32), 0)],
                         ids=["carve", "gdn2", "carve,attn-K8-V12", "carve-content_rank0"])
def test_model_prefill_then_triton_decode(monkeypatch, calls, mixer, dims, rank):
    """With CARVE_BACKEND=triton, prefill (chunk_carve: torch path for C = 8) and then one token at a time
    (the fused Triton decode step: conv, gates and recurrence in one kernel) equals one forward over the
    whole sequence (docs/DESIGN.md section 6): C = 8, T = 21, prefill 6 tokens, so the decode steps cross two
    chunk boundaries."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the conv of a GPU run in fp32
    fused = []  # the custom op carve::decode_step calls carve_kernel.decode_step_triton
    monkeypatch.setattr(carve_kernel, "decode_step_triton",
                        lambda *a, **kw: fused.append(1) or decode_step_triton(*a, **kw))
    torch.manual_seed(0)
    model = perturb(LM(tiny(mixer, head_k_dim=dims[0], head_v_dim=dims[1], content_rank=rank))).eval().to(DEVICE)
    B, T, T1 = 2, 21, 6
    idx = tokens(B, T, model.cfg.vocab_size, seed=3).to(DEVICE)
    full, stepped = prefill_then_decode(model, idx, T1)
    recurrent_layers = sum(m != "attn" for m in model.cfg.layer_mixers())
    assert calls == {"torch": 0, "triton": 0} and len(fused) == (T - T1) * recurrent_layers
    assert_rel(stepped, full, TOL_LOGITS, f"triton prefill+decode logits ({mixer})")


@needs_triton
@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset", [6, 7], ids=["mid-chunk", "chunk-end"])
def test_fused_decode_step(mode, dtype, offset):
    """decode_step_triton against what model.py does without it (causal_conv_silu_torch, the gates in torch,
    recurrent_carve_torch) on the same projections: bf16 projections round the conv, SiLU and
    sigmoid outputs to bf16 as torch's bf16 ops do. It updates the state and the conv cache in place.
    At offset 7 (C = 8) the step finishes a chunk, so the content update runs and o_sum is reset;
    V = 24 masks part of a value block."""
    B, H, K, V, C, W = 3, 2, 16, 24, 8, 4
    gen = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    n_ch = 2 * H * K + H * V
    x, f, b_logit = r(B, 1, n_ch).to(dtype), r(B, 1, H * K).to(dtype), r(B, 1, H * K).to(dtype)
    w_raw = r(B, 1, H * V if mode == "gdn2" else H).to(dtype)
    conv_weight, conv_cache = 0.5 * r(n_ch, 1, W), r(B, n_ch, W - 1).to(dtype)
    A_log, dt_bias = torch.empty(H).uniform_(1, 16, generator=gen).log(), r(H * K) - 3
    content = (r(H, 4, V), r(H, K, 4)) if mode == "carve" else None
    state = CarveState(0.3 * r(B, H, K, V), r(B, H, V), 0.3 * r(B, H, K), offset)
    dev = lambda t: t.to(DEVICE).clone()  # noqa: E731  (a copy: the step writes into it)
    live_state, live_cache = CarveState(*map(dev, state[:3]), offset), dev(conv_cache)
    o = poisoned(
        decode_step_triton, dev(x[:, 0]), dev(conv_weight), live_cache, dev(f[:, 0]), dev(A_log), dev(dt_bias),
        dev(b_logit[:, 0]), dev(w_raw[:, 0]), live_state, tuple(map(dev, content)) if content else None, -5.0,
        chunk_size=C)
    qkv, cache_ref = causal_conv_silu_torch(x, conv_weight, conv_cache)
    q, k, v = (t.reshape(B, 1, H, -1) for t in qkv.split([H * K, H * K, H * V], dim=-1))
    g = -A_log.exp()[:, None] * F.softplus(f.float().reshape(B, 1, H, K) + dt_bias.view(H, K))
    w = torch.sigmoid(w_raw).view(B, 1, H, V) if mode == "gdn2" else torch.sigmoid(w_raw)
    o_ref, final_ref = recurrent_carve_torch(q, k, v, g, b_logit.view(B, 1, H, K), w, content, state, True,
                                             chunk_size=C)
    assert o.dtype == dtype and live_cache.dtype == dtype
    assert torch.equal(live_cache.cpu(), cache_ref)  # the shifted inputs, exactly
    # bf16: the kernel rounds the conv, SiLU and sigmoid outputs to bf16 as torch does, but Triton 3.9's
    # interpreter converts fp32 to bf16 by truncation (half of random values land one bf16 step from
    # torch's round-to-nearest; compiled kernels round to nearest), so on a CPU those roundings add up
    # to ~1e-2; a wrong tap, gate or activation is off by far more
    tol = TOL_FWD if dtype == torch.float32 else (2 * TOL_BF16 if runs_in_interpreter() else TOL_BF16)
    assert_rel(o.cpu(), o_ref, tol, f"fused decode o {mode} {dtype}")
    assert_rel(live_state.S.cpu(), final_ref.S, tol, f"fused decode S {mode} {dtype}")
    if offset == 7:
        assert not live_state.o_sum.any()  # the chunk finished: o_sum reset
    else:
        assert_rel(live_state.o_sum.cpu(), final_ref.o_sum, tol, f"fused decode o_sum {mode} {dtype}")
    assert_rel(live_state.delta.cpu(), final_ref.delta, tol, f"fused decode delta {mode} {dtype}")


if carve_kernel.triton is not None:
    tl = carve_kernel.triton.language

    @carve_kernel.triton.jit
    def _decay_gate_probe(x, A_log, out, n, a_log_min, BLOCK: tl.constexpr):
        """out = _decay_gate(x, A_log, a_log_min) for n values of x = f + dt_bias, each with its A_log."""
        o = tl.arange(0, BLOCK)
        m = o < n
        g = carve_kernel._decay_gate(tl.load(x + o, mask=m, other=0.0), tl.load(A_log + o, mask=m, other=0.0),
                                     a_log_min)
        tl.store(out + o, g, mask=m)


@needs_triton
def test_decay_gate_triton_twin():
    """_decay_gate, decay_gate's Triton twin inside the fused decode step (a private helper: a kernel is
    its only caller, so this test runs it through a probe kernel of its own), against decay_gate over
    gate_sweep's regimes: x from -30 to 40 and A_log below, at and above a_log_min.

    Norm-wise within 1e-6 relative. Element by element:
    - softplus(x) > 1 (up to and past the threshold 20, where it is x): within 1e-6 relative.
    - softplus(x) <= 1 (the twin's log1p form): within 1e-6 * max(1, |x| / 5) relative. exp's
      condition number is |x|: a compiled kernel's exp (exp2 of x log2(e)) rounds that product,
      ~|x| 2^-24 relative (measured on an H200: up to 7e-8 |x|, 1.6e-6 at x = -27.4).
    Heads with A_log below a_log_min give the floor's values bit for bit."""
    f, A_log, dt_bias, a_log_min = gate_sweep()
    want = decay_gate(f, A_log, dt_bias, a_log_min)[0]                       # [H, K] fp32
    H, K = want.shape
    x = (f[0] + dt_bias).to(DEVICE).contiguous()  # the fp32 sum, as decay_gate and the decode kernel form it
    heads = A_log[:, None].expand(H, K).to(DEVICE).contiguous()
    got = torch.full((H, K), float("nan"), device=DEVICE)
    _decay_gate_probe[(1,)](x, heads, got, H * K, a_log_min, BLOCK=carve_kernel.triton.next_power_of_2(H * K))
    got = got.cpu()
    assert_rel(got, want, 1e-6, "decay gate triton twin vs decay_gate")
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[2])    # A_log = -9, -5.5 floored at -5
    err = (got.double() - want.double()).abs()
    rel = err / want.double().abs()
    rate = A_log.double().clamp(min=a_log_min).exp()[:, None].expand(H, K)
    softplus = want.double() / -rate
    large = softplus > 1
    assert large.any() and (softplus < 1e-4).any() and ((softplus > 1e-4) & ~large).any()  # every regime
    assert_error(rel[large].max().item(), 1e-6, "decay gate twin, elementwise rel (softplus > 1)")
    scaled = rel / (x.cpu().double().abs() / 5).clamp(min=1)
    assert_error(scaled[~large].max().item(), 1e-6, "decay gate twin, elementwise rel / max(1, |x|/5) (softplus <= 1)")


@needs_triton
def test_decode_op_compiles_without_graph_breaks(monkeypatch):
    """The decode step is the custom op carve::recurrent: torch.compile with fullgraph=True
    traces a step through it (a raw Triton launch would break the graph) and computes the same values;
    opcheck validates the op's schema and fake (meta) implementation."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    x = make_inputs(2, 1, 2, 16, 32, "carve")
    state, (x["D"], x["U"]) = make_state(2, 2, 16, 32, "carve", chunk_size=8, prefix=15)  # token 16 ends a chunk
    args, content, state = on_device(x, state, torch.float32)

    def step(*tensors):
        o, final = recurrent_carve(*tensors, content, state, True, None, 8)
        return o, final.S, final.o_sum, final.delta

    with torch.no_grad():
        eager = step(*args)
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    assert not torch.equal(eager[3], state.delta)  # the chunk-end content update happened inside the op
    D, U = content
    torch.library.opcheck(torch.ops.carve.recurrent.default,
                          (*args, state.S, state.o_sum, state.delta, D, U, state.offset, 0.25, 8))
    # the fused decode step (conv and gates included), with a layer's shapes: 2HK + HV = 128 channels;
    # it updates the state in place, which must be contiguous fp32 as zero_state makes it
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    S, o_sum, delta = (t.contiguous() for t in state[:3])
    torch.library.opcheck(torch.ops.carve.decode_step.default,
                          (r(2, 128), r(128, 1, 4), r(2, 128, 3), r(2, 32), r(2), r(32), r(2, 32), r(2, 2),
                           S, o_sum, delta, D, U, state.offset, -5.0, 0.25, 8))


@needs_triton
def test_fused_decode_step_rejects_a_state_it_cannot_update_in_place():
    """The fused step writes the new state into the given tensors: a bf16 or strided state is refused
    with a message naming the tensor, not silently left stale."""
    B, H, K, V = 1, 2, 16, 16
    n_ch = 2 * H * K + H * V
    z = lambda *s: torch.zeros(*s, device=DEVICE)  # noqa: E731
    state = CarveState(z(B, H, K, V).bfloat16(), z(B, H, V), z(B, H, K), 0)
    with pytest.raises(ValueError, match="state.S must be contiguous fp32"):
        decode_step_triton(z(B, n_ch), z(n_ch, 1, 4), z(B, n_ch, 3), z(B, H * K), z(H), z(H * K), z(B, H * K),
                           z(B, H), state, None, -5.0, chunk_size=8)
