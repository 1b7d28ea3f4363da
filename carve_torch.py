"""
The torch side of the CARVE / GDN-2 kernels: the decode state, the input checks, and the two torch
paths: `recurrent_carve_torch`, the per-token fp32 recurrence written straight from SPEC sections 1
and 3 (the decode path of the torch backend and the statement of what every kernel computes), and
`chunk_carve_torch`, the chunked WY form of SPEC section 2 (the fallback for training and prefill).
carve_kernel.py chooses between these and the Triton kernels (carve_triton_chunk.py, carve_triton.py);
call it, not this.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

L2_NORM_EPS = 1e-6
# Every path floors the log-decay at GATE_FLOOR per token (alpha >= e^-5 = 0.0067, which already
# forgets almost everything in one step; the gradient below the floor is zero). SPEC section 5 asks for
# a bounded gate; this bound is what lets the Triton chunk kernels form exp(G_r - G_s) inside a
# 16-token block as a product of two factors within exp(+-40), i.e. as tensor-core matrix products.
GATE_FLOOR = -5.0


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


def _check_inputs(q, k, v, g, b_logit, w, content, initial_state, state_rows=None):
    """state_rows: rows of initial_state (B, or the number of packed sequences)."""
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
        N = B if state_rows is None else state_rows
        for name, shape in (("S", (N, H, K, V)), ("o_sum", (N, H, V)), ("delta", (N, H, K))):
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
    return q, k, u, to_bh(g).clamp(min=GATE_FLOOR), to_bh(b_logit), scale, state


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


def _needs_grad(q, k, v, g, b_logit, w, content, initial_state):
    """Whether autograd would record this call: grad mode on and any tensor input requiring grad."""
    tensors = [q, k, v, g, b_logit, w, *(content or ()), *(initial_state[:3] if initial_state else ())]
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


def _packed_sequences(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale, chunk_size,
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
