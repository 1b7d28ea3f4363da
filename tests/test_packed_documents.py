"""Packed documents (docs/DESIGN.md section 10): cu_seqlens in chunk_carve's torch path
(packed_sequences_torch; the Triton kernels' cu_seqlens are in test_triton_chunk.py), doc_start_token
in the model on both paths, reset_at_eot in train.py. Documents packed into one row must compute
exactly what they compute alone."""
import os
import subprocess
import sys

import pytest
import torch

import train
from carve_kernel import CarveState, chunk_carve
from model import LM
from reference import (DEVICE, NAMES, ROOT, TOL_FWD, TOL_GRAD, TOL_LOGITS, assert_rel, make_inputs, needs_triton,
                       perturb, reference, tiny)

BOUNDS = [0, 5, 5, 21, 40, 41]  # includes an empty sequence, a 1-token one, chunk-crossing ones (C = 8)


def pieces(x, bounds):
    return [x[:, a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("mode", ["carve", "gdn2"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
def test_cu_seqlens_equals_each_sequence_alone(mode, with_state):
    N, T, H, K, V, C = len(BOUNDS) - 1, BOUNDS[-1], 2, 16, 24, 8
    x = make_inputs(1, T, H, K, V, mode)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    content = (leaves["D"], leaves["U"]) if mode == "carve" else None
    gen = torch.Generator().manual_seed(3)
    offsets = (0, 3, 7, 9, 0)
    state = CarveState(torch.randn(N, H, K, V, generator=gen), torch.randn(N, H, V, generator=gen),
                       torch.randn(N, H, K, generator=gen), offsets) if with_state else None
    o, final = chunk_carve(*(leaves[n] for n in NAMES), content, state, True, None, C,
                           cu_seqlens=torch.tensor(BOUNDS))
    assert final.offset == tuple((offsets[i] if with_state else 0) + b - a
                                 for i, (a, b) in enumerate(zip(BOUNDS, BOUNDS[1:])))
    do = torch.randn(o.shape, generator=gen)
    (o * do).sum().backward()
    # the float64 reference, one sequence at a time
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    ref_content = (ref_leaves["D"], ref_leaves["U"]) if mode == "carve" else None
    outs = []
    for i, (a, b) in enumerate(zip(BOUNDS, BOUNDS[1:])):
        if a == b:   # an empty sequence: its state passes through unchanged (zero without an initial state)
            for field in ("S", "o_sum", "delta"):
                want = getattr(state, field)[i] if with_state else torch.zeros_like(getattr(final, field)[i])
                assert torch.equal(getattr(final, field)[i], want), f"empty sequence's final {field}"
            continue
        kw = dict(S0=state.S[i:i + 1].double(), o_sum0=state.o_sum[i:i + 1].double(),
                  delta0=state.delta[i:i + 1].double(), offset=offsets[i]) if with_state else {}
        o_i, (S_i, o_sum_i, delta_i, _) = reference(*(ref_leaves[n][:, a:b] for n in NAMES), ref_content,
                                                    chunk_size=C, **kw)
        outs.append(o_i)
        assert_rel(final.S[i:i + 1], S_i, TOL_FWD, "packed S")
        assert_rel(final.o_sum[i:i + 1], o_sum_i, TOL_FWD, "packed o_sum")
        if mode == "carve":
            assert_rel(final.delta[i:i + 1], delta_i, TOL_FWD, "packed delta")
    ref_o = torch.cat(outs, dim=1)
    assert_rel(o, ref_o, TOL_FWD, "packed o")
    (ref_o * do.double()).sum().backward()
    for n in leaves:
        assert_rel(leaves[n].grad, ref_leaves[n].grad, TOL_GRAD, f"packed d{n}")


def test_cu_seqlens_errors():
    x = make_inputs(2, 10, 2, 16, 16, "gdn2")
    args = [x[n] for n in NAMES]
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_carve(*args, cu_seqlens=torch.tensor([0, 10]))
    one = [a[:1] for a in args]
    with pytest.raises(ValueError, match="rise from 0 to the total length 10"):
        chunk_carve(*one, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="rise from 0"):
        chunk_carve(*one, cu_seqlens=torch.tensor([0, 6, 4, 10]))


def check_packed_documents(model, doc):
    """Rows of packed documents (each starting with `doc`): every document's logits equal the
    document alone, and without the resets the later documents would see the earlier ones."""
    gen = torch.Generator().manual_seed(0)
    lengths = [[9, 14, 1, 16], [23, 17]]  # two rows of 40 tokens
    docs = [[torch.cat([torch.tensor([doc]), torch.randint(8, 256, (n - 1,), generator=gen)]) for n in row]
            for row in lengths]
    device = next(model.parameters()).device
    docs = [[d.to(device) for d in row] for row in docs]
    packed = torch.stack([torch.cat(row) for row in docs])
    with torch.no_grad():
        logits, _ = model(packed)
        for r, row in enumerate(docs):
            start = 0
            for d in row:
                alone, _ = model(d[None])
                assert_rel(logits[r:r + 1, start:start + len(d)], alone, TOL_LOGITS, "packed vs alone")
                start += len(d)
        # control: without the resets the later documents do see the earlier ones
        model.cfg.doc_start_token = -1
        unmasked, _ = model(packed)
    assert (unmasked[0, 9:23] - logits[0, 9:23]).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", ["carve", "gdn2", "attn", "carve,attn"])
@pytest.mark.parametrize("window", [0, 4])
def test_packed_documents_see_nothing_of_each_other(pattern, window):
    doc = 7  # the doc_start_token; documents below start with it, as prepare_data.py writes them
    check_packed_documents(perturb(LM(tiny(pattern, attn_window=window, doc_start_token=doc, vocab_size=256)).eval()),
                           doc)


@needs_triton
@pytest.mark.parametrize("pattern", ["carve", "gdn2,attn"])
def test_packed_documents_on_the_triton_path(monkeypatch, pattern):
    """The same with the Triton chunk kernels (cu_seqlens inside the kernels): K = V = 16, C = 16."""
    monkeypatch.setenv("CARVE_BACKEND", "triton")
    model = LM(tiny(pattern, doc_start_token=7, vocab_size=256, head_k_dim=16, head_v_dim=16, chunk_size=16))
    check_packed_documents(perturb(model).to(DEVICE).eval(), 7)


def test_generation_cache_refuses_a_document_start_inside_a_prompt():
    """A prompt is one document; a decode step is not checked (that would cost a host sync a step, and
    a batch feeds rows that sampled eot on with it)."""
    model = LM(tiny("carve", doc_start_token=7, vocab_size=64)).eval()
    cache = model.init_cache(1)
    with torch.no_grad():
        model(torch.tensor([[7, 20, 30]]), cache=cache)  # a document start first is fine
        with pytest.raises(ValueError, match="doc_start_token"):
            model(torch.tensor([[7, 3]]), cache=cache)
        with pytest.raises(ValueError, match="doc_start_token"):
            model(torch.tensor([[5, 7, 9]]), cache=model.init_cache(1))
        model(torch.tensor([[7]]), cache=cache)


@pytest.fixture(scope="module")
def shakespeare_gpt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shakespeare_gpt2"
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": os.path.abspath(os.environ.get("CARVE_BPE_CACHE", ".bpe"))}
    subprocess.run([sys.executable, "prepare_data.py", "--tokenizer", "gpt2", "--out_dir", str(out)], cwd=ROOT,
                   check=True, capture_output=True, env=env)
    return str(out)


def test_reset_at_eot_gives_the_model_its_document_start(shakespeare_gpt2, tmp_path):
    """--reset_at_eot=True on gpt2 tokens: the trained model's config holds eot as its document start
    (what the model does with it: test_packed_documents_see_nothing_of_each_other)."""
    small = ["--n_layer=1", "--d_model=32", "--n_head=2", "--head_k_dim=8", "--head_v_dim=8", "--mlp_hidden=64",
             "--chunk_size=8", "--content_rank=2", "--seq_len=64", "--micro_batch_size=2", "--batch_tokens=128",
             "--warmup_steps=1", "--eval_tokens=256", "--eval_interval=2", "--max_steps=2", "--log_interval=1"]
    out = tmp_path / "run"
    train.main(["carve_shakespeare", *small, f"--data_dir={shakespeare_gpt2}", f"--out_dir={out}",
                "--reset_at_eot=True"])
    meta = train.load_newest_checkpoint(str(out), log=lambda line: None)[0]["model_config"]
    assert meta["doc_start_token"] == 50256


def test_reset_at_eot_needs_an_eot_token(tmp_path):
    byte_data = tmp_path / "byte"
    subprocess.run([sys.executable, "prepare_data.py", "--out_dir", str(byte_data)], cwd=ROOT, check=True,
                   capture_output=True)
    with pytest.raises(SystemExit, match="has no eot token"):
        train.main(["carve_shakespeare", f"--data_dir={byte_data}", f"--out_dir={tmp_path / 'o'}",
                    "--reset_at_eot=True"])
    with pytest.raises(SystemExit, match="set from the data; use reset_at_eot"):
        train.main(["carve_shakespeare", "--doc_start_token=3"])
