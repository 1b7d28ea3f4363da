"""
The Triton chunk kernels of CARVE / GDN-2 behind carve_kernel.chunk_carve, for training and prefill
(SPEC section 2): the forward (the walk alone, or split around a parallel prep kernel), the three-kernel
backward, and the custom ops carve::chunk_fwd / carve::chunk_bwd with the autograd that joins them, so
torch.compile keeps one graph. chunk_carve_torch in carve_torch.py defines what they compute; the tests
compare both with an independent float64 reference. The decode kernels are in carve_triton.py.
"""
import contextlib
from typing import List, Optional

import torch
import triton
import triton.language as tl

from carve_torch import CarveState, _check_inputs, _sequence_bounds
from carve_triton import _interpreted, _packed_bt


# Training and prefill (SPEC section 2). The forward walks each sequence and head through blocks of
# BT = 16 tokens: the WY form with 16-token blocks in place of C-token chunks, while Delta = U D m is
# still updated at absolute multiples of chunk_size C (a multiple of 16), so it is the same function.
# The small blocks make the decay factors safe: with g >= GATE_FLOOR, exp(G_r - G_s) inside a block
# splits through the block's middle into two factors within exp(+-40), so T and M are plain matrix
# products on tensor cores (fp32 inputs through tf32x3, see _dot_operands).
#
# Forward, in one of two forms (_split_forward picks by the number of walk programs):
#   - the walk alone, one program per (sequence, head), block after block: the block's tiles
#     (_block_tiles: norms, decays, M, gamma q, decayed keys), b, the solve, R, O and the state update.
#     The whole [K, V] fp32 state stays in registers (CARVE's Delta needs every value column).
#   - split, when (sequence, head) programs alone would leave most of the card idle: _chunk_prep_kernel
#     first computes the tiles in parallel over chunks, and CARVE's walk loads them. GDN-2, whose Delta
#     never changes, also solves T, A, Y and U = A Z in the prep kernel, walks with one program per
#     (sequence, head, value block) doing only R = U - Y S and the state update, and computes the
#     outputs in parallel afterwards (_chunk_fwd_output), with the walk's operations in the same order,
#     so CARVE at initialisation still equals GDN-2 bit for bit in either form.
# The forward stores what the backward needs, so the backward never repeats the walk: the state at
# each block start, v_new (R) of every token, Delta and m of every chunk, and per
# block A = (I + T)^-1, M, Y, gamma q, the keys decayed to the block end and the block's total
# log-decay; the dot operands among them in the operands' dtype (_operand_dtype), as fla stores h.
# Backward, three kernels:
#   1. _chunk_bwd_walk: the only sequential part. Per (sequence, head, value block), blocks in reverse:
#      dR = M^T dO scale + k_end dS and dS <- gamma_L dS + (gamma q)^T dO scale - Y^T dR; stores dR, the
#      state gradient after every block in the operand dtype, and sum(S * dS) over its value columns.
#   2. _chunk_bwd_values, parallel over (chunk, head): from the stored block states and state gradients
#      (no carried gradient, so no fp32 [K, V] tile in registers), computes dv, dw and the
#      value-summed pieces (dO S^T, dR S^T, R dS^T, dO R^T, dR R^T) for the next kernel.
#   3. _chunk_bwd_keys, parallel over (chunk, head): the chain through A, T and M to dq, dk, dg,
#      db_logit and dDelta.
# When the walks leave half the card idle (long sequences, few of them), the split forward and the
# backward cut each sequence into pieces of chunks: the walk of one piece runs on a high-priority
# stream beside the parallel kernels of others (the forward's prep kernel of the next piece, the
# backward's value and key sides of the piece just walked). Each piece is a sequence table of its own,
# so the kernels are the same.
# Dot operands are in the input dtype with fp32 accumulation (_dot_operands); the 16 x 16 inverse is
# exact fp32.

CHUNK_BT = 16  # rows of a block
# Launch settings from a sweep on an H200 (docs/BENCHMARKS.md: 4, 8 and 16 warps, 1 to 3 stages). Two
# stages let the loads of the next block overlap the current one's products; the exceptions below were
# faster than that default (the prep kernel and GDN-2's walk 1.5x, the key side 1.07x).
CHUNK_LAUNCH = dict(num_warps=8, num_stages=2)
PREP_LAUNCH = dict(num_warps=4, num_stages=2)
GDN2_WALK_LAUNCH = dict(num_warps=8, num_stages=3)
KEYS_LAUNCH = dict(num_warps=8, num_stages=3)
# The forward's two forms (see above): the walk alone, or split into parallel parts around a shorter
# walk. The split moves more data (the prepared tiles) and pays off only when the walk has too few
# programs to fill the card (docs/BENCHMARKS.md has the measured crossover).
FORWARD_SPLIT = None  # True / False forces one form (tests); None: by the count of walk programs
# When the walk programs leave half the card idle, the split forward and the backward walk each sequence
# in pieces of chunks (_walk_pieces), so that the parallel kernels run on the idle SMs beside the walk:
# the prep kernel of the next piece, the value and key sides of the piece the reverse walk has just
# finished.
WALK_PIECES, PIECE_CHUNKS = 8, 16   # at most 8 pieces, none shorter than 16 chunks
PIECES = None  # an int forces the number of pieces (tests); None: by the walk programs and the length


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split_forward(n_walks, device):
    if FORWARD_SPLIT is not None:
        return FORWARD_SPLIT
    return device.type == "cuda" and 2 * n_walks < _sm_count(device)


def _walk_bv(N, H, V, device):
    """Value columns of a value-block walk program (GDN-2's forward walk, the reverse walk): 64, or 32
    when 64 would leave SMs idle, as the forward's split does. At 1 x 32768 on an H200 the reverse walk
    took 3.47 ms with 32 columns against 4.06 with 64, GDN-2's walk 1.91 against 2.14; 16 columns were
    no faster, and at 8 x 2048 (many programs) 32 columns were slower (docs/BENCHMARKS.md). It follows
    FORWARD_SPLIT, so the tests that force either form run both widths."""
    return min(V, 32 if _split_forward(N * H * (V // 64), device) else 64)


def _reverse_walk_bv(table, H, V, chunk_size, device):
    """The reverse walk's value columns: _walk_bv's choice, widened to 64 when even that walk is cut into
    pieces (the value and key sides then run on the SMs the walk leaves idle, and twice as many idle SMs
    gained more than 32 columns' faster walk: fwd+bwd 8.20 -> 7.96 ms in GDN-2 mode and 15.98 -> 15.73
    in CARVE at 1 x 32768 on an H200). Where 64 columns would first bring the pieces (2 x 8192), the
    time became erratic from run to run (3.7 to 5.7 ms in GDN-2 mode), so there the width stays
    (docs/BENCHMARKS.md)."""
    rows = _table_rows(table)
    BV = _walk_bv(len(rows), H, V, device)
    if BV < 64 <= V and _pieces_wanted(rows, len(rows) * H * (V // BV), device) > 1:
        return 64
    return BV


def _pieces_wanted(rows, n_walks, device):
    """How many pieces _walk_pieces aims for (1: none): PIECES if set; else up to WALK_PIECES when the
    walk programs leave at least half the SMs idle, none shorter than PIECE_CHUNKS, whose launches would
    cost the host more than the overlap saves."""
    most = max(r[4] for r in rows)
    n = PIECES
    if n is None:
        idle = device.type == "cuda" and 2 * n_walks <= _sm_count(device)
        n = min(WALK_PIECES, most // PIECE_CHUNKS) if idle else 1
    return n if most >= 2 else 1


def _walk_pieces(table, n_walks, chunk_size, device):
    """The sequence table cut into _pieces_wanted pieces of whole chunks, in order: each a table of its
    own, a row per sequence (empty where a sequence has no chunks left) pointing into the same stores;
    one piece is the table itself."""
    rows = _table_rows(table)
    n = _pieces_wanted(rows, n_walks, device)
    if n <= 1:
        return [table]
    most = max(r[4] for r in rows)
    per_piece = -(-most // n)
    pieces = []
    for i0 in range(0, most, per_piece):
        piece = []
        for bos, length, off, chunk0, n_chunks, block0 in rows:
            lo, hi = min(i0, n_chunks), min(i0 + per_piece, n_chunks)   # the sequence's chunks lo .. hi - 1
            start = off if lo == 0 else min(off + length, (off // chunk_size + lo) * chunk_size)
            end = max(start, min(off + length, (off // chunk_size + hi) * chunk_size))
            piece += [bos + start - off, end - start, start, chunk0 + lo, hi - lo,
                      block0 + start // CHUNK_BT - off // CHUNK_BT]
        pieces.append(piece)
    return pieces


def _pieces_on_device(pieces, device, seqs=None):
    """The pieces' tables on the device, in one copy; for one piece, `seqs` if the caller already has the
    whole table there."""
    if len(pieces) == 1 and seqs is not None:
        return [seqs]
    return list(torch.split(_to_device(sum(pieces, []), device), len(pieces[0])))


_WALK_STREAMS = {}


def _walk_stream(device, pieces):
    """A high-priority stream per GPU for the walks of several pieces (None for one piece, or on the
    CPU): when a piece's walk ends, the next one's programs take the freed SMs before the parallel
    kernel's waiting programs do."""
    if device.type != "cuda" or len(pieces) == 1:
        return None
    if device.index not in _WALK_STREAMS:
        _WALK_STREAMS[device.index] = torch.cuda.Stream(device, priority=-1)
    return _WALK_STREAMS[device.index]


def _after_current(stream):
    """A context that enqueues on `stream` behind everything the current stream has enqueued so far
    (the current stream itself when `stream` is None)."""
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return torch.cuda.stream(stream)


def _reverse_walk_warps(n_walks, device):
    """4 warps when there are more reverse-walk programs than SMs: two of them then share an SM, so all
    run at once (0.46 against 0.61 ms at 8 x 2048 on an H200); fewer programs run faster with 8 warps."""
    return 4 if n_walks > _sm_count(device) else 8


SEQ_FIELDS = 6  # first token, length, offset, first stored chunk, chunks, first stored block


@triton.jit
def _sequence(seqs, i_n, C: tl.constexpr, BT: tl.constexpr):
    """The table row of sequence i_n (see _sequence_table) and its first and last absolute block."""
    bos = tl.load(seqs + i_n * 6)
    length = tl.load(seqs + i_n * 6 + 1)
    offset = tl.load(seqs + i_n * 6 + 2)
    chunk0 = tl.load(seqs + i_n * 6 + 3)
    n_chunks = tl.load(seqs + i_n * 6 + 4)
    block0 = tl.load(seqs + i_n * 6 + 5)
    blk_first = offset // BT
    blk_last = tl.where(length > 0, (offset + length - 1) // BT, blk_first - 1)
    return bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last


@triton.jit
def _chunk_program(H, max_chunks):
    """(sequence, head, chunk) of a program in a grid over sequences x chunks x heads (chunks beyond a
    sequence's own count have nothing to do)."""
    pid = tl.program_id(0).to(tl.int64)
    i_nj = pid // H
    return i_nj // max_chunks, pid % H, i_nj % max_chunks


@triton.jit
def _value_block_program(H, NV):
    """(sequence, head, value block) of a program in a grid over sequences x heads x value blocks."""
    pid = tl.program_id(0).to(tl.int64)
    i_nh = pid // NV
    return i_nh // H, i_nh % H, pid % NV


@triton.jit
def _block_rows(a, bos, offset, length, BT: tl.constexpr):
    """Token rows of absolute block a: flat token index and validity (inside this call)."""
    t = a * BT + tl.arange(0, BT) - offset
    valid = (t >= 0) & (t < length)
    return bos + t, valid


@triton.jit
def _chunk_blocks(j, offset, blk_first, blk_last, C: tl.constexpr, BT: tl.constexpr):
    """First and last absolute block of the sequence's chunk j (counted in this call)."""
    a0 = tl.maximum(((offset // C) + j) * (C // BT), blk_first)
    a1 = tl.minimum(((offset // C) + j + 1) * (C // BT) - 1, blk_last)
    return a0, a1


@triton.jit
def _block_inputs(q, k, g, tok, valid, i_h, sq, sk, sg, K: tl.constexpr):
    """Rows `tok` (masked by `valid`) of head i_h: L2-normalised q and k with their norms, the raw
    and floored log-decay's in-block cumsum and total."""
    o_k = tl.arange(0, K)
    m = valid[:, None]
    q_raw = tl.load(q + tok[:, None] * sq + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    k_raw = tl.load(k + tok[:, None] * sk + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    g_raw = tl.load(g + tok[:, None] * sg + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    q_norm = tl.maximum(tl.sqrt(tl.sum(q_raw * q_raw, axis=1)), 1e-6)   # F.normalize(eps=1e-6)
    k_norm = tl.maximum(tl.sqrt(tl.sum(k_raw * k_raw, axis=1)), 1e-6)
    gf = tl.maximum(g_raw, -5.0)                                            # GATE_FLOOR
    Gc = tl.cumsum(gf, axis=0)                                              # G_r inside the block
    GL = tl.sum(gf, axis=0)                                                 # G of the block's last row
    return q_raw / q_norm[:, None], k_raw / k_norm[:, None], q_norm, k_norm, g_raw, Gc, GL


@triton.jit
def _erase_gate(b_logit, tok, valid, i_h, sb, delta, K: tl.constexpr):
    """b = sigmoid(b_logit + delta) for rows `tok` of head i_h."""
    o_k = tl.arange(0, K)
    b_l = tl.load(b_logit + tok[:, None] * sb + i_h * K + o_k[None, :], mask=valid[:, None], other=0.0)
    return tl.sigmoid(b_l.to(tl.float32) + delta[None, :])


@triton.jit
def _block_factors(qn, kn, Gc, GL):
    """exp(G_r - G_s) = exp(G_r - G_L/2) exp(G_L/2 - G_s): both factors lie within exp(+-40) for
    g >= -5, so T = tril((b Kp) Pk^T, -1) and M = tril(Pq Pk^T) are products of bounded operands.
    Returns Pq, Pk, Kp = k exp(G - G_L/2), and the two factors."""
    half = GL * 0.5
    e_pos = tl.exp(Gc - half[None, :])
    e_neg = tl.exp(half[None, :] - Gc)
    return qn * e_pos, kn * e_neg, kn * e_pos, e_pos, e_neg


@triton.jit
def _load_rows16(ptr, tok, valid, i_h, H, BT: tl.constexpr, IDENTITY: tl.constexpr):
    """A stored [BT, BT] block matrix, one row per token ([tokens, H, BT] fp32); rows outside the
    call read as rows of the identity (IDENTITY) or zero."""
    o_t = tl.arange(0, BT)
    x = tl.load(ptr + (tok[:, None] * H + i_h) * BT + o_t[None, :], mask=valid[:, None], other=0.0)
    if IDENTITY:
        x = tl.where(valid[:, None], x, tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0))
    return x


@triton.jit
def _state_grad_step(dS, gq, Y, gammaL, dO, dR, scale, DT: tl.constexpr, PREC: tl.constexpr):
    """The gradient of the state before a block from the one after it, with O = (gamma q S + M R) scale,
    R = U - Y S and S_end = gamma_L S + k_end^T R: gamma_L dS + (gamma q)^T dO scale - Y^T dR."""
    dS = tl.dot(tl.trans((gq * scale).to(DT)), dO, acc=dS * gammaL[:, None], input_precision=PREC)
    return tl.dot(tl.trans((-Y).to(DT)), dR, acc=dS, input_precision=PREC)


@triton.jit
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


@triton.jit
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
    Y_dt = tl.dot(A.to(DT), (b * gk).to(DT), input_precision=PREC).to(DT)
    return Y_dt, tl.dot(A.to(DT), Z.to(DT), input_precision=PREC)


@triton.jit
def _walk_block(S, Y_dt, AZ, k_end_dt, GL, h_store, h_offsets, DT: tl.constexpr, PREC: tl.constexpr):
    """One block of a forward walk from the state S before it: stores S in the operand dtype (the
    backward's block state) and returns it, R = A Z - Y S in the operand dtype, and the state after the
    block, gamma_L S + k_end^T R. Both walks take their blocks through it, so that CARVE at
    initialisation rounds exactly as GDN-2 does."""
    S_dt = S.to(DT)
    tl.store(h_store + h_offsets, S_dt.to(h_store.dtype.element_ty))
    R_dt = (AZ - tl.dot(Y_dt, S_dt, input_precision=PREC)).to(DT)
    return S_dt, R_dt, tl.dot(tl.trans(k_end_dt), R_dt, acc=S * tl.exp(GL)[:, None], input_precision=PREC)


@triton.jit
def _block_tiles(q, k, g, tok, valid, i_h, sq, sk, sg, K: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                 BT: tl.constexpr):
    """What a block's forward needs that depends on neither the state nor Delta: M, gamma q and the keys
    decayed to the block end in the operand dtype, and the block's total log-decay (all four kept for
    the backward, see _store_block_tiles); and the key tiles T and Y are built from, Kp = k exp(G - G_L/2)
    and gamma k in fp32, Pk = k exp(G_L/2 - G) in the operand dtype."""
    qn, kn, q_norm, k_norm, g_raw, Gc, GL = _block_inputs(q, k, g, tok, valid, i_h, sq, sk, sg, K)
    Pq, Pk, Kp, e_pos, e_neg = _block_factors(qn, kn, Gc, GL)
    Pk_dt = Pk.to(DT)
    o_t = tl.arange(0, BT)
    Mm = tl.where(o_t[:, None] >= o_t[None, :], tl.dot(Pq.to(DT), tl.trans(Pk_dt), input_precision=PREC), 0.0)
    gamma = tl.exp(Gc)
    return Mm, (gamma * qn).to(DT), (tl.exp(GL[None, :] - Gc) * kn).to(DT), GL, Kp, Pk_dt, gamma * kn


@triton.jit
def _store_block_tiles(mm_store, gq_store, kend_store, gl_store, Mm, gq_dt, k_end_dt, GL, tok, valid, i_h,
                       i_blk, H, K: tl.constexpr, BT: tl.constexpr):
    """_block_tiles' four tiles for the backward (i_blk: the block's row in gl_store)."""
    o_k = tl.arange(0, K)
    m_row = valid[:, None]
    p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
    tl.store(mm_store + (tok[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], Mm, mask=m_row)
    tl.store(gq_store + p_k, gq_dt.to(gq_store.dtype.element_ty), mask=m_row)
    tl.store(kend_store + p_k, k_end_dt.to(kend_store.dtype.element_ty), mask=m_row)
    tl.store(gl_store + i_blk * K + o_k, GL)


@triton.jit
def _chunk_prep_kernel(q, k, g, b_logit, v, w, delta_in, mm_store, gq_store, kend_store, gl_store, kp_store,
                       pk_store, gk_store, a_store, y_store, u_store, delta_store, seqs, max_chunks,
                       sq, sk, sg, sb, sv, sw, H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       VALUE_GATE: tl.constexpr, SOLVE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                       BT: tl.constexpr):
    """One program per (sequence, chunk, head), for a forward split in parallel parts: each block's
    _block_tiles, stored for the backward and, for the CARVE walk (PREPPED), the three key tiles. With
    SOLVE (GDN-2, whose Delta never changes): the solve itself, A, Y and U = A Z, for
    _chunk_fwd_gdn2_walk."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, C, BT)
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
            Mm, gq_dt, k_end_dt, GL, Kp, Pk_dt, gk = _block_tiles(q, k, g, tok, valid, i_h, sq, sk, sg, K, DT, PREC,
                                                                  BT)
            _store_block_tiles(mm_store, gq_store, kend_store, gl_store, Mm, gq_dt, k_end_dt, GL, tok, valid, i_h,
                               (block0 + a - blk_first) * H + i_h, H, K, BT)
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            if SOLVE:
                b = _erase_gate(b_logit, tok, valid, i_h, sb, delta, K)
                A = _block_solve(b * Kp, Pk_dt, DT, PREC, BT)
                Y_dt, AZ = _block_wy(A, b, gk, v, w, tok, valid, i_h, sv, sw, V, VALUE_GATE, DT, PREC)
                tl.store(a_store + (tok[:, None] * H + i_h) * BT + o_t[None, :], A, mask=m_row)
                tl.store(y_store + p_k, Y_dt.to(y_store.dtype.element_ty), mask=m_row)
                o_v = tl.arange(0, V)
                tl.store(u_store + tok[:, None] * (H * V) + i_h * V + o_v[None, :], AZ, mask=m_row)
            else:
                tl.store(kp_store + p_k, Kp, mask=m_row)
                tl.store(pk_store + p_k, Pk_dt.to(pk_store.dtype.element_ty), mask=m_row)
                tl.store(gk_store + p_k, gk, mask=m_row)


@triton.jit
def _chunk_fwd_gdn2_walk(u_store, y_store, kend_store, gl_store, S_in, o_sum_in, delta_in, S_out, o_sum_out,
                         delta_out, h_store, r_store, seqs, H, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                         C: tl.constexpr, USE_INITIAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                         BT: tl.constexpr):
    """GDN-2's walk, one program per (sequence, head, value block): with A, Y and U = A Z solved in
    parallel beforehand, a block is _walk_block, as in the CARVE walk. Stores the state at every block
    start and R; the outputs come from _chunk_fwd_output."""
    i_n, i_h, i_v = _value_block_program(H, V // BV)
    i_nh = i_n * H + i_h
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, C, BT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    p_kv = o_k[:, None] * V + o_v[None, :]
    p_S = i_nh * K * V + p_kv
    if USE_INITIAL:
        S = tl.load(S_in + p_S)
        tl.store(o_sum_out + i_nh * V + o_v, tl.load(o_sum_in + i_nh * V + o_v))   # _chunk_fwd_output
    else:                                                                          # updates it
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
        AZ = tl.load(u_store + p_v, mask=m_row, other=0.0)
        i_blk = (block0 + a - blk_first) * H + i_h
        GL = tl.load(gl_store + i_blk * K + o_k)
        S_dt, R_dt, S = _walk_block(S, Y_dt, AZ, k_end_dt, GL, h_store, i_blk * K * V + p_kv, DT, PREC)
        tl.store(r_store + p_v, R_dt.to(r_store.dtype.element_ty), mask=m_row)
    tl.store(S_out + p_S, S)


@triton.jit
def _chunk_fwd_output(o, h_store, r_store, mm_store, gq_store, o_sum_out, seqs, max_chunks, H, scale,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      BT: tl.constexpr):
    """GDN-2's outputs, one program per (sequence, chunk, head): O = (gamma q S + M R) scale from the
    stored block states and R, as the CARVE walk computes it; the last chunk of a sequence also adds
    its rows into the final o_sum (which _chunk_fwd_gdn2_walk set to the initial one)."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, C, BT)
    if j < n_chunks:
        a0, a1 = _chunk_blocks(j, offset, blk_first, blk_last, C, BT)
        o_k = tl.arange(0, K)
        o_v = tl.arange(0, V)
        i_nh = i_n * H + i_h
        last = j == n_chunks - 1
        if last & (j == 0):
            o_acc = tl.load(o_sum_out + i_nh * V + o_v)
        else:
            o_acc = tl.zeros([V], dtype=tl.float32)
        for a in range(a0, a1 + 1):
            tok, valid = _block_rows(a, bos, offset, length, BT)
            m_row = valid[:, None]
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            p_v = tok[:, None] * (H * V) + i_h * V + o_v[None, :]
            gq_dt = tl.load(gq_store + p_k, mask=m_row, other=0.0).to(DT)
            Mm = _load_rows16(mm_store, tok, valid, i_h, H, BT, False)
            R_dt = tl.load(r_store + p_v, mask=m_row, other=0.0).to(DT)
            S_dt = tl.load(h_store + ((block0 + a - blk_first) * H + i_h) * K * V + o_k[:, None] * V
                           + o_v[None, :]).to(DT)
            O = (tl.dot(gq_dt, S_dt, input_precision=PREC) + tl.dot(Mm.to(DT), R_dt, input_precision=PREC)) * scale
            tl.store(o + p_v, O.to(o.dtype.element_ty), mask=m_row)
            o_acc += tl.sum(O, axis=0)
        if last:
            complete = (offset + length) % C == 0
            tl.store(o_sum_out + i_nh * V + o_v, tl.where(complete, 0.0, o_acc))


@triton.jit
def _chunk_fwd_kernel(q, k, g, b_logit, v, w, D, U, o, S_in, o_sum_in, delta_in, S_out, o_sum_out, delta_out,
                      h_store, delta_store, m_store, r_store, a_store, mm_store, y_store, gq_store, kend_store,
                      gl_store, kp_store, pk_store, gk_store, seqs, sq, sk, sg, sb, sv, sw, H, scale,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, RANK: tl.constexpr,
                      VALUE_GATE: tl.constexpr, HAS_CONTENT: tl.constexpr, PREPPED: tl.constexpr,
                      USE_INITIAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """The walk, one program per (sequence, head): the whole forward of CARVE (and of GDN-2 when
    there are programs enough to fill the card), or with PREPPED, CARVE's walk over
    _chunk_prep_kernel's tiles."""
    i_nh = tl.program_id(0).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, C, BT)
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
            Mm = _load_rows16(mm_store, tok, valid, i_h, H, BT, False)
            GL = tl.load(gl_store + i_blk * K + o_k)
        else:
            Mm, gq_dt, k_end_dt, GL, Kp, Pk_dt, gk = _block_tiles(q, k, g, tok, valid, i_h, sq, sk, sg, K, DT, PREC,
                                                                  BT)
            _store_block_tiles(mm_store, gq_store, kend_store, gl_store, Mm, gq_dt, k_end_dt, GL, tok, valid, i_h,
                               i_blk, H, K, BT)
        b = _erase_gate(b_logit, tok, valid, i_h, sb, delta, K)
        A = _block_solve(b * Kp, Pk_dt, DT, PREC, BT)
        Y_dt, AZ = _block_wy(A, b, gk, v, w, tok, valid, i_h, sv, sw, V, VALUE_GATE, DT, PREC)
        S_dt, R_dt, S = _walk_block(S, Y_dt, AZ, k_end_dt, GL, h_store, i_blk * K * V + p_kv, DT, PREC)
        O = (tl.dot(gq_dt, S_dt, input_precision=PREC) + tl.dot(Mm.to(DT), R_dt, input_precision=PREC)) * scale
        o_acc += tl.sum(O, axis=0)                     # masked rows are exact zeros
        p_o = tok[:, None] * (H * V) + i_h * V + o_v[None, :]
        tl.store(o + p_o, O.to(o.dtype.element_ty), mask=m_row)
        tl.store(r_store + p_o, R_dt.to(r_store.dtype.element_ty), mask=m_row)
        tl.store(y_store + p_k, Y_dt.to(y_store.dtype.element_ty), mask=m_row)
        tl.store(a_store + p_16, A, mask=m_row)
        if (((a + 1) * BT) % C == 0) & ((a + 1) * BT <= offset + length):   # a chunk is complete
            if HAS_CONTENT:
                m = o_acc / C      # stop-gradient read of m (SPEC section 1): the backward treats it as data
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


@triton.jit
def _chunk_bwd_walk(do, h_store, mm_store, y_store, gq_store, kend_store, gl_store, dS_carry, dr_store, ds_store,
                    d_gl, seqs, H, scale, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """One program per (sequence, head, value block), blocks in reverse, carrying dS (the gradient of
    the state after the block): stores dR of every token and dS of every block, in the operand dtype
    (the value side reads both only as dot operands, as it reads the forward's block states), and this
    value block's part of d_gl = sum over V of S * dS, the gradient of the block's decay (one part per
    value block; the key side adds them). d_gl reads the fp32 dS, and the block state it needs is loaded
    one block ahead: a load the next statements waited for cost 1 us a block on the H200. dS_carry holds
    the state gradient at the end of the walked tokens and gets it at their start, so a sequence can be
    walked piece by piece (_walk_pieces)."""
    i_n, i_h, i_v = _value_block_program(H, V // BV)
    i_nh = i_n * H + i_h
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, C, BT)
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
        tl.store(d_gl + (i_blk * (V // BV) + i_v) * K + o_k, tl.sum(S_blk.to(tl.float32) * dS, axis=1))
        S_blk = tl.load(h_store + (i_blk - H) * K * V + p_kv, mask=p_kv * 0 + a > blk_first,
                        other=0.0)                                              # block a - 1's
        Mm = _load_rows16(mm_store, tok, valid, i_h, H, BT, False)
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


@triton.jit
def _chunk_bwd_values(v, w, do, r_store, dr_store, h_store, ds_store, a_store, dv, dw, d_gq, d_y, d_kend,
                      d_m, d_rr, seqs, max_chunks, sv, sw, H, scale, K: tl.constexpr, V: tl.constexpr,
                      C: tl.constexpr, VALUE_GATE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      BT: tl.constexpr):
    """One program per (sequence, chunk, head): per block, from the state before it (as the forward
    stored it) and the state gradient after it (as the reverse walk stored it), dv, dw and the
    value-summed pieces the key-side kernel needs. All V columns in one program, so the sums over V are
    plain stores (deterministic, nothing to zero first)."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, C, BT)
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
            A = _load_rows16(a_store, tok, valid, i_h, H, BT, True)
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


@triton.jit
def _chunk_bwd_keys(q, k, g, b_logit, delta_store, a_store, gl_store, d_gq, d_y, d_kend, d_gl, d_m, d_rr,
                    dq, dk, dg, db_logit, d_delta, seqs, max_chunks, sq, sk, sg, sb, H,
                    NV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                    BT: tl.constexpr):
    """One program per (sequence, chunk, head): for each block, the chain from the value-summed
    pieces through A = (I + T)^-1, T and M (whose factors are rebuilt from q, k, g, b) to dq, dk,
    dg, db_logit, and dDelta of the chunk."""
    i_n, i_h, j = _chunk_program(H, max_chunks)
    bos, length, offset, chunk0, n_chunks, block0, blk_first, blk_last = _sequence(seqs, i_n, C, BT)
    if j < n_chunks:
        a0, a1 = _chunk_blocks(j, offset, blk_first, blk_last, C, BT)
        o_k = tl.arange(0, K)
        o_t = tl.arange(0, BT)
        r_i = o_t[:, None]
        s_i = o_t[None, :]
        delta = tl.load(delta_store + ((chunk0 + j) * H + i_h) * K + o_k)
        dd = tl.zeros([K], dtype=tl.float32)
        for a in range(a0, a1 + 1):
            tok, valid = _block_rows(a, bos, offset, length, BT)
            m_row = valid[:, None]
            qn, kn, q_norm, k_norm, g_raw, Gc, _ = _block_inputs(q, k, g, tok, valid, i_h, sq, sk, sg, K)
            # the forward's total log-decay, the same bits as _block_inputs' sum, which is unused here and
            # dropped by the compiler: a reduction across the tile's rows costs shared-memory round trips
            # (docs/KERNEL_NOTES.md v7)
            GL = tl.load(gl_store + ((block0 + a - blk_first) * H + i_h) * K + o_k)
            b = _erase_gate(b_logit, tok, valid, i_h, sb, delta, K)
            Pq, Pk, Kp, e_pos, e_neg = _block_factors(qn, kn, Gc, GL)
            Pb = b * Kp
            gamma = tl.exp(Gc)
            decay_end = tl.exp(GL[None, :] - Gc)
            p_k = tok[:, None] * (H * K) + i_h * K + o_k[None, :]
            dgq = tl.load(d_gq + p_k, mask=m_row, other=0.0)
            dY = tl.load(d_y + p_k, mask=m_row, other=0.0)
            At = tl.trans(_load_rows16(a_store, tok, valid, i_h, H, BT, True))
            dX = tl.dot(At.to(DT), dY.to(DT), input_precision=PREC)
            dke = tl.load(d_kend + p_k, mask=m_row, other=0.0)
            p_gl = (((block0 + a - blk_first) * H + i_h) * NV) * K + o_k
            dGLS = tl.load(d_gl + p_gl)                      # sum(S * dS), one part per reverse-walk program
            for i_v in tl.static_range(1, NV):
                dGLS += tl.load(d_gl + p_gl + i_v * K)
            dM = tl.where(r_i >= s_i, _load_rows16(d_m, tok, valid, i_h, H, BT, False), 0.0)
            # R = A (Z - X S) with A = (I + T)^-1, so dT = -A^T dR R^T (dR R^T from the value side)
            dT = -tl.dot(At, _load_rows16(d_rr, tok, valid, i_h, H, BT, False), input_precision="ieee")
            dT = tl.where(r_i > s_i, dT, 0.0)
            dPb = tl.dot(dT.to(DT), Pk.to(DT), input_precision=PREC)
            dPq = tl.dot(dM.to(DT), Pk.to(DT), input_precision=PREC)
            dPk = tl.dot(tl.trans(dT.to(DT)), Pb.to(DT), input_precision=PREC) \
                + tl.dot(tl.trans(dM.to(DT)), Pq.to(DT), input_precision=PREC)
            # T = Pb Pk^T, M = Pq Pk^T, O = (gamma q S + M R) scale, Y = A X with X = gamma b k and
            # S_end = gamma_L S + k_end^T R, where Pq = q e_pos, Pk = k e_neg, Pb = b k e_pos, k_end = k decay_end;
            # d/dG of e_pos, gamma is the factor itself, of e_neg, decay_end its negative
            dqn = dPq * e_pos + dgq * gamma
            z = dPb * e_pos + dX * gamma
            db = kn * z
            dk_end = dke * decay_end
            dk_neg = dPk * e_neg + dk_end
            dkn = dk_neg + b * z
            dGc = qn * dqn + b * db - kn * dk_neg
            dGL = tl.sum(kn * dk_end, axis=0) + tl.exp(GL) * dGLS
            dgv = tl.cumsum(dGc, axis=0, reverse=True) + dGL[None, :]     # G_r = sum of g_s for s <= r
            dgv = tl.where(g_raw < -5.0, 0.0, dgv)                       # the floor's gradient
            dq_raw = tl.where(q_norm[:, None] > 1e-6,
                              (dqn - qn * tl.sum(qn * dqn, axis=1)[:, None]) / q_norm[:, None], dqn / 1e-6)
            dk_raw = tl.where(k_norm[:, None] > 1e-6,
                              (dkn - kn * tl.sum(kn * dkn, axis=1)[:, None]) / k_norm[:, None], dkn / 1e-6)
            dbl = db * b * (1.0 - b)
            dd += tl.sum(tl.where(m_row, dbl, 0.0), axis=0)
            tl.store(dq + p_k, dq_raw.to(dq.dtype.element_ty), mask=m_row)
            tl.store(dk + p_k, dk_raw.to(dk.dtype.element_ty), mask=m_row)
            tl.store(dg + p_k, dgv.to(dg.dtype.element_ty), mask=m_row)
            tl.store(db_logit + p_k, dbl.to(db_logit.dtype.element_ty), mask=m_row)
        tl.store(d_delta + ((chunk0 + j) * H + i_h) * K + o_k, dd)


def chunk_triton_supports(k_dim, v_dim, chunk_size):
    """Shapes the chunk kernels take: K and V powers of two in 16..128, chunk_size a multiple of 16.
    Anything else runs the torch path."""
    return k_dim in (16, 32, 64, 128) and v_dim in (16, 32, 64, 128) and chunk_size % CHUNK_BT == 0


def _pieces(offset, length, size):
    """How many pieces of `size` tokens, aligned at absolute multiples of it, the tokens offset ..
    offset + length - 1 touch."""
    return (offset + length - 1) // size - offset // size + 1 if length else 0


def _sequence_table(B, T, offset, cu_seqlens, chunk_size):
    """Per sequence, SEQ_FIELDS ints: first token (a row of the flattened B*T tokens), length, absolute
    offset, first stored chunk, number of chunks, first stored block; flattened (a custom-op argument)."""
    bounds = [n * T for n in range(B + 1)] if cu_seqlens is None else list(cu_seqlens)
    offsets = list(offset) if isinstance(offset, (tuple, list)) else [offset] * (len(bounds) - 1)
    table, chunks, blocks = [], 0, 0
    for start, end, off in zip(bounds, bounds[1:], offsets):
        n_chunks = _pieces(off, end - start, chunk_size)
        table += [start, end - start, off, chunks, n_chunks, blocks]
        chunks += n_chunks
        blocks += _pieces(off, end - start, CHUNK_BT)
    return table


def _table_rows(table):
    """The flattened sequence table as a list of its rows (SEQ_FIELDS ints each)."""
    return [table[i:i + SEQ_FIELDS] for i in range(0, len(table), SEQ_FIELDS)]


def _table_sizes(table):
    """(sequences, stored chunks, stored blocks, most chunks of one sequence)."""
    rows = _table_rows(table)
    last = rows[-1]
    return len(rows), last[3] + last[4], last[5] + _pieces(last[2], last[1], CHUNK_BT), max(r[4] for r in rows)


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
    """The torch dtype of the chunk kernels' dot operands: the input dtype (see _dot_operands for the
    precision of fp32 products). Triton 3.9's interpreter multiplies the raw bits of bf16 dot operands (it keeps bf16 as
    uint16), so interpreted kernels use fp32 operands; the bf16 loads and stores of inputs and outputs
    stay bf16, and the compiled bf16 products are checked on a GPU. The forward stores the operands it
    used (state at chunk starts, v_new, Y, gamma q, decayed keys) in this dtype, so the backward reads
    the same values."""
    return torch.float32 if dtype == torch.float32 or _interpreted() else dtype


def _dot_operands(dtype):
    """Launch arguments of the chunk kernels for inputs of `dtype`: DT, _operand_dtype as a Triton dtype;
    PREC, for fp32 operands "tf32x3", three tf32 tensor-core products whose sum rounds close to the fp32
    product; and enable_fp_fusion off with fp32 operands. Exact fp32 products ("ieee", on the CUDA cores)
    spilled kilobytes a thread: fp32 forward+backward at 8 x 2048 on an H200 took 132.9 ms with them and
    15.7 ms with tf32x3 (docs/BENCHMARKS.md). tf32x3 splits an operand a into big = tf32(a) and
    small = a - big; with FP fusion, a product computed just before is contracted into that subtraction,
    so an operand computed in registers (GDN-2's prep kernel) and the same operand loaded (CARVE's walk)
    split differently, and CARVE at initialisation would no longer equal GDN-2 bit for bit. The 16 x 16
    inverse stays exact fp32 (_block_solve)."""
    dt = _operand_dtype(dtype)
    fp32 = dt == torch.float32
    return dict(DT={torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dt],
                PREC="tf32x3" if fp32 else "tf32", enable_fp_fusion=not fp32)


def _fwd_shapes(q, v, table):
    """Shapes and dtypes of carve::chunk_fwd's outputs: o, the final S, o_sum, delta, then what the
    backward keeps (state at block starts, Delta and m per chunk, v_new, A and M rows, Y, gamma q,
    keys decayed to the block end, the block's total log-decay)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, n_chunks, n_blocks, _ = _table_sizes(table)
    f32, dt = torch.float32, _operand_dtype(q.dtype)
    return [((B, T, H, V), v.dtype), ((N, H, K, V), f32), ((N, H, V), f32), ((N, H, K), f32),
            ((n_blocks, H, K, V), dt), ((n_chunks, H, K), f32), ((n_chunks, H, V), f32), ((B, T, H, V), dt),
            ((B, T, H, CHUNK_BT), f32), ((B, T, H, CHUNK_BT), f32), ((B, T, H, K), dt), ((B, T, H, K), dt),
            ((B, T, H, K), dt), ((n_blocks, H, K), f32)]


@torch.library.custom_op("carve::chunk_fwd", mutates_args=())
def _chunk_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b_logit: torch.Tensor,
                  w: torch.Tensor, D: Optional[torch.Tensor], U: Optional[torch.Tensor],
                  S0: Optional[torch.Tensor], o_sum0: Optional[torch.Tensor], delta0: Optional[torch.Tensor],
                  table: List[int], scale: float, chunk_size: int) -> List[torch.Tensor]:
    """o and the final S, o_sum, delta (a row per sequence), then what the backward keeps."""
    H, K = q.shape[2], q.shape[3]
    N = len(table) // SEQ_FIELDS
    dev, f32 = q.device, torch.float32
    q, k, v, g, b_logit, w = (_token_rows(x) for x in (q, k, v, g, b_logit, w))
    out = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in _fwd_shapes(q, v, table)]
    out[6].zero_()   # m stays 0 for chunks that do not finish
    use_initial = S0 is not None
    if use_initial:
        S0, o_sum0 = S0.float().contiguous(), o_sum0.float().contiguous()
    delta0 = delta0.float().contiguous() if delta0 is not None else torch.zeros(N, H, K, dtype=f32, device=dev)
    has_content = D is not None
    seqs = _to_device(table, dev)
    V, max_chunks = v.shape[-1], _table_sizes(table)[3]
    o, S, o_sum, delta, h_store, delta_store, _, r_store, a_store, mm_store, y_store, gq_store, kend_store, \
        gl_store = out
    S_in, o_sum_in = (S0, o_sum0) if use_initial else (S, o_sum)
    common = dict(K=K, V=V, C=chunk_size, BT=CHUNK_BT, **_dot_operands(q.dtype))
    walk = dict(RANK=D.shape[1] if has_content else 1, VALUE_GATE=w.dim() == 4, HAS_CONTENT=has_content,
                **common, **CHUNK_LAUNCH)
    strides = [x.stride(1) for x in (q, k, g, b_logit, v, w)]
    if not _split_forward(N * H, dev):
        _chunk_fwd_kernel[(N * H,)](
            q, k, g, b_logit, v, w, D if has_content else delta0, U if has_content else delta0, o, S_in, o_sum_in,
            delta0, *out[1:], delta0, delta0, delta0, seqs, *strides, H, scale, PREPPED=False,
            USE_INITIAL=use_initial, **walk)
        return out
    if has_content:  # the key tiles the prep kernel writes for the CARVE walk
        kp, gk = (torch.empty(q.shape, dtype=f32, device=dev) for _ in range(2))
        pk = torch.empty(q.shape, dtype=_operand_dtype(q.dtype), device=dev)
        u = kp       # (not written: no solve in the prep kernel)
        n_walks = N * H
    else:            # GDN-2: U = A Z from the prep kernel's solve
        u = torch.empty(v.shape, dtype=f32, device=dev)
        kp = gk = pk = u   # (not written)
        BV = _walk_bv(N, H, V, dev)
        n_walks = N * H * (V // BV)
    pieces = _walk_pieces(table, n_walks, chunk_size, dev)
    piece_seqs = _pieces_on_device(pieces, dev, seqs)
    walk_stream = _walk_stream(dev, pieces)
    for i, (piece_table, piece) in enumerate(zip(pieces, piece_seqs)):
        piece_chunks = _table_sizes(piece_table)[3]
        _chunk_prep_kernel[(N * piece_chunks * H,)](
            q, k, g, b_logit, v, w, delta0, mm_store, gq_store, kend_store, gl_store, kp, pk, gk, a_store, y_store,
            u, delta_store, piece, piece_chunks, *strides, H, VALUE_GATE=w.dim() == 4, SOLVE=not has_content,
            **common, **PREP_LAUNCH)
        # a later piece starts from the state, o_sum and delta the previous one left (read, then rewritten)
        start = (S, o_sum, delta, True) if i > 0 else (S_in, o_sum_in, delta0, use_initial)
        with _after_current(walk_stream):   # behind this piece's prep kernel
            if has_content:
                _chunk_fwd_kernel[(N * H,)](
                    q, k, g, b_logit, v, w, D, U, o, *start[:3], *out[1:], kp, pk, gk, piece, *strides, H, scale,
                    PREPPED=True, USE_INITIAL=start[3], **walk)
            else:
                _chunk_fwd_gdn2_walk[(n_walks,)](
                    u, y_store, kend_store, gl_store, *start[:3], S, o_sum, delta, h_store, r_store, piece, H,
                    BV=BV, USE_INITIAL=start[3], **common, **GDN2_WALK_LAUNCH)
    if walk_stream is not None:
        torch.cuda.current_stream(dev).wait_stream(walk_stream)
    if not has_content:
        _chunk_fwd_output[(N * max_chunks * H,)](
            o, h_store, r_store, mm_store, gq_store, o_sum, seqs, max_chunks, H, scale, **common, **CHUNK_LAUNCH)
    return out


@_chunk_fwd_op.register_fake
def _(q, k, v, g, b_logit, w, D, U, S0, o_sum0, delta0, table, scale, chunk_size):
    return [q.new_empty(shape, dtype=dtype) for shape, dtype in _fwd_shapes(q, v, table)]


@torch.library.custom_op("carve::chunk_bwd", mutates_args=())
def _chunk_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b_logit: torch.Tensor,
                  w: torch.Tensor, do: torch.Tensor, dS_end: Optional[torch.Tensor], saved: List[torch.Tensor],
                  table: List[int], scale: float, chunk_size: int) -> List[torch.Tensor]:
    """dq, dk, dv, dg, db_logit, dw, dDelta of each chunk, and each initial state's gradient."""
    h_store, delta_store, _, r_store, a_store, mm_store, y_store, gq_store, kend_store, gl_store = saved
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, n_chunks, n_blocks, _ = _table_sizes(table)
    dev, f32 = q.device, torch.float32
    q, k, v, g, b_logit, w, do = (_token_rows(x) for x in (q, k, v, g, b_logit, w, do))
    BV = _reverse_walk_bv(table, H, V, chunk_size, dev)
    n_walks = N * H * (V // BV)
    dots = _dot_operands(q.dtype)
    pieces = _walk_pieces(table, n_walks, chunk_size, dev)[::-1]   # the last piece first
    piece_seqs = _pieces_on_device(pieces, dev)
    # the walk carries dS through this buffer from the end of each sequence to its start
    dS0 = dS_end.float().clone(memory_format=torch.contiguous_format) if dS_end is not None else \
        torch.zeros(N, H, K, V, dtype=f32, device=dev)
    dr_store = torch.empty(B, T, H, V, dtype=_operand_dtype(q.dtype), device=dev)  # only read as an operand
    ds_store = torch.empty(n_blocks, H, K, V, dtype=_operand_dtype(q.dtype), device=dev)
    d_gl = torch.empty(n_blocks, H, V // BV, K, dtype=f32, device=dev)
    walked = []   # an event after each piece's walk (None on the CPU or for one piece)
    walk_stream = _walk_stream(dev, pieces)
    for piece in piece_seqs:
        with _after_current(walk_stream):
            _chunk_bwd_walk[(n_walks,)](
                do, h_store, mm_store, y_store, gq_store, kend_store, gl_store, dS0, dr_store, ds_store, d_gl,
                piece, H, scale, K=K, V=V, BV=BV, C=chunk_size, BT=CHUNK_BT, **dots,
                num_warps=_reverse_walk_warps(n_walks, dev), num_stages=2)
            walked.append(walk_stream.record_event() if walk_stream is not None else None)
    d_gq, d_kend = (torch.empty(B, T, H, K, dtype=f32, device=dev) for _ in range(2))
    d_y = torch.empty(B, T, H, K, dtype=_operand_dtype(q.dtype), device=dev)   # only read as a dot operand
    d_m, d_rr = (torch.empty(B, T, H, CHUNK_BT, dtype=f32, device=dev) for _ in range(2))
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    dw = torch.empty(B, T, H, *w.shape[3:], dtype=w.dtype if w.dim() == 4 else f32, device=dev)
    for i, (piece_table, piece, event) in enumerate(zip(pieces, piece_seqs, walked)):
        if event is not None:   # this piece's value and key sides run beside the walk of the next pieces
            torch.cuda.current_stream(dev).wait_event(event)
        piece_chunks = _table_sizes(piece_table)[3]
        _chunk_bwd_values[(N * piece_chunks * H,)](
            v, w, do, r_store, dr_store, h_store, ds_store, a_store, dv, dw, d_gq, d_y, d_kend, d_m, d_rr, piece,
            piece_chunks, v.stride(1), w.stride(1), H, scale,
            K=K, V=V, C=chunk_size, VALUE_GATE=w.dim() == 4, BT=CHUNK_BT, **dots, **CHUNK_LAUNCH)
        if i == len(pieces) - 1:
            del dr_store, ds_store   # read for the last time (the key side does not read them)
        if i == 0:   # made here so that, with one piece, they take the memory of the stores just freed
            dq, dk, db_logit = (torch.empty(B, T, H, K, dtype=x.dtype, device=dev) for x in (q, k, b_logit))
            dg = torch.empty(B, T, H, K, dtype=g.dtype, device=dev)
            d_delta = torch.empty(n_chunks, H, K, dtype=f32, device=dev)
        _chunk_bwd_keys[(N * piece_chunks * H,)](
            q, k, g, b_logit, delta_store, a_store, gl_store, d_gq, d_y, d_kend, d_gl, d_m, d_rr, dq, dk, dg,
            db_logit, d_delta, piece, piece_chunks, q.stride(1), k.stride(1), g.stride(1), b_logit.stride(1), H,
            NV=V // BV, K=K, C=chunk_size, BT=CHUNK_BT, **dots, **KEYS_LAUNCH)
    return [dq, dk, dv, dg, db_logit, dw.to(w.dtype), d_delta, dS0]


@_chunk_bwd_op.register_fake
def _(q, k, v, g, b_logit, w, do, dS_end, saved, table, scale, chunk_size):
    N, n_chunks = len(table) // SEQ_FIELDS, _table_sizes(table)[1]
    f32 = torch.float32
    fresh = lambda x: x.new_empty(x.shape)  # noqa: E731  (contiguous, like the real outputs)
    return [fresh(q), fresh(k), fresh(v), fresh(g), fresh(b_logit), fresh(w),
            q.new_empty(n_chunks, q.shape[2], q.shape[3], dtype=f32),
            q.new_empty(N, q.shape[2], q.shape[3], v.shape[-1], dtype=f32)]


def _chunk_setup_context(ctx, inputs, output):
    q, k, v, g, b_logit, w, D, U, S0, o_sum0, delta0, table, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, b_logit, w, D, U, *output[4:])
    ctx.set_materialize_grads(False)   # the saved outputs get no gradient: no zero tensors of their size
    ctx.table, ctx.scale, ctx.chunk_size = table, scale, chunk_size
    ctx.has_S0, ctx.has_delta0 = S0 is not None, delta0 is not None


def _chunk_backward(ctx, grads):
    do, dS, _, d_delta_final = grads[:4]   # o_sum is a stop-gradient read: its gradient is dropped
    q, k, v, g, b_logit, w, D, U, *saved = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=q.device)
    dq, dk, dv, dg, db_logit, dw, d_delta, dS0 = torch.ops.carve.chunk_bwd(
        q, k, v, g, b_logit, w, do, dS, saved, ctx.table, ctx.scale, ctx.chunk_size)
    dD, dU, d_delta0 = _content_grads(d_delta, d_delta_final, saved[2], D, U, ctx.table, ctx.chunk_size, q)
    return (dq, dk, dv, dg, db_logit, dw, dD, dU, dS0 if ctx.has_S0 else None, None,
            d_delta0 if ctx.has_delta0 else None, None, None, None)


torch.library.register_autograd("carve::chunk_fwd", _chunk_backward, setup_context=_chunk_setup_context)


def _content_grads(d_delta, d_delta_final, m_store, D, U, table, chunk_size, like):
    """From dDelta of each chunk (summed over its rows by the backward kernel) to the gradients of D,
    U and the initial delta. Chunk i's Delta is the initial delta for a sequence's first chunk and
    U D m_{i-1} after it; the final delta is U D m of the last chunk if that chunk is complete, else
    the last chunk's Delta. m is data here (stop-gradient, SPEC section 1)."""
    rows = _table_rows(table)
    dev, H, K = like.device, like.shape[2], like.shape[3]
    final = d_delta_final if d_delta_final is not None else torch.zeros(len(rows), H, K, device=dev)
    walked = [n for n, r in enumerate(rows) if r[4] > 0]       # sequences with at least one chunk
    complete = [(r[1] + r[2]) % chunk_size == 0 for r in rows]  # ... whose last chunk is complete
    # one copy to the device for all index lists: each copy costs the host tens of microseconds
    lists = [[n for n, r in enumerate(rows) for _ in range(r[4])], walked,
             [rows[n][3] + rows[n][4] - 1 for n in walked], [rows[n][3] for n in walked],
             [complete[n] for n in walked], [r[4] == 0 or c for r, c in zip(rows, complete)]]
    chunk_seq, seq, last, first, done, passes = torch.split(_to_device(sum(lists, []), dev), [len(x) for x in lists])
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


def chunk_carve_triton(q, k, v, g, b_logit, w, content=None, initial_state=None, output_final_state=False,
                       scale=None, chunk_size=64, cu_seqlens=None):
    """chunk_carve_torch's semantics (and _packed_sequences' for cu_seqlens) with the Triton chunk
    kernels, forward and backward (through the custom op carve::chunk_fwd and its registered
    autograd, so torch.compile keeps one graph)."""
    bounds = None if cu_seqlens is None else _sequence_bounds(q, cu_seqlens, initial_state)
    _check_inputs(q, k, v, g, b_logit, w, content, initial_state, None if bounds is None else len(bounds) - 1)
    B, T, H, K = q.shape
    if not chunk_triton_supports(K, v.shape[-1], chunk_size):
        raise ValueError(f"the Triton chunk kernels take K, V in 16..128 (powers of two) and chunk_size a "
                         f"multiple of 16; got K={K}, V={v.shape[-1]}, chunk_size={chunk_size}")
    offset = initial_state.offset if initial_state is not None else 0
    table = _sequence_table(B, T, offset, bounds, chunk_size)
    D, U = content if content is not None else (None, None)
    S0, o_sum0, delta0 = initial_state[:3] if initial_state is not None else (None, None, None)
    o, S, o_sum, delta = torch.ops.carve.chunk_fwd(q, k, v, g, b_logit, w, D, U, S0, o_sum0, delta0, table,
                                                   K ** -0.5 if scale is None else float(scale), chunk_size)[:4]
    if not output_final_state:
        return o, None
    offsets = tuple(table[2 + i] + table[1 + i] for i in range(0, len(table), SEQ_FIELDS))
    return o, CarveState(S, o_sum.detach(), delta, offsets if cu_seqlens is not None else offset + T)
