"""bench_decode.py on a CPU: its guard rails, and what it times and counts, run with the plain step
(the CUDA-graph step needs a GPU: tests/test_sample.py checks it there)."""
import os
import subprocess
import sys

import pytest
import torch

from bench_decode import fill_cache, measure, step_bytes
from model import LM
from reference import ROOT, tiny


def test_guard_rails():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for args, expected in ((["carve_1b3"], "bench_decode.py needs a CUDA GPU"),
                           (["carve_1b3", "--batch=1,x"], "error: --batch and --context take comma-separated"),
                           ([], "error: give at least one config")):
        result = subprocess.run([sys.executable, "bench_decode.py", *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0 and expected in result.stderr.strip().splitlines()[-1], result.stderr


def test_cache_filled_as_after_a_context_and_the_bytes_a_step_moves():
    model = LM(tiny("carve,attn", head_k_dim=8, head_v_dim=8)).eval()
    cache = model.init_cache(3, max_len=40, dtype=torch.bfloat16)
    fill_cache(cache, 20, torch.Generator().manual_seed(0))
    assert cache[0]["state"].offset == 20 and cache[0]["state"].S.abs().sum() > 0
    assert cache[1]["offset"] == 20 and int(cache[1]["position"]) == 20
    assert cache[1]["k"][:, :, :20].abs().sum() > 0 and not cache[1]["k"][:, :, 20:].any()
    weights, moved = step_bytes(model, cache, 20)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert weights == 4 * linear   # fp32 weights here (bench_decode.py makes them bf16)
    state = 3 * 2 * 8 * 8 * 4                                # B H K V, fp32
    keys_values = 2 * 3 * 2 * 20 * 8 * 2                     # k and v: B H context D, bf16
    assert moved == weights + 2 * state + keys_values


def test_measure_times_the_plain_step():
    model = LM(tiny("carve,attn", head_k_dim=8, head_v_dim=8)).eval()
    ms, tokens_per_s, weights, moved, kernels = measure(model, batch=2, context=10, steps=3, graph=False,
                                                        compile=False)
    assert ms > 0 and tokens_per_s == pytest.approx(2 * 1000 / ms) and moved > weights > 0
    assert kernels is None   # no profile asked
