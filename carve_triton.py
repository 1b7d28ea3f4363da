"""
The Triton decode kernels of CARVE / GDN-2 behind carve_kernel.py's functions: the decode step (per
token, inference only) and the fused decode step of a layer (conv and gates included). Each is a
torch.library custom op, so torch.compile keeps one graph. The chunk kernels (training and prefill)
are in carve_triton_chunk.py. The torch paths of carve_torch.py define what they compute; the tests
compare both with an independent float64 reference.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from carve_torch import CarveState, _check_inputs, _chunk_segments, _needs_grad, _next_delta


def _interpreted():
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return type(_recurrent_fwd_kernel).__name__ == "InterpretedFunction"


# The per-token recurrence of recurrent_carve_torch as one Triton kernel (SPEC sections 1, 3), for
# decode: inference only, no backward. Each program owns a [K, BV] tile of one head's fp32 state and
# keeps it in registers over the tokens of a segment, so the state is read and written once per
# segment. A segment never crosses an absolute chunk boundary: the content update between chunks
# (Delta = U D m) is a tiny einsum the launcher does in torch, exactly like the torch path.

@triton.jit
def _token_step(S, q_t, k_t, v_t, g_t, bl_t, w_t, d, scale):
    """One token of the recurrence (SPEC section 1's step form) on a [BK, BV] fp32 state tile, from
    fp32 inputs; padded channels are 0. Returns the new tile and this tile's columns of o."""
    # L2 norm as F.normalize(eps=1e-6): x / max(||x||, 1e-6)
    q_t = q_t / tl.maximum(tl.sqrt(tl.sum(q_t * q_t, axis=0)), 1e-6)
    k_t = k_t / tl.maximum(tl.sqrt(tl.sum(k_t * k_t, axis=0)), 1e-6)
    b_t = tl.sigmoid(bl_t + d)
    S = S * tl.exp(tl.maximum(g_t, -5.0))[:, None]                     # Diag(alpha) S, g >= GATE_FLOOR
    v_new = w_t * v_t - tl.sum(S * (b_t * k_t)[:, None], axis=0)       # u - S^T (b * k)
    S = S + k_t[:, None] * v_new[None, :]                              # + k v_new^T
    return S, tl.sum(S * q_t[:, None], axis=0) * scale                 # S^T q * scale


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


@triton.jit
def _conv_silu(x, conv_w, conv_in, conv_out, i_b, ch, m_ch, n_ch, WIDTH: tl.constexpr,
               WP: tl.constexpr):
    """Channels `ch` of batch row i_b: the depthwise causal conv over the cached last WIDTH - 1 inputs
    and this one, then SiLU, each rounded to x's dtype as the model's torch ops are; writes the
    cache shifted by one. x [B, n_ch]; conv_w [n_ch, WIDTH]; caches [B, n_ch, WIDTH - 1]."""
    o_w = tl.arange(0, WP)
    m_w = m_ch[:, None] & (o_w[None, :] < WIDTH - 1)
    p_cache = (i_b * n_ch + ch[:, None]) * (WIDTH - 1) + o_w[None, :]
    hist = tl.load(conv_in + p_cache, mask=m_w, other=0.0).to(tl.float32)
    cur = tl.load(x + i_b * n_ch + ch, mask=m_ch, other=0.0)
    # the weights in x's dtype too, as causal_conv casts them
    taps = tl.load(conv_w + ch[:, None] * WIDTH + o_w[None, :], mask=m_w, other=0.0).to(cur.dtype)
    last = tl.load(conv_w + ch * WIDTH + WIDTH - 1, mask=m_ch, other=0.0).to(cur.dtype)
    y = tl.sum(hist * taps.to(tl.float32), axis=1) + cur.to(tl.float32) * last.to(tl.float32)
    y = y.to(cur.dtype).to(tl.float32)
    shifted = tl.load(conv_in + p_cache + 1, mask=m_w & (o_w[None, :] < WIDTH - 2), other=0.0)
    new_cache = tl.where(o_w[None, :] < WIDTH - 2, shifted.to(cur.dtype), cur[:, None])
    tl.store(conv_out + p_cache, new_cache.to(conv_out.dtype.element_ty), mask=m_w)
    return (y * tl.sigmoid(y)).to(cur.dtype).to(tl.float32)


@triton.jit
def _decode_step_kernel(x, conv_w, conv_in, conv_out, f, A_log, dt_bias, b_logit, w, o, S_in, S_out,
                        o_sum_in, o_sum_out, delta, H, scale, a_log_min,
                        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        WIDTH: tl.constexpr, WP: tl.constexpr, VALUE_GATE: tl.constexpr):
    """One decode step (T = 1) of a layer from its projections, before any activation: the causal
    conv of q, k, v with its cache and SiLU, the decay g = -exp(max(A_log, a_log_min)) *
    softplus(f + dt_bias), the write gate sigmoid(w) (rounded to w's dtype, as torch.sigmoid of a
    bf16 tensor is), then _token_step. x [B, 2HK + HV] holds the q, k, v projections; f, b_logit
    [B, H*K]; w [B, H*V] (GDN-2) or [B, H] (CARVE); A_log [H], dt_bias [H*K]; every tensor contiguous.
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
    q_t = _conv_silu(x, conv_w, conv_in, conv_out, i_b, i_h * K + o_k, m_k, n_ch, WIDTH, WP)
    k_t = _conv_silu(x, conv_w, conv_in, conv_out, i_b, (H + i_h) * K + o_k, m_k, n_ch, WIDTH, WP)
    v_t = _conv_silu(x, conv_w, conv_in, conv_out, i_b, 2 * H * K + i_h * V + o_v, m_v, n_ch, WIDTH, WP)
    rate = tl.exp(tl.maximum(tl.load(A_log + i_h).to(tl.float32), a_log_min))
    f_t = tl.load(f + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32) \
        + tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    e = tl.exp(tl.minimum(f_t, 20.0))                  # softplus as torch: log1p(exp(f)), f above 20
    g_t = -rate * tl.where(f_t > 20.0, f_t, tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e)))
    bl_t = tl.load(b_logit + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    if VALUE_GATE:
        w_raw = tl.load(w + i_bh * V + o_v, mask=m_v, other=0.0)
    else:
        w_raw = tl.load(w + i_bh)
    w_t = tl.sigmoid(w_raw.to(tl.float32)).to(w_raw.dtype).to(tl.float32)
    p_S = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    m_S = m_k[:, None] & m_v[None, :]
    S = tl.load(S_in + p_S, mask=m_S, other=0.0)
    d = tl.load(delta + i_bh * K + o_k, mask=m_k, other=0.0)
    S, o_t = _token_step(S, q_t, k_t, v_t, g_t, bl_t, w_t, d, scale)
    tl.store(o + i_bh * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)
    tl.store(S_out + p_S, S, mask=m_S)
    tl.store(o_sum_out + i_bh * V + o_v, tl.load(o_sum_in + i_bh * V + o_v, mask=m_v, other=0.0) + o_t, mask=m_v)


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
        if finishes_chunk:
            delta = _finish_chunk(content, o_sum, delta, chunk_size)
    final = CarveState(S, o_sum, delta, offset + T) if output_final_state else None
    return o, final


def decode_step_triton(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w, state, content, a_log_min,
                       scale=None, chunk_size=64):
    """One fused decode step of a CARVE / GDN-2 layer from its projections at one position: x [B, 2HK + HV]
    (q, k, v before the conv), conv_weight [2HK + HV, 1, W], conv_cache [B, 2HK + HV, W - 1], f and
    b_logit [B, H*K], w [B, H*V] (GDN-2) or [B, H] (CARVE), all before their activations, and the
    layer's A_log [H] and dt_bias [H*K]. Returns o [B, 1, H, V] in x's dtype, the new CarveState and
    the new conv cache. It computes what causal_conv, the gates and recurrent_carve_triton compute in
    model.py, in one launch (plus the Delta einsum in torch once every chunk_size tokens). Inference only."""
    B, n_ch = x.shape
    H = A_log.shape[0]
    K = f.shape[-1] // H
    V = (n_ch - 2 * H * K) // H
    width = conv_weight.shape[-1]
    dev, f32 = x.device, torch.float32
    BK, BV, num_warps = _decode_config(B * H, K, V)
    o = torch.empty(B, 1, H, V, dtype=x.dtype, device=dev)
    S = torch.empty(B, H, K, V, dtype=f32, device=dev)
    o_sum = torch.empty(B, H, V, dtype=f32, device=dev)
    new_cache = torch.empty(B, n_ch, width - 1, dtype=x.dtype, device=dev)
    S_in, o_sum_in, delta, offset = state
    delta = delta.float()
    c = lambda t: t.contiguous()  # noqa: E731
    _decode_step_kernel[(-(-V // BV) * B * H,)](
        c(x), c(conv_weight), c(conv_cache.to(x.dtype)), new_cache, c(f), c(A_log), c(dt_bias), c(b_logit), c(w), o,
        c(S_in.float()), S, c(o_sum_in.float()), o_sum, c(delta), H,
        K ** -0.5 if scale is None else float(scale), float(a_log_min),
        K=K, V=V, BK=BK, BV=BV, WIDTH=width, WP=max(2, 1 << (width - 2).bit_length()),
        VALUE_GATE=w.shape[-1] == H * V, num_warps=num_warps)
    if (offset + 1) % chunk_size == 0:
        delta = _finish_chunk(content, o_sum, delta, chunk_size)
    return o, CarveState(S, o_sum, delta, offset + 1), new_cache


def _finish_chunk(content, o_sum, delta, chunk_size):
    """After a decode launch that finished a chunk: Delta = U D m for the next chunk (CARVE), in torch
    and fp32 under any autocast, and o_sum reset in place. Returns the new delta."""
    if content is not None:
        with torch.no_grad(), torch.autocast(o_sum.device.type, enabled=False):
            delta = _next_delta(content, o_sum, chunk_size).contiguous()
    o_sum.zero_()
    return delta


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
    # a custom op may not return an input, and its outputs are contiguous like the fake's
    return o, final.S, final.o_sum, final.delta.clone(memory_format=torch.contiguous_format)


@_recurrent_triton_op.register_fake
def _(q, k, v, g, b_logit, w, S, o_sum, delta, D, U, offset, scale, chunk_size):
    f32 = torch.float32
    return (v.new_empty(*q.shape[:3], v.shape[-1]), S.new_empty(S.shape, dtype=f32),
            o_sum.new_empty(o_sum.shape, dtype=f32), delta.new_empty(delta.shape, dtype=f32))


@torch.library.custom_op("carve::decode_step", mutates_args=())
def _decode_step_op(x: torch.Tensor, conv_weight: torch.Tensor, conv_cache: torch.Tensor, f: torch.Tensor,
                    A_log: torch.Tensor, dt_bias: torch.Tensor, b_logit: torch.Tensor, w: torch.Tensor,
                    S: torch.Tensor, o_sum: torch.Tensor, delta: torch.Tensor, D: Optional[torch.Tensor],
                    U: Optional[torch.Tensor], offset: int, a_log_min: float, scale: float,
                    chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    content = (D, U) if D is not None else None
    o, final, cache = decode_step_triton(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w,
                                         CarveState(S, o_sum, delta, offset), content, a_log_min, scale,
                                         chunk_size)
    # a custom op may not return an input, and its outputs are contiguous like the fake's
    return o, final.S, final.o_sum, final.delta.clone(memory_format=torch.contiguous_format), cache


@_decode_step_op.register_fake
def _(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w, S, o_sum, delta, D, U, offset, a_log_min, scale,
      chunk_size):
    B, H, K, V = S.shape
    f32 = torch.float32
    return (x.new_empty(B, 1, H, V), S.new_empty(S.shape, dtype=f32), o_sum.new_empty(o_sum.shape, dtype=f32),
            delta.new_empty(delta.shape, dtype=f32), x.new_empty(B, x.shape[1], conv_weight.shape[-1] - 1))
