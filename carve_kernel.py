"""
CARVE / GDN-2 gated delta-rule kernels: chunk-parallel (training, prefill) and per-token (decode),
in [B, T, H, D] tensors as in flash-linear-attention. docs/DESIGN.md has the mathematics and the
design; "docs/DESIGN.md section N" cites it, "this file's section N" the numbered banners below.

    o, state = chunk_carve(q, k, v, g, b_logit, w, content=None, initial_state=None,
                           output_final_state=False, scale=None, chunk_size=64, cu_seqlens=None)
    o, state = recurrent_carve(q, k, v, g, b_logit, w, content=None, initial_state=None,
                               output_final_state=False, scale=None, chunk_size=64)
    o, state = fused_decode_step(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w_logit, state, content,
                                 a_log_min, chunk_size=64)     # updates state and conv_cache in place
    y = output_norm_gate(o, gate, weight, eps, activation="silu")   # gate [..., V], or a GateProjection(x, W, b)
    y, new_cache = causal_conv_silu(x, weight, cache=None, doc_start=None)
    q, k, v = short_conv_qkv(ShortConv(x, weight, doc_start), H, K)   # causal_conv_silu's y as q, k, v views
    y = linear(x, weight, bias=None)   # F.linear; a Triton GEMV for one row without gradient (decode)
    y = swiglu_linear(gate_up, weight)  # F.linear(SiLU(gate) * up, weight), not keeping the product
    x = embedding(idx, weight)          # F.embedding(idx, weight), its weight gradient the same bits every time

    q, k     [B, T, H, K]  L2-normalised here, inside the kernel
    v        [B, T, H, V]  (chunk_carve: q may be a ShortConv(x, weight, doc_start) standing for all three,
                           k and v None: the chunk op runs the conv itself and keeps x, not q, k, v)
    g        [B, T, H, K]  fp32 log-decay (<= 0), alpha = exp(g); see decay_gate. Or a DecayGate(f, A_log,
                           dt_bias, a_log_min): decay_gate's inputs, computed inside the kernels (f itself
                           may be a GateProjection(x, W, None): the chunk op makes f = x W^T)
    b_logit  [B, T, H, K]  erase-gate logits; b = sigmoid(b_logit + Delta_c(t))
    w        [B, T, H, V]  GDN-2's write gate in [0, 1], or [B, T, H] CARVE's scalar beta
    content  None (GDN-2) or (D [H, r, V], U [H, K, r]) (CARVE): Delta_c = U D m_{c-1}
    cu_seqlens  (chunk_carve) None, or [N + 1] offsets of N sequences packed into one row [1, total]

`state` is a `CarveState`: everything needed to continue a sequence exactly, so chunk_carve over T1
tokens followed by chunk_carve or recurrent_carve over T2 more equals one call over T1 + T2 tokens.

The file reads top to bottom:
  1. Public API and the one dispatch point, `backend_for`: Triton for CUDA tensors, torch otherwise;
     CARVE_BACKEND=torch|triton overrides.
  2. Torch definitions: the per-token recurrence `recurrent_carve_torch` (what every kernel computes,
     and the torch decode path) and the chunked WY form `chunk_carve_torch` (the torch training path).
  3. Triton chunk forward: the schedule, the sequence table, the forward's two forms and its kernels.
  4. Triton chunk backward: the block tiles made again, a walk that rebuilds the block states, the
     reverse walk, two parallel kernels, and the content gradients.
  5. Triton decode: the per-token kernel behind recurrent_carve and a layer's fused decode step.
  6. Triton layer pieces: the short causal conv + SiLU over the q, k, v projection, the layer's
     RMSNorm(o) * act(gate) and the MLP's SiLU(gate) * up, each forward and backward; the batch-1 GEMV
     of a decode step.
  7. The torch.library custom ops around the Triton launchers, so torch.compile keeps one graph.
Triton is optional: without it (a CPU-only install, macOS) every call takes the torch path.
"""
from __future__ import annotations  # the kernels' tl.constexpr annotations stay strings without triton

import contextlib
import functools
import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    triton_jit = triton.jit
except ImportError:
    triton = tl = None
    triton_jit = lambda fn: fn  # noqa: E731  the kernels stay plain functions that nothing calls

# ============================================================================================
# 1. Public API and the dispatch point
# ============================================================================================

# Every path floors the log-decay at GATE_FLOOR per token (alpha >= e^-5: one step already forgets
# 99.3%; the gradient below the floor is zero). The Triton chunk kernels rely on it to form the decay
# ratios of a 16-token block as two factors within exp(+-40) (docs/DESIGN.md sections 4 and 7).
GATE_FLOOR = -5.0
L2_NORM_EPS = 1e-6         # q and k are divided by max(||x||, L2_NORM_EPS), as F.normalize does
SOFTPLUS_THRESHOLD = 20.0  # softplus(x) = x above it, as F.softplus's default
if triton is not None:  # the same values for the kernels, which read module globals only as tl.constexpr
    GATE_FLOOR_TL = tl.constexpr(GATE_FLOOR)
    L2_NORM_EPS_TL = tl.constexpr(L2_NORM_EPS)
    SOFTPLUS_THRESHOLD_TL = tl.constexpr(SOFTPLUS_THRESHOLD)


class CarveState(NamedTuple):
    S: torch.Tensor      # [B, H, K, V] fp32 recurrent state
    o_sum: torch.Tensor  # [B, H, V] fp32 sum of o over the tokens seen so far in the current chunk
    delta: torch.Tensor  # [B, H, K] fp32 erase-gate shift Delta for the current chunk (0 for GDN-2)
    offset: int          # absolute position of the next token; chunk c(t) = t // chunk_size
    #                      (a tuple of them, one per sequence, for packed sequences: cu_seqlens)


class DecayGate(NamedTuple):
    """The log-decay g as decay_gate's inputs, for chunk_carve (and recurrent_carve) to take instead of g:
    the Triton chunk kernels then compute g where they read it, forward and backward, so no fp32
    [B, T, H, K] g is made or kept for the backward (the torch paths call decay_gate). f may be a
    GateProjection(x, W, None) of a low-rank input x [B, T, r]: the chunk op then makes f = x W^T
    itself, forward and backward, and keeps x rather than f."""
    f: torch.Tensor      # [B, T, H, K] the raw projection W_f x, or a GateProjection making it
    A_log: torch.Tensor  # [H]
    dt_bias: torch.Tensor  # [H, K]
    a_log_min: float


class GateProjection(NamedTuple):
    """output_norm_gate's gate as F.linear(x, weight, bias) of a low-rank input x [..., r], for the
    Triton path to compute where it reads it and again in the backward: the [..., H, V] gate is then not
    kept for the backward (64 MiB a 1.3B layer of 16,384 tokens). x comes in the compute dtype (under
    autocast, autocast's); weight and bias are rounded to it, as autocast rounds them for F.linear.
    The product is not a call of a Linear module: hooks on one do not see it."""
    x: torch.Tensor                # [..., r]
    weight: torch.Tensor           # [H * V, r]
    bias: Optional[torch.Tensor]   # [H * V]


class ShortConv(NamedTuple):
    """q, k and v as one short conv's output: causal_conv_silu(x, weight, doc_start=doc_start) split into
    H*K, H*K and H*V channels (short_conv_qkv), for chunk_carve to take in q's place (k and v None). The
    Triton chunk op then keeps x, which the conv's backward keeps anyway, rather than q, k and v, and runs
    the conv again in its backward: 192 MiB less a 1.3B layer of 16,384 tokens, for one conv forward."""
    x: torch.Tensor                     # [B, T, 2*H*K + H*V] the conv's input
    weight: torch.Tensor                # [2*H*K + H*V, 1, W]
    doc_start: Optional[torch.Tensor]   # [T] of a packed row (causal_conv_silu), or None


def zero_state(batch_size, n_head, k_dim, v_dim, device):
    f32 = dict(dtype=torch.float32, device=device)
    return CarveState(torch.zeros(batch_size, n_head, k_dim, v_dim, **f32),
                      torch.zeros(batch_size, n_head, v_dim, **f32),
                      torch.zeros(batch_size, n_head, k_dim, **f32), 0)


def runs_in_interpreter():
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton's import), which
    makes every jitted function of this module an InterpretedFunction: any one of them would tell."""
    return type(_recurrent_fwd_kernel).__name__ == "InterpretedFunction"


def backend_for(x: torch.Tensor) -> str:
    """The single kernel-dispatch point: 'triton' for CUDA tensors, 'torch' otherwise (and wherever
    triton is not installed). CARVE_BACKEND=torch|triton overrides; 'triton' with CPU tensors runs
    the kernels in the Triton interpreter, which TRITON_INTERPRET=1 must select before this module
    (and triton) is imported."""
    choice = os.environ.get("CARVE_BACKEND", "")
    if choice == "":
        return "triton" if x.is_cuda and triton is not None else "torch"
    if choice not in ("torch", "triton"):
        raise ValueError(f"CARVE_BACKEND must be 'torch' or 'triton', got {choice!r}")
    if choice == "triton":
        if triton is None:
            raise RuntimeError("CARVE_BACKEND=triton, but triton cannot be imported: install triton "
                               "or unset CARVE_BACKEND to use the torch path")
        if not x.is_cuda and not runs_in_interpreter():
            raise RuntimeError("CARVE_BACKEND=triton with CPU tensors needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before importing triton and carve_kernel (or use CUDA "
                               "tensors, or CARVE_BACKEND=torch)")
    return choice


def chunk_carve(q, k, v, g, b_logit, w, content=None, initial_state=None, output_final_state=False, scale=None,
                chunk_size=64, cu_seqlens=None) -> Tuple[torch.Tensor, Optional[CarveState]]:
    """The chunk-parallel form (training, prefill): the Triton kernels where backend_for says so and
    the shapes fit (chunk_triton_supports), else chunk_carve_torch. q may be a ShortConv standing for
    q, k and v (k and v None)."""
    conv = q if isinstance(q, ShortConv) else None
    if conv is None:
        x, K, V = q, q.shape[-1], v.shape[-1]
    else:
        _check_short_conv(conv, k, v, b_logit)   # b_logit [B, T, H, K] and x [B, T, H (2K + V)]
        x, (H, K) = conv.x, b_logit.shape[2:]
        V = (x.shape[-1] - 2 * H * K) // H
    triton_path = backend_for(x) == "triton" and chunk_triton_supports(K, V, chunk_size)
    with torch.autocast(x.device.type, enabled=False):  # fp32 inside, whatever autocast the caller runs
        if triton_path:
            return chunk_carve_triton(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                      chunk_size, cu_seqlens)
        if conv is not None:
            q, k, v = short_conv_qkv(conv, H, K)
        g = log_decay_of(g)
        if cu_seqlens is not None:
            return packed_sequences_torch(q, k, v, g, b_logit, w, content, initial_state, output_final_state,
                                          scale, chunk_size, cu_seqlens)
        return chunk_carve_torch(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                 chunk_size)


def recurrent_carve(q, k, v, g, b_logit, w, content=None, initial_state=None,
                    output_final_state=False, scale=None, chunk_size=64) -> Tuple[torch.Tensor, Optional[CarveState]]:
    """The per-token form (decode): the Triton kernel where backend_for says so and no gradient is
    needed (it has no backward), else recurrent_carve_torch."""
    g = log_decay_of(g)
    if backend_for(q) == "triton" and not _needs_grad(q, k, v, g, b_logit, w, content, initial_state):
        _check_inputs(q, k, v, g, b_logit, w, content, initial_state)
        B, T, H, K = q.shape
        state = initial_state if initial_state is not None else zero_state(B, H, K, v.shape[-1], q.device)
        D, U = content if content is not None else (None, None)
        o, S, o_sum, delta = torch.ops.carve.recurrent(
            q, k, v, g, b_logit, w, state.S, state.o_sum, state.delta, D, U, state.offset,
            K ** -0.5 if scale is None else float(scale), chunk_size)
        return o, (CarveState(S, o_sum, delta, state.offset + T) if output_final_state else None)
    with torch.autocast(q.device.type, enabled=False):
        return recurrent_carve_torch(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                     chunk_size)


def fused_decode_step(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w_logit, state, content, a_log_min,
                      chunk_size=64):
    """One decode step of a layer from its projections, conv and gates included (decode_step_triton),
    through the custom op carve::decode_step, so a compiled generation loop keeps one graph. w_logit is
    the write gate before its sigmoid, which the kernel applies (everywhere else w is the gate itself).
    It updates the state's tensors and conv_cache in place (a CUDA graph replays on them) and returns
    (o, the state one token on). The caller picks it when backend_for says 'triton' and no gradient is
    needed (model.py)."""
    K = f.shape[-1] // A_log.shape[0]
    D, U = content if content is not None else (None, None)
    o = torch.ops.carve.decode_step(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w_logit, state.S,
                                    state.o_sum, state.delta, D, U, state.offset, float(a_log_min), K ** -0.5,
                                    chunk_size)
    # a new CarveState rather than state._replace: torch 2.11's dynamo rebuilds _replace's result as a
    # plain tuple when it replays the cache's update after a compiled step
    return o, CarveState(state.S, state.o_sum, state.delta, state.offset + 1)


def output_norm_gate(o, gate, weight, eps, activation="silu"):
    """The layer's output: RMSNorm(o) * weight * act(gate) over the last axis (per head), act = SiLU or
    sigmoid; o and gate [..., V] in one dtype (or gate a GateProjection of o's shape), weight [V]; the
    result in o's dtype, fp32 inside. One Triton kernel each way (this file's section 6) where backend_for says so,
    else output_norm_gate_torch."""
    projection = gate if isinstance(gate, GateProjection) else GateProjection(gate, None, None)
    if backend_for(o) == "triton":
        return torch.ops.carve.norm_gate(o, *projection, weight, float(eps), activation == "silu")[0]
    return output_norm_gate_torch(o, projected_gate(projection, o.shape), weight, eps, activation)


def projected_gate(projection: GateProjection, shape):
    """The gate a GateProjection stands for, in `shape`; the tensor itself when it holds no weight."""
    x, weight, bias = projection
    if weight is None:
        return x
    return linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype)).view(shape)


def projection_backward(d_gate, projection: GateProjection, needs_grad):
    """(dx, dweight, dbias) of projected_gate from the gradient of the gate it made, as autograd would give
    them through F.linear on weights rounded to x's dtype; None where needs_grad (three bools) says no
    gradient is wanted, or where there is no bias."""
    x, weight, bias = projection
    d_gate = d_gate.reshape(-1, weight.shape[0])
    d_x = (d_gate @ weight.to(x.dtype)).view(x.shape) if needs_grad[0] else None
    d_weight = (d_gate.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if needs_grad[1] else None
    d_bias = d_gate.sum(0).to(bias.dtype) if bias is not None and needs_grad[2] else None
    return d_x, d_weight, d_bias


def causal_conv_silu(x, weight, cache=None, doc_start=None):
    """SiLU of the depthwise causal conv over x [B, T, C] with weight [C, 1, W]: (y [B, T, C] in x's
    dtype, the new cache or None). `cache` [B, C, W - 1] holds the last W - 1 inputs before x (a
    prompt continued); the new one is returned only when it is given. `doc_start` [T] (a packed row,
    B = 1): where each token's document starts; taps before it read zeros. One Triton kernel each way
    (this file's section 6) where backend_for says so, else causal_conv_silu_torch."""
    if backend_for(x) != "triton":
        return causal_conv_silu_torch(x, weight, cache, doc_start)
    y = torch.ops.carve.conv_silu(x, weight, None if cache is None else cache.to(x.dtype), doc_start)
    return y, None if cache is None else _next_conv_cache(x, cache, weight.shape[-1])


def short_conv_qkv(conv: ShortConv, n_head, k_dim):
    """The q, k [B, T, H, K] and v [B, T, H, V] a ShortConv stands for: views of one causal_conv_silu output."""
    B, T, C = conv.x.shape
    y, _ = causal_conv_silu(conv.x, conv.weight, None, conv.doc_start)
    q, k, v = y.split([n_head * k_dim, n_head * k_dim, C - 2 * n_head * k_dim], dim=-1)
    return q.view(B, T, n_head, k_dim), k.view(B, T, n_head, k_dim), v.view(B, T, n_head, -1)


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), except that one row (a batch-1 decode step) with no gradient runs a
    Triton GEMV (this file's section 6) where backend_for says so: there cuBLAS read the narrow 1.3B
    weights (o_proj, down_proj, GDN-2's w_proj) at 35-53% of the copy bandwidth (docs/DESIGN.md section
    6). Under autocast x is cast to its dtype, as F.linear would; the GEMV runs only where the weight
    already is in that dtype (sample.py's inference_weights)."""
    one_row = x.numel() == x.shape[-1] > 0 and weight.dim() == 2
    if one_row and backend_for(x) == "triton" and not torch.is_grad_enabled():
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if weight.dtype == dtype and (bias is None or bias.dtype == dtype):
            return torch.ops.carve.gemv(x.to(dtype), weight, bias)
    return F.linear(x, weight, bias)


def swiglu_linear(gate_up, weight):
    """F.linear(swiglu(gate_up), weight): the MLP's second product, all in gate_up's dtype (weight in it
    too). Where backend_for says so, a Triton kernel makes h = SiLU(gate) * up and the op keeps gate_up,
    not h [..., F], for the backward, whose op makes h again itself: made by torch ops in a backward
    formula, torch.compile merged it with the forward's h and kept that (3.4 GiB over a 1.3B step of
    16,384 tokens). Else swiglu_linear_torch."""
    if weight.dim() != 2 or gate_up.shape[-1] != 2 * weight.shape[1] or weight.dtype != gate_up.dtype:
        raise ValueError(f"swiglu_linear: gate_up {tuple(gate_up.shape)} {gate_up.dtype} needs a weight [out, "
                         f"{gate_up.shape[-1] // 2}] in {gate_up.dtype}; got {tuple(weight.shape)} {weight.dtype}")
    with torch.autocast(gate_up.device.type, enabled=False):   # the dtype given, as the op's fake says
        if backend_for(gate_up) == "triton":
            return torch.ops.carve.swiglu_linear(gate_up, weight)
        return swiglu_linear_torch(gate_up, weight)


def embedding(idx, weight):
    """F.embedding(idx, weight). Where backend_for says triton and the weight needs a gradient, the backward is
    a kernel of this file's section 6 that sums each token's rows in one fixed order: PyTorch's CUDA backward
    adds repeated tokens with atomics in whatever order they land, and on an H200 its gradient was the one in
    the whole model that differed between two identical passes, so no two runs of one command logged the same
    losses (docs/DESIGN.md section 8)."""
    if backend_for(weight) == "triton" and torch.is_grad_enabled() and weight.requires_grad:
        return torch.ops.carve.embedding(idx, weight)
    return F.embedding(idx, weight)


# ============================================================================================
# 2. Torch definitions (docs/DESIGN.md sections 1-3, 6 and 10)
# ============================================================================================

def decay_gate(f, A_log, dt_bias, a_log_min):
    """The log-decay g = -exp(max(A_log, a_log_min)) * softplus(f + dt_bias) in fp32, from the raw
    projection f [..., H, K], A_log [H] and dt_bias [H, K]. The floor on A_log keeps the decay from
    vanishing (docs/DESIGN.md section 7). _decay_gate is its Triton twin (the fused decode step, and the
    chunk kernels given a DecayGate)."""
    rate = A_log.float().clamp(min=a_log_min).exp()[:, None]
    return -rate * F.softplus(f.float() + dt_bias.float(), threshold=SOFTPLUS_THRESHOLD)


def log_decay_of(g):
    """g as a log-decay tensor: a DecayGate through decay_gate (its shapes checked against its f), a
    tensor as it is."""
    if not isinstance(g, DecayGate):
        return g
    _check_decay_gate(g)
    f = projected_gate(g.f, _raw_decay_shape(g)) if isinstance(g.f, GateProjection) else g.f
    return decay_gate(f, g.A_log, g.dt_bias, g.a_log_min)


def _raw_decay_shape(gate: DecayGate):
    """The shape of a DecayGate's f: its own, or for a GateProjection x's leading axes with H from A_log
    and K from dt_bias."""
    if isinstance(gate.f, GateProjection):
        return (*gate.f.x.shape[:-1], gate.A_log.shape[0], gate.dt_bias.shape[-1])
    return tuple(gate.f.shape)


def _check_decay_gate(gate):
    f_shape = _raw_decay_shape(gate)
    H, K = f_shape[-2:]
    if isinstance(gate.f, GateProjection):   # f = x W^T
        weight = gate.f.weight
        if weight.dim() != 2 or weight.shape[0] != H * K or gate.f.bias is not None:
            raise ValueError(f"DecayGate.f, a GateProjection, needs a weight [H * K, r] = [{H * K}, r] and no bias; "
                             f"got {tuple(weight.shape)}")
    for name, x, shape in (("A_log", gate.A_log, (H,)), ("dt_bias", gate.dt_bias, (H, K))):
        if tuple(x.shape) != shape:
            raise ValueError(f"DecayGate.{name} has shape {tuple(x.shape)}, expected {shape} (f is {f_shape})")


def output_norm_gate_torch(o, gate, weight, eps, activation="silu"):
    """output_norm_gate's definition: the norm and the gate in fp32, one rounding to o's dtype."""
    normed = F.rms_norm(o.float(), (o.shape[-1],), weight.float(), eps)
    return (normed * (F.silu(gate.float()) if activation == "silu" else torch.sigmoid(gate.float()))).to(o.dtype)


def swiglu(gate_up):
    """SiLU(gate) * up for gate_up = [gate, up] along its last axis, in its dtype (SiLU rounded to it first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_linear_torch(gate_up, weight):
    """swiglu_linear's definition."""
    return F.linear(swiglu(gate_up), weight)


def causal_conv_silu_torch(x, weight, cache=None, doc_start=None):
    """causal_conv_silu's definition in torch ops, in x's dtype as autocast would run them: the weights
    rounded to it, the conv summed in fp32 and rounded once (as conv1d in a half dtype rounds), then SiLU."""
    width = weight.shape[-1]
    xt = x.transpose(1, 2)
    history = cache.to(x.dtype) if cache is not None else x.new_zeros(x.shape[0], x.shape[2], width - 1)
    xt = torch.cat([history, xt], dim=-1)
    if doc_start is None:
        y = F.conv1d(xt, weight.to(x.dtype), groups=xt.shape[1])
    else:
        T = doc_start.shape[0]
        tap_pos = torch.arange(T, device=x.device)[:, None] - (width - 1) + torch.arange(width, device=x.device)
        windows = xt.unfold(-1, width, 1) * (tap_pos >= doc_start[:, None]).to(x.dtype)       # [B, C, T, W]
        taps = weight.to(x.dtype).float()[:, None, 0, :]
        y = (windows.float() * taps).sum(-1).to(x.dtype)
    return F.silu(y).transpose(1, 2), None if cache is None else _next_conv_cache(x, cache, width)


def _next_conv_cache(x, cache, width):
    """The last width - 1 inputs of cache followed by x [B, T, C], as a cache [B, C, width - 1]."""
    joined = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=-1)
    return joined[..., joined.shape[-1] - (width - 1):].contiguous()


def _check_short_conv(conv: ShortConv, k, v, b_logit):
    """A ShortConv's shapes against b_logit's [B, T, H, K]: x [B, T, 2*H*K + H*V], weight [channels, 1, W]."""
    if k is not None or v is not None:
        raise ValueError("q is a ShortConv, which stands for q, k and v: pass k and v as None")
    B, T, H, K = b_logit.shape
    x, weight = conv.x, conv.weight
    V = (x.shape[-1] - 2 * H * K) // H if x.dim() == 3 else 0
    if x.dim() != 3 or tuple(x.shape[:2]) != (B, T) or V < 1 or x.shape[-1] != H * (2 * K + V):
        raise ValueError(f"ShortConv.x has shape {tuple(x.shape)}, expected [{B}, {T}, 2*H*K + H*V] with H, K = "
                         f"{H}, {K} from b_logit {tuple(b_logit.shape)} (q, k and v side by side)")
    if weight.dim() != 3 or tuple(weight.shape[:2]) != (x.shape[-1], 1):
        raise ValueError(f"ShortConv.weight has shape {tuple(weight.shape)}, expected [{x.shape[-1]}, 1, width]")
    if conv.doc_start is not None and (B != 1 or tuple(conv.doc_start.shape) != (T,)):
        raise ValueError(f"ShortConv.doc_start has shape {tuple(conv.doc_start.shape)}, expected [{T}] for one "
                         f"packed row (B = 1, got {B})")


def _check_inputs(q, k, v, g, b_logit, w, content, initial_state, state_rows=None):
    """state_rows: rows of initial_state (B, or the number of packed sequences)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if isinstance(g, DecayGate):
        _check_decay_gate(g)
        g_name = "DecayGate.f" + (" (made by its GateProjection)" if isinstance(g.f, GateProjection) else "")
        g_shape = _raw_decay_shape(g)
    else:
        g_name, g_shape = "g", tuple(g.shape)
    for name, got, shape in (("k", tuple(k.shape), (B, T, H, K)), ("v", tuple(v.shape), (B, T, H, V)),
                             (g_name, g_shape, (B, T, H, K)), ("b_logit", tuple(b_logit.shape), (B, T, H, K))):
        if got != shape:
            raise ValueError(f"{name} has shape {got}, expected {shape} (q is {tuple(q.shape)})")
    if tuple(w.shape) not in ((B, T, H, V), (B, T, H)):
        raise ValueError(f"w has shape {tuple(w.shape)}, expected {(B, T, H, V)} (GDN-2) or {(B, T, H)} (CARVE)")
    if content is not None:
        D, U = content
        if D.shape[0] != H or D.shape[2] != V or tuple(U.shape) != (H, K, D.shape[1]):
            raise ValueError(f"content (D, U) must be shaped [H, r, V], [H, K, r] = [{H}, r, {V}], [{H}, {K}, r]; "
                             f"got {tuple(D.shape)}, {tuple(U.shape)}")
    if T == 0:
        raise ValueError("the sequences are empty (T = 0): give at least one token")
    if initial_state is not None:
        N = B if state_rows is None else state_rows
        for name, shape in (("S", (N, H, K, V)), ("o_sum", (N, H, V)), ("delta", (N, H, K))):
            got = tuple(getattr(initial_state, name).shape)
            if got != shape:
                raise ValueError(f"initial_state.{name} has shape {got}, expected {shape}")


def _prepare(q, k, v, g, b_logit, w, content, initial_state, scale):
    """Common set-up of both torch paths: q and k L2-normalised, the write term u = w v, g floored and
    b_logit, all as fp32 [B, H, T, D] tensors; the scale; the state."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    g = log_decay_of(g)
    _check_inputs(q, k, v, g, b_logit, w, content, initial_state)
    scale = K ** -0.5 if scale is None else scale
    to_bh = lambda x: x.float().transpose(1, 2)  # noqa: E731  [B, T, H, D] -> [B, H, T, D]
    q = F.normalize(to_bh(q), dim=-1, eps=L2_NORM_EPS)
    k = F.normalize(to_bh(k), dim=-1, eps=L2_NORM_EPS)
    u = to_bh(v) * (to_bh(w) if w.dim() == 4 else w.float().transpose(1, 2)[..., None])
    state = initial_state if initial_state is not None else zero_state(B, H, K, V, q.device)
    state = state._replace(o_sum=state.o_sum.detach())  # m is a stop-gradient read (see _next_delta)
    return q, k, u, to_bh(g).clamp(min=GATE_FLOOR), to_bh(b_logit), scale, state


def _next_delta(content, o_sum, chunk_size):
    """Delta for the next chunk from the finished chunk's output sum.

    Stop-gradient read of m (docs/DESIGN.md section 2): m is a constant, so gradients reach D and U
    but never flow through m into earlier states; that keeps the backward chunk-parallel."""
    D, U = content
    m = o_sum / chunk_size  # o_sum was accumulated from detached outputs
    return torch.einsum("hkr,hrv,bhv->bhk", U.float(), D.float(), m)


def recurrent_carve_torch(q, k, v, g, b_logit, w, content=None, initial_state=None,
                          output_final_state=False, scale=None, chunk_size=64):
    """Per-token fp32 recurrence, written straight from docs/DESIGN.md sections 1, 2 and 6. The decode path
    of the torch backend, tested like every other path against the float64 reference of tests/reference.py."""
    q, k, u, g, b_logit, scale, state = _prepare(q, k, v, g, b_logit, w, content, initial_state, scale)
    S, o_sum, delta, offset = state
    outs = []
    for t in range(q.shape[2]):
        b = torch.sigmoid(b_logit[:, :, t] + delta)                                  # [B, H, K]
        S = S * g[:, :, t].exp()[..., None]                                          # Diag(alpha) S
        v_new = u[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, b * k[:, :, t])
        S = S + k[:, :, t, :, None] * v_new[:, :, None, :]
        o = torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]) * scale
        outs.append(o)
        o_sum = o_sum + o.detach()  # m is a stop-gradient read (see _next_delta)
        if (offset + t + 1) % chunk_size == 0:                                       # chunk finished
            if content is not None:
                delta = _next_delta(content, o_sum, chunk_size)
            o_sum = torch.zeros_like(o_sum)
    o = torch.stack(outs, dim=1).to(v.dtype)                                         # [B, T, H, V]
    final = CarveState(S, o_sum, delta, offset + q.shape[2]) if output_final_state else None
    return o, final


SUB_CHUNK = 16   # tokens of a sub-chunk in _decayed_products, as the Triton kernels' blocks (docs/DESIGN.md section 3)


def _decayed_products(x, k, G, strict):
    """P_rs = sum_c x_rc k_sc exp(G_rc - G_sc) for s <= r (s < r if strict), 0 above: [B, H, C, C].

    exp(G_r - G_s) <= 1 wherever it is used, but gamma^-1 = exp(-G_s) alone overflows fp32 for a
    fast-decaying channel. So the chunk is cut into sub-chunks of SUB_CHUNK tokens: inside one, the ratio
    is formed pairwise; between sub-chunk i and an earlier j it is split into three factors that are
    each <= 1, exp(G_r - G_first(i)) exp(G_first(i) - G_last(j)) exp(G_last(j) - G_s), which turns the
    off-diagonal blocks into matrix products."""
    B, H, C, K = x.shape
    n = -(-C // SUB_CHUNK)
    pad = n * SUB_CHUNK - C
    if pad:  # zero vectors with no further decay; their rows and columns are cut off at the end
        x, k = F.pad(x, (0, 0, 0, pad)), F.pad(k, (0, 0, 0, pad))
        G = torch.cat([G, G[:, :, -1:].expand(B, H, pad, K)], dim=2)
    xb, kb, Gb = (t.reshape(B, H, n, SUB_CHUNK, K) for t in (x, k, G))
    inside = torch.ones(SUB_CHUNK, SUB_CHUNK, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    diff = (Gb[..., :, None, :] - Gb[..., None, :, :]).masked_fill(~inside[:, :, None], float("-inf"))
    diag = (xb[..., :, None, :] * kb[..., None, :, :] * diff.exp()).sum(-1)            # [B, H, n, s, s]
    G_first, G_last = Gb[..., 0, :], Gb[..., -1, :]                                     # [B, H, n, K]
    left = xb * (Gb - G_first[..., None, :]).exp()
    right = kb * (G_last[..., None, :] - Gb).exp()
    earlier = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)              # j < i
    between = (G_first[:, :, :, None] - G_last[:, :, None]).masked_fill(~earlier[:, :, None], float("-inf")).exp()
    blocks = (left[:, :, :, None] * between[..., None, :]) @ right[:, :, None].transpose(-1, -2)  # [B,H,n,n,s,s]
    blocks = blocks + torch.eye(n, dtype=x.dtype, device=x.device)[:, :, None, None] * diag[:, :, :, None]
    return blocks.transpose(3, 4).reshape(B, H, n * SUB_CHUNK, n * SUB_CHUNK)[:, :, :C, :C]


def _chunk_segments(offset, T, chunk_size):
    """Cut tokens 0 .. T-1 of a sequence that resumes at absolute position `offset` into pieces that
    each lie inside one absolute chunk: yields (start, end, whether the piece finishes its chunk)."""
    start = 0
    while start < T:
        end = min(T, start + chunk_size - (offset + start) % chunk_size)
        yield start, end, (offset + end) % chunk_size == 0
        start = end


def _chunk_step(q, k, u, g, b_logit, S0, delta, scale):
    """One chunk of the WY form (docs/DESIGN.md section 3), all chunk positions at once.

    q, k, g, b_logit: [B, H, C, K]; u: [B, H, C, V]; S0: [B, H, K, V]; delta: [B, H, K]."""
    C = q.shape[2]
    b = torch.sigmoid(b_logit + delta[:, :, None, :])
    G = g.cumsum(dim=2)                                                              # G_r, fp32
    Tm = _decayed_products(b * k, k, G, strict=True)                                 # T_rs, s < r
    M = _decayed_products(q, k, G, strict=False)                                     # M_rs, s <= r
    gamma = G.exp()
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    # A = (I + T)^-1 is never formed: one unit-lower-triangular solve gives Y and A Z (Z = u) together
    Y_AZ = torch.linalg.solve_triangular(eye + Tm, torch.cat([gamma * b * k, u], dim=-1),
                                         upper=False, unitriangular=True)
    Y, AZ = Y_AZ.split([k.shape[-1], u.shape[-1]], dim=-1)
    R = AZ - Y @ S0                                                                  # v_new of every token
    o = ((gamma * q) @ S0 + M @ R) * scale
    decay_to_end = (G[:, :, -1:, :] - G).exp()                                       # gamma_C / gamma_r
    S = gamma[:, :, -1, :, None] * S0 + (decay_to_end * k).transpose(-1, -2) @ R
    return o, S


def chunk_carve_torch(q, k, v, g, b_logit, w, content=None, initial_state=None,
                      output_final_state=False, scale=None, chunk_size=64):
    """Chunked WY form in torch, vectorised over batch, heads and chunk positions; the Python loop
    runs over chunks only, because CARVE's gates in chunk c depend on the output of chunk c-1.
    Chunks are cut at absolute positions (multiples of chunk_size counted from the sequence start),
    so a sequence resumed from a state at any offset sees the same chunks as one unbroken call."""
    q, k, u, g, b_logit, scale, state = _prepare(q, k, v, g, b_logit, w, content, initial_state, scale)
    S, o_sum, delta, offset = state
    T = q.shape[2]
    outs = []
    for start, end, finishes_chunk in _chunk_segments(offset, T, chunk_size):
        o, S = _chunk_step(q[:, :, start:end], k[:, :, start:end], u[:, :, start:end],
                           g[:, :, start:end], b_logit[:, :, start:end], S, delta, scale)
        outs.append(o)
        o_sum = o_sum + o.detach().sum(dim=2)  # m is a stop-gradient read (see _next_delta)
        if finishes_chunk:
            if content is not None:
                delta = _next_delta(content, o_sum, chunk_size)
            o_sum = torch.zeros_like(o_sum)
    o = torch.cat(outs, dim=2).transpose(1, 2).to(v.dtype)
    final = CarveState(S, o_sum, delta, offset + T) if output_final_state else None
    return o, final


def _needs_grad(q, k, v, g, b_logit, w, content, initial_state):
    """Whether autograd would record this call: grad mode on and any tensor input requiring grad."""
    state = (initial_state.S, initial_state.o_sum, initial_state.delta) if initial_state is not None else ()
    tensors = [q, k, v, g, b_logit, w, *(content or ()), *state]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sequence_bounds(q, cu_seqlens, initial_state):
    """cu_seqlens as a checked list of ints."""
    bounds = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    total = q.shape[1]
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the inputs hold the sequences back to back in one row: batch size "
                         f"must be 1, got {q.shape[0]}")
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the total length {total}, got {bounds}")
    if initial_state is not None and initial_state.S.shape[0] != len(bounds) - 1:
        raise ValueError(f"initial_state has {initial_state.S.shape[0]} rows for {len(bounds) - 1} packed sequences")
    return bounds


def packed_sequences_torch(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale, chunk_size,
                           cu_seqlens):
    """Packed sequences (flash-attention's cu_seqlens): the inputs are [1, total, H, D] holding N
    sequences back to back, sequence i at cu_seqlens[i] : cu_seqlens[i+1]. Each starts from its own
    state (row i of initial_state, else zeros) and counts chunks from its own start, so no state,
    content mean or chunk boundary reaches from one sequence into the next. The final state has a
    row per sequence and, as its offset, a tuple of the per-sequence positions."""
    bounds = _sequence_bounds(q, cu_seqlens, initial_state)
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        state = None
        if initial_state is not None:
            offset = initial_state.offset
            state = CarveState(initial_state.S[i:i + 1], initial_state.o_sum[i:i + 1], initial_state.delta[i:i + 1],
                               offset[i] if isinstance(offset, (tuple, list)) else offset)
        if end == start:  # an empty sequence: no output, its state passes through unchanged
            finals.append(state or zero_state(1, q.shape[2], q.shape[3], v.shape[3], q.device))
            continue
        piece = lambda x: x[:, start:end]  # noqa: E731
        o, final = chunk_carve_torch(piece(q), piece(k), piece(v), piece(g), piece(b_logit), piece(w), content,
                                     state, True, scale, chunk_size)
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape)
    if not output_final_state:
        return o, None
    return o, CarveState(torch.cat([f.S for f in finals]), torch.cat([f.o_sum for f in finals]),
                         torch.cat([f.delta for f in finals]), tuple(f.offset for f in finals))


# ============================================================================================
# 3. Triton chunk forward (docs/DESIGN.md section 4)
# ============================================================================================
# The forward walks each sequence and head through blocks of BT = 16 tokens: the WY form with
# 16-token blocks in place of C-token chunks, while Delta = U D m is still updated at absolute
# multiples of chunk_size C (a multiple of 16), so it is the same function. It has two forms
# (chunk_schedule picks one): the walk alone (_chunk_fwd_kernel, one program per sequence and head),
# or, when those programs would leave most of the card idle, split around the parallel
# _chunk_prep_kernel (and for GDN-2 a value-block walk and the parallel _chunk_fwd_output). It stores
# what the backward needs (ChunkSaved) except the state at each block start, which the backward walks
# again from what is stored (one product a block, without the solve and the output).

CHUNK_BT = 16  # rows of a block
# Launch settings from a sweep on an H200 (4, 8 and 16 warps, 1 to 3 stages). Two stages let the loads
# of the next block overlap the current one's products; the exceptions below were faster than that
# default (the prep kernel and GDN-2's walk 1.5x, the key side 1.07x). The backward's re-walk of the
# block states (REBUILD_LAUNCH) runs with GDN-2's walk's settings: it is a walk over value blocks too.
CHUNK_LAUNCH = dict(num_warps=8, num_stages=2)
PREP_LAUNCH = dict(num_warps=4, num_stages=2)
GDN2_WALK_LAUNCH = dict(num_warps=8, num_stages=3)
REBUILD_LAUNCH = dict(num_warps=8, num_stages=3)
KEYS_LAUNCH = dict(num_warps=8, num_stages=3)


def _reverse_walk_launch(n_walks, sms):
    """The backward's reverse walk (_chunk_bwd_walk): 4 warps when there are more walk programs than SMs,
    as two then share an SM, so all run at once (0.46 against 0.61 ms at 8 x 2048 on an H200); fewer
    programs run faster with 8 warps."""
    return dict(num_warps=4 if n_walks > sms else 8, num_stages=2)


class SequenceRow(NamedTuple):
    """A row of the sequence table (_sequence_table), which the chunk kernels read as SEQ_FIELDS ints a
    sequence (_sequence)."""
    first_token: int   # its first token's row among the flattened B*T tokens
    length: int
    offset: int        # the absolute position of its first token
    first_chunk: int   # its first chunk's row in the per-chunk stores (ChunkSaved's chunk_delta, chunk_mean)
    n_chunks: int      # the absolute chunks its tokens touch
    first_block: int   # its first block's row in the per-block stores (ChunkSaved's block_decay)


SEQ_FIELDS = len(SequenceRow._fields)


class TableSizes(NamedTuple):
    """The sequence table's sizes (_table_sizes), by which the launchers size their stores and grids."""
    n_sequences: int
    n_chunks: int      # rows of the per-chunk stores, all sequences together
    n_blocks: int      # rows of the per-block stores, all sequences together
    most_chunks: int   # the most chunks of one sequence


class ChunkSchedule(NamedTuple):
    """How the chunk kernels are launched for a shape; chunk_schedule is the measured rule, and a caller
    may give its own (the tests run every form on the CPU)."""
    split_forward: bool                       # split around the parallel prep kernel, or the walk alone
    walk_columns: int                         # value columns of GDN-2's walk in the split forward
    forward_pieces: int = 1                   # the split forward walks each sequence in this many pieces
    backward_columns: Optional[int] = None    # value columns of the reverse walk (None: walk_columns)
    backward_pieces: int = 1                  # the backward walks each sequence in this many pieces


WALK_PIECES, PIECE_CHUNKS = 8, 16  # pieces of a walk: at most 8, none shorter than 16 chunks


def chunk_schedule(n_sequences, most_chunks, H, V, has_content, sms) -> ChunkSchedule:
    """The launch plan, measured on an H200 (docs/DESIGN.md section 4 has the numbers).
    - The split forward moves more data (the prepared tiles): it pays only when the (sequence, head)
      walk programs fill less than half of the SMs.
    - Value-block walks take 32 columns where 64 would leave half the SMs idle (more programs).
    - Where a walk leaves at least half the SMs idle, each sequence is walked in pieces of chunks, so
      the parallel kernels of one piece run beside the walk of the next: at 1 x 32768 fwd+bwd took
      15.6 ms against 17.6 without pieces (CARVE), 7.95 against 9.95 (GDN-2), and CARVE 3.86 against
      4.01 at 4 x 4096. The reverse walk then takes 64 columns again: twice as many idle SMs gained
      more than the narrower walk.
    most_chunks: the most chunks of one sequence; sms: the card's SMs. On the CPU (sms 0) the walk alone,
    unpieced."""

    def pieces(n_walks):
        idle = 2 * n_walks <= sms
        return max(1, min(WALK_PIECES, most_chunks // PIECE_CHUNKS)) if idle else 1

    split = 2 * n_sequences * H < sms
    columns = min(V, 32 if 2 * n_sequences * H * (V // 64) < sms else 64)
    backward_columns = 64 if columns < 64 <= V and pieces(n_sequences * H * (V // columns)) > 1 else columns
    return ChunkSchedule(split_forward=split, walk_columns=columns,
                         forward_pieces=pieces(n_sequences * H * (1 if has_content else V // columns)) if split else 1,
                         backward_columns=backward_columns,
                         backward_pieces=pieces(n_sequences * H * (V // backward_columns)))


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


class ChunkSaved(NamedTuple):
    """What the chunk forward stores for the backward (docs/DESIGN.md section 4). The dot operands
    among them are in the operand dtype (_operand_dtype), so the backward reads what the forward used.
    Not the state at each block's start: the backward walks it again from R, k_end and G_L
    (_chunk_rebuild_states), since keeping it took 512 MiB a 1.3B layer of 4 x 4096 tokens. Nor the
    block tiles Y, gamma q and k_end (BlockTiles), which the backward makes again (_chunk_bwd_tiles).
    The walk starts from a copy of S0: a model's cache overwrites S0 in place after the call."""
    # each field's comment ends with the kernel parameter that takes it
    chunk_delta: torch.Tensor   # [chunks, H, K] fp32 Delta of each chunk; delta_store
    chunk_mean: torch.Tensor    # [chunks, H, V] fp32 m of each complete chunk (0 elsewhere and for GDN-2); m_store
    v_new: torch.Tensor         # [B, T, H, V] R = A Z - Y S of every token; r_store
    inverse: torch.Tensor       # [B, T, H, BT] fp32 A = (I + T)^-1 of each block, a row per token; a_store
    decayed_qk: torch.Tensor    # [B, T, H, BT] fp32 M of each block, a row per token; mm_store
    block_decay: torch.Tensor   # [blocks, H, K] fp32 the block's total log-decay G_L; gl_store
    initial_state: torch.Tensor  # [N, H, K, V] fp32 copy of S0 (empty without one), where the re-walk starts; S_in


class BlockTiles(NamedTuple):
    """Per-token tiles in the operand dtype that the split forward's walks and the backward's two walks
    read, made by each pass for itself (3 x 64 MiB a 1.3B layer of 16,384 tokens, not kept in between)."""
    y: torch.Tensor             # [B, T, H, K] Y = A (gamma b k); y_store
    gamma_q: torch.Tensor       # [B, T, H, K] gamma q; gq_store
    k_end: torch.Tensor         # [B, T, H, K] the keys decayed to their block's end; kend_store


def _block_tiles_buffers(q, y=True, gamma_q_and_k_end=True):
    """BlockTiles of q's shape in the operand dtype; None for those not wanted."""
    def new(wanted):
        return torch.empty(q.shape, dtype=_operand_dtype(q.dtype), device=q.device) if wanted else None
    return BlockTiles(new(y), new(gamma_q_and_k_end), new(gamma_q_and_k_end))


class ChunkForward(NamedTuple):
    """carve::chunk_fwd's outputs: o, the final state (a row per sequence), then ChunkSaved's fields."""
    o: torch.Tensor
    S: torch.Tensor
    o_sum: torch.Tensor
    delta: torch.Tensor
    saved: ChunkSaved


FIRST_SAVED_OUTPUT = 4   # carve::chunk_fwd's list of outputs: o, S, o_sum, delta, then ChunkSaved's fields


def chunk_triton_supports(k_dim, v_dim, chunk_size):
    """Shapes the chunk kernels take: K and V powers of two in 16..128, chunk_size a multiple of 16.
    Anything else runs the torch path."""
    return k_dim in (16, 32, 64, 128) and v_dim in (16, 32, 64, 128) and chunk_size % CHUNK_BT == 0


def chunk_carve_triton(q, k, v, g, b_logit, w, content=None, initial_state=None, output_final_state=False,
                       scale=None, chunk_size=64, cu_seqlens=None, schedule: Optional[ChunkSchedule] = None):
    """chunk_carve_torch's semantics (and packed_sequences_torch's for cu_seqlens) with the Triton chunk
    kernels, forward and backward, through the custom op carve::chunk_fwd and its registered autograd.
    `schedule` overrides chunk_schedule's choice (the tests run every form on the CPU). q may be a
    ShortConv standing for q, k and v (k and v None): the op then keeps its x rather than them."""
    conv = q if isinstance(q, ShortConv) else None
    if conv is not None:
        _check_short_conv(conv, k, v, b_logit)
        q, k, v = short_conv_qkv(conv, *b_logit.shape[2:])
    bounds = None if cu_seqlens is None else _sequence_bounds(q, cu_seqlens, initial_state)
    _check_inputs(q, k, v, g, b_logit, w, content, initial_state, None if bounds is None else len(bounds) - 1)
    B, T, H, K = q.shape
    if not chunk_triton_supports(K, v.shape[-1], chunk_size):
        raise ValueError(f"the Triton chunk kernels take K, V in 16..128 (powers of two) and chunk_size a "
                         f"multiple of 16; got K={K}, V={v.shape[-1]}, chunk_size={chunk_size}")
    offset = initial_state.offset if initial_state is not None else 0
    table = _sequence_table(B, T, offset, bounds, chunk_size)
    sizes = _table_sizes(table)
    schedule = schedule or chunk_schedule(sizes.n_sequences, sizes.most_chunks, H, v.shape[-1], content is not None,
                                          _sm_count(q.device))
    D, U = content if content is not None else (None, None)
    S0, o_sum0, delta0 = (initial_state.S, initial_state.o_sum, initial_state.delta) if initial_state is not None \
        else (None, None, None)
    g, A_log, dt_bias, a_log_min = g if isinstance(g, DecayGate) else (g, None, None, 0.0)
    g, f_weight = (g.x, g.weight) if isinstance(g, GateProjection) else (g, None)
    if A_log is not None:   # the kernels index them as packed [H] and [H, K]
        A_log, dt_bias = A_log.contiguous(), dt_bias.contiguous()
    o, S, o_sum, delta = torch.ops.carve.chunk_fwd(
        q, k, v, g, A_log, dt_bias, float(a_log_min), b_logit, w, D, U, S0, o_sum0, delta0, table,
        K ** -0.5 if scale is None else float(scale),
        chunk_size, schedule.split_forward, schedule.walk_columns, schedule.forward_pieces,
        schedule.backward_columns or schedule.walk_columns, schedule.backward_pieces, f_weight,
        *(conv if conv is not None else (None, None, None)))[:FIRST_SAVED_OUTPUT]
    if not output_final_state:
        return o, None
    offsets = tuple(row.offset + row.length for row in _table_rows(table))
    return o, CarveState(S, o_sum.detach(), delta, offsets if cu_seqlens is not None else offset + T)


def _aligned_windows(offset, length, size):
    """How many windows of `size` tokens, aligned at absolute multiples of it, the tokens offset ..
    offset + length - 1 touch."""
    return (offset + length - 1) // size - offset // size + 1 if length else 0


def _sequence_table(B, T, offset, cu_seqlens, chunk_size):
    """A SequenceRow per sequence, flattened into one list of ints (a custom-op argument)."""
    bounds = [n * T for n in range(B + 1)] if cu_seqlens is None else list(cu_seqlens)
    offsets = list(offset) if isinstance(offset, (tuple, list)) else [offset] * (len(bounds) - 1)
    table, chunks, blocks = [], 0, 0
    for start, end, off in zip(bounds, bounds[1:], offsets):
        n_chunks = _aligned_windows(off, end - start, chunk_size)
        # extend, not +=: torch.compile (dynamo of torch 2.11) refuses list += NamedTuple
        table.extend(SequenceRow(first_token=start, length=end - start, offset=off, first_chunk=chunks,
                                 n_chunks=n_chunks, first_block=blocks))
        chunks += n_chunks
        blocks += _aligned_windows(off, end - start, CHUNK_BT)
    return table


def _table_rows(table):
    """The flattened sequence table as a list of SequenceRows."""
    return [SequenceRow(*table[i:i + SEQ_FIELDS]) for i in range(0, len(table), SEQ_FIELDS)]


def _table_sizes(table) -> TableSizes:
    rows = _table_rows(table)
    last = rows[-1]
    return TableSizes(n_sequences=len(rows), n_chunks=last.first_chunk + last.n_chunks,
                      n_blocks=last.first_block + _aligned_windows(last.offset, last.length, CHUNK_BT),
                      most_chunks=max(row.n_chunks for row in rows))


def _packed_bt(x):
    """x [B, T, H, D] or [B, T, H] as the kernel reads it: the (H, D) part packed, any B and T
    strides (a view of a fused projection qualifies without a copy)."""
    packed = x.stride(-1) == 1 and (x.dim() == 3 or x.stride(2) == x.shape[-1])
    return x if packed else x.contiguous()


def _token_rows(x):
    """x [B, T, H, D] (or [B, T, H]) as the chunk kernels read it: _packed_bt's layout with, in addition,
    all B*T token rows at one stride; a view of a fused projection qualifies without a copy."""
    x = _packed_bt(x)
    return x.contiguous() if x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1) else x


def _to_device(values, device, dtype=torch.int64):
    """A host list as a tensor on `device` without waiting for the GPU. torch.tensor(..., device="cuda")
    copies and then synchronises the stream, so it waits for every queued kernel; six or seven such
    waits a forward + backward left the GPU idle between launches (removing them took CARVE at 8 x 2048
    from 6.4 to 4.6 ms on an H200). A non-blocking copy from pageable memory is staged at once and
    queued behind the kernels; it also traces under torch.compile, where pinning would not."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _operand_dtype(dtype):
    """The torch dtype of the chunk kernels' dot operands: the input dtype for bf16 and fp32 (see
    _dot_operands for the precision of fp32 products), and bf16 for fp16 inputs: the block decay factors
    reach e^40, far past fp16's largest value (65504, about e^11), while bf16 has fp32's range
    (docs/DESIGN.md section 7). Triton 3.9's interpreter multiplies the raw bits of bf16 dot operands
    (it keeps bf16 as uint16), so interpreted kernels use fp32 operands; the half-precision loads and
    stores of inputs and outputs stay as they are, and the compiled products are checked on a GPU. The
    forward stores the operands it used (ChunkSaved) in this dtype, so the backward reads the same values."""
    if dtype == torch.float32 or runs_in_interpreter():
        return torch.float32
    return torch.bfloat16


def _dot_operands(dtype):
    """Launch arguments of the chunk kernels for inputs of `dtype`: DT, _operand_dtype as a Triton dtype;
    PREC, for fp32 operands "tf32x3", three tf32 tensor-core products whose sum rounds close to the fp32
    product; and enable_fp_fusion off with fp32 operands. Exact fp32 products ("ieee", on the CUDA cores)
    spilled kilobytes a thread: fp32 forward+backward at 8 x 2048 on an H200 took 132.9 ms with them and
    15.7 ms with tf32x3 (docs/DESIGN.md section 12). tf32x3 splits an operand a into big = tf32(a) and
    small = a - big; with FP fusion, a product computed just before is contracted into that subtraction,
    so an operand computed in registers (GDN-2's prep kernel) and the same operand loaded (CARVE's walk)
    split differently, and CARVE at initialisation would no longer equal GDN-2 bit for bit. The 16 x 16
    inverse stays exact fp32 (_block_solve)."""
    dt = _operand_dtype(dtype)
    fp32 = dt == torch.float32
    return dict(DT=tl.float32 if fp32 else tl.bfloat16,
                PREC="tf32x3" if fp32 else "tf32", enable_fp_fusion=not fp32)


def _forward_buffers(q, v, table, has_initial, new):
    """carve::chunk_fwd's outputs as a ChunkForward of tensors made by `new(shape, dtype)`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    sizes = _table_sizes(table)
    N = sizes.n_sequences
    f32, dt = torch.float32, _operand_dtype(q.dtype)
    rows = lambda width, dtype: new((B, T, H, width), dtype)  # noqa: E731
    saved = ChunkSaved(chunk_delta=new((sizes.n_chunks, H, K), f32),
                       chunk_mean=new((sizes.n_chunks, H, V), f32), v_new=rows(V, dt), inverse=rows(CHUNK_BT, f32),
                       decayed_qk=rows(CHUNK_BT, f32), block_decay=new((sizes.n_blocks, H, K), f32),
                       initial_state=new((N, H, K, V) if has_initial else (0,), f32))
    return ChunkForward(o=rows(V, v.dtype), S=new((N, H, K, V), f32), o_sum=new((N, H, V), f32),
                        delta=new((N, H, K), f32), saved=saved)


def chunk_forward_triton(q, k, v, g, A_log, dt_bias, a_log_min, b_logit, w, D, U, S0, o_sum0, delta0, table, scale,
                         chunk_size, schedule: ChunkSchedule) -> ChunkForward:
    """The launches of one chunk forward (the body of carve::chunk_fwd). g is the log-decay, or with
    A_log and dt_bias (not None) a DecayGate's raw projection f."""
    H, K = q.shape[2], q.shape[3]
    sizes = _table_sizes(table)
    N = sizes.n_sequences
    dev, f32 = q.device, torch.float32
    q, k, v, g, b_logit, w = (_token_rows(x) for x in (q, k, v, g, b_logit, w))
    use_initial = S0 is not None
    out = _forward_buffers(q, v, table, use_initial, lambda shape, dtype: torch.empty(shape, dtype=dtype, device=dev))
    saved = out.saved
    saved.chunk_mean.zero_()   # m stays 0 for chunks that do not finish
    if use_initial:
        saved.initial_state.copy_(S0)
    S_in, o_sum_in = (saved.initial_state, o_sum0.float().contiguous()) if use_initial else (out.S, out.o_sum)
    delta0 = delta0.float().contiguous() if delta0 is not None else torch.zeros(N, H, K, dtype=f32, device=dev)
    has_content = D is not None
    seqs = _to_device(table, dev)
    V = v.shape[-1]
    # the state at each block's start (the kernels' h_store): only GDN-2's output kernel reads it (the walks
    # compute O as they go), and the backward walks it again rather than keeping it
    block_state = torch.empty(sizes.n_blocks, H, K, V, dtype=_operand_dtype(q.dtype), device=dev) \
        if schedule.split_forward and not has_content else None
    inputs = dict(q=q, k=k, g=g, A_log=A_log, dt_bias=dt_bias, a_log_min=a_log_min, RAW_DECAY=A_log is not None,
                  b_logit=b_logit, v=v, w=w, sq=q.stride(1), sk=k.stride(1), sg=g.stride(1), sb=b_logit.stride(1),
                  sv=v.stride(1), sw=w.stride(1), H=H)
    common = dict(K=K, V=V, C=chunk_size, BT=CHUNK_BT, **_dot_operands(q.dtype))
    # the split form's prep kernel hands its walks gamma q and k_end (GDN-2's also Y); the walk alone keeps
    # them in registers. The backward makes its own (_chunk_bwd_tiles)
    tiles = _block_tiles_buffers(q, y=schedule.split_forward and not has_content,
                                 gamma_q_and_k_end=schedule.split_forward)
    stores = dict(o=out.o, S_out=out.S, o_sum_out=out.o_sum, delta_out=out.delta, h_store=block_state,
                  delta_store=saved.chunk_delta, m_store=saved.chunk_mean, r_store=saved.v_new, a_store=saved.inverse,
                  mm_store=saved.decayed_qk, gq_store=tiles.gamma_q, kend_store=tiles.k_end,
                  gl_store=saved.block_decay)
    # the walks compute O as they go and keep no block states (STORE_STATES); tests/test_triton_chunk.py
    # turns it on to compare them with the states the backward rebuilds
    walk = dict(D=D, U=U, RANK=D.shape[1] if has_content else 1, VALUE_GATE=w.dim() == 4, HAS_CONTENT=has_content,
                STORE_STATES=False, scale=scale, **inputs, **stores, **common, **CHUNK_LAUNCH)
    if not schedule.split_forward:
        _chunk_fwd_kernel[(N * H,)](S_in=S_in, o_sum_in=o_sum_in, delta_in=delta0, seqs=seqs, kp_store=None,
                                    pk_store=None, gk_store=None, PREPPED=False, USE_INITIAL=use_initial, **walk)
        return out
    # CARVE's walk loads the key tiles; GDN-2's Delta never changes, so the prep kernel also solves
    # and leaves A Z for a walk over value blocks
    key_tiles = dict(kp_store=torch.empty(q.shape, dtype=f32, device=dev),
                     pk_store=torch.empty(q.shape, dtype=_operand_dtype(q.dtype), device=dev),
                     gk_store=torch.empty(q.shape, dtype=f32, device=dev)) if has_content else \
        dict(kp_store=None, pk_store=None, gk_store=None)
    az = None if has_content else torch.empty(v.shape, dtype=f32, device=dev)
    BV = schedule.walk_columns
    pieces = _walk_pieces(table, schedule.forward_pieces, chunk_size)
    walk_stream = _walk_stream(dev, len(pieces))
    for i, (piece_table, piece) in enumerate(zip(pieces, _pieces_on_device(pieces, dev, seqs))):
        piece_chunks = _table_sizes(piece_table).most_chunks
        _chunk_prep_kernel[(N * piece_chunks * H,)](
            delta_in=delta0, mm_store=saved.decayed_qk, gq_store=tiles.gamma_q, kend_store=tiles.k_end,
            gl_store=saved.block_decay, a_store=saved.inverse, y_store=tiles.y, az_store=az,
            delta_store=saved.chunk_delta, seqs=piece, max_chunks=piece_chunks, VALUE_GATE=w.dim() == 4,
            SOLVE=not has_content, **key_tiles, **inputs, **common, **PREP_LAUNCH)
        # a later piece starts from the state, o_sum and delta the previous one left (read, then rewritten)
        start = dict(S_in=out.S, o_sum_in=out.o_sum, delta_in=out.delta, USE_INITIAL=True) if i > 0 else \
            dict(S_in=S_in, o_sum_in=o_sum_in, delta_in=delta0, USE_INITIAL=use_initial)
        with _after_current(walk_stream):   # behind this piece's prep kernel
            if has_content:
                _chunk_fwd_kernel[(N * H,)](seqs=piece, PREPPED=True, **start, **key_tiles, **walk)
            else:
                _chunk_fwd_gdn2_walk[(N * H * (V // BV),)](
                    az_store=az, y_store=tiles.y, kend_store=tiles.k_end, gl_store=saved.block_decay,
                    S_out=out.S, o_sum_out=out.o_sum, delta_out=out.delta, h_store=block_state,
                    r_store=saved.v_new, seqs=piece, H=H, BV=BV, **start, **common, **GDN2_WALK_LAUNCH)
    if walk_stream is not None:
        torch.cuda.current_stream(dev).wait_stream(walk_stream)
    if not has_content:
        _chunk_fwd_output[(N * sizes.most_chunks * H,)](
            o=out.o, h_store=block_state, r_store=saved.v_new, mm_store=saved.decayed_qk,
            gq_store=tiles.gamma_q, o_sum_out=out.o_sum, seqs=seqs, max_chunks=sizes.most_chunks, H=H, scale=scale,
            **common, **CHUNK_LAUNCH)
    return out


def _walk_pieces(table, n, chunk_size):
    """The sequence table cut into n pieces of whole chunks, in order: each a table of its own, a row
    per sequence (empty where a sequence has no chunks left) pointing into the same stores, so the
    kernels are the same; one piece is the table itself."""
    rows = _table_rows(table)
    most = max(row.n_chunks for row in rows)
    if n <= 1 or most < 2:
        return [table]
    per_piece = -(-most // n)
    pieces = []
    for i0 in range(0, most, per_piece):
        piece = []
        for bos, length, off, chunk0, n_chunks, block0 in rows:
            lo, hi = min(i0, n_chunks), min(i0 + per_piece, n_chunks)   # the sequence's chunks lo .. hi - 1
            start = off if lo == 0 else min(off + length, (off // chunk_size + lo) * chunk_size)
            end = max(start, min(off + length, (off // chunk_size + hi) * chunk_size))
            piece.extend(SequenceRow(first_token=bos + start - off, length=end - start, offset=start,
                                     first_chunk=chunk0 + lo, n_chunks=hi - lo,
                                     first_block=block0 + start // CHUNK_BT - off // CHUNK_BT))
        pieces.append(piece)
    return pieces


def _pieces_on_device(pieces, device, seqs):
    """The pieces' tables on the device, in one copy; for one piece (the whole table), `seqs`, the table
    the caller already has there."""
    if len(pieces) == 1:
        return [seqs]
    return list(torch.split(_to_device(sum(pieces, []), device), len(pieces[0])))


def _walk_stream(device, n_pieces):
    """A high-priority stream per GPU for the walks of a sequence walked in pieces: when one piece's walk
    ends, the next one's programs take the freed SMs before the parallel kernels' waiting programs do.
    None for one piece, or on the CPU: the walks then run on the current stream (_after_current)."""
    return _high_priority_stream(device) if n_pieces > 1 and device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _high_priority_stream(device):
    return torch.cuda.Stream(device, priority=-1)


def _after_current(stream):
    """A context that enqueues on `stream` behind everything the current stream has enqueued so far
    (the current stream itself when `stream` is None, as on the CPU)."""
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return torch.cuda.stream(stream)


assert SEQ_FIELDS == 6, "_sequence reads a table row's first 6 ints: give it the new field too"
if triton is not None:
    SEQ_FIELDS_TL = tl.constexpr(SEQ_FIELDS)


@triton_jit
def _sequence(seqs, i_n, BT: tl.constexpr):
    """The table row of sequence i_n (see _sequence_table) and its first and last absolute block."""
    row = seqs + i_n * SEQ_FIELDS_TL
    bos = tl.load(row)
    length = tl.load(row + 1)
    offset = tl.load(row + 2)
    chunk0 = tl.load(row + 3)
    n_chunks = tl.load(row + 4)
    block0 = tl.load(row + 5)
    blk_first = offset // BT
    blk_last = tl.where(length > 0, (offset + length - 1) // BT, blk_first - 1)
    return bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last


@triton_jit
def _chunk_program(H, max_chunks):
    """(sequence, head, chunk) of a program in a grid over sequences x chunks x heads (chunks beyond a
    sequence's own count have nothing to do)."""
    pid = tl.program_id(0).to(tl.int64)
    i_nj = pid // H
    return i_nj // max_chunks, pid % H, i_nj % max_chunks


@triton_jit
def _value_block_program(H, NV):
    """(sequence, head, value block) of a program in a grid over sequences x heads x value blocks."""
    pid = tl.program_id(0).to(tl.int64)
    i_nh = pid // NV
    return i_nh // H, i_nh % H, pid % NV


@triton_jit
def _block_rows(a, bos, offset, length, BT: tl.constexpr):
    """Token rows of absolute block a: flat token index and validity (inside this call)."""
    t = a * BT + tl.arange(0, BT) - offset
    valid = (t >= 0) & (t < length)
    return bos + t, valid


@triton_jit
def _chunk_blocks(j, offset, blk_first, blk_last, C: tl.constexpr, BT: tl.constexpr):
    """First and last absolute block of the sequence's chunk j (counted in this call)."""
    a0 = tl.maximum(((offset // C) + j) * (C // BT), blk_first)
    a1 = tl.minimum(((offset // C) + j + 1) * (C // BT) - 1, blk_last)
    return a0, a1


@triton_jit
def _log_decay(g, A_log, dt_bias, a_log_min, tok, valid, i_h, sg, K: tl.constexpr, RAW_DECAY: tl.constexpr):
    """Rows `tok` (masked by `valid`: 0 there) of head i_h of the log-decay, unfloored: g itself, or
    with RAW_DECAY (a DecayGate) decay_gate's value from the raw projection f in g, A_log and dt_bias.
    Also returns f + dt_bias (RAW_DECAY; else g), which the backward's df needs."""
    o_k = tl.arange(0, K)
    m = valid[:, None]
    x = tl.load(g + tok[:, None] * sg + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    if RAW_DECAY:
        x += tl.load(dt_bias + i_h * K + o_k).to(tl.float32)[None, :]
        g_raw = tl.where(m, _decay_gate(x, tl.load(A_log + i_h).to(tl.float32), a_log_min), 0.0)
    else:
        g_raw = x
    return g_raw, x


@triton_jit
def _block_inputs(q, k, g, A_log, dt_bias, a_log_min, tok, valid, i_h, sq, sk, sg, K: tl.constexpr,
                  RAW_DECAY: tl.constexpr):
    """Rows `tok` (masked by `valid`) of head i_h: L2-normalised q and k with their norms, the raw
    log-decay (_log_decay), and the floored log-decay's in-block cumsum and total."""
    o_k = tl.arange(0, K)
    m = valid[:, None]
    q_raw = tl.load(q + tok[:, None] * sq + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    k_raw = tl.load(k + tok[:, None] * sk + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    g_raw, _ = _log_decay(g, A_log, dt_bias, a_log_min, tok, valid, i_h, sg, K, RAW_DECAY)
    q_norm = tl.maximum(tl.sqrt(tl.sum(q_raw * q_raw, axis=1)), L2_NORM_EPS_TL)   # as F.normalize
    k_norm = tl.maximum(tl.sqrt(tl.sum(k_raw * k_raw, axis=1)), L2_NORM_EPS_TL)
    gf = tl.maximum(g_raw, GATE_FLOOR_TL)
    Gc = tl.cumsum(gf, axis=0)                                              # G_r inside the block
    GL = tl.sum(gf, axis=0)                                                 # G of the block's last row
    return q_raw / q_norm[:, None], k_raw / k_norm[:, None], q_norm, k_norm, g_raw, Gc, GL


@triton_jit
def _erase_gate(b_logit, tok, valid, i_h, sb, delta, K: tl.constexpr):
    """b = sigmoid(b_logit + delta) for rows `tok` of head i_h."""
    o_k = tl.arange(0, K)
    b_l = tl.load(b_logit + tok[:, None] * sb + i_h * K + o_k[None, :], mask=valid[:, None], other=0.0)
    return tl.sigmoid(b_l.to(tl.float32) + delta[None, :])


@triton_jit
def _block_factors(qn, kn, Gc, GL):
    """exp(G_r - G_s) = exp(G_r - G_L/2) exp(G_L/2 - G_s): both factors lie within exp(+-40) for
    g >= -5, so T = tril((b Kp) Pk^T, -1) and M = tril(Pq Pk^T) are products of bounded operands.
    Returns Pq, Pk, Kp = k exp(G - G_L/2), and the two factors."""
    half = GL * 0.5
    e_pos = tl.exp(Gc - half[None, :])
    e_neg = tl.exp(half[None, :] - Gc)
    return qn * e_pos, kn * e_neg, kn * e_pos, e_pos, e_neg


@triton_jit
def _load_block_rows(ptr, tok, valid, i_h, H, BT: tl.constexpr, IDENTITY: tl.constexpr):
    """A stored [BT, BT] block matrix, one row per token ([tokens, H, BT] fp32); rows outside the
    call read as rows of the identity (IDENTITY) or zero."""
    o_t = tl.arange(0, BT)
    x = tl.load(ptr + (tok[:, None] * H + i_h) * BT + o_t[None, :], mask=valid[:, None], other=0.0)
    if IDENTITY:
        x = tl.where(valid[:, None], x, tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0))
    return x


@triton_jit
def _block_solve(Pb, Pk_dt, DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """A = (I + T)^-1 with T = tril(Pb Pk^T, -1), as (I - T)(I + T^2)(I + T^4)(I + T^8) (T is strictly
    lower triangular, so T^16 = 0), in exact fp32. The CARVE walk and GDN-2's parallel solve both call
    this, so the two round alike (CARVE at initialisation must equal GDN-2 bit for bit)."""
    o_t = tl.arange(0, BT)
    r_i = o_t[:, None]
    s_i = o_t[None, :]
    Tm = tl.where(r_i > s_i, tl.dot(Pb.to(DT), tl.trans(Pk_dt), input_precision=PREC), 0.0)
    eye = tl.where(r_i == s_i, 1.0, 0.0)
    N2 = tl.dot(Tm, Tm, input_precision="ieee")
    A = tl.dot(eye - Tm, eye + N2, input_precision="ieee")
    N4 = tl.dot(N2, N2, input_precision="ieee")
    A = tl.dot(A, eye + N4, input_precision="ieee")
    return tl.dot(A, eye + tl.dot(N4, N4, input_precision="ieee"), input_precision="ieee")


@triton_jit
def _block_y(A, b, gk, DT: tl.constexpr, PREC: tl.constexpr):
    """Y = A (b gamma k) in the operand dtype: the forward (_block_wy) and the backward's tiles
    (_chunk_bwd_tiles) both make it here, so the two agree bit for bit."""
    return tl.dot(A.to(DT), (b * gk).to(DT), input_precision=PREC).to(DT)


@triton_jit
def _block_wy(A, b, gk, v, w, tok, valid, i_h, sv, sw, V: tl.constexpr, VALUE_GATE: tl.constexpr,
              DT: tl.constexpr, PREC: tl.constexpr):
    """Y = A (b gamma k) in the operand dtype and A Z in fp32, Z = w * v (w a vector or a scalar a row)."""
    o_v = tl.arange(0, V)
    m_row = valid[:, None]
    v_t = tl.load(v + tok[:, None] * sv + i_h * V + o_v[None, :], mask=m_row, other=0.0).to(tl.float32)
    if VALUE_GATE:
        w_t = tl.load(w + tok[:, None] * sw + i_h * V + o_v[None, :], mask=m_row, other=0.0)
        Z = w_t.to(tl.float32) * v_t
    else:
        Z = tl.load(w + tok * sw + i_h, mask=valid, other=0.0).to(tl.float32)[:, None] * v_t
    return _block_y(A, b, gk, DT, PREC), tl.dot(A.to(DT), Z.to(DT), input_precision=PREC)


@triton_jit
def _state_after_block(S, k_end_dt, R_dt, GL, PREC: tl.constexpr):
    """gamma_L S + k_end^T R: the state after a block, as the forward walks (_walk_block) and the
    backward's re-walk (_chunk_rebuild_states) both compute it, so the two agree bit for bit."""
    return tl.dot(tl.trans(k_end_dt), R_dt, acc=S * tl.exp(GL)[:, None], input_precision=PREC)


@triton_jit
def _walk_block(S, Y_dt, AZ, k_end_dt, GL, h_store, h_offsets, STORE: tl.constexpr, DT: tl.constexpr,
                PREC: tl.constexpr):
    """One block of a forward walk from the state S before it: stores S in the operand dtype if STORE
    (for _chunk_fwd_output; _chunk_rebuild_states makes the same for the backward) and returns it,
    R = A Z - Y S in the operand dtype, and the state after the block, gamma_L S + k_end^T R. Both
    walks take their blocks through it, so that CARVE at initialisation rounds exactly as GDN-2 does."""
    S_dt = S.to(DT)
    if STORE:
        tl.store(h_store + h_offsets, S_dt.to(h_store.dtype.element_ty))
    R_dt = (AZ - tl.dot(Y_dt, S_dt, input_precision=PREC)).to(DT)
    return S_dt, R_dt, _state_after_block(S, k_end_dt, R_dt, GL, PREC)


@triton_jit
def _block_tiles(q, k, g, A_log, dt_bias, a_log_min, tok, valid, i_h, sq, sk, sg, K: tl.constexpr,
                 RAW_DECAY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """What a block's forward needs that depends on neither the state nor Delta: M in fp32, gamma q and
    the keys decayed to the block end (k_end) in the operand dtype, and the block's total log-decay (M and
    G_L kept for the backward, gamma q and k_end made again by it: _chunk_bwd_tiles); and the key tiles T
    and Y are built from, Kp = k exp(G - G_L/2) and gamma k in fp32, Pk = k exp(G_L/2 - G) in the operand
    dtype."""
    qn, kn, q_norm, k_norm, g_raw, Gc, GL = _block_inputs(q, k, g, A_log, dt_bias, a_log_min, tok, valid, i_h, sq,
                                                          sk, sg, K, RAW_DECAY)
    Pq, Pk, Kp, e_pos, e_neg = _block_factors(qn, kn, Gc, GL)
    Pk_dt = Pk.to(DT)
    o_t = tl.arange(0, BT)
    Mm = tl.where(o_t[:, None] >= o_t[None, :], tl.dot(Pq.to(DT), tl.trans(Pk_dt), input_precision=PREC), 0.0)
    gamma = tl.exp(Gc)
    return Mm, (gamma * qn).to(DT), (tl.exp(GL[None, :] - Gc) * kn).to(DT), GL, Kp, Pk_dt, gamma * kn


@triton_jit
def _store_block_tiles(mm_store, gq_store, kend_store, gl_store, Mm, gq_dt, k_end_dt, GL, tok, valid, i_h,
                       i_blk, H, K: tl.constexpr, BT: tl.constexpr, TILES: tl.constexpr):
    """_block_tiles' M and G_L for the backward (i_blk: the block's row in gl_store), and with TILES
    gamma q and k_end for a walk of this call that reads them (the split forward's)."""
    o_k = tl.arange(0, K)
    m_row = valid[:, None]
    p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
    tl.store(mm_store + (tok[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], Mm, mask=m_row)
    if TILES:
        tl.store(gq_store + p_k, gq_dt.to(gq_store.dtype.element_ty), mask=m_row)
        tl.store(kend_store + p_k, k_end_dt.to(kend_store.dtype.element_ty), mask=m_row)
    tl.store(gl_store + i_blk * K + o_k, GL)


@triton_jit
def _chunk_prep_kernel(q, k, g, A_log, dt_bias, a_log_min, b_logit, v, w, delta_in, mm_store, gq_store, kend_store,
                       gl_store, kp_store, pk_store, gk_store, a_store, y_store, az_store, delta_store, seqs,
                       max_chunks, sq, sk, sg, sb, sv, sw, H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       RAW_DECAY: tl.constexpr, VALUE_GATE: tl.constexpr, SOLVE: tl.constexpr, DT: tl.constexpr,
                       PREC: tl.constexpr, BT: tl.constexpr):
    """One program per (sequence, chunk, head), for a forward split in parallel parts: each block's
    _block_tiles, stored for the backward and, for the CARVE walk (PREPPED), the three key tiles. With
    SOLVE (GDN-2, whose Delta never changes): the solve itself, A, Y and A Z, for
    _chunk_fwd_gdn2_walk."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    if j < n_chunks:
        a0, a1 = _chunk_blocks(j, offset, blk_first, blk_last, C, BT)
        o_k = tl.arange(0, K)
        o_t = tl.arange(0, BT)
        if SOLVE:
            delta = tl.load(delta_in + (i_n * H + i_h) * K + o_k)
            tl.store(delta_store + ((chunk0 + j) * H + i_h) * K + o_k, delta)
        for a in range(a0, a1 + 1):
            tok, valid = _block_rows(a, bos, offset, length, BT)
            m_row = valid[:, None]
            Mm, gq_dt, k_end_dt, GL, Kp, Pk_dt, gk = _block_tiles(
                q, k, g, A_log, dt_bias, a_log_min, tok, valid, i_h, sq, sk, sg, K, RAW_DECAY, DT, PREC, BT)
            _store_block_tiles(mm_store, gq_store, kend_store, gl_store, Mm, gq_dt, k_end_dt, GL, tok, valid, i_h,
                               (block0 + a - blk_first) * H + i_h, H, K, BT, True)
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            if SOLVE:
                b = _erase_gate(b_logit, tok, valid, i_h, sb, delta, K)
                A = _block_solve(b * Kp, Pk_dt, DT, PREC, BT)
                Y_dt, AZ = _block_wy(A, b, gk, v, w, tok, valid, i_h, sv, sw, V, VALUE_GATE, DT, PREC)
                tl.store(a_store + (tok[:, None] * H + i_h) * BT + o_t[None, :], A, mask=m_row)
                tl.store(y_store + p_k, Y_dt.to(y_store.dtype.element_ty), mask=m_row)
                o_v = tl.arange(0, V)
                tl.store(az_store + tok[:, None] * (H * V) + i_h * V + o_v[None, :], AZ, mask=m_row)
            else:
                tl.store(kp_store + p_k, Kp, mask=m_row)
                tl.store(pk_store + p_k, Pk_dt.to(pk_store.dtype.element_ty), mask=m_row)
                tl.store(gk_store + p_k, gk, mask=m_row)


@triton_jit
def _chunk_fwd_gdn2_walk(az_store, y_store, kend_store, gl_store, S_in, o_sum_in, delta_in, S_out, o_sum_out,
                         delta_out, h_store, r_store, seqs, H, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                         C: tl.constexpr, USE_INITIAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                         BT: tl.constexpr):
    """GDN-2's walk, one program per (sequence, head, value block): with A, Y and A Z solved in
    parallel beforehand, a block is _walk_block, as in the CARVE walk. Stores the state at every block
    start and R; the outputs come from _chunk_fwd_output."""
    i_n, i_h, i_v = _value_block_program(H, V // BV)
    i_nh = i_n * H + i_h
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    p_kv = o_k[:, None] * V + o_v[None, :]
    p_S = i_nh * K * V + p_kv
    # the initial o_sum (or 0) goes to o_sum_out, where _chunk_fwd_output reads and updates it
    if USE_INITIAL:
        S = tl.load(S_in + p_S)
        tl.store(o_sum_out + i_nh * V + o_v, tl.load(o_sum_in + i_nh * V + o_v))
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
        tl.store(o_sum_out + i_nh * V + o_v, tl.zeros([BV], dtype=tl.float32))
    if i_v == 0:
        tl.store(delta_out + i_nh * K + o_k, tl.load(delta_in + i_nh * K + o_k))
    for a in range(blk_first, blk_last + 1):
        tok, valid = _block_rows(a, bos, offset, length, BT)
        m_row = valid[:, None]
        p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_v = tok[:, None] * (H * V) + i_h * V + o_v[None, :]
        Y_dt = tl.load(y_store + p_k, mask=m_row, other=0.0).to(DT)
        k_end_dt = tl.load(kend_store + p_k, mask=m_row, other=0.0).to(DT)
        AZ = tl.load(az_store + p_v, mask=m_row, other=0.0)
        i_blk = (block0 + a - blk_first) * H + i_h
        GL = tl.load(gl_store + i_blk * K + o_k)
        S_dt, R_dt, S = _walk_block(S, Y_dt, AZ, k_end_dt, GL, h_store, i_blk * K * V + p_kv, True, DT, PREC)
        tl.store(r_store + p_v, R_dt.to(r_store.dtype.element_ty), mask=m_row)
    tl.store(S_out + p_S, S)


@triton_jit
def _chunk_fwd_output(o, h_store, r_store, mm_store, gq_store, o_sum_out, seqs, max_chunks, H, scale,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      BT: tl.constexpr):
    """GDN-2's outputs, one program per (sequence, chunk, head): O = (gamma q S + M R) scale from the
    stored block states and R, as the CARVE walk computes it. The last chunk of a sequence writes the
    final o_sum: 0 if it is complete, else its rows' sum, plus the initial o_sum when it is also the
    call's first chunk (the chunk that o_sum belongs to)."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    if j < n_chunks:
        a0, a1 = _chunk_blocks(j, offset, blk_first, blk_last, C, BT)
        o_k = tl.arange(0, K)
        o_v = tl.arange(0, V)
        i_nh = i_n * H + i_h
        last = j == n_chunks - 1
        if last & (j == 0):   # the initial o_sum, which _chunk_fwd_gdn2_walk copied into o_sum_out
            o_acc = tl.load(o_sum_out + i_nh * V + o_v)
        else:
            o_acc = tl.zeros([V], dtype=tl.float32)
        for a in range(a0, a1 + 1):
            tok, valid = _block_rows(a, bos, offset, length, BT)
            m_row = valid[:, None]
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            p_v = tok[:, None] * (H * V) + i_h * V + o_v[None, :]
            gq_dt = tl.load(gq_store + p_k, mask=m_row, other=0.0).to(DT)
            Mm = _load_block_rows(mm_store, tok, valid, i_h, H, BT, False)
            R_dt = tl.load(r_store + p_v, mask=m_row, other=0.0).to(DT)
            S_dt = tl.load(h_store + ((block0 + a - blk_first) * H + i_h) * K * V + o_k[:, None] * V
                           + o_v[None, :]).to(DT)
            O = (tl.dot(gq_dt, S_dt, input_precision=PREC) + tl.dot(Mm.to(DT), R_dt, input_precision=PREC)) * scale
            tl.store(o + p_v, O.to(o.dtype.element_ty), mask=m_row)
            o_acc += tl.sum(O, axis=0)
        if last:
            complete = (offset + length) % C == 0
            tl.store(o_sum_out + i_nh * V + o_v, tl.where(complete, 0.0, o_acc))


@triton_jit
def _chunk_fwd_kernel(q, k, g, A_log, dt_bias, a_log_min, b_logit, v, w, D, U, o, S_in, o_sum_in, delta_in, S_out,
                      o_sum_out, delta_out, h_store, delta_store, m_store, r_store, a_store, mm_store,
                      gq_store, kend_store, gl_store, kp_store, pk_store, gk_store, seqs, sq, sk, sg, sb, sv, sw, H,
                      scale, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, RANK: tl.constexpr,
                      RAW_DECAY: tl.constexpr, VALUE_GATE: tl.constexpr, HAS_CONTENT: tl.constexpr,
                      PREPPED: tl.constexpr, USE_INITIAL: tl.constexpr, STORE_STATES: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """The walk, one program per (sequence, head): the whole forward of CARVE (and of GDN-2 when
    there are programs enough to fill the card), or with PREPPED, CARVE's walk over
    _chunk_prep_kernel's tiles."""
    i_nh = tl.program_id(0).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    o_k = tl.arange(0, K)
    o_v = tl.arange(0, V)
    o_t = tl.arange(0, BT)
    p_kv = o_k[:, None] * V + o_v[None, :]
    p_S = i_nh * K * V + p_kv
    if USE_INITIAL:
        S = tl.load(S_in + p_S)
        o_acc = tl.load(o_sum_in + i_nh * V + o_v)
    else:
        S = tl.zeros([K, V], dtype=tl.float32)
        o_acc = tl.zeros([V], dtype=tl.float32)
    delta = tl.load(delta_in + i_nh * K + o_k)
    for a in range(blk_first, blk_last + 1):
        tok, valid = _block_rows(a, bos, offset, length, BT)
        m_row = valid[:, None]
        j = (a * BT) // C - offset // C                    # chunk of this block, counted in this call
        if ((a * BT) % C == 0) | (a == blk_first):         # a chunk starts: keep its Delta
            tl.store(delta_store + ((chunk0 + j) * H + i_h) * K + o_k, delta)
        i_blk = (block0 + a - blk_first) * H + i_h
        p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_16 = (tok[:, None] * H + i_h) * BT + o_t[None, :]
        if PREPPED:
            Kp = tl.load(kp_store + p_k, mask=m_row, other=0.0)
            Pk_dt = tl.load(pk_store + p_k, mask=m_row, other=0.0)
            gk = tl.load(gk_store + p_k, mask=m_row, other=0.0)
            gq_dt = tl.load(gq_store + p_k, mask=m_row, other=0.0).to(DT)
            k_end_dt = tl.load(kend_store + p_k, mask=m_row, other=0.0).to(DT)
            Mm = _load_block_rows(mm_store, tok, valid, i_h, H, BT, False)
            GL = tl.load(gl_store + i_blk * K + o_k)
        else:
            Mm, gq_dt, k_end_dt, GL, Kp, Pk_dt, gk = _block_tiles(
                q, k, g, A_log, dt_bias, a_log_min, tok, valid, i_h, sq, sk, sg, K, RAW_DECAY, DT, PREC, BT)
            _store_block_tiles(mm_store, gq_store, kend_store, gl_store, Mm, gq_dt, k_end_dt, GL, tok, valid, i_h,
                               i_blk, H, K, BT, False)
        b = _erase_gate(b_logit, tok, valid, i_h, sb, delta, K)
        A = _block_solve(b * Kp, Pk_dt, DT, PREC, BT)
        Y_dt, AZ = _block_wy(A, b, gk, v, w, tok, valid, i_h, sv, sw, V, VALUE_GATE, DT, PREC)
        S_dt, R_dt, S = _walk_block(S, Y_dt, AZ, k_end_dt, GL, h_store, i_blk * K * V + p_kv, STORE_STATES, DT,
                                    PREC)
        O = (tl.dot(gq_dt, S_dt, input_precision=PREC) + tl.dot(Mm.to(DT), R_dt, input_precision=PREC)) * scale
        o_acc += tl.sum(O, axis=0)                     # masked rows are exact zeros
        p_o = tok[:, None] * (H * V) + i_h * V + o_v[None, :]
        tl.store(o + p_o, O.to(o.dtype.element_ty), mask=m_row)
        tl.store(r_store + p_o, R_dt.to(r_store.dtype.element_ty), mask=m_row)
        tl.store(a_store + p_16, A, mask=m_row)
        if (((a + 1) * BT) % C == 0) & ((a + 1) * BT <= offset + length):   # a chunk is complete
            if HAS_CONTENT:
                m = o_acc / C      # stop-gradient read of m (docs/DESIGN.md section 2)
                tl.store(m_store + ((chunk0 + j) * H + i_h) * V + o_v, m)
                o_r = tl.arange(0, RANK)
                Dm = tl.load(D + i_h * RANK * V + o_r[:, None] * V + o_v[None, :]).to(tl.float32)
                Dm = tl.sum(Dm * m[None, :], axis=1)                                     # D m  [RANK]
                Um = tl.load(U + i_h * K * RANK + o_k[:, None] * RANK + o_r[None, :]).to(tl.float32)
                delta = tl.sum(Um * Dm[None, :], axis=1)                                 # U D m [K]
            o_acc = tl.zeros([V], dtype=tl.float32)
    tl.store(S_out + p_S, S)
    tl.store(o_sum_out + i_nh * V + o_v, o_acc)
    tl.store(delta_out + i_nh * K + o_k, delta)


# ============================================================================================
# 4. Triton chunk backward (docs/DESIGN.md section 5)
# ============================================================================================
# Five kernels: _chunk_bwd_tiles (the forward's block tiles Y, gamma q and k_end again, parallel over
# chunks); two sequential ones, _chunk_rebuild_states (the state at each block start, walked again
# forward) and _chunk_bwd_walk (blocks in reverse, per value block, carrying the state gradient); then
# two kernels parallel over chunks: _chunk_bwd_values (dv, dw and the
# value-summed pieces) and _chunk_bwd_keys (the chain through A, T and M to dq, dk, dg, db_logit, dDelta;
# given a DecayGate, df for dg and the parts of the gradients of dt_bias and A_log).

def chunk_backward_triton(q, k, v, g, A_log, dt_bias, a_log_min, b_logit, w, do, dS_end, saved: ChunkSaved, table,
                          scale, chunk_size, backward_columns, backward_pieces, split_forward):
    """The launches of one chunk backward (the body of carve::chunk_bwd): dq, dk, dv, dg, db_logit,
    dw, dDelta of each chunk, each initial state's gradient, and for a DecayGate (A_log given; dg is
    then df) the gradients of dt_bias and A_log, the latter before A_log's floor (zeros without).
    backward_columns and backward_pieces: ChunkSchedule's, the reverse walk's value columns and pieces;
    with pieces, the value and key sides of the piece just walked run beside the reverse walk of the
    pieces before it. split_forward: the forward's form (its block tiles are made again with the launch
    settings of the kernel that made them)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, n_chunks, n_blocks, max_chunks = _table_sizes(table)
    dev, f32, dt = q.device, torch.float32, _operand_dtype(q.dtype)
    q, k, v, g, b_logit, w, do = (_token_rows(x) for x in (q, k, v, g, b_logit, w, do))
    BV = backward_columns
    n_walks = N * H * (V // BV)
    dots = _dot_operands(q.dtype)
    seqs = _to_device(table, dev)
    pieces = _walk_pieces(table, backward_pieces, chunk_size)[::-1]   # the last piece first
    piece_seqs = _pieces_on_device(pieces, dev, seqs)
    # the walk carries dS through this buffer from the end of each sequence to its start
    dS0 = dS_end.float().clone(memory_format=torch.contiguous_format) if dS_end is not None else \
        torch.zeros(N, H, K, V, dtype=f32, device=dev)
    dr_store = torch.empty(B, T, H, V, dtype=dt, device=dev)    # only read as a dot operand
    ds_store = torch.empty(n_blocks, H, K, V, dtype=dt, device=dev)
    block_state = torch.empty(n_blocks, H, K, V, dtype=dt, device=dev)   # h_store, as the forward's
    tiles = _block_tiles_buffers(q)
    _chunk_bwd_tiles[(N * max_chunks * H,)](
        q=q, k=k, g=g, A_log=A_log, dt_bias=dt_bias, a_log_min=a_log_min, b_logit=b_logit,
        delta_store=saved.chunk_delta, a_store=saved.inverse, y_store=tiles.y, gq_store=tiles.gamma_q,
        kend_store=tiles.k_end, seqs=seqs, max_chunks=max_chunks, sq=q.stride(1), sk=k.stride(1), sg=g.stride(1),
        sb=b_logit.stride(1), H=H, K=K, C=chunk_size, RAW_DECAY=A_log is not None, BT=CHUNK_BT, **dots,
        # launched as the forward kernel that made them (the prep kernel, or the walk alone): a 16 x K tile's
        # in-block cumsum and sum are spread over the warps by their number, and another number of warps
        # adds them in another order, which would change the tiles' last bits
        **(PREP_LAUNCH if split_forward else CHUNK_LAUNCH))
    # 32 columns a program: the walk is a chain of one small product a block, so more and narrower
    # programs finish sooner (at 4 x 4096, 256 programs for 132 SMs rather than 128 of 64 columns)
    rebuild_columns = min(V, 32)
    _chunk_rebuild_states[(N * H * (V // rebuild_columns),)](
        S_in=saved.initial_state, kend_store=tiles.k_end, r_store=saved.v_new,
        gl_store=saved.block_decay, h_store=block_state, seqs=seqs, H=H, K=K, V=V,
        BV=rebuild_columns, C=chunk_size, USE_INITIAL=saved.initial_state.numel() > 0, BT=CHUNK_BT, **dots,
        **REBUILD_LAUNCH)
    # sum over V of S * dS, the gradient of gamma_L = exp(G_L): a part per block and reverse-walk program
    s_ds_parts = torch.empty(n_blocks, H, V // BV, K, dtype=f32, device=dev)
    walk_stream = _walk_stream(dev, len(pieces))
    walk_launch = _reverse_walk_launch(n_walks, _sm_count(dev))
    walked = []   # an event after each piece's walk (None for one piece, or on the CPU)
    for piece in piece_seqs:
        with _after_current(walk_stream):
            _chunk_bwd_walk[(n_walks,)](
                do=do, h_store=block_state, mm_store=saved.decayed_qk, y_store=tiles.y,
                gq_store=tiles.gamma_q, kend_store=tiles.k_end, gl_store=saved.block_decay, dS_carry=dS0,
                dr_store=dr_store, ds_store=ds_store, s_ds_parts=s_ds_parts, seqs=piece, H=H, scale=scale, K=K, V=V,
                BV=BV, C=chunk_size, BT=CHUNK_BT, **dots, **walk_launch)
            walked.append(walk_stream.record_event() if walk_stream is not None else None)
    d_gq, d_kend = (torch.empty(B, T, H, K, dtype=f32, device=dev) for _ in range(2))
    d_y = torch.empty(B, T, H, K, dtype=dt, device=dev)         # only read as a dot operand
    d_m, d_rr = (torch.empty(B, T, H, CHUNK_BT, dtype=f32, device=dev) for _ in range(2))
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    dw = torch.empty(B, T, H, *w.shape[3:], dtype=w.dtype if w.dim() == 4 else f32, device=dev)
    for i, (piece_table, piece, event) in enumerate(zip(pieces, piece_seqs, walked)):
        if event is not None:
            torch.cuda.current_stream(dev).wait_event(event)
        piece_chunks = _table_sizes(piece_table).most_chunks
        grid = (N * piece_chunks * H,)
        _chunk_bwd_values[grid](
            v=v, w=w, do=do, r_store=saved.v_new, dr_store=dr_store, h_store=block_state, ds_store=ds_store,
            a_store=saved.inverse, dv=dv, dw=dw, d_gq=d_gq, d_y=d_y, d_kend=d_kend, d_m=d_m, d_rr=d_rr, seqs=piece,
            max_chunks=piece_chunks, sv=v.stride(1), sw=w.stride(1), H=H, scale=scale, K=K, V=V, C=chunk_size,
            VALUE_GATE=w.dim() == 4, BT=CHUNK_BT, **dots, **CHUNK_LAUNCH)
        if i == len(pieces) - 1:
            del dr_store, ds_store, block_state, tiles   # read for the last time (the key side does not read them)
        if i == 0:   # made here so that, with one piece, they take the memory of the stores just freed
            dq, dk, db_logit = (torch.empty(B, T, H, K, dtype=x.dtype, device=dev) for x in (q, k, b_logit))
            dg = torch.empty(B, T, H, K, dtype=g.dtype, device=dev)
            d_delta = torch.empty(n_chunks, H, K, dtype=f32, device=dev)
            # per-chunk parts of the decay parameters' gradients (summed below: deterministic, no atomics)
            d_dt_bias, d_A_log = (torch.empty(n_chunks if A_log is not None else 0, H, K, dtype=f32, device=dev)
                                  for _ in range(2))
        _chunk_bwd_keys[grid](
            q=q, k=k, g=g, A_log=A_log, dt_bias=dt_bias, a_log_min=a_log_min, b_logit=b_logit,
            delta_store=saved.chunk_delta, a_store=saved.inverse, gl_store=saved.block_decay, d_gq=d_gq, d_y=d_y,
            d_kend=d_kend, s_ds_parts=s_ds_parts, d_m=d_m, d_rr=d_rr, dq=dq, dk=dk, dg=dg, db_logit=db_logit,
            d_delta=d_delta, d_dt_bias=d_dt_bias, d_A_log=d_A_log, seqs=piece, max_chunks=piece_chunks,
            sq=q.stride(1), sk=k.stride(1), sg=g.stride(1), sb=b_logit.stride(1), H=H, NV=V // BV, K=K, C=chunk_size,
            RAW_DECAY=A_log is not None, BT=CHUNK_BT, **dots, **KEYS_LAUNCH)
    return [dq, dk, dv, dg, db_logit, dw.to(w.dtype), d_delta, dS0, d_dt_bias.sum(0), d_A_log.sum((0, 2))]


def _content_grads(d_delta, d_delta_final, m_store, D, U, table, chunk_size):
    """From dDelta of each chunk (summed over its rows by the backward kernel) to the gradients of D,
    U and the initial delta. Chunk i's Delta is the initial delta for a sequence's first chunk and
    U D m_{i-1} after it; the final delta is U D m of the last chunk if that chunk is complete, else
    the last chunk's Delta. m is data here (stop-gradient, docs/DESIGN.md section 2)."""
    rows = _table_rows(table)
    dev = d_delta.device
    final = d_delta_final if d_delta_final is not None else d_delta.new_zeros(len(rows), *d_delta.shape[1:])
    walked = [n for n, r in enumerate(rows) if r.n_chunks > 0]         # sequences with at least one chunk
    complete = [(r.offset + r.length) % chunk_size == 0 for r in rows]  # ... whose last chunk is complete
    index_lists = dict(chunk_seq=[n for n, r in enumerate(rows) for _ in range(r.n_chunks)],  # each chunk's row
                       seq=walked, last=[rows[n].first_chunk + rows[n].n_chunks - 1 for n in walked],
                       first=[rows[n].first_chunk for n in walked], done=[complete[n] for n in walked],
                       passes=[r.n_chunks == 0 or c for r, c in zip(rows, complete)])
    # one copy to the device for all index lists: each copy costs the host tens of microseconds
    chunk_seq, seq, last, first, done, passes = torch.split(_to_device(sum(index_lists.values(), []), dev),
                                                            [len(x) for x in index_lists.values()])
    done, passes = done.bool()[:, None, None], passes.bool()[:, None, None]
    final_of_last = final[seq]
    d_delta[last] += torch.where(done, 0.0, final_of_last)
    if D is None:  # GDN-2: every chunk uses the state's delta unchanged
        return None, None, torch.where(passes, final, 0.0).index_add_(0, chunk_seq, d_delta)
    d_delta0 = final.clone()
    d_delta0[seq] = d_delta[first]
    d_next = torch.cat([d_delta[1:], torch.zeros_like(d_delta[:1])])   # gradient of U D m of chunk i
    d_next[last] = torch.where(done, final_of_last, 0.0)
    # per head: dU = d_next^T (D m) and dD = (U^T d_next)^T m over the chunks, as batched products (an
    # einsum spent longer planning its contraction order on the host than the GPU spent on it)
    m_h, d_next_h = m_store.transpose(0, 1), d_next.transpose(0, 1)     # [H, chunks, V], [H, chunks, K]
    dU = torch.matmul(d_next_h.transpose(1, 2), torch.matmul(m_h, D.float().transpose(1, 2)))
    dD = torch.matmul(torch.matmul(d_next_h, U.float()).transpose(1, 2), m_h)
    return dD.to(D.dtype), dU.to(U.dtype), d_delta0


@triton_jit
def _state_grad_step(dS, gq, Y, gammaL, dO, dR, scale, DT: tl.constexpr, PREC: tl.constexpr):
    """The gradient of the state before a block from the one after it, with O = (gamma q S + M R) scale,
    R = A Z - Y S and S_end = gamma_L S + k_end^T R: gamma_L dS + (gamma q)^T dO scale - Y^T dR."""
    dS = tl.dot(tl.trans((gq * scale).to(DT)), dO, acc=dS * gammaL[:, None], input_precision=PREC)
    return tl.dot(tl.trans((-Y).to(DT)), dR, acc=dS, input_precision=PREC)


@triton_jit
def _chunk_bwd_tiles(q, k, g, A_log, dt_bias, a_log_min, b_logit, delta_store, a_store, y_store, gq_store, kend_store,
                     seqs, max_chunks, sq, sk, sg, sb, H, K: tl.constexpr, C: tl.constexpr, RAW_DECAY: tl.constexpr,
                     DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """One program per (sequence, chunk, head): the forward's block tiles again, bit for bit: gamma q and
    k_end from _block_tiles, and Y = A (b gamma k) (_block_y) from the stored A and Delta."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    if j < n_chunks:
        a0, a1 = _chunk_blocks(j, offset, blk_first, blk_last, C, BT)
        o_k = tl.arange(0, K)
        delta = tl.load(delta_store + ((chunk0 + j) * H + i_h) * K + o_k)
        for a in range(a0, a1 + 1):
            tok, valid = _block_rows(a, bos, offset, length, BT)
            m_row = valid[:, None]
            _, gq_dt, k_end_dt, _, _, _, gk = _block_tiles(q, k, g, A_log, dt_bias, a_log_min, tok, valid, i_h, sq,
                                                           sk, sg, K, RAW_DECAY, DT, PREC, BT)
            b = _erase_gate(b_logit, tok, valid, i_h, sb, delta, K)
            Y_dt = _block_y(_load_block_rows(a_store, tok, valid, i_h, H, BT, True), b, gk, DT, PREC)
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            tl.store(y_store + p_k, Y_dt.to(y_store.dtype.element_ty), mask=m_row)
            tl.store(gq_store + p_k, gq_dt.to(gq_store.dtype.element_ty), mask=m_row)
            tl.store(kend_store + p_k, k_end_dt.to(kend_store.dtype.element_ty), mask=m_row)


@triton_jit
def _chunk_rebuild_states(S_in, kend_store, r_store, gl_store, h_store, seqs, H, K: tl.constexpr, V: tl.constexpr,
                          BV: tl.constexpr, C: tl.constexpr, USE_INITIAL: tl.constexpr, DT: tl.constexpr,
                          PREC: tl.constexpr, BT: tl.constexpr):
    """The state at every block start, one program per (sequence, head, value block), walked again from
    the sequence's initial state with the R the forward kept and k_end made again (_chunk_bwd_tiles):
    S' = gamma_L S + k_end^T R (_state_after_block, as in _walk_block), with the same operands, so the
    backward reads the states the forward used."""
    i_n, i_h, i_v = _value_block_program(H, V // BV)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    p_kv = o_k[:, None] * V + o_v[None, :]
    if USE_INITIAL:
        S = tl.load(S_in + (i_n * H + i_h) * K * V + p_kv)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for a in range(blk_first, blk_last + 1):
        tok, valid = _block_rows(a, bos, offset, length, BT)
        m_row = valid[:, None]
        k_end_dt = tl.load(kend_store + tok[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_row, other=0.0).to(DT)
        R_dt = tl.load(r_store + tok[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_row, other=0.0).to(DT)
        i_blk = (block0 + a - blk_first) * H + i_h
        tl.store(h_store + i_blk * K * V + p_kv, S.to(DT).to(h_store.dtype.element_ty))
        S = _state_after_block(S, k_end_dt, R_dt, tl.load(gl_store + i_blk * K + o_k), PREC)


@triton_jit
def _chunk_bwd_walk(do, h_store, mm_store, y_store, gq_store, kend_store, gl_store, dS_carry, dr_store, ds_store,
                    s_ds_parts, seqs, H, scale, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """One program per (sequence, head, value block), blocks in reverse, carrying dS (the gradient of
    the state after the block): stores dR of every token and dS of every block, in the operand dtype
    (the value side reads both only as dot operands, as it reads the forward's block states), and into
    s_ds_parts this value block's part of the sum over V of S * dS, the gradient of the block's decay
    gamma_L = exp(G_L) (one part per value block; the key side adds them). The sum reads the fp32 dS, and
    the block state it needs is loaded one block ahead: a load the next statements waited for cost 1 us a
    block on the H200. dS_carry holds the state gradient at the end of each sequence and gets it at its
    start."""
    i_n, i_h, i_v = _value_block_program(H, V // BV)
    i_nh = i_n * H + i_h
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    p_kv = o_k[:, None] * V + o_v[None, :]
    p_S = i_nh * K * V + p_kv
    dS = tl.load(dS_carry + p_S)
    # the state before the last block (masks as tensors: the interpreter takes no scalar condition there)
    S_blk = tl.load(h_store + ((block0 + blk_last - blk_first) * H + i_h) * K * V + p_kv,
                    mask=p_kv * 0 + blk_last >= blk_first, other=0.0)
    for aa in range(blk_first, blk_last + 1):
        a = blk_last + blk_first - aa
        tok, valid = _block_rows(a, bos, offset, length, BT)
        m_row = valid[:, None]
        i_blk = (block0 + a - blk_first) * H + i_h
        dS_dt = dS.to(DT)
        tl.store(ds_store + i_blk * K * V + p_kv, dS_dt.to(ds_store.dtype.element_ty))
        tl.store(s_ds_parts + (i_blk * (V // BV) + i_v) * K + o_k, tl.sum(S_blk.to(tl.float32) * dS, axis=1))
        S_blk = tl.load(h_store + (i_blk - H) * K * V + p_kv, mask=p_kv * 0 + a > blk_first,
                        other=0.0)                                              # block a - 1's
        Mm = _load_block_rows(mm_store, tok, valid, i_h, H, BT, False)
        p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
        k_end = tl.load(kend_store + p_k, mask=m_row, other=0.0).to(DT)
        gq = tl.load(gq_store + p_k, mask=m_row, other=0.0).to(tl.float32)
        Y = tl.load(y_store + p_k, mask=m_row, other=0.0).to(tl.float32)
        gammaL = tl.exp(tl.load(gl_store + i_blk * K + o_k))
        p_v = tok[:, None] * (H * V) + i_h * V + o_v[None, :]
        dO = tl.load(do + p_v, mask=m_row, other=0.0).to(DT)
        dR = tl.dot(tl.trans(Mm.to(DT)), dO, input_precision=PREC) * scale \
            + tl.dot(k_end, dS_dt, input_precision=PREC)
        dR_dt = dR.to(DT)
        tl.store(dr_store + p_v, dR_dt.to(dr_store.dtype.element_ty), mask=m_row)
        dS = _state_grad_step(dS, gq, Y, gammaL, dO, dR_dt, scale, DT, PREC)
    tl.store(dS_carry + p_S, dS)


@triton_jit
def _chunk_bwd_values(v, w, do, r_store, dr_store, h_store, ds_store, a_store, dv, dw, d_gq, d_y, d_kend,
                      d_m, d_rr, seqs, max_chunks, sv, sw, H, scale, K: tl.constexpr, V: tl.constexpr,
                      C: tl.constexpr, VALUE_GATE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      BT: tl.constexpr):
    """One program per (sequence, chunk, head): per block, from the state before it (as
    _chunk_rebuild_states walked it again) and the state gradient after it (as the reverse walk stored
    it), dv, dw and the value-summed pieces the key-side kernel needs. All V columns in one program, so
    the sums over V are plain stores (deterministic, nothing to zero first)."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    if j < n_chunks:
        a0, a1 = _chunk_blocks(j, offset, blk_first, blk_last, C, BT)
        o_k = tl.arange(0, K)
        o_v = tl.arange(0, V)
        o_t = tl.arange(0, BT)
        p_kv = o_k[:, None] * V + o_v[None, :]
        for a in range(a0, a1 + 1):
            i_blk = (block0 + a - blk_first) * H + i_h
            S_dt = tl.load(h_store + i_blk * K * V + p_kv).to(DT)
            dS_dt = tl.load(ds_store + i_blk * K * V + p_kv).to(DT)
            tok, valid = _block_rows(a, bos, offset, length, BT)
            m_row = valid[:, None]
            p_v = tok[:, None] * (H * V) + i_h * V + o_v[None, :]
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            dO = tl.load(do + p_v, mask=m_row, other=0.0).to(DT)
            R = tl.load(r_store + p_v, mask=m_row, other=0.0).to(DT)
            dR = tl.load(dr_store + p_v, mask=m_row, other=0.0).to(DT)
            A = _load_block_rows(a_store, tok, valid, i_h, H, BT, True)
            v_t = tl.load(v + tok[:, None] * sv + i_h * V + o_v[None, :], mask=m_row, other=0.0).to(tl.float32)
            if VALUE_GATE:
                w_t = tl.load(w + tok[:, None] * sw + i_h * V + o_v[None, :], mask=m_row, other=0.0)
                w_t = w_t.to(tl.float32)
            else:
                w_t = tl.load(w + tok * sw + i_h, mask=valid, other=0.0).to(tl.float32)[:, None]
            tl.store(d_gq + p_k, tl.dot(dO, tl.trans(S_dt), input_precision=PREC) * scale, mask=m_row)
            tl.store(d_y + p_k, (-tl.dot(dR, tl.trans(S_dt), input_precision=PREC)).to(d_y.dtype.element_ty),
                     mask=m_row)
            tl.store(d_kend + p_k, tl.dot(R, tl.trans(dS_dt), input_precision=PREC), mask=m_row)
            p_16 = (tok[:, None] * H + i_h) * BT + o_t[None, :]
            tl.store(d_m + p_16, tl.dot(dO, tl.trans(R), input_precision=PREC) * scale, mask=m_row)
            tl.store(d_rr + p_16, tl.dot(dR, tl.trans(R), input_precision=PREC), mask=m_row)
            dZ = tl.dot(tl.trans(A.to(DT)), dR, input_precision=PREC)
            tl.store(dv + p_v, (dZ * w_t).to(dv.dtype.element_ty), mask=m_row)
            if VALUE_GATE:
                tl.store(dw + p_v, (dZ * v_t).to(dw.dtype.element_ty), mask=m_row)
            else:
                tl.store(dw + tok * H + i_h, tl.sum(dZ * v_t, axis=1), mask=valid)


@triton_jit
def _chunk_bwd_keys(q, k, g, A_log, dt_bias, a_log_min, b_logit, delta_store, a_store, gl_store, d_gq, d_y, d_kend,
                    s_ds_parts, d_m, d_rr, dq, dk, dg, db_logit, d_delta, d_dt_bias, d_A_log, seqs, max_chunks, sq, sk,
                    sg, sb, H, NV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, RAW_DECAY: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """One program per (sequence, chunk, head): for each block, the chain from the value-summed
    pieces through A = (I + T)^-1, T and M (whose factors are rebuilt from q, k, g, b) to dq, dk,
    dg, db_logit, and dDelta of the chunk. With RAW_DECAY, dg holds df instead (the gradient of the
    raw projection, through decay_gate) and the chunk's parts of the gradients of dt_bias and A_log
    (per channel) go to d_dt_bias and d_A_log."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, BT)
    if j < n_chunks:
        a0, a1 = _chunk_blocks(j, offset, blk_first, blk_last, C, BT)
        o_k = tl.arange(0, K)
        o_t = tl.arange(0, BT)
        r_i = o_t[:, None]
        s_i = o_t[None, :]
        delta = tl.load(delta_store + ((chunk0 + j) * H + i_h) * K + o_k)
        d_delta_sum = tl.zeros([K], dtype=tl.float32)
        d_dt = tl.zeros([K], dtype=tl.float32)
        d_A_log_sum = tl.zeros([K], dtype=tl.float32)
        for a in range(a0, a1 + 1):
            tok, valid = _block_rows(a, bos, offset, length, BT)
            m_row = valid[:, None]
            qn, kn, q_norm, k_norm, g_raw, Gc, _ = _block_inputs(q, k, g, A_log, dt_bias, a_log_min, tok, valid, i_h,
                                                                 sq, sk, sg, K, RAW_DECAY)
            # the forward's total log-decay, the same bits as _block_inputs' sum, which is unused here and
            # dropped by the compiler: a reduction across the tile's rows costs shared-memory round trips
            GL = tl.load(gl_store + ((block0 + a - blk_first) * H + i_h) * K + o_k)
            b = _erase_gate(b_logit, tok, valid, i_h, sb, delta, K)
            Pq, Pk, Kp, e_pos, e_neg = _block_factors(qn, kn, Gc, GL)
            Pb = b * Kp
            gamma = tl.exp(Gc)
            decay_end = tl.exp(GL[None, :] - Gc)
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            dgq = tl.load(d_gq + p_k, mask=m_row, other=0.0)
            dY = tl.load(d_y + p_k, mask=m_row, other=0.0)
            At = tl.trans(_load_block_rows(a_store, tok, valid, i_h, H, BT, True))
            dX = tl.dot(At.to(DT), dY.to(DT), input_precision=PREC)
            d_kend_tile = tl.load(d_kend + p_k, mask=m_row, other=0.0)
            p_gl = (((block0 + a - blk_first) * H + i_h) * NV) * K + o_k
            s_ds = tl.load(s_ds_parts + p_gl)                # sum(S * dS), one part per reverse-walk program
            for i_v in tl.static_range(1, NV):
                s_ds += tl.load(s_ds_parts + p_gl + i_v * K)
            dM = tl.where(r_i >= s_i, _load_block_rows(d_m, tok, valid, i_h, H, BT, False), 0.0)
            # R = A (Z - X S) with A = (I + T)^-1, so dT = -A^T dR R^T (dR R^T from the value side)
            dT = -tl.dot(At, _load_block_rows(d_rr, tok, valid, i_h, H, BT, False), input_precision="ieee")
            dT = tl.where(r_i > s_i, dT, 0.0)
            dPb = tl.dot(dT.to(DT), Pk.to(DT), input_precision=PREC)
            dPq = tl.dot(dM.to(DT), Pk.to(DT), input_precision=PREC)
            dPk = tl.dot(tl.trans(dT.to(DT)), Pb.to(DT), input_precision=PREC) \
                + tl.dot(tl.trans(dM.to(DT)), Pq.to(DT), input_precision=PREC)
            # T = Pb Pk^T, M = Pq Pk^T, O = (gamma q S + M R) scale, Y = A X with X = gamma b k and
            # S_end = gamma_L S + k_end^T R, where Pq = q e_pos, Pk = k e_neg, Pb = b k e_pos, k_end = k decay_end;
            # d/dG of e_pos, gamma is the factor itself, of e_neg, decay_end its negative
            dqn = dPq * e_pos + dgq * gamma
            d_bk = dPb * e_pos + dX * gamma                                # the gradient of b k
            db = kn * d_bk
            dk_end = d_kend_tile * decay_end
            dk_neg = dPk * e_neg + dk_end
            dkn = dk_neg + b * d_bk
            dGc = qn * dqn + b * db - kn * dk_neg
            dGL = tl.sum(kn * dk_end, axis=0) + tl.exp(GL) * s_ds
            dg_tile = tl.cumsum(dGc, axis=0, reverse=True) + dGL[None, :]  # G_r = sum of g_s for s <= r
            dg_tile = tl.where(g_raw < GATE_FLOOR_TL, 0.0, dg_tile)            # the floor's gradient
            if RAW_DECAY:   # g = -rate softplus(x), x = f + dt_bias: dg/dx = -rate sigmoid(x), dg/dA_log = g
                _, x = _log_decay(g, A_log, dt_bias, a_log_min, tok, valid, i_h, sg, K, RAW_DECAY)
                rate = tl.exp(tl.maximum(tl.load(A_log + i_h).to(tl.float32), a_log_min))
                d_A_log_tile = dg_tile * g_raw
                dg_tile = dg_tile * -rate * tl.where(x > SOFTPLUS_THRESHOLD_TL, 1.0, tl.sigmoid(x))
                d_dt += tl.sum(tl.where(m_row, dg_tile, 0.0), axis=0)
                d_A_log_sum += tl.sum(tl.where(m_row, d_A_log_tile, 0.0), axis=0)
            dq_raw = tl.where(q_norm[:, None] > L2_NORM_EPS_TL,
                              (dqn - qn * tl.sum(qn * dqn, axis=1)[:, None]) / q_norm[:, None],
                              dqn / L2_NORM_EPS_TL)
            dk_raw = tl.where(k_norm[:, None] > L2_NORM_EPS_TL,
                              (dkn - kn * tl.sum(kn * dkn, axis=1)[:, None]) / k_norm[:, None],
                              dkn / L2_NORM_EPS_TL)
            dbl = db * b * (1.0 - b)
            d_delta_sum += tl.sum(tl.where(m_row, dbl, 0.0), axis=0)
            tl.store(dq + p_k, dq_raw.to(dq.dtype.element_ty), mask=m_row)
            tl.store(dk + p_k, dk_raw.to(dk.dtype.element_ty), mask=m_row)
            tl.store(dg + p_k, dg_tile.to(dg.dtype.element_ty), mask=m_row)
            tl.store(db_logit + p_k, dbl.to(db_logit.dtype.element_ty), mask=m_row)
        tl.store(d_delta + ((chunk0 + j) * H + i_h) * K + o_k, d_delta_sum)
        if RAW_DECAY:
            tl.store(d_dt_bias + ((chunk0 + j) * H + i_h) * K + o_k, d_dt)
            tl.store(d_A_log + ((chunk0 + j) * H + i_h) * K + o_k, d_A_log_sum)


# ============================================================================================
# 5. Triton decode (docs/DESIGN.md section 6)
# ============================================================================================
# The per-token recurrence of recurrent_carve_torch as one kernel, for decode: inference only, no
# backward. Each program owns a [K, BV] tile of one head's fp32 state and keeps it in registers over
# the tokens of a segment, so the state is read and written once per segment. A segment never crosses
# an absolute chunk boundary: the content update between chunks (Delta = U D m) is a tiny einsum the
# launcher does in torch, exactly like the torch path. decode_step_triton fuses one generated token's
# whole layer step into one launch: the short conv, the gates and this recurrence.

def _decode_config(k_dim, v_dim):
    """(BK, BV, num_warps) of _recurrent_fwd_kernel. The step is memory-bound: each program reads
    and writes a BK x BV fp32 state tile once per segment and does ~6 flops per element per token.
    Measured on one H200 (H = 16, K = V = 128, fp32 state, device time of a decode step from a CUDA
    graph; copy bandwidth 4.27 TB/s): BV = 32 with one warp (128 state elements a thread, all in
    registers) is the fastest of BV 8..64 x 1..8 warps at B = 256 (138 us, 3.9 TB/s) and B = 32
    (21 us); at B = 1 every config takes 2.6-3.4 us (launch latency), so the choice does not depend
    on the batch. More than ~128 elements a thread spills (BV = 64 with one warp: 6x slower), hence
    the warps for wider tiles."""
    BK = max(16, 1 << (k_dim - 1).bit_length())
    BV = min(32, max(16, 1 << (v_dim - 1).bit_length()))
    num_warps = max(1, min(8, BK * BV // 4096))
    return BK, BV, num_warps


def recurrent_carve_triton(q, k, v, g, b_logit, w, content=None, initial_state=None,
                           output_final_state=False, scale=None, chunk_size=64, value_columns=None):
    """recurrent_carve_torch's semantics with the Triton kernel: same inputs (g or a DecayGate, made into
    g in torch first), o in v.dtype, the same CarveState. Inference only (the decode path): it has no
    backward, so it refuses inputs that need a gradient; `recurrent_carve` sends those to the torch path.

    The tokens are cut into segments at absolute chunk boundaries (chunk c(t) = (offset + t) //
    chunk_size), one launch per segment. After a segment that finishes a chunk: m = o_sum / C,
    Delta = U D m (CARVE), o_sum = 0, in torch. A decode step (T = 1) is one launch, plus that
    einsum once every chunk_size tokens. No host synchronisation."""
    g = log_decay_of(g)
    _check_inputs(q, k, v, g, b_logit, w, content, initial_state)
    if _needs_grad(q, k, v, g, b_logit, w, content, initial_state):
        raise RuntimeError("recurrent_carve_triton is inference only (no backward): call it under "
                           "torch.no_grad(), or use recurrent_carve, which takes the torch path when "
                           "a gradient is needed")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    dev, f32 = q.device, torch.float32
    q, k, v, g, b_logit, w = (_packed_bt(x) for x in (q, k, v, g, b_logit, w))
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    S = torch.empty(B, H, K, V, dtype=f32, device=dev)  # the kernel writes every element
    o_sum = torch.empty(B, H, V, dtype=f32, device=dev)
    if initial_state is not None:
        S_in = initial_state.S.to(f32).contiguous()
        o_sum_in = initial_state.o_sum.to(f32).contiguous()
        delta = initial_state.delta.to(f32).contiguous()
        offset = initial_state.offset
    else:
        S_in, o_sum_in, offset = S, o_sum, 0
        delta = torch.zeros(B, H, K, dtype=f32, device=dev)
    use_initial = initial_state is not None
    BK, BV, num_warps = _decode_config(K, V)
    if value_columns is not None:  # narrower tiles than the measured choice (the tests' masks and blocks)
        BV, num_warps = value_columns, 1
    grid = (triton.cdiv(V, BV) * B * H,)
    strides = {f"s{name}_{axis}": x.stride(i) for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("bl", b_logit),
                                                              ("w", w)) for i, axis in enumerate("bt")}
    for start, end, finishes_chunk in _chunk_segments(offset, T, chunk_size):
        _recurrent_fwd_kernel[grid](q=q, k=k, v=v, g=g, b_logit=b_logit, w=w, o=o, S_in=S_in, S_out=S,
                                    o_sum_in=o_sum_in, o_sum_out=o_sum, delta=delta, **strides, t_start=start,
                                    n_tokens=end - start, T=T, H=H, scale=scale, K=K, V=V, BK=BK, BV=BV,
                                    VALUE_GATE=w.dim() == 4, USE_INITIAL=use_initial, num_warps=num_warps)
        # from here on the kernel continues from (and overwrites in place) its own output
        S_in, o_sum_in, use_initial = S, o_sum, True
        if finishes_chunk:
            delta = _finish_chunk(content, o_sum, delta, chunk_size)
    final = CarveState(S, o_sum, delta, offset + T) if output_final_state else None
    return o, final


def decode_step_triton(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w_logit, state, content, a_log_min,
                       scale=None, chunk_size=64):
    """One fused decode step of a CARVE / GDN-2 layer from its projections at one position: x [B, 2HK + HV]
    (q, k, v before the conv), conv_weight [2HK + HV, 1, W], conv_cache [B, 2HK + HV, W - 1], f and
    b_logit [B, H*K], w_logit [B, H*V] (GDN-2) or [B, H] (CARVE), the write gate's logit (the kernel
    applies the sigmoid), all before their activations, and the layer's A_log [H] and dt_bias [H*K].
    Returns o [B, 1, H, V] in x's dtype and advances the state's S, o_sum and delta (contiguous fp32) and
    conv_cache in place, so that a CUDA graph of the step replays on the same buffers. It computes what
    causal_conv_silu, the gates and recurrent_carve_triton compute in model.py, in one launch (plus the
    Delta einsum in torch once every chunk_size tokens), and the conv cache's shift in a second (every
    value block of a head reads the head's q and k cache, so none may overwrite it during the launch).
    Inference only."""
    B, n_ch = x.shape
    H = A_log.shape[0]
    K = f.shape[-1] // H
    V = (n_ch - 2 * H * K) // H
    width = conv_weight.shape[-1]
    S, o_sum, delta, offset = state
    for name, tensor in (("S", S), ("o_sum", o_sum), ("delta", delta)):
        if tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(f"decode_step_triton updates the state in place: state.{name} must be contiguous "
                             f"fp32 (zero_state's), got {tensor.dtype}, strides {tensor.stride()}")
    BK, BV, num_warps = _decode_config(K, V)
    o = torch.empty(B, 1, H, V, dtype=x.dtype, device=x.device)
    new_cache = torch.empty(B, n_ch, width - 1, dtype=conv_cache.dtype, device=x.device)
    c = lambda t: t.contiguous()  # noqa: E731
    # each program reads its [K, BV] tile of S and its BV entries of o_sum before writing them back
    _decode_step_kernel[(triton.cdiv(V, BV) * B * H,)](
        x=c(x), conv_w=c(conv_weight), conv_in=c(conv_cache), conv_out=new_cache, f=c(f), A_log=c(A_log),
        dt_bias=c(dt_bias), b_logit=c(b_logit), w_logit=c(w_logit), o=o, S_in=S, S_out=S, o_sum_in=o_sum,
        o_sum_out=o_sum, delta=delta, H=H, scale=K ** -0.5 if scale is None else float(scale),
        a_log_min=float(a_log_min), K=K, V=V, BK=BK, BV=BV, WIDTH=width, WP=max(2, 1 << (width - 2).bit_length()),
        VALUE_GATE=w_logit.shape[-1] == H * V, num_warps=num_warps)
    conv_cache.copy_(new_cache)
    if (offset + 1) % chunk_size == 0:
        next_delta = _finish_chunk(content, o_sum, delta, chunk_size)
        if content is not None:   # GDN-2's delta stays zero
            delta.copy_(next_delta)
    return o


def _finish_chunk(content, o_sum, delta, chunk_size):
    """After a decode launch that finished a chunk: Delta = U D m for the next chunk (CARVE), in torch
    and fp32 under any autocast, and o_sum reset in place. Returns the new delta."""
    if content is not None:
        with torch.no_grad(), torch.autocast(o_sum.device.type, enabled=False):
            delta = _next_delta(content, o_sum, chunk_size).contiguous()
    o_sum.zero_()
    return delta


@triton_jit
def _token_step(S, q_t, k_t, v_t, g_t, bl_t, w_t, d, scale):
    """One token of the recurrence (docs/DESIGN.md section 1, the step form) on a [BK, BV] fp32 state tile, from
    fp32 inputs; padded channels are 0. Returns the new tile and this tile's columns of o."""
    q_t = q_t / tl.maximum(tl.sqrt(tl.sum(q_t * q_t, axis=0)), L2_NORM_EPS_TL)  # as F.normalize
    k_t = k_t / tl.maximum(tl.sqrt(tl.sum(k_t * k_t, axis=0)), L2_NORM_EPS_TL)
    b_t = tl.sigmoid(bl_t + d)
    S = S * tl.exp(tl.maximum(g_t, GATE_FLOOR_TL))[:, None]            # Diag(alpha) S
    v_new = w_t * v_t - tl.sum(S * (b_t * k_t)[:, None], axis=0)       # u - S^T (b * k)
    S = S + k_t[:, None] * v_new[None, :]                              # + k v_new^T
    return S, tl.sum(S * q_t[:, None], axis=0) * scale                 # S^T q * scale


@triton_jit
def _recurrent_fwd_kernel(q, k, v, g, b_logit, w, o, S_in, S_out, o_sum_in, o_sum_out, delta,
                          sq_b, sq_t, sk_b, sk_t, sv_b, sv_t, sg_b, sg_t, sbl_b, sbl_t, sw_b, sw_t,
                          t_start, n_tokens, T, H, scale,
                          K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          VALUE_GATE: tl.constexpr, USE_INITIAL: tl.constexpr):
    """Tokens t_start .. t_start + n_tokens - 1 of every sequence, all inside one chunk.

    Inputs are [B, T, H, D] with the (H, D) part packed (strides H: D, D: 1) and any batch and
    time strides (s*_b, s*_t), so the q, k, v views of a fused projection need no copy. w is
    [B, T, H, V] (VALUE_GATE, GDN-2) or [B, T, H] (CARVE's beta). o is [B, T, H, V] contiguous;
    S [B, H, K, V], o_sum [B, H, V], delta [B, H, K] contiguous fp32. Program pid handles value
    columns i_v*BV .. i_v*BV + BV - 1 of head i_bh; K <= BK and V may be any size (masked)."""
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_bh = (pid // NV).to(tl.int64)  # int64 offsets: B*H*K*V and B*T*H*D may pass 2^31
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_S = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    m_S = m_k[:, None] & m_v[None, :]
    if USE_INITIAL:
        S = tl.load(S_in + p_S, mask=m_S, other=0.0)                       # [BK, BV] fp32
        o_acc = tl.load(o_sum_in + i_bh * V + o_v, mask=m_v, other=0.0)    # [BV] fp32
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        o_acc = tl.zeros([BV], dtype=tl.float32)
    d = tl.load(delta + i_bh * K + o_k, mask=m_k, other=0.0)              # Delta of this chunk
    for i in range(n_tokens):
        t = t_start + i
        q_t = tl.load(q + i_b * sq_b + t * sq_t + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        k_t = tl.load(k + i_b * sk_b + t * sk_t + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        g_t = tl.load(g + i_b * sg_b + t * sg_t + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        bl_t = tl.load(b_logit + i_b * sbl_b + t * sbl_t + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + i_b * sv_b + t * sv_t + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if VALUE_GATE:  # GDN-2: w_t * v_t
            w_t = tl.load(w + i_b * sw_b + t * sw_t + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        else:           # CARVE: beta_t v_t
            w_t = tl.load(w + i_b * sw_b + t * sw_t + i_h).to(tl.float32)
        S, o_t = _token_step(S, q_t, k_t, v_t, g_t, bl_t, w_t, d, scale)
        tl.store(o + ((i_b * T + t) * H + i_h) * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)
        o_acc += o_t  # fp32 running sum of this chunk's outputs (the content signal m)
    tl.store(S_out + p_S, S, mask=m_S)
    tl.store(o_sum_out + i_bh * V + o_v, o_acc, mask=m_v)


@triton_jit
def _conv_silu_one_token(x, conv_w, conv_in, conv_out, i_b, ch, m_ch, n_ch, WIDTH: tl.constexpr,
                         WP: tl.constexpr):
    """Channels `ch` of batch row i_b: the depthwise causal conv over the cached last WIDTH - 1 inputs
    and this one, then SiLU, each rounded to x's dtype as the model's torch ops are; writes the
    cache shifted by one. x [B, n_ch]; conv_w [n_ch, WIDTH]; caches [B, n_ch, WIDTH - 1]."""
    o_w = tl.arange(0, WP)
    m_w = m_ch[:, None] & (o_w[None, :] < WIDTH - 1)
    p_cache = (i_b * n_ch + ch[:, None]) * (WIDTH - 1) + o_w[None, :]
    cur = tl.load(x + i_b * n_ch + ch, mask=m_ch, other=0.0)
    hist = tl.load(conv_in + p_cache, mask=m_w, other=0.0).to(cur.dtype).to(tl.float32)  # the cache in x's dtype
    # the weights in x's dtype too, as causal_conv_silu_torch casts them
    taps = tl.load(conv_w + ch[:, None] * WIDTH + o_w[None, :], mask=m_w, other=0.0).to(cur.dtype)
    last = tl.load(conv_w + ch * WIDTH + WIDTH - 1, mask=m_ch, other=0.0).to(cur.dtype)
    y = tl.sum(hist * taps.to(tl.float32), axis=1) + cur.to(tl.float32) * last.to(tl.float32)
    y = y.to(cur.dtype).to(tl.float32)
    shifted = tl.load(conv_in + p_cache + 1, mask=m_w & (o_w[None, :] < WIDTH - 2), other=0.0)
    new_cache = tl.where(o_w[None, :] < WIDTH - 2, shifted.to(cur.dtype), cur[:, None])
    tl.store(conv_out + p_cache, new_cache.to(conv_out.dtype.element_ty), mask=m_w)
    return (y * tl.sigmoid(y)).to(cur.dtype).to(tl.float32)


@triton_jit
def _decay_gate(f, A_log_h, a_log_min):
    """decay_gate's Triton twin, for one head: f = the raw projection plus dt_bias (fp32), A_log_h the
    head's A_log. softplus as torch computes it: log1p(exp(f)), f itself above the threshold. Triton
    has no log1p: log(u) e / (u - 1) with u = 1 + e cancels the rounding of u (exact where u = 1)."""
    rate = tl.exp(tl.maximum(A_log_h, a_log_min))
    e = tl.exp(tl.minimum(f, SOFTPLUS_THRESHOLD_TL))
    u = 1.0 + e
    exact = u == 1.0
    log1p_e = tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))
    return -rate * tl.where(f > SOFTPLUS_THRESHOLD_TL, f, log1p_e)


@triton_jit
def _decode_step_kernel(x, conv_w, conv_in, conv_out, f, A_log, dt_bias, b_logit, w_logit, o, S_in, S_out,
                        o_sum_in, o_sum_out, delta, H, scale, a_log_min,
                        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        WIDTH: tl.constexpr, WP: tl.constexpr, VALUE_GATE: tl.constexpr):
    """One decode step (T = 1) of a layer from its projections, before any activation: the causal
    conv of q, k, v with its cache and SiLU, the decay (_decay_gate), the write gate sigmoid(w_logit)
    (rounded to w_logit's dtype, as torch.sigmoid of a bf16 tensor is), then _token_step. x [B, 2HK + HV]
    holds the q, k, v projections; f, b_logit [B, H*K]; w_logit [B, H*V] (GDN-2) or [B, H] (CARVE);
    A_log [H], dt_bias [H*K]; every tensor contiguous.
    Every value block of a head writes the same new conv cache of the head's q and k channels."""
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_bh = (pid // NV).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n_ch = 2 * H * K + H * V
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    q_t = _conv_silu_one_token(x, conv_w, conv_in, conv_out, i_b, i_h * K + o_k, m_k, n_ch, WIDTH, WP)
    k_t = _conv_silu_one_token(x, conv_w, conv_in, conv_out, i_b, (H + i_h) * K + o_k, m_k, n_ch, WIDTH, WP)
    v_t = _conv_silu_one_token(x, conv_w, conv_in, conv_out, i_b, 2 * H * K + i_h * V + o_v, m_v, n_ch, WIDTH, WP)
    f_t = tl.load(f + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32) \
        + tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    g_t = _decay_gate(f_t, tl.load(A_log + i_h).to(tl.float32), a_log_min)
    bl_t = tl.load(b_logit + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    if VALUE_GATE:
        w_raw = tl.load(w_logit + i_bh * V + o_v, mask=m_v, other=0.0)
    else:
        w_raw = tl.load(w_logit + i_bh)
    w_t = tl.sigmoid(w_raw.to(tl.float32)).to(w_raw.dtype).to(tl.float32)
    p_S = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    m_S = m_k[:, None] & m_v[None, :]
    S = tl.load(S_in + p_S, mask=m_S, other=0.0)
    d = tl.load(delta + i_bh * K + o_k, mask=m_k, other=0.0)
    S, o_t = _token_step(S, q_t, k_t, v_t, g_t, bl_t, w_t, d, scale)
    tl.store(o + i_bh * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)
    tl.store(S_out + p_S, S, mask=m_S)
    tl.store(o_sum_out + i_bh * V + o_v, tl.load(o_sum_in + i_bh * V + o_v, mask=m_v, other=0.0) + o_t, mask=m_v)


# ============================================================================================
# 6. Triton layer pieces: the causal conv + SiLU, the output norm and gate, the batch-1 GEMV
#    (docs/DESIGN.md section 6), the MLP's SiLU(gate) * up, the embedding's ordered backward (section 8)
# ============================================================================================
# Each replaces some ten torch kernels and their fp32 intermediates by one kernel each way; each
# backward recomputes what its forward computed from the inputs (one more read) rather than storing it.
#
# The conv: the W taps of a token read rows t - W + 1 .. t of its batch row, zeros before the row (or
# the cache, a prompt continued) and before the token's document (doc_start). The backward runs in two
# passes: the first recomputes each output's pre-activation once, writes dpre = dy silu'(pre) and
# per-program parts of the weight gradient (summed in torch: deterministic, no atomics); the second
# gives an input row the gradient of the W outputs that read it. At a 1.3B layer (4 x 4096 tokens) on
# an H200: one pass recomputing the W pre-activations each input row feeds took 1.8 ms, the two passes
# 0.69, of which the first 0.55; its weight-gradient sum once per 256 rows rather than per 32-row
# tile took it from 0.86 (docs/DESIGN.md section 6).

CONV_ROWS, CONV_CHANNELS = 32, 128   # a program's tile of tokens x channels
CONV_DPRE_TILES = 8   # the backward's first pass walks 8 tiles a program: one weight-gradient sum per 256 rows


def _unit_last_stride(x):
    """x, copied only if its last axis is not of unit stride: this section's kernels read the conv's x,
    the GEMV's weight and swiglu's gate_up with unit stride along the last axis and any other strides."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _contiguous_or_none(x):
    return None if x is None else x.contiguous()


def conv_silu_triton(x, weight, history, doc_start):
    """causal_conv_silu's y with the Triton kernel; x [B, T, C] with unit channel stride, history
    [B, C, W - 1] in x's dtype or None, doc_start [T] or None."""
    B, T, C = x.shape
    y = torch.empty((B, T, C), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(T, CONV_ROWS), triton.cdiv(C, CONV_CHANNELS), B)
    _conv_silu_fwd_kernel[grid](x=x, weight=weight, history=history, doc_start=doc_start, y=y, T=T, C=C,
                                sb=x.stride(0), st=x.stride(1), WIDTH=weight.shape[-1], HAS_HISTORY=history is not None,
                                HAS_DOCS=doc_start is not None, BT=CONV_ROWS, BC=CONV_CHANNELS)
    return y


def conv_silu_backward_triton(dy, x, weight, history, doc_start):
    """causal_conv_silu's backward with the Triton kernels: (dx, dweight); no gradient reaches the cache."""
    B, T, C = x.shape
    width = weight.shape[-1]
    dy = dy.contiguous()
    # dpre in x's dtype: the torch definition's SiLU backward rounds it there too
    dpre, dx = (torch.empty((B, T, C), dtype=x.dtype, device=x.device) for _ in range(2))
    grid = (triton.cdiv(T, CONV_ROWS), triton.cdiv(C, CONV_CHANNELS), B)
    shape = dict(T=T, C=C, WIDTH=width, HAS_DOCS=doc_start is not None, BT=CONV_ROWS, BC=CONV_CHANNELS)
    dpre_grid = (triton.cdiv(T, CONV_ROWS * CONV_DPRE_TILES), grid[1], B)
    dweight_parts = torch.empty(B * dpre_grid[0], C, width, dtype=torch.float32, device=x.device)
    _conv_silu_dpre_kernel[dpre_grid](dy=dy, x=x, weight=weight, history=history, doc_start=doc_start, dpre=dpre,
                                      dweight_parts=dweight_parts, sb=x.stride(0), st=x.stride(1),
                                      HAS_HISTORY=history is not None, TILES=CONV_DPRE_TILES,
                                      TAPS=triton.next_power_of_2(width), **shape)
    _conv_dx_kernel[grid](dpre=dpre, weight=weight, doc_start=doc_start, dx=dx, **shape)
    return dx, dweight_parts.sum(0).view(weight.shape).to(weight.dtype)


@triton_jit
def _conv_input(x, history, doc_start, i_b, src, out_rows, ch, m_ch, T, C, sb, st, WIDTH: tl.constexpr,
                HAS_HISTORY: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The conv's input at rows `src` of batch row i_b, channels ch, as read by the outputs at
    `out_rows` (rows past T read zeros): x where src >= 0, the history before it (or zeros), zeros
    before the output's document start. src and out_rows end in a unit channel axis, ch and m_ch
    begin with unit axes, so that a [rows, channels] or a [rows, taps, channels] tile comes back."""
    m = (out_rows < T) & (src < T)
    if HAS_DOCS:
        m &= src >= tl.load(doc_start + out_rows, mask=out_rows < T, other=0)
    xs = tl.load(x + i_b * sb + src * st + ch, mask=m & (src >= 0) & m_ch, other=0.0)
    if HAS_HISTORY:
        p_h = (i_b * C + ch) * (WIDTH - 1) + (WIDTH - 1 + src)
        xs += tl.load(history + p_h, mask=m & (src < 0) & m_ch, other=0.0)
    return xs.to(tl.float32)


@triton_jit
def _conv_tap(weight, x, ch, m_ch, i, WIDTH: tl.constexpr):
    """Tap i of the channels' weights, rounded to x's dtype as the torch definition rounds them."""
    return tl.load(weight + ch * WIDTH + i, mask=m_ch, other=0.0).to(x.dtype.element_ty).to(tl.float32)


@triton_jit
def _conv_pre(x, weight, history, doc_start, i_b, rows, ch, m_ch, T, C, sb, st, WIDTH: tl.constexpr,
              HAS_HISTORY: tl.constexpr, HAS_DOCS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The conv at output rows `rows` before SiLU, rounded to x's dtype (as the torch conv rounds)."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(WIDTH):
        xs = _conv_input(x, history, doc_start, i_b, (rows - (WIDTH - 1) + i)[:, None], rows[:, None], ch[None, :],
                         m_ch[None, :], T, C, sb, st, WIDTH, HAS_HISTORY, HAS_DOCS)
        acc += xs * _conv_tap(weight, x, ch, m_ch, i, WIDTH)[None, :]
    return acc.to(x.dtype.element_ty).to(tl.float32)


@triton_jit
def _conv_silu_fwd_kernel(x, weight, history, doc_start, y, T, C, sb, st, WIDTH: tl.constexpr,
                          HAS_HISTORY: tl.constexpr, HAS_DOCS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i_t * BT + tl.arange(0, BT)
    ch = i_c * BC + tl.arange(0, BC)
    m_ch = ch < C
    pre = _conv_pre(x, weight, history, doc_start, i_b, rows, ch, m_ch, T, C, sb, st, WIDTH, HAS_HISTORY, HAS_DOCS,
                    BT, BC)
    p_y = (i_b * T + rows[:, None]) * C + ch[None, :]
    tl.store(y + p_y, (pre * tl.sigmoid(pre)).to(y.dtype.element_ty), mask=(rows < T)[:, None] & m_ch[None, :])


@triton_jit
def _conv_silu_dpre_kernel(dy, x, weight, history, doc_start, dpre, dweight_parts, T, C, sb, st, WIDTH: tl.constexpr,
                           HAS_HISTORY: tl.constexpr, HAS_DOCS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                           TILES: tl.constexpr, TAPS: tl.constexpr):
    """dpre = dy silu'(pre) at this program's TILES x BT output rows t, and
    dweight_parts[program, c, i] = sum over those rows of dpre(t) x(t - W + 1 + i), accumulated per
    [row, tap, channel] and summed over rows once at the end."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ch = i_c * BC + tl.arange(0, BC)
    m_ch = ch < C
    taps = tl.arange(0, TAPS)
    acc = tl.zeros([BT, TAPS, BC], dtype=tl.float32)
    for j in range(TILES):
        rows = (i_t * TILES + j) * BT + tl.arange(0, BT)
        m = (rows < T)[:, None] & m_ch[None, :]
        p = (i_b * T + rows[:, None]) * C + ch[None, :]
        pre = _conv_pre(x, weight, history, doc_start, i_b, rows, ch, m_ch, T, C, sb, st, WIDTH, HAS_HISTORY,
                        HAS_DOCS, BT, BC)
        s = tl.sigmoid(pre)
        d = (tl.load(dy + p, mask=m, other=0.0).to(tl.float32) * s * (1.0 + pre * (1.0 - s))).to(dpre.dtype.element_ty)
        tl.store(dpre + p, d, mask=m)
        # taps past WIDTH read src >= T (masked to zeros): the padded tap axis adds nothing
        src = tl.where(taps[None, :] < WIDTH, rows[:, None] - (WIDTH - 1) + taps[None, :], T)
        xs = _conv_input(x, history, doc_start, i_b, src[:, :, None], rows[:, None, None], ch[None, None, :],
                         m_ch[None, None, :], T, C, sb, st, WIDTH, HAS_HISTORY, HAS_DOCS)
        acc += d.to(tl.float32)[:, None, :] * xs
    part = (i_b * tl.num_programs(0) + i_t) * C * WIDTH
    tl.store(dweight_parts + part + ch[None, :] * WIDTH + taps[:, None], tl.sum(acc, axis=0),
             mask=(taps < WIDTH)[:, None] & m_ch[None, :])


@triton_jit
def _conv_dx_kernel(dpre, weight, doc_start, dx, T, C, WIDTH: tl.constexpr, HAS_DOCS: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    """Input row s feeds output s + j through tap W - 1 - j: dx(s) = sum_j w_{W-1-j} dpre(s + j), only
    where that output reads s (its document started at or before s)."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i_t * BT + tl.arange(0, BT)
    ch = i_c * BC + tl.arange(0, BC)
    m_ch = ch < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        out_rows = rows + j
        reads = out_rows < T
        if HAS_DOCS:
            reads &= rows >= tl.load(doc_start + out_rows, mask=out_rows < T, other=0)
        d = tl.load(dpre + (i_b * T + out_rows[:, None]) * C + ch[None, :], mask=reads[:, None] & m_ch[None, :],
                    other=0.0).to(tl.float32)
        acc += d * _conv_tap(weight, dpre, ch, m_ch, WIDTH - 1 - j, WIDTH)[None, :]
    tl.store(dx + (i_b * T + rows[:, None]) * C + ch[None, :], acc.to(dx.dtype.element_ty),
             mask=(rows < T)[:, None] & m_ch[None, :])

# RMSNorm(o) * weight * act(gate) for rows of one head's V values, forward and backward, so that the
# layer's output keeps no fp32 copy of o and runs two kernels instead of some ten elementwise passes.
# The backward recomputes the normalised row from o (one more read) rather than storing it.

NORM_GATE_ROWS = 32  # rows a program: [32, 128] tiles keep every value of a row in one program


def norm_gate_triton(o, gate, weight, eps, silu):
    """output_norm_gate's forward with the Triton kernel; returns (y, rstd [rows] fp32)."""
    V = o.shape[-1]
    o2, gate2 = o.reshape(-1, V), gate.reshape(-1, V)
    y = torch.empty(o2.shape, dtype=o2.dtype, device=o.device)
    rstd = torch.empty(o2.shape[0], dtype=torch.float32, device=o.device)
    _norm_gate_fwd_kernel[(triton.cdiv(o2.shape[0], NORM_GATE_ROWS),)](
        o=o2, gate=gate2, weight=weight, y=y, rstd=rstd, n_rows=o2.shape[0], eps=eps, V=V,
        BV=triton.next_power_of_2(V), ROWS=NORM_GATE_ROWS, SILU=silu)
    return y.view(o.shape), rstd


def norm_gate_backward_triton(dy, o, gate, weight, rstd, silu):
    """output_norm_gate's backward with the Triton kernel: (do, dgate, dweight)."""
    V = o.shape[-1]
    o2, gate2, dy2 = o.reshape(-1, V), gate.reshape(-1, V), dy.reshape(-1, V).contiguous()
    n_programs = triton.cdiv(o2.shape[0], NORM_GATE_ROWS)
    do, dgate = (torch.empty(o2.shape, dtype=x.dtype, device=o.device) for x in (o2, gate2))
    dweight_parts = torch.empty(n_programs, V, dtype=torch.float32, device=o.device)  # summed below: no atomics
    _norm_gate_bwd_kernel[(n_programs,)](
        dy=dy2, o=o2, gate=gate2, weight=weight, rstd=rstd, do=do, dgate=dgate, dweight_parts=dweight_parts,
        n_rows=o2.shape[0], V=V, BV=triton.next_power_of_2(V), ROWS=NORM_GATE_ROWS, SILU=silu)
    return do.view(o.shape), dgate.view(gate.shape), dweight_parts.sum(0).to(weight.dtype)


@triton_jit
def _norm_gate_rows(o, gate, weight, n_rows, V: tl.constexpr, BV: tl.constexpr, ROWS: tl.constexpr):
    """This program's rows: offsets, mask, o and gate in fp32, the weight row."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BV)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < V)
    offsets = rows[:, None] * V + cols[None, :]
    x = tl.load(o + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + cols, mask=cols < V, other=0.0).to(tl.float32)
    return rows, offsets, mask, x, g, w


@triton_jit
def _norm_gate_fwd_kernel(o, gate, weight, y, rstd, n_rows, eps, V: tl.constexpr, BV: tl.constexpr,
                          ROWS: tl.constexpr, SILU: tl.constexpr):
    rows, offsets, mask, x, g, w = _norm_gate_rows(o, gate, weight, n_rows, V, BV, ROWS)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / V + eps)
    act = g * tl.sigmoid(g) if SILU else tl.sigmoid(g)
    tl.store(y + offsets, (x * r[:, None] * w[None, :] * act).to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, r, mask=rows < n_rows)


@triton_jit
def _norm_gate_bwd_kernel(dy, o, gate, weight, rstd, do, dgate, dweight_parts, n_rows, V: tl.constexpr,
                          BV: tl.constexpr, ROWS: tl.constexpr, SILU: tl.constexpr):
    """With n = o rstd, y = n w act(g): dg = dy n w act'(g); dw = sum over rows of dy act(g) n;
    do = rstd (dn - n mean(dn n)) with dn = dy act(g) w."""
    rows, offsets, mask, x, g, w = _norm_gate_rows(o, gate, weight, n_rows, V, BV, ROWS)
    r = tl.load(rstd + rows, mask=rows < n_rows, other=0.0)
    dy_tile = tl.load(dy + offsets, mask=mask, other=0.0).to(tl.float32)
    n = x * r[:, None]
    s = tl.sigmoid(g)
    if SILU:
        act = g * s
        act_grad = s * (1.0 + g * (1.0 - s))
    else:
        act = s
        act_grad = s * (1.0 - s)
    tl.store(dgate + offsets, (dy_tile * n * w[None, :] * act_grad).to(dgate.dtype.element_ty), mask=mask)
    d_normed = dy_tile * act
    tl.store(dweight_parts + tl.program_id(0) * V + tl.arange(0, BV), tl.sum(d_normed * n, axis=0),
             mask=tl.arange(0, BV) < V)
    dn = d_normed * w[None, :]
    do_tile = r[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / V)[:, None])
    tl.store(do + offsets, do_tile.to(do.dtype.element_ty), mask=mask)


# The batch-1 GEMV: one program per `rows` output features reads those rows of the weight whole, in
# [rows, cols] tiles, accumulates the products in fp32 and sums them once at the end. At one row a
# product streams its weight from memory once, so the settings are those that keep the most bytes in
# flight on every SM. bench_kernels.py --gemv sweeps them on weights that stream from memory as in a
# decode step (docs/BENCHMARKS.md): the wide weights (in_proj, gate_up_proj, the head) run as well
# with 16 rows a program of 256 columns as with any other setting; the narrow ones (2048 or 2304
# outputs over 2048 to 6208 inputs: o_proj, down_proj, GDN-2's w_proj) run 1.4-1.8x faster with 2 rows
# of 1024 columns than with the 4 or 8 rows of 256 that the wide weights' rule gives them: 2 or 4 times
# the programs, each loading as many or twice the bytes a step. That took the compiled 1.3B CARVE decode
# step's device time from 1.48 to 1.29 ms.

class GemvSettings(NamedTuple):
    rows: int        # output features a program
    cols: int        # weight columns a loop step loads
    num_warps: int


def gemv_settings(n_features, k_in, sm_count):
    """Launch settings for a [n_features, k_in] weight: 2 rows of 1024 columns a program when 16 rows
    would leave an SM fewer than two programs and 2 rows give it at least four over 1024 or more
    inputs; otherwise the most rows (up to 16) that still give every SM two programs, of 256 columns."""
    if triton.cdiv(n_features, 16) < 2 * sm_count and n_features >= 8 * sm_count and k_in >= 1024:
        return GemvSettings(2, 1024, 4)
    rows = 16
    while rows > 1 and triton.cdiv(n_features, rows) < 2 * sm_count:
        rows //= 2
    return GemvSettings(rows, 256, 4)


def gemv_triton(x, weight, bias, settings=None):
    """x [..., K] of one row, weight [N, K] (unit stride along K), bias [N] or None: x @ weight^T + bias.
    settings: a GemvSettings (default gemv_settings'; bench_kernels.py --gemv sweeps them)."""
    N, K = weight.shape
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    rows, cols, num_warps = settings or gemv_settings(N, K, _sm_count(x.device))
    _gemv_kernel[(triton.cdiv(N, rows),)](x=x, weight=weight, bias=bias, out=out, N=N, K=K, sw=weight.stride(0),
                                          HAS_BIAS=bias is not None, ROWS=rows, COLS=cols, num_warps=num_warps)
    return out


@triton_jit
def _gemv_kernel(x, weight, bias, out, N, K, sw, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_rows = rows < N
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for k0 in range(0, K, COLS):
        cols = k0 + tl.arange(0, COLS)
        w = tl.load(weight + rows[:, None].to(tl.int64) * sw + cols[None, :],
                    mask=m_rows[:, None] & (cols < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * tl.load(x + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=m_rows, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=m_rows)

# The MLP's SiLU(gate) * up: [SWIGLU_ROWS, SWIGLU_COLS] tiles of gate_up's rows; the backward's kernel
# writes h again beside the gradient, so the op never keeps it. The roundings are autograd's through
# F.silu(gate) * up in gate_up's dtype: SiLU, the product and dh * up each rounded to it.

SWIGLU_ROWS, SWIGLU_COLS = 16, 128


def swiglu_triton(gate_up, dh=None, make_h=True):
    """(h, d_gate_up) for gate_up [N, 2F] (unit stride along its rows): h [N, F] = swiglu(gate_up) if
    make_h, else None; with dh [N, F], the gradient of h, d_gate_up [N, 2F], else None."""
    n_rows, F2 = gate_up.shape
    def new(cols, wanted):
        return torch.empty(n_rows, cols, dtype=gate_up.dtype, device=gate_up.device) if wanted else None
    h, d_gate_up = new(F2 // 2, make_h), new(F2, dh is not None)
    grid = (triton.cdiv(n_rows, SWIGLU_ROWS), triton.cdiv(F2 // 2, SWIGLU_COLS))
    _swiglu_kernel[grid](gate_up=gate_up, dh=None if dh is None else dh.contiguous(), d_gate_up=d_gate_up, h=h,
                         n_rows=n_rows, F=F2 // 2, s_row=gate_up.stride(0), BACKWARD=dh is not None, STORE_H=make_h,
                         ROWS=SWIGLU_ROWS, COLS=SWIGLU_COLS)
    return h, d_gate_up


@triton_jit
def _swiglu_kernel(gate_up, dh, d_gate_up, h, n_rows, F, s_row, BACKWARD: tl.constexpr, STORE_H: tl.constexpr,
                   ROWS: tl.constexpr, COLS: tl.constexpr):
    """h = SiLU(g) u (stored if STORE_H); with BACKWARD, from dh: dg = round(dh u) s (1 + g (1 - s))
    (s = sigmoid(g)), du = dh SiLU(g), into d_gate_up's two halves."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    p_gate = rows[:, None].to(tl.int64) * s_row + cols[None, :]
    g = tl.load(gate_up + p_gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up + p_gate + F, mask=mask, other=0.0).to(tl.float32)
    dt = gate_up.dtype.element_ty
    s = tl.sigmoid(g)
    silu = (g * s).to(dt).to(tl.float32)
    p_h = rows[:, None].to(tl.int64) * F + cols[None, :]
    if STORE_H:
        tl.store(h + p_h, (silu * u).to(dt), mask=mask)
    if BACKWARD:
        d = tl.load(dh + p_h, mask=mask, other=0.0).to(tl.float32)
        d_silu = (d * u).to(dt).to(tl.float32)
        p_grad = rows[:, None].to(tl.int64) * (2 * F) + cols[None, :]
        tl.store(d_gate_up + p_grad, (d_silu * s * (1.0 + g * (1.0 - s))).to(dt), mask=mask)
        tl.store(d_gate_up + p_grad + F, (d * silu).to(dt), mask=mask)

# The token embedding's weight gradient, without atomics: the token positions sorted by token id (a stable
# sort), then one program per (token, column block) adds that token's gradient rows in sorted order,
# EMBED_ROWS at a time into an [EMBED_ROWS, EMBED_COLS] fp32 tile that it sums once at the end. Every call
# adds in the same order, so the bits repeat; a frequent token costs its program a longer loop, not a race.

EMBED_ROWS, EMBED_COLS = 16, 128


def embedding_backward_triton(idx, dy, n_tokens):
    """The gradient of weight [n_tokens, D] (in dy's dtype) for x = weight[idx], from dy = dL/dx [..., D]."""
    ids = idx.reshape(-1)
    dy = dy.reshape(-1, dy.shape[-1]).contiguous()
    D = dy.shape[1]
    sorted_ids, order = torch.sort(ids, stable=True)
    # starts[t] .. starts[t + 1] - 1: where token t's positions lie in `order`
    starts = torch.searchsorted(sorted_ids, torch.arange(n_tokens + 1, device=ids.device, dtype=ids.dtype))
    grad = torch.empty(n_tokens, D, dtype=dy.dtype, device=dy.device)
    _embedding_backward_kernel[(n_tokens, triton.cdiv(D, EMBED_COLS))](
        dy=dy, order=order, starts=starts, grad=grad, D=D, ROWS=EMBED_ROWS, COLS=EMBED_COLS)
    return grad


@triton_jit
def _embedding_backward_kernel(dy, order, starts, grad, D, ROWS: tl.constexpr, COLS: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    m_cols = cols < D
    first = tl.load(starts + token)
    end = tl.load(starts + token + 1)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for p0 in range(first, end, ROWS):
        p = p0 + tl.arange(0, ROWS)
        m_p = p < end
        rows = tl.load(order + p, mask=m_p, other=0)
        acc += tl.load(dy + rows[:, None] * D + cols[None, :], mask=m_p[:, None] & m_cols[None, :],
                       other=0.0).to(tl.float32)
    tl.store(grad + token.to(tl.int64) * D + cols, tl.sum(acc, axis=0).to(grad.dtype.element_ty), mask=m_cols)

# ============================================================================================
# 7. Custom ops: each Triton launcher behind a torch.library op, so torch.compile sees one opaque
#    node instead of a launch it cannot trace, and the graph does not break
# ============================================================================================

if triton is not None:
    @torch.library.custom_op("carve::chunk_fwd", mutates_args=())
    def _chunk_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, A_log: Optional[torch.Tensor],
                      dt_bias: Optional[torch.Tensor], a_log_min: float, b_logit: torch.Tensor, w: torch.Tensor,
                      D: Optional[torch.Tensor], U: Optional[torch.Tensor], S0: Optional[torch.Tensor],
                      o_sum0: Optional[torch.Tensor], delta0: Optional[torch.Tensor], table: List[int], scale: float,
                      chunk_size: int, split_forward: bool, walk_columns: int, forward_pieces: int,
                      backward_columns: int, backward_pieces: int, f_weight: Optional[torch.Tensor],
                      conv_x: Optional[torch.Tensor], conv_weight: Optional[torch.Tensor],
                      conv_doc_start: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """g is the decay input in one of three forms: the log-decay g itself (A_log None); a DecayGate's raw
        input f (with A_log); or, with f_weight, a GateProjection's x, from which f = x f_weight^T is made here.
        With conv_weight, q, k, v are short_conv_qkv of ShortConv(conv_x, conv_weight, conv_doc_start):
        the forward reads q, k, v; carve::chunk_bwd makes them again from conv_x. backward_columns,
        backward_pieces and the conv arguments are not read here: they are inputs for
        _chunk_setup_context, which sees only the op's inputs and outputs."""
        f = projected_gate(GateProjection(g, f_weight, None), q.shape)
        out = chunk_forward_triton(q, k, v, f, A_log, dt_bias, a_log_min, b_logit, w, D, U, S0, o_sum0, delta0, table,
                                   scale, chunk_size, ChunkSchedule(split_forward, walk_columns, forward_pieces))
        return [out.o, out.S, out.o_sum, out.delta, *out.saved]

    @_chunk_fwd_op.register_fake
    def _(q, k, v, g, A_log, dt_bias, a_log_min, b_logit, w, D, U, S0, o_sum0, delta0, table, scale, chunk_size,
          split_forward, walk_columns, forward_pieces, backward_columns, backward_pieces, f_weight, conv_x, conv_weight,
          conv_doc_start):
        out = _forward_buffers(q, v, table, S0 is not None, lambda shape, dtype: q.new_empty(shape, dtype=dtype))
        return [out.o, out.S, out.o_sum, out.delta, *out.saved]

    @torch.library.custom_op("carve::chunk_bwd", mutates_args=())
    def _chunk_bwd_op(q: Optional[torch.Tensor], k: Optional[torch.Tensor], v: Optional[torch.Tensor], g: torch.Tensor,
                      A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], a_log_min: float,
                      b_logit: torch.Tensor, w: torch.Tensor, do: torch.Tensor, dS_end: Optional[torch.Tensor],
                      saved: List[torch.Tensor], table: List[int], scale: float, chunk_size: int,
                      backward_columns: int, backward_pieces: int, split_forward: bool, conv_x: Optional[torch.Tensor],
                      conv_weight: Optional[torch.Tensor],
                      conv_doc_start: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """With conv_weight, q, k, v are None and made here from the ShortConv, inside the op: made in the
        registered backward instead, they would be the forward's conv call again, which torch.compile merges
        with it (common subexpressions), keeping the forward's q, k, v after all."""
        if conv_weight is not None:
            q, k, v = short_conv_qkv(ShortConv(conv_x, conv_weight, conv_doc_start), *b_logit.shape[2:])
        return chunk_backward_triton(q, k, v, g, A_log, dt_bias, a_log_min, b_logit, w, do, dS_end, ChunkSaved(*saved),
                                     table, scale, chunk_size, backward_columns, backward_pieces, split_forward)

    @_chunk_bwd_op.register_fake
    def _(q, k, v, g, A_log, dt_bias, a_log_min, b_logit, w, do, dS_end, saved, table, scale, chunk_size,
          backward_columns, backward_pieces, split_forward, conv_x, conv_weight, conv_doc_start):
        sizes = _table_sizes(table)
        H, K = b_logit.shape[2:]
        V = do.shape[-1]
        f32 = torch.float32
        new = lambda *shape, dtype: do.new_empty(shape, dtype=dtype)  # noqa: E731  (contiguous, like the real outputs)
        qk_dtype, v_dtype = (conv_x.dtype, conv_x.dtype) if conv_weight is not None else (q.dtype, v.dtype)
        return [new(*b_logit.shape, dtype=qk_dtype), new(*b_logit.shape, dtype=qk_dtype),
                new(*do.shape, dtype=v_dtype), new(*g.shape, dtype=g.dtype), new(*b_logit.shape, dtype=b_logit.dtype),
                new(*w.shape, dtype=w.dtype), new(sizes.n_chunks, H, K, dtype=f32),
                new(sizes.n_sequences, H, K, V, dtype=f32),
                new(H, K, dtype=f32), new(H, dtype=f32)]

    def _chunk_setup_context(ctx, inputs, output):
        (q, k, v, g, A_log, dt_bias, a_log_min, b_logit, w, D, U, S0, o_sum0, delta0, table, scale, chunk_size,
         split_forward, _, _, backward_columns, backward_pieces, f_weight, conv_x, conv_weight, conv_doc_start) = inputs
        if conv_weight is not None:   # the conv's input instead of its output: the conv's backward keeps it too
            q = k = v = None
        ctx.save_for_backward(q, k, v, g, f_weight, A_log, dt_bias, b_logit, w, D, U, conv_x, conv_weight,
                              conv_doc_start, *output[FIRST_SAVED_OUTPUT:])
        ctx.set_materialize_grads(False)   # the saved outputs get no gradient: no zero tensors of their size
        ctx.table, ctx.scale, ctx.chunk_size, ctx.a_log_min = table, scale, chunk_size, a_log_min
        ctx.backward_columns, ctx.backward_pieces = backward_columns, backward_pieces
        ctx.split_forward = split_forward
        ctx.has_S0, ctx.has_delta0 = S0 is not None, delta0 is not None

    def _chunk_backward(ctx, grads):
        do, dS, _, d_delta_final = grads[:FIRST_SAVED_OUTPUT]   # o_sum is a stop-gradient read: its gradient is dropped
        q, k, v, g, f_weight, A_log, dt_bias, b_logit, w, D, U, conv_x, conv_weight, conv_doc_start, *saved = \
            ctx.saved_tensors
        saved = ChunkSaved(*saved)
        if do is None:  # only the final state was used
            do = torch.zeros(saved.v_new.shape, dtype=(v if v is not None else conv_x).dtype, device=b_logit.device)
        projection = GateProjection(g, f_weight, None)
        dq, dk, dv, dg, db_logit, dw, d_delta, dS0, d_dt_bias, d_A_log = torch.ops.carve.chunk_bwd(
            q, k, v, projected_gate(projection, b_logit.shape), A_log, dt_bias, ctx.a_log_min, b_logit, w, do,
            dS, list(saved), ctx.table, ctx.scale, ctx.chunk_size, ctx.backward_columns, ctx.backward_pieces,
            ctx.split_forward, conv_x, conv_weight, conv_doc_start)
        d_f_weight = None
        if f_weight is not None:   # back through f = x W^T
            needs = ctx.needs_input_grad
            dg, d_f_weight, _ = projection_backward(dg, projection, (needs[3], needs[-4], False))   # g, f_weight
        dD, dU, d_delta0 = _content_grads(d_delta, d_delta_final, saved.chunk_mean, D, U, ctx.table,
                                          ctx.chunk_size)
        if A_log is not None:   # through the floor max(A_log, a_log_min): no gradient below it
            d_A_log = (d_A_log * (A_log >= ctx.a_log_min)).to(A_log.dtype)
            d_dt_bias = d_dt_bias.to(dt_bias.dtype)
        else:
            d_A_log = d_dt_bias = None
        # None for a_log_min, o_sum0 (a stop-gradient read), the eight inputs from table to backward_pieces, and
        # the conv's three (their gradients reach conv_x and conv_weight through q, k and v)
        return (dq, dk, dv, dg, d_A_log, d_dt_bias, None, db_logit, dw, dD, dU, dS0 if ctx.has_S0 else None, None,
                d_delta0 if ctx.has_delta0 else None, *[None] * 8, d_f_weight, None, None, None)

    torch.library.register_autograd("carve::chunk_fwd", _chunk_backward, setup_context=_chunk_setup_context)

    @torch.library.custom_op("carve::recurrent", mutates_args=())
    def _recurrent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b_logit: torch.Tensor,
                      w: torch.Tensor, S: torch.Tensor, o_sum: torch.Tensor, delta: torch.Tensor,
                      D: Optional[torch.Tensor], U: Optional[torch.Tensor], offset: int, scale: float,
                      chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        content = (D, U) if D is not None else None
        o, final = recurrent_carve_triton(q, k, v, g, b_logit, w, content, CarveState(S, o_sum, delta, offset),
                                          True, scale, chunk_size)
        # a custom op may not return an input, and its outputs are contiguous like the fake's
        return o, final.S, final.o_sum, final.delta.clone(memory_format=torch.contiguous_format)

    @_recurrent_op.register_fake
    def _(q, k, v, g, b_logit, w, S, o_sum, delta, D, U, offset, scale, chunk_size):
        f32 = torch.float32
        return (v.new_empty(*q.shape[:3], v.shape[-1]), S.new_empty(S.shape, dtype=f32),
                o_sum.new_empty(o_sum.shape, dtype=f32), delta.new_empty(delta.shape, dtype=f32))

    @torch.library.custom_op("carve::decode_step", mutates_args=("conv_cache", "S", "o_sum", "delta"))
    def _decode_step_op(x: torch.Tensor, conv_weight: torch.Tensor, conv_cache: torch.Tensor, f: torch.Tensor,
                        A_log: torch.Tensor, dt_bias: torch.Tensor, b_logit: torch.Tensor, w_logit: torch.Tensor,
                        S: torch.Tensor, o_sum: torch.Tensor, delta: torch.Tensor, D: Optional[torch.Tensor],
                        U: Optional[torch.Tensor], offset: int, a_log_min: float, scale: float,
                        chunk_size: int) -> torch.Tensor:
        content = (D, U) if D is not None else None
        return decode_step_triton(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w_logit,
                                  CarveState(S, o_sum, delta, offset), content, a_log_min, scale, chunk_size)

    @_decode_step_op.register_fake
    def _(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w_logit, S, o_sum, delta, D, U, offset, a_log_min,
          scale, chunk_size):
        B, H, K, V = S.shape
        return x.new_empty(B, 1, H, V)

    @torch.library.custom_op("carve::conv_silu", mutates_args=())
    def _conv_silu_op(x: torch.Tensor, weight: torch.Tensor, history: Optional[torch.Tensor],
                      doc_start: Optional[torch.Tensor]) -> torch.Tensor:
        return conv_silu_triton(_unit_last_stride(x), weight.contiguous(), _contiguous_or_none(history),
                                _contiguous_or_none(doc_start))

    @_conv_silu_op.register_fake
    def _(x, weight, history, doc_start):
        return x.new_empty(x.shape)

    def _conv_silu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _conv_silu_backward(ctx, dy):
        x, weight, history, doc_start = ctx.saved_tensors
        dx, dweight = torch.ops.carve.conv_silu_bwd(dy, x, weight, history, doc_start)
        return dx, dweight, None, None

    torch.library.register_autograd("carve::conv_silu", _conv_silu_backward, setup_context=_conv_silu_setup_context)

    @torch.library.custom_op("carve::conv_silu_bwd", mutates_args=())
    def _conv_silu_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, history: Optional[torch.Tensor],
                          doc_start: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return conv_silu_backward_triton(dy, _unit_last_stride(x), weight.contiguous(),
                                         _contiguous_or_none(history), _contiguous_or_none(doc_start))

    @_conv_silu_bwd_op.register_fake
    def _(dy, x, weight, history, doc_start):
        return x.new_empty(x.shape), torch.empty_like(weight)

    @torch.library.custom_op("carve::norm_gate", mutates_args=())
    def _norm_gate_op(o: torch.Tensor, gate: torch.Tensor, gate_weight: Optional[torch.Tensor],
                      gate_bias: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                      silu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(y, rstd): rstd [rows] fp32 is kept for the backward. With gate_weight, gate is a
        GateProjection's x and the gate is made here, for this call only."""
        full_gate = projected_gate(GateProjection(gate, gate_weight, gate_bias), o.shape)
        return norm_gate_triton(o.contiguous(), full_gate.contiguous(), weight, eps, silu)

    @_norm_gate_op.register_fake
    def _(o, gate, gate_weight, gate_bias, weight, eps, silu):
        return (torch.empty_like(o, memory_format=torch.contiguous_format),
                o.new_empty(o.numel() // o.shape[-1], dtype=torch.float32))

    def _norm_gate_setup_context(ctx, inputs, output):
        o, gate, gate_weight, gate_bias, weight, eps, silu = inputs
        ctx.save_for_backward(o, gate, gate_weight, gate_bias, weight, output[1])
        ctx.set_materialize_grads(False)
        ctx.silu = silu

    def _norm_gate_backward(ctx, dy, _):   # rstd is the op's own bookkeeping: no gradient flows into it
        o, gate, gate_weight, gate_bias, weight, rstd = ctx.saved_tensors
        projection = GateProjection(gate, gate_weight, gate_bias)
        do, dgate, dweight = torch.ops.carve.norm_gate_bwd(dy, o, projected_gate(projection, o.shape), weight,
                                                           rstd, ctx.silu)
        if gate_weight is None:
            return do, dgate, None, None, dweight, None, None
        return do, *projection_backward(dgate, projection, ctx.needs_input_grad[1:4]), dweight, None, None

    torch.library.register_autograd("carve::norm_gate", _norm_gate_backward, setup_context=_norm_gate_setup_context)

    @torch.library.custom_op("carve::norm_gate_bwd", mutates_args=())
    def _norm_gate_bwd_op(dy: torch.Tensor, o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor, silu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return norm_gate_backward_triton(dy, o.contiguous(), gate.contiguous(), weight, rstd, silu)

    @_norm_gate_bwd_op.register_fake
    def _(dy, o, gate, weight, rstd, silu):
        return (torch.empty_like(o, memory_format=torch.contiguous_format),
                torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(weight))

    @torch.library.custom_op("carve::gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return gemv_triton(x.contiguous(), _unit_last_stride(weight), _contiguous_or_none(bias))

    @_gemv_op.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.custom_op("carve::swiglu_linear", mutates_args=())
    def _swiglu_linear_op(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h, _ = swiglu_triton(_unit_last_stride(gate_up.reshape(-1, gate_up.shape[-1])))
        return F.linear(h, weight).view(*gate_up.shape[:-1], weight.shape[0])

    @_swiglu_linear_op.register_fake
    def _(gate_up, weight):
        return gate_up.new_empty((*gate_up.shape[:-1], weight.shape[0]))

    def _swiglu_linear_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)   # gate_up and weight: h is made again in the backward

    def _swiglu_linear_backward(ctx, dy):
        gate_up, weight = ctx.saved_tensors
        d_gate_up, *d_weight = torch.ops.carve.swiglu_linear_bwd(dy, gate_up, weight, ctx.needs_input_grad[1])
        return d_gate_up, d_weight[0] if d_weight else None

    torch.library.register_autograd("carve::swiglu_linear", _swiglu_linear_backward,
                                    setup_context=_swiglu_linear_setup_context)

    @torch.library.custom_op("carve::swiglu_linear_bwd", mutates_args=())
    def _swiglu_linear_bwd_op(dy: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor,
                              weight_grad: bool) -> List[torch.Tensor]:
        """[d_gate_up, d_weight if weight_grad]: h made here, not in the registered backward, where
        torch.compile would merge it with the forward's and keep that."""
        dy2 = dy.reshape(-1, dy.shape[-1])
        h, d_gate_up = swiglu_triton(_unit_last_stride(gate_up.reshape(-1, gate_up.shape[-1])), dy2 @ weight,
                                     weight_grad)
        return [d_gate_up.view(gate_up.shape), *([dy2.t() @ h] if weight_grad else [])]

    @_swiglu_linear_bwd_op.register_fake
    def _(dy, gate_up, weight, weight_grad):
        return [torch.empty_like(gate_up, memory_format=torch.contiguous_format),
                *([weight.new_empty(weight.shape)] if weight_grad else [])]

    @torch.library.custom_op("carve::embedding", mutates_args=())
    def _embedding_op(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, weight)

    @_embedding_op.register_fake
    def _(idx, weight):
        return weight.new_empty((*idx.shape, weight.shape[1]))

    def _embedding_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.n_tokens = inputs[1].shape[0]

    def _embedding_backward(ctx, dy):
        idx, = ctx.saved_tensors
        return None, torch.ops.carve.embedding_bwd(idx, dy, ctx.n_tokens)

    torch.library.register_autograd("carve::embedding", _embedding_backward, setup_context=_embedding_setup_context)

    @torch.library.custom_op("carve::embedding_bwd", mutates_args=())
    def _embedding_bwd_op(idx: torch.Tensor, dy: torch.Tensor, n_tokens: int) -> torch.Tensor:
        return embedding_backward_triton(idx, dy, n_tokens)

    @_embedding_bwd_op.register_fake
    def _(idx, dy, n_tokens):
        return dy.new_empty((n_tokens, dy.shape[-1]))
