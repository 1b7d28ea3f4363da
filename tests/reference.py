"""What the test files share: the float64 oracle, the input makers, the tolerances, the error
measures, and the tiny-model helpers. Test files import from here (`from reference import ...`),
never from one another; conftest.py puts the repository root and this folder on sys.path.

The oracle, `reference`, is written in the matrix form of docs/DESIGN.md section 1,

    S_t = (I - k_t (b_t * k_t)^T) Diag(alpha_t) S_{t-1} + k_t (w_t * v_t)^T,   o_t = S_t^T q_t * scale,

in float64, with an explicit K x K erase matrix, straight from the mathematics: it imports nothing
from carve_kernel but the CarveState container, so that every path of carve_kernel (the torch
per-token recurrence included) is tested against it rather than trusted."""
import math
import os
import sys
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from carve_kernel import CarveState
from model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "g", "b_logit", "w")  # the kernels' positional tensor inputs, in order

# The Triton tests run the real kernels (in Triton's interpreter on a CPU); the fixture (conftest.py)
# fails them, rather than skipping them, where triton is not installed.
needs_triton = pytest.mark.usefixtures("triton_installed")

# ----------------------------------------------------------------------------- tolerances

# fp32 tolerances, ~10-100x above the largest relative errors observed on CPU (torch 2.13):
# outputs and states <= 3.2e-7, gradients <= 7e-7 (`CARVE_ERR_REPORT=1` prints them).
TOL_FWD = 1e-5
TOL_GRAD = 2e-5
# bf16 inputs: the output and the gradients of bf16 inputs are rounded to bf16 (2^-9 = 2e-3 relative
# per element; observed <= 2e-3 overall); on the torch paths fp32 states and fp32-input gradients keep
# the fp32 tolerances. The Triton chunk kernels use bf16 dot operands on a GPU for bf16 and fp16 inputs
# (docs/DESIGN.md section 7), so there TOL_BF16 is the forward and the gradient tolerance of both; in
# the interpreter their products are fp32, and their fp32 results keep the fp32 tolerances.
TOL_BF16 = 1e-2
# fp32 logits of the tiny models below: chunk vs per-token paths and prefill splits agree to
# ~1e-7 relative; 1e-5 is ~50x above that and far below what any state or cache bug produces.
TOL_LOGITS = 1e-5

# ----------------------------------------------------------------------------- error measures

OBSERVED = defaultdict(float)  # check name -> largest relative error seen (conftest.py reports it)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64. Fails on any NaN/Inf in either tensor, so NaN never passes.
    A zero reference gives ||out|| / tiny, i.e. anything non-zero fails."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    assert torch.isfinite(ref).all(), "reference has NaN/Inf"
    if out.device != ref.device:
        out = out.to(ref.device)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel(out, ref, tol, what):
    return assert_error(rel_err(out, ref), tol, what)


def assert_error(err, tol, what):
    """err <= tol, for an error measured otherwise than by rel_err; the largest seen is reported."""
    OBSERVED[what] = max(OBSERVED[what], err)
    assert err <= tol, f"{what}: error {err:.3e} > tolerance {tol:.1e}"
    return err


def record(what, value):
    """Record a value that a test requires to be *large* (a control); reported as the smallest seen."""
    key = what + " (min)"
    OBSERVED[key] = min(OBSERVED.get(key, float("inf")), value)


# ----------------------------------------------------------------------------- the oracle

# The per-token floor on the log-decay, g >= -5 (docs/DESIGN.md section 7). Written here from the
# mathematics, not imported from carve_kernel (GATE_FLOOR), so the oracle stays independent of the
# code under test.
REFERENCE_GATE_FLOOR = -5.0


def l2norm(x, eps=1e-6):
    """x / max(||x||, eps): F.normalize's convention, which carve_kernel uses (eps = 1e-6)."""
    return x / torch.sqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps * eps))


def reference(q, k, v, g, b_logit, w, content=None, S0=None, o_sum0=None, delta0=None, offset=0,
              chunk_size=64, scale=None, detach_m=True):
    """Naive per-token recurrence from docs/DESIGN.md sections 1 and 2, in whatever dtype and on
    whatever device it is given (float64 in the tests). Returns o [B, T, H, V] and (S, o_sum, delta,
    offset) after the last token."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k = l2norm(q), l2norm(k)
    g = g.clamp(min=REFERENCE_GATE_FLOOR)
    zeros = lambda *s: torch.zeros(*s, dtype=q.dtype, device=q.device)  # noqa: E731
    S = zeros(B, H, K, V) if S0 is None else S0
    o_sum = zeros(B, H, V) if o_sum0 is None else o_sum0
    delta = zeros(B, H, K) if delta0 is None else delta0
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(T):
        kt, qt = k[:, t], q[:, t]                                                  # [B, H, K]
        wv = w[:, t] * v[:, t] if w.dim() == 4 else w[:, t, :, None] * v[:, t]    # [B, H, V]
        b = torch.sigmoid(b_logit[:, t] + delta)                                  # [B, H, K]
        erase = eye - kt[..., :, None] * (b * kt)[..., None, :]                   # I - k (b*k)^T
        S = erase @ (torch.exp(g[:, t])[..., None] * S) + kt[..., :, None] * wv[..., None, :]
        o = (S.transpose(-1, -2) @ qt[..., None])[..., 0] * scale                 # S^T q * scale
        outs.append(o)
        o_sum = o_sum + (o.detach() if detach_m else o)
        if (offset + t + 1) % chunk_size == 0:          # absolute chunk c finished: m_c, Delta_{c+1}
            if content is not None:
                D, U = content
                m = o_sum / chunk_size
                delta = torch.einsum("hkr,hrv,bhv->bhk", U, D, m)                 # U_h D_h m_c
            o_sum = torch.zeros_like(o_sum)
    return torch.stack(outs, dim=1), (S, o_sum, delta, offset + T)


def run_reference(leaves, state, chunk_size, detach_m=True):
    """The float64 reference on exactly the kernel's (possibly bf16-rounded) inputs: leaves holds
    q, k, v, g, b_logit, w (and D, U for CARVE); state is a CarveState or None. Returns the float64
    leaves (initial S and delta as "S0" and "delta0"), o and the final (S, o_sum, delta, offset)."""
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    content = (ref["D"], ref["U"]) if "D" in ref else None
    kw = {}
    if state is not None:
        ref["S0"] = state.S.detach().double().requires_grad_()
        ref["delta0"] = state.delta.detach().double().requires_grad_()
        kw = dict(S0=ref["S0"], o_sum0=state.o_sum.double(), delta0=ref["delta0"], offset=state.offset)
    o, final = reference(ref["q"], ref["k"], ref["v"], ref["g"], ref["b_logit"], ref["w"], content,
                         chunk_size=chunk_size, detach_m=detach_m, **kw)
    return ref, o, final


# ----------------------------------------------------------------------------- inputs

def make_inputs(B, T, H, K, V, mode, rank=4, seed=0, content_scale=2.0):
    """Random fp32 inputs with realistic ranges: g = logsigmoid(..) in about [-4, 0), gates in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
             g=F.logsigmoid(1.5 * r(B, T, H, K) + 2.5), b_logit=r(B, T, H, K))
    if mode == "carve":
        x["w"] = torch.sigmoid(r(B, T, H))
        x["D"] = content_scale * r(H, rank, V)
        x["U"] = content_scale * r(H, K, rank)
    else:
        x["w"] = torch.sigmoid(r(B, T, H, V))
    return x


def make_state(B, H, K, V, mode, chunk_size, seed=1, prefix=None):
    """A consistent initial state: the reference run over a random prefix whose length is NOT a
    multiple of chunk_size (so offset, o_sum and, for CARVE, delta are all non-zero)."""
    prefix = chunk_size + 5 if prefix is None else prefix
    x = make_inputs(B, prefix, H, K, V, mode, seed=seed)
    content = (x["D"], x["U"]) if mode == "carve" else None
    _, (S, o_sum, delta, offset) = reference(x["q"], x["k"], x["v"], x["g"], x["b_logit"], x["w"],
                                             content, chunk_size=chunk_size)
    assert offset % chunk_size != 0 and o_sum.abs().sum() > 0
    assert mode != "carve" or delta.abs().sum() > 0
    # the content projection of the prefix must be the one the test uses: return it with the state
    return CarveState(S.float(), o_sum.float(), delta.float(), offset), content


def state_without_content(B, H, K, V, chunk_size, seed):
    """A state from the reference run over a random prefix of chunk_size + 5 tokens with CARVE's scalar write
    strength and no content projection (the model's content_rank=0): offset inside a chunk, delta exactly 0."""
    x = make_inputs(B, chunk_size + 5, H, K, V, "carve", seed=seed)
    _, (S, o_sum, delta, offset) = reference(*(x[n] for n in NAMES), None, chunk_size=chunk_size)
    assert not delta.any()
    return CarveState(S.float(), o_sum.float(), delta.float(), offset)


@contextmanager
def poisoned_allocations():
    """Inside it, torch.empty fills every floating-point tensor it makes with NaN and lists it (the list
    is what `with` gives), so an element that a kernel's launcher allocates and the kernel does not write
    shows up as NaN, and rel_err fails on it."""
    real_empty, made = torch.empty, []

    def empty_nan(*shape, **kw):
        t = real_empty(*shape, **kw)
        if t.is_floating_point():
            made.append(t.fill_(float("nan")))
        return t

    torch.empty = empty_nan
    try:
        yield made
    finally:
        torch.empty = real_empty


def assert_bits_on_gpu(got, want, interpreter_rtol):
    """Bit-equal on a GPU. In Triton's interpreter the products are numpy's, whose rounding can depend on a
    tile's width (OpenBLAS on an AMD EPYC: one float32 ulp apart), so there within interpreter_rtol, relative to
    each entry and to want's largest."""
    if want.is_cuda:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=interpreter_rtol,
                                   atol=interpreter_rtol * want.float().abs().max())


def model_style_gates(B, T, H, K, seed, fast_channels=0, fast_value=-20.0):
    """g = -exp(A_log) * softplus(f + dt_bias) as the model computes it (A_log ~ log U(1, 16), dt_bias
    the inverse softplus of a log-uniform dt in [1e-3, 1e-1]); the first `fast_channels` key
    channels of every head are set to `fast_value` per token (a decay of e^-20 per step)."""
    gen = torch.Generator().manual_seed(seed)
    A_log = torch.empty(H).uniform_(1, 16, generator=gen).log()
    dt = torch.empty(H * K).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
    dt_bias = (dt + torch.log(-torch.expm1(-dt))).view(H, K)
    f = torch.randn(B, T, H, K, generator=gen)
    g = -A_log.exp()[:, None] * F.softplus(f + dt_bias)
    g[..., :fast_channels] = fast_value
    return g


def gate_sweep():
    """Inputs of the decay gate g = -exp(max(A_log, a_log_min)) * softplus(f + dt_bias) over every
    regime: x = f + dt_bias from -30 to 40 in steps of 1/16 (exactly, in fp32), plus points around
    x = log(1e-4) = -9.2103 and the softplus threshold 20, for six heads whose A_log lies below
    (-9, -5.5), at (-5) and above (-1, 0, log 16) a_log_min = -5; every head has the same dt_bias,
    so the heads below the floor must equal the one at it. Returns f [1, H, K], A_log [H],
    dt_bias [H, K], a_log_min."""
    x = torch.cat([torch.arange(-30 * 16, 40 * 16 + 1) / 16,
                   torch.tensor([-9.2104, -9.2103, 19.99, 19.999, 20.001, 20.01])]).sort().values
    A_log = torch.tensor([-9.0, -5.5, -5.0, -1.0, 0.0, math.log(16.0)])
    H, K = len(A_log), len(x)
    dt_bias = (torch.randint(-8, 9, (1, K), generator=torch.Generator().manual_seed(0)) / 8).expand(H, K)
    return (x - dt_bias)[None], A_log, dt_bias, -5.0


# ----------------------------------------------------------------------------- tiny models

def tiny(mixer="carve", **kw):
    cfg = dict(vocab_size=61, n_layer=2, d_model=32, n_head=2, head_k_dim=8, head_v_dim=12, mlp_hidden=48,
               chunk_size=8, content_rank=4, mixer=mixer)
    cfg.update(kw)
    return ModelConfig(**cfg)


@torch.no_grad()
def perturb(model, seed=0):
    """Give the parameters that start at zero (CARVE's U and beta, GDN-2's write gate, the output-gate
    bias, and any a fork adds) random values, so the content gate, the write gate and Delta are all
    exercised."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if (p == 0).all():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "content_up" in name else 0.3))
    return model


def tokens(B, T, vocab, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill_then_decode(model, idx, T1, max_len=None):
    """(logits of one forward from position T1-1 on, the same logits from a prefill of T1 tokens
    followed by one cached step per token; with max_len, on init_cache's static buffers)."""
    cache = model.init_cache(idx.shape[0], max_len=max_len)
    steps = [model(idx[:, :T1], cache=cache)[0]]
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(T1, idx.shape[1])]
    return model(idx)[0][:, T1 - 1:], torch.cat(steps, dim=1)


# ----------------------------------------------------------------------------- train.py runs

# train.py arguments of a tiny CARVE model; each test file adds its own batch, schedule and data
TINY_MODEL_ARGS = ["--n_layer=2", "--d_model=32", "--n_head=2", "--head_k_dim=16", "--head_v_dim=16",
                   "--mlp_hidden=64", "--chunk_size=16", "--content_rank=4"]


def train_in_process(args):
    """train.main(args) on one thread: bitwise-repeatable CPU arithmetic between runs."""
    import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(args)
    finally:
        torch.set_num_threads(threads)


def torchrun_train(args, nproc=2, launcher_args=()):
    """The command of train.py under torchrun, its ranks on the CPU (gloo) wherever the tests run: a machine
    with one GPU cannot hold two GPU ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *launcher_args, "train.py", *args, "--device=cpu"]


def train_log(out_dir):
    """The records of out_dir/log.jsonl."""
    import json
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def newest_checkpoint(out_dir):
    import train
    return train.load_newest_checkpoint(str(out_dir), log=lambda line: None)[0]


# ----------------------------------------------------------------------------- the grid scripts

def load_script(name):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def second_call_output(script, argv, out, capsys):
    """script.main(argv) once more over the runs of a first call into `out`: asserts that no run trains
    again (every train.log unchanged) and returns what it printed."""
    logs = {p: p.read_text() for p in out.glob("*/train.log")}
    capsys.readouterr()
    script.main(argv)
    assert {p: p.read_text() for p in out.glob("*/train.log")} == logs   # nothing trained again
    return capsys.readouterr().out
