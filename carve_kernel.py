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
CARVE_BACKEND=torch|triton overrides. The Triton backend has the chunk kernels (`chunk_carve_triton`,
forward and backward, the custom op carve::chunk_fwd with its autograd registered; K, V powers of two
up to 128 and chunk_size a multiple of 16, other shapes take the torch path) and two decode kernels,
inference only: `recurrent_carve_triton` (the custom op carve::recurrent_triton) behind
recurrent_carve, and `fused_decode_step` (carve::decode_step), a layer's whole step from its
projections, conv and gates included, which model.py uses to decode.

Every path floors g at GATE_FLOOR = -5 per token (carve_torch.py says why).

The code is in four files: this one (the public functions and the dispatch), carve_torch.py (the
state, the checks and the torch paths, which define what the kernels compute), carve_triton_chunk.py
(the Triton chunk kernels) and carve_triton.py (the Triton decode kernels), each kernel behind a
torch.library custom op.
"""
import os
from typing import Optional, Tuple

import torch

from carve_torch import (GATE_FLOOR, CarveState, _check_inputs, _needs_grad, _packed_sequences,  # noqa: F401
                         chunk_carve_torch, recurrent_carve_torch, zero_state)

try:  # Triton is optional: without it every call runs the torch path
    import triton
except ImportError:
    triton = None
if triton is not None:
    from carve_triton import _interpreted, decode_step_triton, recurrent_carve_triton  # noqa: F401
    from carve_triton_chunk import chunk_carve_triton, chunk_triton_supports  # noqa: F401


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
        if not x.is_cuda and not _interpreted():
            raise RuntimeError("CARVE_BACKEND=triton with CPU tensors needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before importing triton and carve_kernel (or use CUDA "
                               "tensors, or CARVE_BACKEND=torch)")
    return choice


def chunk_carve(q, k, v, g, b_logit, w, content=None, initial_state=None, output_final_state=False, scale=None,
                chunk_size=64, cu_seqlens=None) -> Tuple[torch.Tensor, Optional[CarveState]]:
    triton_path = backend_for(q) == "triton" and chunk_triton_supports(q.shape[-1], v.shape[-1], chunk_size)
    with torch.autocast(q.device.type, enabled=False):  # fp32 inside, whatever autocast the caller runs
        if triton_path:
            return chunk_carve_triton(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                      chunk_size, cu_seqlens)
        if cu_seqlens is not None:
            return _packed_sequences(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                     chunk_size, cu_seqlens)
        return chunk_carve_torch(q, k, v, g, b_logit, w, content, initial_state, output_final_state, scale,
                                 chunk_size)


def fused_decode_step(x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w, state, content, a_log_min,
                      chunk_size=64):
    """decode_step_triton (one layer's decode step from its projections, conv and gates included)
    through the custom op carve::decode_step, so a compiled generation loop keeps one graph. The caller
    picks it when backend_for says 'triton' and no gradient is needed (model.py)."""
    K = f.shape[-1] // A_log.shape[0]
    D, U = content if content is not None else (None, None)
    o, S, o_sum, delta, cache = torch.ops.carve.decode_step(
        x, conv_weight, conv_cache, f, A_log, dt_bias, b_logit, w, state.S, state.o_sum, state.delta, D, U,
        state.offset, float(a_log_min), K ** -0.5, chunk_size)
    return o, CarveState(S, o_sum, delta, state.offset + 1), cache


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
