"""bench_train.py on a CPU: its guard rails, and the classifier of its --profile breakdown."""
import os
import subprocess
import sys

import pytest

from bench_train import kernel_kind, print_profile
from conftest import ROOT


def run_bench(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    return subprocess.run([sys.executable, "bench_train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_cuda_exits_with_one_line():
    result = run_bench("carve_1b3", "--steps", "1")
    assert result.returncode != 0
    assert result.stderr.strip() == "bench_train.py needs a CUDA GPU"


def test_unknown_config_and_key_exit_with_one_line():
    for args, expected in ((["carve_1b4"], "error: config file 'carve_1b4' not found"),
                           (["carve_1b3", "--sq_len=2048"], "error: unknown config key 'sq_len'")):
        result = run_bench(*args)
        assert result.returncode != 0
        assert result.stderr.startswith(expected) and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, kind", [
    ("_chunk_fwd_kernel", "chunk"),
    ("_chunk_bwd_keys", "chunk"),
    ("chunk_gdn2_fwd_kernel_inter_solve_fused", "chunk"),   # fla's
    ("recompute_w_u_fwd_gdn2_kernel", "chunk"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x2x1_0_tnn_align8_warpspecialized", "matmul"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>(cublasSplitKParams<float>)", "matmul"),
    ("_gemv_kernel", "matmul"),   # ours, batch-1 decode
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bfloat16_t>)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(Flash_fwd_params)", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, float)", "other"),
    ("triton_poi_fused__to_copy_mul_silu_0", "other"),
    ("Memset (Device)", "other"),
])
def test_kernel_kind(name, kind):
    assert kernel_kind(name) == kind


def test_print_profile_by_kind_and_top_kernels(capsys):
    print_profile({"_chunk_fwd_kernel": 0.030, "_gemv_kernel": 0.060, "triton_poi_fused_add_0": 0.010}, 0.125)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "    one step: 0.100 ms of device time (timed step 0.125 ms)"
    assert [line.split()[-3:] for line in out[1:5]] == [["0.030", "ms", "30.0%"], ["0.060", "ms", "60.0%"],
                                                         ["0.000", "ms", "0.0%"], ["0.010", "ms", "10.0%"]]
    assert [line.split()[0] for line in out[1:5]] == ["chunk", "matrix", "attention", "everything"]
    assert out[6].split() == ["0.060", "ms", "60.0%", "_gemv_kernel"]
    print_profile({}, 0.125)
    assert capsys.readouterr().out == "    the profiler recorded no device kernels for this step\n"
