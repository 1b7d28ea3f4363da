"""
The CARVE and GDN-2 language models (docs/DESIGN.md sections 1 and 11), in one file.

    embedding -> n_layer x [x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))] -> RMSNorm -> head

The mixer of each layer comes from `ModelConfig.mixer`, a comma-separated pattern repeated over the
layers: "carve" (all CARVE), "gdn2", "attn" (a Transformer), or e.g. "carve,attn" (a hybrid).

Generation: `model.init_cache(batch_size)` gives an empty per-layer cache; `model(idx, cache=cache)`
runs any number of tokens on top of it (the chunk kernel for a prompt, the per-token kernel for a
single token) and updates it in place, so a recurrent layer costs O(1) per generated token.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from carve_kernel import (CarveState, DecayGate, GateProjection, ShortConv, backend_for, causal_conv_silu, chunk_carve,
                          embedding, fused_decode_step, linear, output_norm_gate, recurrent_carve, swiglu,
                          swiglu_linear, zero_state)

MIXERS = ("carve", "gdn2", "attn")


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    n_layer: int = 18
    d_model: int = 2304
    n_head: int = 16
    head_k_dim: int = 128
    head_v_dim: int = 128
    mlp_hidden: int = 6208
    mixer: str = "carve"          # comma-separated pattern repeated over the layers
    conv_size: int = 4            # depthwise causal short convolution on q, k, v
    chunk_size: int = 64          # C: CARVE's content gate changes once per chunk of C tokens
    content_rank: int = 16        # r of CARVE's content projection U_h D_h; 0: none (Delta = 0, an ablation)
    a_log_min: float = -5.0       # floor on A_log before exp (docs/DESIGN.md section 7: a vanishing decay overflows)
    attn_window: int = 0          # sliding window of the attn mixer in tokens; 0 = full causal
    rope_theta: float = 10000.0
    gate_act: str = "silu"        # output gate activation: silu (the paper's) or sigmoid
    doc_start_token: int = -1     # a token that starts a document (prepare_data.py's eot): nothing before
    #                               it is seen from it on (state, conv, attention); -1 = no resets
    tie_embeddings: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        bad = [m for m in self.mixer_pattern() if m not in MIXERS]
        if bad:
            raise ValueError(f"mixer={self.mixer!r}: unknown mixer {bad[0]!r}; choose from {MIXERS}, "
                             f"comma-separated, e.g. 'carve' or 'gdn2,attn'")
        if self.gate_act not in ("silu", "sigmoid"):
            raise ValueError(f"gate_act={self.gate_act!r}: expected 'silu' or 'sigmoid'")
        for key in ("vocab_size", "n_layer", "d_model", "n_head", "head_k_dim", "head_v_dim", "mlp_hidden", "conv_size",
                    "chunk_size"):
            if getattr(self, key) < 1 and not (key == "vocab_size" and self.vocab_size == 0):
                raise ValueError(f"{key}={getattr(self, key)}: must be at least 1")
        if self.attn_window < 0:
            raise ValueError(f"attn_window={self.attn_window}: must be at least 0 (0: full causal attention)")
        if self.content_rank < 0:
            raise ValueError(f"content_rank={self.content_rank}: must be at least 0 (0: CARVE without its content "
                             f"shift)")
        if "attn" in self.mixer_pattern() and self.head_k_dim % 2:
            raise ValueError(f"head_k_dim={self.head_k_dim}: attention layers rotate pairs of channels (RoPE), "
                             f"so it must be even")

    def mixer_pattern(self):
        return [m.strip() for m in self.mixer.split(",")]

    def layer_mixers(self):
        pattern = self.mixer_pattern()
        return [pattern[i % len(pattern)] for i in range(self.n_layer)]

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


class Linear(nn.Linear):
    """nn.Linear whose one-row products without gradient (a batch-1 decode step on a GPU) run
    carve_kernel.linear's GEMV."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def init_linear(layer):
    nn.init.xavier_uniform_(layer.weight, gain=2 ** -2.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_linear_parts(layer, sizes):
    """A Linear that computes several projections at once (one launch, one read of x), initialised as
    if each block of `sizes` output rows were a Linear layer of its own."""
    for part in layer.weight.split(sizes):
        nn.init.xavier_uniform_(part, gain=2 ** -2.5)


def in_compute_dtype(x):
    """x in the dtype autocast runs matrix products in, cast once: the Linear layers that read it share
    this copy (and the backward saves it once) instead of each casting x again."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def packed_documents(doc_id):
    """From per-token document numbers [B, T] to the packed view of all B*T tokens as one row:
    (cu_seqlens [N + 1] of the N documents, doc_start [B*T] where each token's document starts).
    A row's first token always starts a document."""
    B, T = doc_id.shape
    new = torch.ones_like(doc_id, dtype=torch.bool)
    new[:, 1:] = doc_id[:, 1:] != doc_id[:, :-1]
    new = new.flatten()
    positions = torch.arange(B * T, device=doc_id.device)
    starts = positions[new]
    cu_seqlens = torch.cat([starts, starts.new_tensor([B * T])])
    doc_start = torch.cummax(torch.where(new, positions, 0), dim=0).values
    return cu_seqlens, doc_start


class DeltaMixer(nn.Module):
    """The gated delta-rule token mixer: CARVE (kind='carve') or its baseline GDN-2 (kind='gdn2').

    Parameters shared by both have the same names, so a GDN-2 model's weights load into CARVE."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind, self.cfg = kind, cfg
        H, K, V, d = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.d_model
        # every projection of x that both models have, as one product: q, k, v (the conv reads them as
        # one [B, T, 2HK + HV] slice), the first half of the low-rank decay gate, the erase gate's logits,
        # the first half of the low-rank output gate; the write gate differs between the models and keeps
        # a Linear of its own
        self.in_sizes = (H * K, H * K, H * V, K, H * K, V)
        self.in_proj = Linear(d, sum(self.in_sizes), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(2 * H * K + H * V, 1, cfg.conv_size))
        # channel-wise decay g = -exp(A_log) * softplus(W_f x + dt_bias), W_f low rank d -> K -> H*K
        self.f_up = Linear(K, H * K, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H * K))
        # content_rank 0 keeps CARVE's write gate and drops its content shift: the ablation that tells what
        # the shift adds from what the scalar write strength does
        self.has_content = kind == "carve" and cfg.content_rank > 0
        if kind == "gdn2":
            self.w_proj = Linear(d, H * V, bias=False)                 # write gate, value axis
        else:
            self.beta_proj = Linear(d, H, bias=False)                  # scalar write strength per head
            if self.has_content:
                self.content_down = nn.Parameter(torch.empty(H, cfg.content_rank, V))   # D_h: V -> r
                self.content_up = nn.Parameter(torch.empty(H, K, cfg.content_rank))     # U_h: r -> K
        self.g_up = Linear(V, H * V, bias=True)                        # output gate, low rank d -> V -> H*V
        self.o_norm_weight = nn.Parameter(torch.ones(V))
        self.o_proj = Linear(H * V, d, bias=False)

    @torch.no_grad()
    def reset_parameters(self):
        H, K = self.cfg.n_head, self.cfg.head_k_dim
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.in_proj:
                init_linear(m)
        init_linear_parts(self.in_proj, self.in_sizes)
        nn.init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))  # nn.Conv1d's default
        self.A_log.copy_(torch.empty(H).uniform_(1, 16).log())
        dt = torch.empty(H * K).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))         # inverse softplus
        # zero write-gate projection: sigmoid(0) = 0.5 in both models, and U = 0 makes Delta = 0,
        # so a fresh CARVE computes exactly GDN-2 (docs/DESIGN.md section 9)
        if self.kind == "gdn2":
            nn.init.zeros_(self.w_proj.weight)
        else:
            nn.init.zeros_(self.beta_proj.weight)
            if self.has_content:
                for h in range(H):
                    nn.init.xavier_uniform_(self.content_down[h], gain=2 ** -2.5)
                nn.init.zeros_(self.content_up)
        nn.init.ones_(self.o_norm_weight)

    def forward(self, x, cache=None, doc_id=None):
        cfg = self.cfg
        batch_shape = x.shape
        packed, doc_start = {}, None
        if doc_id is not None:  # documents packed in the rows: run all tokens as one row, cut per document
            cu_seqlens, doc_start = packed_documents(doc_id)
            x, packed = x.reshape(1, -1, x.shape[-1]), {"cu_seqlens": cu_seqlens}
        B, T, _ = x.shape
        H, K, V = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
        qkv, f_low, b_logit, g_low = self.in_proj(x).split([2 * H * K + H * V, *self.in_sizes[3:]], dim=-1)
        w_raw = self.w_proj(x) if self.kind == "gdn2" else self.beta_proj(x)
        content = (self.content_down, self.content_up) if self.has_content else None
        if cache is not None and T == 1 and self.fused_decode(x):
            # decode: the conv, the gates and the recurrence in one kernel, on the cache's tensors in place;
            # w_raw is the write gate's logit: the kernel applies the sigmoid
            o, cache["state"] = fused_decode_step(qkv[:, 0], self.conv_weight, cache["conv"], self.f_up(f_low[:, 0]),
                                                  self.A_log, self.dt_bias, b_logit[:, 0], w_raw[:, 0],
                                                  cache["state"], content, cfg.a_log_min, cfg.chunk_size)
        else:
            if cache is None:   # the chunk op runs the conv itself and keeps its input, not q, k, v, for the backward
                q, k, v = ShortConv(qkv, self.conv_weight, doc_start), None, None
            else:
                qkv, conv_cache = causal_conv_silu(qkv, self.conv_weight, cache["conv"], doc_start)
                q, k, v = (t.view(B, T, H, -1) for t in qkv.split([H * K, H * K, H * V], dim=-1))
            # the decay's inputs rather than g: the chunk kernels compute g where they read it (no fp32 g kept),
            # and the chunk op makes f = f_up(f_low) itself, forward and backward (f not kept either)
            g = DecayGate(GateProjection(f_low, self.f_up.weight, None), self.A_log, self.dt_bias.view(H, K),
                          cfg.a_log_min)
            w = torch.sigmoid(w_raw).view(B, T, H, V) if self.kind == "gdn2" else torch.sigmoid(w_raw)
            kernel = recurrent_carve if (cache is not None and T == 1) else chunk_carve
            o, state = kernel(q, k, v, g, b_logit.reshape(B, T, H, K), w, content,
                              initial_state=cache["state"] if cache else None, output_final_state=cache is not None,
                              chunk_size=cfg.chunk_size, **packed)
            if cache is not None:   # in place: the cache's tensors stay where a CUDA graph reads them
                old = cache["state"]
                for buffer, new in zip((cache["conv"], old.S, old.o_sum, old.delta), (conv_cache, *state[:3])):
                    buffer.copy_(new)
                # not old._replace(...): see fused_decode_step
                cache["state"] = CarveState(old.S, old.o_sum, old.delta, state.offset)
        o = output_norm_gate(o, GateProjection(g_low, self.g_up.weight, self.g_up.bias), self.o_norm_weight,
                             cfg.norm_eps, cfg.gate_act)
        return self.o_proj(o.reshape(B, T, H * V)).view(batch_shape)

    def fused_decode(self, x):
        """Whether a decode step runs the fused Triton step: the Triton backend (backend_for), a conv
        cache to shift, and no gradient needed (the fused kernel has no backward)."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return backend_for(x) == "triton" and self.cfg.conv_size > 1 and not needs_grad

    def empty_cache(self, batch_size, device, max_len=None, dtype=None):
        cfg = self.cfg
        channels = self.conv_weight.shape[0]
        # the conv cache in the compute dtype: the inputs it keeps are projections, exact in it
        return {"conv": torch.zeros(batch_size, channels, cfg.conv_size - 1, device=device,
                                    dtype=dtype or torch.float32),
                "state": zero_state(batch_size, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, device)}


def rope(x, positions, theta):
    """Rotary position embedding on [B, T, H, D] for the absolute positions [T] (a tensor)."""
    D = x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = positions.float()[:, None] * inv_freq
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def causal_window_mask(query_pos, key_pos, window):
    """[queries, keys] of absolute positions: a key is seen when it is not after the query and, with a
    window > 0, fewer than `window` tokens before it."""
    allowed = key_pos[None, :] <= query_pos[:, None]
    if window > 0:
        allowed &= key_pos[None, :] > query_pos[:, None] - window
    return allowed


class Attention(nn.Module):
    """Causal softmax attention with RoPE (optionally a sliding window): the Transformer baseline
    and the attention layers of a hybrid."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D, d = cfg.n_head, cfg.head_k_dim, cfg.d_model
        self.qkv_proj = Linear(d, 3 * H * D, bias=False)
        self.o_proj = Linear(H * D, d, bias=False)

    @torch.no_grad()
    def reset_parameters(self):
        H, D = self.cfg.n_head, self.cfg.head_k_dim
        init_linear_parts(self.qkv_proj, [H * D] * 3)
        init_linear(self.o_proj)

    def forward(self, x, cache=None, doc_id=None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, D = cfg.n_head, cfg.head_k_dim
        offset = cache["offset"] if cache else 0
        static = cache is not None and "position" in cache
        # a static cache keeps the position on the device too, so a CUDA graph's replays read the current one
        positions = (cache["position"] if static else offset) + torch.arange(T, device=x.device)
        q, k, v = self.qkv_proj(x).view(B, T, 3, H, D).unbind(dim=2)
        q = rope(q, positions, cfg.rope_theta).transpose(1, 2)
        k = rope(k, positions, cfg.rope_theta).transpose(1, 2)
        v = v.transpose(1, 2)
        if static:   # write into the buffers; attend over all of them, masked to the positions written
            if offset + T > cache["k"].shape[2]:
                raise ValueError(f"the KV cache holds {cache['k'].shape[2]} positions (init_cache's max_len); "
                                 f"{offset + T} needed")
            cache["k"].index_copy_(2, positions, k.to(cache["k"].dtype))
            cache["v"].index_copy_(2, positions, v.to(cache["v"].dtype))
            cache["position"] += T
            cache["offset"] = offset + T
            k, v = cache["k"].to(q.dtype), cache["v"].to(q.dtype)
        elif cache is not None:
            k = torch.cat([cache["k"].to(k.dtype), k], dim=2)
            v = torch.cat([cache["v"].to(v.dtype), v], dim=2)
            # a sliding window needs only the last window-1 keys for the next query
            drop = 0 if cfg.attn_window == 0 else max(0, k.shape[2] - (cfg.attn_window - 1))
            cache["k"], cache["v"] = k[:, :, drop:], v[:, :, drop:]
            cache["offset"] = offset + T
        S = k.shape[2]  # keys visible: the cached ones, then these T (static: every buffer position)
        if doc_id is not None:  # cache is None here: S == T
            same_doc = doc_id[:, None, :, None] == doc_id[:, None, None, :]
            allowed = causal_window_mask(positions, positions, cfg.attn_window) & same_doc
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        elif not static and cfg.attn_window == 0 and S == T:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:   # absolute key positions: the buffer's own, or the last S before these T ended
            key_pos = torch.arange(S, device=x.device) + (0 if static else offset + T - S)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_window_mask(positions, key_pos,
                                                                                       cfg.attn_window))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def empty_cache(self, batch_size, device, max_len=None, dtype=torch.float32):
        """Keys and values that grow with each call, or with max_len, buffers of max_len positions
        written in place (static: what a CUDA graph needs)."""
        H, D = self.cfg.n_head, self.cfg.head_k_dim
        if max_len is None:
            return {"k": torch.zeros(batch_size, H, 0, D, device=device),
                    "v": torch.zeros(batch_size, H, 0, D, device=device), "offset": 0}
        return {"k": torch.zeros(batch_size, H, max_len, D, device=device, dtype=dtype),
                "v": torch.zeros(batch_size, H, max_len, D, device=device, dtype=dtype), "offset": 0,
                "position": torch.zeros((), dtype=torch.long, device=device)}


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)   # gate and up as one product
        self.down_proj = Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self):
        init_linear_parts(self.gate_up_proj, [self.down_proj.in_features] * 2)
        init_linear(self.down_proj)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if torch.is_grad_enabled() and (gate_up.requires_grad or self.down_proj.weight.requires_grad):
            # training: on the Triton path the product SiLU(gate) * up is not kept for the backward (swiglu_linear);
            # the weight in gate_up's dtype, as autocast would round it
            return swiglu_linear(gate_up, self.down_proj.weight.to(gate_up.dtype))
        return self.down_proj(swiglu(gate_up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: str):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = Attention(cfg) if mixer == "attn" else DeltaMixer(cfg, mixer)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cache=None, doc_id=None):
        x = x + self.mixer(in_compute_dtype(self.mixer_norm(x)), cache, doc_id)
        return x + self.mlp(in_compute_dtype(self.mlp_norm(x)))


LOSS_CHUNK_ROWS = 4096  # rows of logits alive at once in the loss: 4096 x 50304 fp32 is 0.8 GB


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight^T against targets (-1: ignored), over chunks of rows,
    so that the [tokens, vocab] logits (fp32 for the softmax: 3.3 GB at 4 x 4096 tokens and a 50304
    vocabulary, and as much again for their gradient) never exist whole. Each chunk's logits are made,
    reduced to its loss and, when a gradient is wanted, turned into its gradients at once: the loss is
    the graph's last node, so the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, need_grad):
        acc = torch.promote_types(x.dtype, torch.float32)   # the softmax in fp32 (fp64 for fp64 inputs)
        n_valid = (targets != -1).sum().clamp(min=1)
        loss = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_grad else None
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            xc, tc = x[rows], targets[rows]
            logits = (xc @ weight.t()).to(acc)
            valid = tc != -1
            target = tc.clamp(min=0)[:, None]
            loss += ((torch.logsumexp(logits, dim=-1) - logits.gather(1, target)[:, 0]) * valid).sum()
            if need_grad:  # d loss / d logits = (softmax - onehot(target)) / n_valid on the valid rows
                grad = torch.softmax(logits, dim=-1)
                grad.scatter_add_(1, target, torch.full_like(grad[:, :1], -1.0))
                grad = (grad * (valid[:, None].to(acc) / n_valid)).to(x.dtype)
                grad_x[rows] = grad @ weight
                grad_w += (grad.t() @ xc).to(acc)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def linear_cross_entropy(x, weight, targets, chunk_rows=LOSS_CHUNK_ROWS):
    """F.cross_entropy(x @ weight^T, targets, ignore_index=-1) over fp32 logits, without the logits
    (LinearCrossEntropy). x [N, d], weight [vocab, d], targets [N]; under autocast in its dtype, as a
    Linear layer would be."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(x.to(dtype), weight.to(dtype), targets, chunk_rows, need_grad)


def join_caches(caches):
    """Generation caches at the same position as one cache of all their rows, in order (new tensors): a
    batch of continuations that go on together, e.g. [cache] * n for n continuations of one prompt."""
    def join(values):
        first = values[0]
        if isinstance(first, torch.Tensor):   # rows along the batch axis; a 0-dim position is shared
            return torch.cat(values) if first.dim() else first.clone()
        if isinstance(first, tuple):          # CarveState: its tensors joined, its offset shared
            return type(first)(*map(join, zip(*values)))
        if any(value != first for value in values):
            raise ValueError(f"join_caches: the caches are at different positions ({values})")
        return first
    return [{key: join([layer[key] for layer in layers]) for key in layers[0]} for layers in zip(*caches)]


def cache_offset(layer_cache):
    """The position of the next token of a layer's generation cache."""
    return layer_cache["offset"] if "offset" in layer_cache else layer_cache["state"].offset


def set_cache_offset(layer_cache, offset):
    """Moves a layer's cache to `offset` on the host side only (its tensors stay as they are)."""
    if "offset" in layer_cache:
        layer_cache["offset"] = offset
    else:
        layer_cache["state"] = layer_cache["state"]._replace(offset=offset)


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, m) for m in cfg.layer_mixers())
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.activation_checkpointing = False  # train.py's switch: recompute each block in the backward
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for block in self.blocks:
            block.mixer.reset_parameters()
            block.mlp.reset_parameters()
            block.mixer_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.norm.reset_parameters()
        init_linear(self.head)
        nn.init.normal_(self.embed.weight, std=0.02)  # after the head: a tied head keeps N(0, 0.02)

    def forward(self, idx, targets=None, cache=None, last_only=True, sparse_targets=False):
        """idx [B, T] token ids. Training: returns (None, mean cross-entropy over targets != -1), never
        making the logits (linear_cross_entropy); with sparse_targets (most targets are -1, as in MQAR,
        which scores its queries only), over the scored rows alone, picked at the cost of one host sync,
        instead of the head's product and softmax at every position; without targets, (logits, None);
        with cfg.doc_start_token set, each row may hold several documents that never see each other.
        With a cache (generation): returns the logits of the last position only (last_only=False: of every
        position, to score a continuation) and updates the cache."""
        doc_id = None
        if self.cfg.doc_start_token >= 0:
            starts = idx == self.cfg.doc_start_token
            if cache is not None:
                # prompts only: a decode step's check would cost a host sync, which a CUDA graph cannot
                # hold, and a batch feeds the rows that sampled eot on with it
                if idx.shape[1] > 1 and (starts[:, 1:].any() or (starts[:, 0].any() and self.blocks
                                                                  and cache_offset(cache[0]) > 0)):
                    raise ValueError(f"generation with a cache runs one document: token {self.cfg.doc_start_token} "
                                     f"(doc_start_token) may only come first in a prompt")
            elif starts[:, 1:].any():
                doc_id = starts.cumsum(dim=1)
        x = embedding(idx, self.embed.weight)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, None, doc_id, use_reentrant=False)
            else:
                x = block(x, cache[i] if cache is not None else None, doc_id)
        x = self.norm(x)
        if cache is not None:
            return self.head(x[:, -1:] if last_only else x), None
        if targets is None:
            return self.head(x), None
        x, targets = x.flatten(0, 1), targets.flatten()
        if sparse_targets:
            scored = (targets != -1).nonzero()[:, 0]
            x, targets = x[scored], targets[scored]
        return None, linear_cross_entropy(x, self.head.weight, targets)

    def init_cache(self, batch_size, device=None, max_len=None, dtype=torch.float32):
        """An empty per-layer cache for generation, updated in place by each call. Attention layers grow
        their keys and values, or with max_len (a CUDA graph's static buffers) hold max_len positions
        of `dtype` from the start."""
        device = device or self.embed.weight.device
        return [block.mixer.empty_cache(batch_size, device, max_len, dtype) for block in self.blocks]

    def num_params(self, non_embedding=True):
        """Parameters in the blocks (the paper's non-embedding count) or everything."""
        if non_embedding:
            return sum(p.numel() for p in self.blocks.parameters())
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def optim_groups(self, weight_decay):
        """Weight decay on matrices only: norms, biases, A_log and dt_bias (all 1-D) are not decayed."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward = 3x forward) per token, counting the matmuls of every
        Linear layer *and* the token mixing itself, so MFU is honest for recurrent layers."""
        cfg = self.cfg
        C, K, V, H = cfg.chunk_size, cfg.head_k_dim, cfg.head_v_dim, cfg.n_head
        linear_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        forward = 2 * linear_weights
        for mixer in cfg.layer_mixers():
            if mixer == "attn":
                # QK^T and PV over the keys a query sees, averaged over the positions of a sequence
                W = cfg.attn_window or seq_len
                context = (W * (W + 1) / 2 + (seq_len - W) * W) / seq_len if seq_len > W else (seq_len + 1) / 2
                forward += 2 * 2 * H * K * context
            else:
                # per head and token of the chunk form (docs/DESIGN.md section 3): T and M rows (2*C/2*K each),
                # the triangular solve for Y and U (C/2*(K+V)*2), M R (C/2*V*2), and three K x V
                # state products (Y S0, (gamma Q) S0, K^T R)
                forward += H * (2 * C * K + C * (K + V) + C * V + 6 * K * V)
        return 3 * forward
