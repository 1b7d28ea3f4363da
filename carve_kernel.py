"""
CARVE / GDN-2 gated delta-rule kernels: chunk-parallel (training, prefill) and per-token (decode).

Public API (tensors in the [B, T, H, D] layout of flash-linear-attention):

    o, state = chunk_carve(q, k, v, g, b_logit, w, content=None, initial_state=None,
                           output_final_state=False, scale=None, chunk_size=64, cu_seqlens=None)
    o, state = recurrent_carve(q, k, v, g, b_logit, w, content=None, initial_state=None,
                               output_final_state=False, scale=None, chunk_size=64)

    q, k     [B, T, H, K]  L2-normalised here, inside the kernel
    v        [B, T, H, V]
    g        [B, T, H, K]  fp32 log-decay (<= 0), alpha = exp(g)
    b_logit  [B, T, H, K]  erase-gate logits; b = sigmoid(b_logit + Delta_c(t))
    w        [B, T, H, V]  GDN-2 write gate in [0, 1], or [B, T, H] CARVE's scalar beta
    content  None (GDN-2) or (D [H, r, V], U [H, K, r]) (CARVE): Delta_c = U D m_{c-1}
    cu_seqlens  (chunk_carve) None, or [N + 1] offsets of N sequences packed into one row [1, total]

`state` is a `CarveState`: everything needed to continue a sequence exactly (SPEC section 3), so
that chunk_carve over T1 tokens followed by chunk_carve or recurrent_carve over T2 more equals one
call over T1 + T2 tokens, whatever T1 is.

The backend is chosen in one place, `backend_for`: Triton for CUDA tensors, torch otherwise, and
CARVE_BACKEND=torch|triton overrides. Today the Triton backend has the decode kernel
(`recurrent_carve_triton`, inference only, registered as the custom op carve::recurrent_triton so
torch.compile traces through it); `chunk_carve` runs the torch path on every backend until the
Triton chunk kernels land behind it.
"""
import os
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it every call runs the torch path
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

L2_NORM_EPS = 1e-6


class CarveState(NamedTuple):
    S: torch.Tensor      # [B, H, K, V] fp32 recurrent state
    o_sum: torch.Tensor  # [B, H, V] fp32 sum of o over the tokens seen so far in the current chunk
    delta: torch.Tensor  # [B, H, K] fp32 erase-gate shift Delta for the current chunk (0 for GDN-2)
    offset: int          # absolute position of the next token; chunk c(t) = t // chunk_size
    #                      (a tuple of them, one per sequence, for packed sequences: cu_seqlens)


def zero_state(batch_size, n_head, k_dim, v_dim, device):
    f32 = dict(dtype=torch.float32, device=device)
    return CarveState(torch.zeros(batch_size, n_head, k_dim, v_dim, **f32),
                      torch.zeros(batch_size, n_head, v_dim, **f32),
                      torch.zeros(batch_size, n_head, k_dim, **f32), 0)


def backend_for(x: torch.Tensor) -> str:
    """The single kernel-dispatch point: 'triton' for CUDA tensors, 'torch' otherwise (and wherever
    triton is not installed). CARVE_BACKEND=torch|triton overrides; 'triton' with CPU tensors runs
    the kernels in the Triton interpreter, which TRITON_INTERPRET=1 must select before carve_kernel
    (and triton) are imported."""
    choice = os.environ.get("CARVE_BACKEND", "")
    if choice == "":
        return "triton" if x.is_cuda and triton is not None else "torch"
    if choice not in ("torch", "triton"):
        raise ValueError(f"CARVE_BACKEND must be 'torch' or 'triton', got {choice!r}")
    if choice == "triton":
        if triton is None:
            raise RuntimeError("CARVE_BACKEND=triton, but triton cannot be imported: install triton "
                               "or unset CARVE_BACKEND to use the torch path")
        if not x.is_cuda and type(_recurrent_fwd_kernel).__name__ != "InterpretedFunction":
            raise RuntimeError("CARVE_BACKEND=triton with CPU tensors needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before importing triton and carve_kernel (or use CUDA "
                               "tensors, or CARVE_BACKEND=torch)")
    return choice


def _check_inputs(q, k, v, g, b_logit, w, content, initial_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    for name, x, shape in (("k", k, (B, T, H, K)), ("v", v, (B, T, H, V)), ("g", g, (B, T, H, K)),
                           ("b_logit", b_logit, (B, T, H, K))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape} (q is {tuple(q.shape)})")
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
        for name, shape in (("S", (B, H, K, V)), ("o_sum", (B, H, V)), ("delta", (B, H, K))):
            got = tuple(getattr(initial_state, name).shape)
            if got != shape:
                raise ValueError(f"initial_state.{name} has shape {got}, expected {shape}")


def _prepare(q, k, v, g, b_logit, w, content, initial_state, scale):
    """Common set-up of both torch paths: fp32 [B, H, T, D] views, the write term u, the state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_inputs(q, k, v, g, b_logit, w, content, initial_state)
    scale = K ** -0.5 if scale is None else scale
    to_bh = lambda x: x.float().transpose(1, 2)  # noqa: E731  [B, T, H, D] -> [B, H, T, D]
    q = F.normalize(to_bh(q), dim=-1, eps=L2_NORM_EPS)
    k = F.normalize(to_bh(k), dim=-1, eps=L2_NORM_EPS)
    u = to_bh(v) * (to_bh(w) if w.dim() == 4 else w.float().transpose(1, 2)[..., None])
    state = initial_state if initial_state is not None else zero_state(B, H, K, V, q.device)
    state = state._replace(o_sum=state.o_sum.detach())  # m is a stop-gradient read (see _next_delta)
    return q, k, u, to_bh(g), to_bh(b_logit), scale, state


def _next_delta(content, o_sum, chunk_size):
    """Delta for the next chunk from the finished chunk's output sum.

    Stop-gradient read of m (SPEC section 1): m is treated as a constant, so gradients reach D and U
    but never flow through m into earlier states; that keeps the backward chunk-parallel."""
    D, U = content
    m = o_sum / chunk_size  # o_sum was accumulated from detached outputs
    return torch.einsum("hkr,hrv,bhv->bhk", U.float(), D.float(), m)


def recurrent_carve_torch(q, k, v, g, b_logit, w, content=None, initial_state=None,
                          output_final_state=False, scale=None, chunk_size=64):
    """Per-token fp32 recurrence, written straight from SPEC sections 1 and 3. It is the decode path
    of the torch backend and the reference every other path is tested against."""
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


def _decayed_products(x, k, G, strict, sub=16):
    """P_rs = sum_c x_rc k_sc exp(G_rc - G_sc) for s <= r (s < r if strict), 0 above: [B, H, C, C].

    exp(G_r - G_s) <= 1 wherever it is used, but gamma^-1 = exp(-G_s) alone overflows fp32 for a
    fast-decaying channel. So the chunk is cut into sub-chunks of `sub` tokens: inside one, the ratio
    is formed pairwise; between sub-chunk i and an earlier j it is split into three factors that are
    each <= 1, exp(G_r - G_first(i)) exp(G_first(i) - G_last(j)) exp(G_last(j) - G_s), which turns the
    off-diagonal blocks into matrix products."""
    B, H, C, K = x.shape
    n = -(-C // sub)
    pad = n * sub - C
    if pad:  # zero vectors with no further decay; their rows and columns are cut off at the end
        x, k = F.pad(x, (0, 0, 0, pad)), F.pad(k, (0, 0, 0, pad))
        G = torch.cat([G, G[:, :, -1:].expand(B, H, pad, K)], dim=2)
    xb, kb, Gb = (t.reshape(B, H, n, sub, K) for t in (x, k, G))
    inside = torch.ones(sub, sub, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    diff = (Gb[..., :, None, :] - Gb[..., None, :, :]).masked_fill(~inside[:, :, None], float("-inf"))
    diag = (xb[..., :, None, :] * kb[..., None, :, :] * diff.exp()).sum(-1)            # [B, H, n, s, s]
    G_first, G_last = Gb[..., 0, :], Gb[..., -1, :]                                     # [B, H, n, K]
    left = xb * (Gb - G_first[..., None, :]).exp()
    right = kb * (G_last[..., None, :] - Gb).exp()
    earlier = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)              # j < i
    between = (G_first[:, :, :, None] - G_last[:, :, None]).masked_fill(~earlier[:, :, None], float("-inf")).exp()
    blocks = (left[:, :, :, None] * between[..., None, :]) @ right[:, :, None].transpose(-1, -2)  # [B,H,n,n,s,s]
    blocks = blocks + torch.eye(n, dtype=x.dtype, device=x.device)[:, :, None, None] * diag[:, :, :, None]
    return blocks.transpose(3, 4).reshape(B, H, n * sub, n * sub)[:, :, :C, :C]


def _chunk_segments(offset, T, chunk_size):
    """Cut tokens 0 .. T-1 of a sequence that resumes at absolute position `offset` into pieces that
    each lie inside one absolute chunk: yields (start, end, whether the piece finishes its chunk)."""
    start = 0
    while start < T:
        end = min(T, start + chunk_size - (offset + start) % chunk_size)
        yield start, end, (offset + end) % chunk_size == 0
        start = end


def _chunk_step(q, k, u, g, b_logit, S0, delta, scale):
    """One chunk of the WY form (SPEC section 2), all chunk positions at once.

    q, k, g, b_logit: [B, H, C, K]; u: [B, H, C, V]; S0: [B, H, K, V]; delta: [B, H, K]."""
    C = q.shape[2]
    b = torch.sigmoid(b_logit + delta[:, :, None, :])
    G = g.cumsum(dim=2)                                                              # G_r, fp32
    T = _decayed_products(b * k, k, G, strict=True)                                  # T_rs, s < r
    M = _decayed_products(q, k, G, strict=False)                                     # M_rs, s <= r
    gamma = G.exp()
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    # A = (I + T)^-1 is never formed: one unit-lower-triangular solve gives Y and U together
    YU = torch.linalg.solve_triangular(eye + T, torch.cat([gamma * b * k, u], dim=-1),
                                       upper=False, unitriangular=True)
    Y, U = YU.split([k.shape[-1], u.shape[-1]], dim=-1)
    R = U - Y @ S0                                                                   # v_new of every token
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


# ============================================================================ Triton: decode kernel
# The per-token recurrence of recurrent_carve_torch as one Triton kernel (SPEC sections 1, 3), for
# decode: inference only, no backward. Each program owns a [K, BV] tile of one head's fp32 state and
# keeps it in registers over the tokens of a segment, so the state is read and written once per
# segment. A segment never crosses an absolute chunk boundary: the content update between chunks
# (Delta = U D m) is a tiny einsum the launcher does in torch, exactly like the torch path.

if triton is not None:
    @triton.jit
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
            bl_t = tl.load(b_logit + i_b * sbl_b + t * sbl_t + i_h * K + o_k, mask=m_k, other=0.0)
            v_t = tl.load(v + i_b * sv_b + t * sv_t + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
            if VALUE_GATE:  # GDN-2: w_t * v_t
                w_t = tl.load(w + i_b * sw_b + t * sw_t + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
            else:           # CARVE: beta_t v_t
                w_t = tl.load(w + i_b * sw_b + t * sw_t + i_h).to(tl.float32)
            # L2 norm as F.normalize(eps=1e-6): x / max(||x||, 1e-6); padded channels are 0
            q_t = q_t / tl.maximum(tl.sqrt(tl.sum(q_t * q_t, axis=0)), 1e-6)
            k_t = k_t / tl.maximum(tl.sqrt(tl.sum(k_t * k_t, axis=0)), 1e-6)
            b_t = tl.sigmoid(bl_t.to(tl.float32) + d)
            S = S * tl.exp(g_t)[:, None]                                       # Diag(alpha) S
            v_new = w_t * v_t - tl.sum(S * (b_t * k_t)[:, None], axis=0)       # u - S^T (b * k)
            S = S + k_t[:, None] * v_new[None, :]                              # + k v_new^T
            o_t = tl.sum(S * q_t[:, None], axis=0) * scale                     # S^T q * scale
            tl.store(o + ((i_b * T + t) * H + i_h) * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)
            o_acc += o_t  # fp32 running sum of this chunk's outputs (the content signal m)
        tl.store(S_out + p_S, S, mask=m_S)
        tl.store(o_sum_out + i_bh * V + o_v, o_acc, mask=m_v)


def _decode_config(batch_heads, k_dim, v_dim):
    """(BK, BV, num_warps) of _recurrent_fwd_kernel. The step is memory-bound: each program reads
    and writes a BK x BV fp32 state tile once per segment and does ~6 flops per element per token.
    Measured on one H200 (H = 16, K = V = 128, fp32 state, device time of a decode step from a CUDA
    graph; copy bandwidth 4.27 TB/s): BV = 32 with one warp (128 state elements a thread, all in
    registers) is the fastest of BV 8..64 x 1..8 warps at B = 256 (138 us, 3.9 TB/s) and B = 32
    (21 us); at B = 1 every config takes 2.6-3.4 us (launch latency). More than ~128 elements a
    thread spills (BV = 64 with one warp: 6x slower), hence the warps for wider tiles."""
    BK = max(16, 1 << (k_dim - 1).bit_length())
    BV = min(32, max(16, 1 << (v_dim - 1).bit_length()))
    num_warps = max(1, min(8, BK * BV // 4096))
    return BK, BV, num_warps


def _needs_grad(q, k, v, g, b_logit, w, content, initial_state):
    """Whether autograd would record this call: grad mode on and any tensor input requiring grad."""
    tensors = [q, k, v, g, b_logit, w, *(content or ()), *(initial_state[:3] if initial_state else ())]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _packed_bt(x):
    """x [B, T, H, D] or [B, T, H] as the kernel reads it: the (H, D) part packed, any B and T
    strides (a view of a fused projection qualifies without a copy)."""
    packed = x.stride(-1) == 1 and (x.dim() == 3 or x.stride(2) == x.shape[-1])
    return x if packed else x.contiguous()


def recurrent_carve_triton(q, k, v, g, b_logit, w, content=None, initial_state=None,
                           output_final_state=False, scale=None, chunk_size=64):
    """recurrent_carve_torch's semantics with the Triton kernel: same inputs, o in v.dtype, the same
    CarveState. Inference only (the decode path): it has no backward, so it refuses inputs that
    need a gradient; `recurrent_carve` sends those to the torch path.

    The tokens are cut into segments at absolute chunk boundaries (chunk c(t) = (offset + t) //
    chunk_size), one launch per segment. After a segment that finishes a chunk: m = o_sum / C,
    Delta = U D m (CARVE), o_sum = 0, in torch. A decode step (T = 1) is one launch, plus that
    einsum once every chunk_size tokens. No host synchronisation."""
    if triton is None:
        raise RuntimeError("recurrent_carve_triton needs triton, which cannot be imported")
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
    BK, BV, num_warps = _decode_config(B * H, K, V)
    grid = (-(-V // BV) * B * H,)
    strides = [s for x in (q, k, v, g, b_logit, w) for s in x.stride()[:2]]
    for start, end, finishes_chunk in _chunk_segments(offset, T, chunk_size):
        _recurrent_fwd_kernel[grid](q, k, v, g, b_logit, w, o, S_in, S, o_sum_in, o_sum, delta,
                                    *strides, start, end - start, T, H, scale,
                                    K=K, V=V, BK=BK, BV=BV, VALUE_GATE=w.dim() == 4,
                                    USE_INITIAL=use_initial, num_warps=num_warps)
        # from here on the kernel continues from (and overwrites in place) its own output
        S_in, o_sum_in, use_initial = S, o_sum, True
        if finishes_chunk:  # the content update, in torch
            if content is not None:
                with torch.no_grad(), torch.autocast(dev.type, enabled=False):  # fp32 under any autocast
                    delta = _next_delta(content, o_sum, chunk_size).contiguous()
            o_sum.zero_()
    final = CarveState(S, o_sum, delta, offset + T) if output_final_state else None
    return o, final


if triton is not None:
    # The decode step as a torch.library custom op: torch.compile (e.g. a compiled generation loop,
    # or mode="reduce-overhead" for CUDA graphs) sees one opaque node instead of a Triton launch it
    # cannot trace, so the graph does not break.
    @torch.library.custom_op("carve::recurrent_triton", mutates_args=())
    def _recurrent_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             b_logit: torch.Tensor, w: torch.Tensor, S: torch.Tensor, o_sum: torch.Tensor,
                             delta: torch.Tensor, D: Optional[torch.Tensor], U: Optional[torch.Tensor], offset: int,
                             scale: float, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
        content = (D, U) if D is not None else None
        o, final = recurrent_carve_triton(q, k, v, g, b_logit, w, content, CarveState(S, o_sum, delta, offset),
                                          True, scale, chunk_size)
        return o, final.S, final.o_sum, final.delta.clone()  # a custom op may not return an input

    @_recurrent_triton_op.register_fake
    def _(q, k, v, g, b_logit, w, S, o_sum, delta, D, U, offset, scale, chunk_size):
        f32 = torch.float32
        return (v.new_empty(*q.shape[:3], v.shape[-1]), S.new_empty(S.shape, dtype=f32),
                o_sum.new_empty(o_sum.shape, dtype=f32), delta.new_empty(delta.shape, dtype=f32))
# ============================================================================ end of Triton decode


def _packed_sequences(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale, chunk_size,
                      cu_seqlens):
    """Packed sequences (flash-attention's cu_seqlens): the inputs are [1, total, H, D] holding N
    sequences back to back, sequence i at cu_seqlens[i] : cu_seqlens[i+1]. Each starts from its own
    state (row i of initial_state, else zeros) and counts chunks from its own start, so no state,
    content mean or chunk boundary reaches from one sequence into the next. The final state has a
    row per sequence and, as its offset, a tuple of the per-sequence positions."""
    bounds = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    total = q.shape[1]
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the inputs hold the sequences back to back in one row: batch size "
                         f"must be 1, got {q.shape[0]}")
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the total length {total}, got {bounds}")
    n = len(bounds) - 1
    if initial_state is not None and initial_state.S.shape[0] != n:
        raise ValueError(f"initial_state has {initial_state.S.shape[0]} rows for {n} packed sequences")
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


def chunk_carve(q, k, v, g, b_logit, w, content=None, initial_state=None, output_final_state=False, scale=None,
                chunk_size=64, cu_seqlens=None) -> Tuple[torch.Tensor, Optional[CarveState]]:
    backend_for(q)
    with torch.autocast(q.device.type, enabled=False):  # fp32 inside, whatever autocast the caller runs
        if cu_seqlens is not None:
            return _packed_sequences(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                     chunk_size, cu_seqlens)
        return chunk_carve_torch(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                 chunk_size)


def recurrent_carve(q, k, v, g, b_logit, w, content=None, initial_state=None,
                    output_final_state=False, scale=None, chunk_size=64) -> Tuple[torch.Tensor, Optional[CarveState]]:
    if backend_for(q) == "triton" and not _needs_grad(q, k, v, g, b_logit, w, content, initial_state):
        # the Triton decode kernel has no backward: a call that needs a gradient runs in torch
        _check_inputs(q, k, v, g, b_logit, w, content, initial_state)
        B, T, H, K = q.shape
        state = initial_state if initial_state is not None else zero_state(B, H, K, v.shape[-1], q.device)
        D, U = content if content is not None else (None, None)
        o, S, o_sum, delta = torch.ops.carve.recurrent_triton(
            q, k, v, g, b_logit, w, state.S, state.o_sum, state.delta, D, U, state.offset,
            K ** -0.5 if scale is None else float(scale), chunk_size)
        return o, (CarveState(S, o_sum, delta, state.offset + T) if output_final_state else None)
    with torch.autocast(q.device.type, enabled=False):
        return recurrent_carve_torch(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                     chunk_size)
