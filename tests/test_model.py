"""Model-level tests (docs/DESIGN.md sections 6, 9 and 11): parameter count, CARVE = GDN-2 at
initialisation, prefill + decode = one forward, optimiser groups, FLOP count, config validation,
finite gradients, the chunked loss."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_module
from carve_kernel import swiglu, swiglu_linear
from model import LM, ModelConfig, SwiGLU, linear_cross_entropy
from reference import TOL_LOGITS, assert_rel, perturb, prefill_then_decode, record, rel_err, tiny, tokens


# ----------------------------------------------------------------------------- parameter count

def test_param_count_1b3():
    with torch.device("meta"):
        gdn2 = LM(ModelConfig(mixer="gdn2"))
        carve = LM(ModelConfig(mixer="carve"))
    cfg = gdn2.cfg
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.mlp_hidden) == \
        (18, 2304, 16, 128, 128, 6208)
    assert gdn2.num_params() == 1_302_638_112  # docs/DESIGN.md section 11
    d, H, K, V, r = cfg.d_model, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.content_rank
    per_layer = d * H * V - H * (d + r * (V + K))  # CARVE drops W_w, adds w_h, D_h, U_h
    fork_hint = "CARVE's block parameters changed: update per_layer here and docs/DESIGN.md section 11"
    assert gdn2.num_params() - carve.num_params() == cfg.n_layer * per_layer == 18 * 4_616_192, fork_hint
    layer = lambda m: sum(p.numel() for p in m.blocks[0].mixer.parameters())  # noqa: E731
    assert layer(gdn2) - layer(carve) == per_layer, fork_hint
    # the embedding and the untied head come on top of the non-embedding count
    assert gdn2.num_params(non_embedding=False) == gdn2.num_params() + 2 * cfg.vocab_size * d + d


# ----------------------------------------------------------------------------- identity at init

@pytest.mark.parametrize("pattern", [("gdn2", "carve"), ("gdn2,attn", "carve,attn")], ids=["pure", "hybrid"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_identity_at_init(pattern, autocast):
    """Fresh GDN-2 weights copied into a fresh CARVE model give bit-identical logits (docs/DESIGN.md section 9),
    over several chunks (so Delta = U D m is computed, and is exactly 0 because U = 0)."""
    torch.manual_seed(0)
    gdn2 = LM(tiny(pattern[0]))
    torch.manual_seed(1)
    carve = LM(tiny(pattern[1]))
    missing, unexpected = carve.load_state_dict(gdn2.state_dict(), strict=False)
    recurrent = [i for i, m in enumerate(carve.cfg.layer_mixers()) if m == "carve"]
    assert sorted(missing) == sorted(f"blocks.{i}.mixer.{n}" for i in recurrent
                                     for n in ("beta_proj.weight", "content_down", "content_up"))
    assert sorted(unexpected) == sorted(f"blocks.{i}.mixer.w_proj.weight" for i in recurrent)
    idx = tokens(2, 4 * carve.cfg.chunk_size + 3, carve.cfg.vocab_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits_gdn2 = gdn2(idx)[0]
        logits_carve = carve(idx)[0]
        assert torch.isfinite(logits_carve).all()
        assert torch.equal(logits_carve, logits_gdn2)
        # control: a non-zero content projection must change the logits after the first chunk
        with torch.no_grad():
            for i in recurrent:
                carve.blocks[i].mixer.content_up.normal_(0, 20.0, generator=torch.Generator().manual_seed(i))
        logits_u = carve(idx)[0]
    C = carve.cfg.chunk_size
    assert torch.equal(logits_u[:, :C], logits_gdn2[:, :C])  # chunk 0 reads m_{-1} = 0
    assert not torch.equal(logits_u, logits_gdn2)
    gap = rel_err(logits_u[:, C:], logits_gdn2[:, C:].float())
    record("identity control: U != 0 changes logits (rel)", gap)
    assert gap > 1e-4


def test_carve_without_content_is_gdn2_at_init_and_has_no_shift():
    """content_rank=0 (the ablation): CARVE's write strength without U and D. It equals GDN-2 at
    initialisation like the full CARVE, and a U that would move the full model's logits does not exist."""
    torch.manual_seed(0)
    gdn2 = LM(tiny("gdn2"))
    torch.manual_seed(1)
    plain = LM(tiny("carve", content_rank=0))
    missing, unexpected = plain.load_state_dict(gdn2.state_dict(), strict=False)
    assert sorted(missing) == [f"blocks.{i}.mixer.beta_proj.weight" for i in range(2)]
    assert not [n for n, _ in plain.named_parameters() if "content" in n]
    assert plain.num_params() == LM(tiny("carve")).num_params() - 2 * 2 * (4 * 12 + 8 * 4)   # H (r V + K r) a layer
    idx = tokens(2, 4 * plain.cfg.chunk_size + 3, plain.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], gdn2(idx)[0])
    with pytest.raises(ValueError, match="content_rank=-1: must be at least 0"):
        tiny("carve", content_rank=-1)


# ----------------------------------------------------------------------------- prefill + decode

DECODE_CONFIGS = [
    pytest.param("carve", 0, id="carve"),
    pytest.param("gdn2", 0, id="gdn2"),
    pytest.param("attn", 0, id="attn"),
    pytest.param("attn", 5, id="attn-window5"),
    pytest.param("carve,attn", 0, id="carve,attn"),
    pytest.param("carve,attn", 5, id="carve,attn-window5"),
    pytest.param("gdn2,attn", 5, id="gdn2,attn-window5"),
]


@pytest.mark.parametrize("max_len", [None, 30], ids=["growing", "static-cache"])
@pytest.mark.parametrize("mixer,window", DECODE_CONFIGS)
@pytest.mark.parametrize("T1", [1, 7, 8, 9, 17])
def test_prefill_then_decode(mixer, window, T1, max_len):
    """model(idx[:, :T1], cache) then one token at a time equals model(idx)[0][:, T1-1:] (docs/DESIGN.md section 6);
    C = 8, T = 21: splits before, on and after chunk boundaries, and T1 = 1; attention keys and values
    growing, or in static buffers of 30 positions (what the CUDA-graph decode step runs on)."""
    torch.manual_seed(0)
    model = perturb(LM(tiny(mixer, attn_window=window))).eval()
    B, T = 2, 21
    idx = tokens(B, T, model.cfg.vocab_size, seed=T1)
    full, stepped = prefill_then_decode(model, idx, T1, max_len)
    assert_rel(stepped, full, TOL_LOGITS, f"prefill+decode logits ({mixer}, w={window}, max_len={max_len})")


def test_static_cache_refuses_positions_past_max_len():
    model = LM(tiny("carve,attn")).eval()
    cache = model.init_cache(1, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="holds 4 positions"):
        model(tokens(1, 5, model.cfg.vocab_size), cache=cache)


@pytest.mark.parametrize("mixer,window", DECODE_CONFIGS)
@pytest.mark.parametrize("pieces", [(5, 6), (9, 3, 7), (1, 15), (8, 8)], ids=str)
def test_prefill_in_pieces(mixer, window, pieces):
    """A prompt fed as several multi-token pieces on top of the cache (then decoded token by token)
    gives the same logits as one forward over the whole sequence."""
    torch.manual_seed(0)
    model = perturb(LM(tiny(mixer, attn_window=window))).eval()
    B, T = 2, 21
    idx = tokens(B, T, model.cfg.vocab_size, seed=sum(pieces))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.init_cache(B)
        got, want, start = [], [], 0
        for n in pieces:
            got.append(model(idx[:, start:start + n], cache=cache)[0])
            start += n
            want.append(full[:, start - 1:start])
        for t in range(start, T):
            got.append(model(idx[:, t:t + 1], cache=cache)[0])
            want.append(full[:, t:t + 1])
    assert_rel(torch.cat(got, dim=1), torch.cat(want, dim=1), TOL_LOGITS,
               f"prefill in pieces logits ({mixer}, w={window})")


# ----------------------------------------------------------------------------- optimiser groups

@pytest.mark.parametrize("mixer,tie", [("carve", False), ("gdn2", False), ("carve,attn", True)])
def test_optim_groups(mixer, tie):
    model = LM(tiny(mixer, tie_embeddings=tie))
    decay_group, no_decay_group = model.optim_groups(0.1)
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    decay = [id(p) for p in decay_group["params"]]
    no_decay = [id(p) for p in no_decay_group["params"]]
    all_params = {id(p): name for name, p in model.named_parameters()}  # tied weights once
    assert len(decay) == len(set(decay)) and len(no_decay) == len(set(no_decay))
    assert not set(decay) & set(no_decay)
    assert sorted(decay + no_decay) == sorted(all_params)  # every parameter exactly once
    names_no_decay = {all_params[i] for i in no_decay}
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias", "bias", "o_norm_weight")):
            assert name in names_no_decay, f"{name} is weight-decayed"
    for module_name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert id(m.weight) in decay, f"{module_name}.weight is not weight-decayed"
        if isinstance(m, (nn.RMSNorm, nn.LayerNorm)):
            assert id(m.weight) in no_decay, f"{module_name}.weight is weight-decayed"
    assert any(n.endswith("A_log") for n in names_no_decay) and any(n.endswith(".bias") for n in names_no_decay)


# ----------------------------------------------------------------------------- FLOPs

def test_flops_per_token():
    attn = LM(tiny("attn"))
    attn_w = LM(tiny("attn", attn_window=64))
    carve = LM(tiny("carve"))
    gdn2 = LM(tiny("gdn2"))
    for m in (attn, attn_w, carve, gdn2):
        assert m.flops_per_token(128) > 0
        # at least the 6 N of the Linear layers (forward + backward)
        assert m.flops_per_token(128) >= 6 * sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear))
    assert attn.flops_per_token(256) > attn.flops_per_token(128) > attn.flops_per_token(64)
    assert attn_w.flops_per_token(64) > attn_w.flops_per_token(32)
    linear = 6 * sum(x.weight.numel() for x in attn_w.modules() if isinstance(x, nn.Linear))
    cfg = attn_w.cfg
    for L in (32, 64, 128, 4096):  # QK^T and PV (2 x 2 FLOPs per key and channel), x3 for fwd + bwd
        mean_context = sum(min(t + 1, cfg.attn_window) for t in range(L)) / L  # keys seen by query t
        expected = linear + 3 * 4 * cfg.n_head * cfg.head_k_dim * mean_context * cfg.n_layer
        assert attn_w.flops_per_token(L) == pytest.approx(expected, rel=1e-12)
    assert carve.flops_per_token(4096) == carve.flops_per_token(128)
    assert gdn2.flops_per_token(4096) == gdn2.flops_per_token(128)
    for m in (carve, gdn2):   # the chunk form's count a token and head (docs/DESIGN.md section 3), x3 for fwd + bwd
        C, K, V, H = m.cfg.chunk_size, m.cfg.head_k_dim, m.cfg.head_v_dim, m.cfg.n_head
        rows_of_T_and_M, solves, M_R, state_products = 2 * C * K, C * (K + V), C * V, 6 * K * V
        mixing = 3 * H * (rows_of_T_and_M + solves + M_R + state_products) * m.cfg.n_layer
        linear = 6 * sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear))
        assert m.flops_per_token(128) == linear + mixing


# ----------------------------------------------------------------------------- config validation

@pytest.mark.parametrize("mixer,bad", [("mamba", "mamba"), ("carve,gdn3", "gdn3"), ("attention", "attention")])
def test_config_rejects_unknown_mixer(mixer, bad):
    with pytest.raises(ValueError, match=repr(bad)):
        ModelConfig(mixer=mixer)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("mixer", ["carve", "gdn2", "attn", "carve,attn"])
def test_gradients_finite(mixer):
    torch.manual_seed(0)
    model = perturb(LM(tiny(mixer, attn_window=6 if "attn" in mixer else 0)))
    idx = tokens(2, 27, model.cfg.vocab_size)
    targets = tokens(2, 27, model.cfg.vocab_size, seed=1)
    targets[0, :3] = -1  # ignored positions
    _, loss = model(idx, targets)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("mixer", ["carve", "gdn2", "attn", "carve,attn"])
def test_activation_checkpointing_changes_nothing(mixer):
    """Recomputing each block in the backward gives the same loss and the same gradients, bit for bit."""
    model = perturb(LM(tiny(mixer)))
    idx = tokens(2, 40, 61)
    results, calls = [], []
    model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        calls.clear()
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    assert (calls_a, calls_b) == (1, 2)  # the checkpointed block really ran again in the backward
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_swiglu_module(monkeypatch, autocast):
    """SwiGLU's training path (swiglu_linear on the weight in gate_up's dtype) gives autograd's values
    through down_proj(SiLU(gate) * up), output and every gradient, bit for bit, also with a frozen
    down_proj (the torch path; tests/test_swiglu.py checks the Triton one); without a gradient it runs
    down_proj itself (the batch-1 GEMV's Linear)."""
    cfg = ModelConfig(d_model=24, mlp_hidden=40)
    mlp = SwiGLU(cfg)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    calls = []
    monkeypatch.setattr(model_module, "swiglu_linear", lambda *args: calls.append(1) or swiglu_linear(*args))
    for frozen in (False, True):
        mlp.down_proj.weight.requires_grad_(not frozen)
        params = [p for p in mlp.parameters() if p.requires_grad]
        runs = []
        for fused in (True, False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = mlp(x) if fused else mlp.down_proj(swiglu(mlp.gate_up_proj(x)))
            runs.append([y, *torch.autograd.grad(y.float().square().sum(), [x, *params])])
        for a, b in zip(*runs):
            assert torch.isfinite(a).all() and torch.equal(a, b)
    assert len(calls) == 2
    mlp.down_proj.weight.requires_grad_(True)
    mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.down_proj(swiglu(mlp.gate_up_proj(x)))) and len(calls) == 4


# ----------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("chunk_rows", [7, 16, 1000])
def test_linear_cross_entropy(chunk_rows):
    """linear_cross_entropy (the logits made chunk by chunk, gradients in the forward) equals
    F.cross_entropy over the full logits in float64, loss and both gradients, with ignored rows, chunks
    that do not divide the rows, and one chunk larger than all of them; a gradient other than 1 reaches
    both inputs scaled; without a gradient it computes the same loss."""
    gen = torch.Generator().manual_seed(0)
    N, d, V = 45, 12, 37
    x = torch.randn(N, d, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(V, d, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::4] = -1
    want = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
    want_grads = torch.autograd.grad(3 * want, (x, weight))
    got = linear_cross_entropy(x, weight, targets, chunk_rows)
    got_grads = torch.autograd.grad(3 * got, (x, weight))
    assert_rel(got, want, 1e-12, "linear cross-entropy loss (fp64)")
    for name, g, w in zip(("x", "weight"), got_grads, want_grads):
        assert_rel(g, w, 1e-12, f"linear cross-entropy grad {name} (fp64)")
    with torch.no_grad():
        assert_rel(linear_cross_entropy(x, weight, targets, chunk_rows), want, 1e-12, "linear cross-entropy no grad")


if torch.cuda.is_available():  # the 1.3B recipe's head: a GPU check, not collected on a CPU
    def test_linear_cross_entropy_at_the_1b3_shape():
        """At the 1.3B recipe's micro-batch on a GPU: 16384 tokens, d_model 2304, vocabulary 50304, bf16
        autocast; against the head's bf16 product and F.cross_entropy over its fp32 logits."""
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(16384, 2304, device="cuda", generator=gen).requires_grad_()
        weight = (0.02 * torch.randn(50304, 2304, device="cuda", generator=gen)).requires_grad_()
        targets = torch.randint(0, 50304, (16384,), device="cuda", generator=gen)
        targets[:100] = -1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)
            got = linear_cross_entropy(x, weight, targets)
        want_grads = torch.autograd.grad(want, (x, weight))
        got_grads = torch.autograd.grad(got, (x, weight))
        assert_rel(got, want, 1e-4, "linear cross-entropy loss, 1.3B head (bf16)")
        for name, g, w in zip(("x", "weight"), got_grads, want_grads):
            assert_rel(g, w, 1e-2, f"linear cross-entropy grad {name}, 1.3B head (bf16)")


@pytest.mark.parametrize("mixer", ["carve", "attn"])
def test_sparse_targets_loss_is_the_full_loss(mixer):
    """With sparse_targets the loss over the scored rows alone equals the loss over every row, and so do
    all gradients, with a few scored positions per row as in MQAR; with none scored it is 0, with zero
    gradients, not NaN."""
    model = perturb(LM(tiny(mixer)))
    idx, all_targets = tokens(3, 40, model.cfg.vocab_size), tokens(3, 40, model.cfg.vocab_size, seed=1)
    targets = torch.full_like(all_targets, -1)
    targets[:, [3, 17, 30]] = all_targets[:, [3, 17, 30]]
    targets[2, 17] = -1
    want = model(idx, targets)[1]
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = model(idx, targets, sparse_targets=True)[1]
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    assert_rel(got, want, 1e-6, "sparse-target loss")
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        assert_rel(g, w, 1e-5, f"sparse-target loss grad {name}")
    none = model(idx, torch.full_like(targets, -1), sparse_targets=True)[1]
    grads = torch.autograd.grad(none, list(model.parameters()), allow_unused=True)
    assert none.item() == 0 and all(g is None or (g == 0).all() for g in grads)


@pytest.mark.parametrize("mixer", ["carve", "attn"])
def test_model_loss_is_the_cross_entropy_of_its_logits(mixer):
    """The model's training loss (no logits made) equals F.cross_entropy over its fp32 logits, in fp32
    and under bf16 autocast (where both round the head's product to bf16 first), with the same gradients."""
    model = perturb(LM(tiny(mixer)))
    idx, targets = tokens(2, 40, model.cfg.vocab_size), tokens(2, 40, model.cfg.vocab_size, seed=1)
    targets[1, 5:9] = -1
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(idx)[0]
            want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            got = model(idx, targets)[1]
        assert got.dtype == torch.float32
        assert_rel(got, want, tol / 10, f"model loss vs cross-entropy of its logits ({dtype})")
        want_grads = torch.autograd.grad(want, list(model.parameters()))
        got_grads = torch.autograd.grad(got, list(model.parameters()))
        for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
            assert_rel(g, w, tol, f"model loss grad {name} ({dtype})")
