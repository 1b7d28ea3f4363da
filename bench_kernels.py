"""Kernel benchmark on one GPU: the Triton chunk kernels (CARVE, and GDN-2 mode) against
flash-linear-attention's chunk_gdn2 and chunk_kda, and the decode step against its fused_recurrent_gdn2.

    python bench_kernels.py                  # the tables (and a correctness check first)
    python bench_kernels.py --breakdown      # also device time per kernel (torch.profiler)
    python bench_kernels.py --shapes 8x2048  # fewer chunk shapes (fla autotunes at every new shape)
    python bench_kernels.py --no-kda --no-decode  # only what compares against chunk_gdn2
    python bench_kernels.py --gemv           # only the batch-1 GEMV at the 1.3B Linear shapes, and a sweep

flash-linear-attention is optional: `pip install einops && pip install --no-deps fla-core==0.6.0`
(pure Python; the script sets FLA_DISABLE_BACKEND_DISPATCH=1). H = 16, K = V = 128, chunk 64, bf16 q, k, v,
b_logit, w, fp32 g; times are medians of triton.testing.do_bench; peak memory is the most allocated
above the inputs during one forward + backward. Decode: one step (T = 1), fp32 state, time of the whole call and of its replay
in a CUDA graph; state traffic = read + write of S (2 B H K V 4 bytes), against the card's copy
bandwidth measured in the same run. GEMV: one bf16 row times each 1.3B Linear weight [N, K] (bf16),
replayed from a CUDA graph and streamed from memory as in a decode step: F.linear (cuBLAS),
carve_kernel.gemv_triton as launched now, and its fastest launch settings (output features a program,
columns a step, warps).
Record results in docs/BENCHMARKS.md with the machine and versions.
"""
import argparse
import itertools
import os

import torch
import torch.nn.functional as F
import triton
import triton.testing

from carve_kernel import (CarveState, ChunkSchedule, chunk_carve_torch, chunk_carve_triton, GemvSettings, gemv_triton,
                          recurrent_carve_triton)

H, K, V, C, RANK = 16, 128, 128, 64, 16
SHAPES = [(8, 2048), (4, 4096), (1, 32768)]  # the 1.3B recipe's micro-batches, and long context
BATCHES = (1, 32, 256)


def ms(fn, **kw):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median", **kw)


def chunk_inputs(B, T, mode, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    bf = torch.bfloat16
    x = [r(B, T, H, K).to(bf), r(B, T, H, K).to(bf), r(B, T, H, V).to(bf),
         F.logsigmoid(1.5 * r(B, T, H, K) + 2.5), r(B, T, H, K).to(bf),
         torch.sigmoid(r(B, T, H) if mode == "carve" else r(B, T, H, V)).to(bf)]
    content = (0.5 * r(H, RANK, V), 0.5 * r(H, K, RANK)) if mode == "carve" else None
    return [t.requires_grad_() for t in x], content


def check():
    """The compiled kernels against the fp32 torch path on the same bf16 inputs, with each form of the
    forward (tests/ do this in depth; this is a guard that the card's compiler built them right)."""
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    for mode, split in itertools.product(("carve", "gdn2"), (False, True)):
        x, content = chunk_inputs(2, 300, mode, seed=1)
        state = CarveState(0.1 * torch.randn(2, H, K, V, device="cuda"), torch.zeros(2, H, V, device="cuda"),
                           torch.zeros(2, H, K, device="cuda"), 5)
        o, final = chunk_carve_triton(*x, content, state, True, schedule=ChunkSchedule(split, 32 if split else V))
        ref = [t.detach().float().requires_grad_() for t in x]
        o_ref, final_ref = chunk_carve_torch(*ref, content, state, True)
        do = torch.randn_like(o_ref)
        grads = torch.autograd.grad(o.float(), x, do)
        grads_ref = torch.autograd.grad(o_ref, ref, do)
        errs = [rel(o, o_ref), rel(final.S, final_ref.S)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
        print(f"check {mode}, {'split' if split else 'walk'} forward: relative error o, S, dq, dk, dv, dg, db_logit,"
              " dw: " + " ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < 2e-2, "the compiled chunk kernels disagree with the torch path"


def fla_chunk():
    try:
        from fla.ops.gdn2 import chunk_gdn2, fused_recurrent_gdn2
        from fla.ops.kda import chunk_kda
        import fla
        print(f"flash-linear-attention {fla.__version__}")
        return chunk_gdn2, chunk_kda, fused_recurrent_gdn2
    except Exception as e:  # noqa: BLE001
        print(f"flash-linear-attention not importable ({type(e).__name__}: {e}): our rows only")
        return None, None, None


def time_chunk(name, B, T, chunk_gdn2, chunk_kda):
    """(fwd ms, fwd+bwd ms, peak MiB) of one implementation at B x T."""
    mode = "carve" if name in ("CARVE (ours)", "fla chunk_kda") else "gdn2"  # chunk_kda takes a scalar beta
    x, content = chunk_inputs(B, T, mode)
    q, k, v, g, b_logit, w = x
    if name in ("CARVE (ours)", "GDN-2 mode (ours)"):
        fn = lambda: chunk_carve_triton(*x, content)[0]  # noqa: E731
    elif name == "fla chunk_gdn2":
        b = torch.sigmoid(b_logit.detach().float()).to(b_logit.dtype).requires_grad_()
        x[4] = b
        fn = lambda: chunk_gdn2(q, k, v, g, b, w, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
    else:  # fla chunk_kda: scalar beta (CARVE's w) and the channel-wise decay
        fn = lambda: chunk_kda(q, k, v, g, w, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

    def step():
        fn().backward(do)

    with torch.no_grad():
        fwd = ms(fn)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return fwd, ms(step, grad_to_none=x), peak


def breakdown(B, T):
    """Device time of each kernel of one CARVE forward + backward, from torch.profiler."""
    x, content = chunk_inputs(B, T, "carve")
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        chunk_carve_triton(*x, content)[0].backward(do)
    torch.cuda.synchronize()
    for t in x:
        t.grad = None  # as in the timed runs: no accumulation into earlier gradients
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        chunk_carve_triton(*x, content)[0].backward(do)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    print(f"\nCARVE {B}x{T}: device ms per kernel (one forward + backward)")
    for key, t in rows[:12]:
        print(f"  {t:8.3f}  {key[:90]}")


def copy_bandwidth():
    n = 2 ** 29  # 2 GiB of fp32
    a = torch.empty(n, device="cuda").normal_()
    b = torch.empty_like(a)
    us = ms(lambda: b.copy_(a)) * 1e3
    return 2 * n * 4 / (us * 1e-6) / 1e12


def time_decode(B, fused_recurrent_gdn2):
    """(ours us, ours in a CUDA graph us, fla us) of one GDN-2-mode decode step at batch B."""
    (q, k, v, g, b_logit, w), _ = chunk_inputs(B, 1, "gdn2")
    q, k, v, g, b_logit, w = (t.detach() for t in (q, k, v, g, b_logit, w))
    state = CarveState(0.1 * torch.randn(B, H, K, V, device="cuda"), torch.zeros(B, H, V, device="cuda"),
                       torch.zeros(B, H, K, device="cuda"), 5)
    ours = lambda: recurrent_carve_triton(q, k, v, g, b_logit, w, None, state, True)  # noqa: E731
    with torch.no_grad():
        ours()
        t = ms(ours) * 1e3
        t_graph = triton.testing.do_bench_cudagraph(ours, rep=100, return_mode="median") * 1e3
        t_fla = float("nan")
        if fused_recurrent_gdn2 is not None:
            b = torch.sigmoid(b_logit.float()).to(b_logit.dtype)
            fla = lambda: fused_recurrent_gdn2(q, k, v, g, b, w, initial_state=state.S,  # noqa: E731
                                               output_final_state=True, use_qk_l2norm_in_kernel=True)
            fla()
            t_fla = ms(fla) * 1e3
    return t, t_graph, t_fla


# the Linear weights [N, K] a 1.3B decode step reads (w_proj: GDN-2's write gate)
GEMV_SHAPES = {"in_proj": (8448, 2304), "beta_proj": (16, 2304), "f_up, g_up": (2048, 128),
               "w_proj": (2048, 2304), "o_proj": (2304, 2048), "gate_up_proj": (12416, 2304),
               "down_proj": (2304, 6208), "head": (50304, 2304)}
# rows, cols, warps, with at most 64 fp32 products a thread held in the accumulator
GEMV_SWEEP = [GemvSettings(r, c, n) for r, c, n in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8))
              if r * c <= 2048 * n]
GEMV_STREAM_BYTES = 2 ** 28   # a step streams its weights from memory: cycle through copies past the L2 cache


def gemv_table():
    """Each GEMV_SHAPES product at one row: us and the share of the copy bandwidth its weight's bytes
    reach, for cuBLAS, the GEMV as launched now, and the GEMV's fastest settings in GEMV_SWEEP. Each time
    is a graph over copies of the weight (enough to pass the L2 cache, up to 256) divided by the copies:
    a decode step streams its weights from memory, and the L2 cache would hold the smaller ones."""
    copy = copy_bandwidth()
    print(f"\nbatch-1 products, bf16, in a CUDA graph; copy bandwidth {copy:.2f} TB/s")
    print(f"{'weight':<14} {'N x K':>12} {'cuBLAS us, share':>17} {'GEMV us, share':>15} {'best us, share':>15}"
          f"  best settings")
    share = lambda us, nbytes: f"{nbytes / (us * 1e-6) / 1e12 / copy:4.0%}"  # noqa: E731
    with torch.no_grad():
        for name, (N, K) in GEMV_SHAPES.items():
            nbytes = 2 * N * K
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                       for _ in range(min(256, max(2, GEMV_STREAM_BYTES // nbytes)))]
            def graph_us(product, weights=weights):
                def all_copies():
                    for w in weights:
                        product(w)
                return triton.testing.do_bench_cudagraph(all_copies, rep=20, return_mode="median") * 1e3 / len(weights)
            cublas, now = graph_us(lambda w: F.linear(x, w)), graph_us(lambda w: gemv_triton(x, w, None))
            best = min((graph_us(lambda w: gemv_triton(x, w, None, settings)), settings) for settings in GEMV_SWEEP)
            print(f"{name:<14} {f'{N} x {K}':>12} {cublas:12.1f} {share(cublas, nbytes)} {now:10.1f} "
                  f"{share(now, nbytes)} {best[0]:10.1f} {share(best[0], nbytes)}  {tuple(best[1])}", flush=True)
            del weights


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--breakdown", action="store_true", help="device time per kernel (torch.profiler)")
    parser.add_argument("--no-kda", action="store_true",
                        help="skip fla's chunk_kda (it autotunes for minutes per shape)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    parser.add_argument("--gemv", action="store_true", help="only the batch-1 GEMV table (and its launch sweep)")
    parser.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES),
                        help="chunk shapes BxT, comma-separated (default: %(default)s)")
    args = parser.parse_args()
    shapes = [item.split("x") for item in args.shapes.split(",")]
    if not all(len(s) == 2 and s[0].isdigit() and s[1].isdigit() for s in shapes):
        parser.error(f"--shapes takes BxT pairs separated by commas, like 8x2048,1x32768; got {args.shapes!r}")
    shapes = [(int(b), int(t)) for b, t in shapes]
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (the tests run the kernels on a CPU)")
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.gemv:
        gemv_table()
        return
    check()
    chunk_gdn2, chunk_kda, fused_recurrent_gdn2 = fla_chunk()
    names = (["fla chunk_gdn2"] if chunk_gdn2 else []) + ["CARVE (ours)", "GDN-2 mode (ours)"]
    # each row is printed as soon as it is measured (fla autotunes at every new shape, which takes a while);
    # chunk_kda's rows come after the decode table: its autotuning takes minutes per shape
    print(f"\nchunk, H={H} K=V={K} bf16: fwd ms | fwd+bwd ms | peak MiB | fwd+bwd and peak / fla chunk_gdn2")
    fla_rows = {}
    for shape in shapes:
        for n in names:
            chunk_row(n, shape, chunk_gdn2, chunk_kda, fla_rows)
    if args.breakdown:
        for shape in shapes:
            breakdown(*shape)
    if not args.no_decode:
        decode_table(fused_recurrent_gdn2)
    if chunk_kda and not args.no_kda:
        print(f"\nchunk, fla chunk_kda (scalar beta), H={H} K=V={K} bf16: as above")
        for shape in shapes:
            chunk_row("fla chunk_kda", shape, chunk_gdn2, chunk_kda, fla_rows)


def chunk_row(name, shape, chunk_gdn2, chunk_kda, fla_rows):
    """Times one implementation at one shape and prints its row; fla chunk_gdn2's row is kept in
    fla_rows for the ratios of the others."""
    fwd, both, peak = time_chunk(name, *shape, chunk_gdn2, chunk_kda)
    if name == "fla chunk_gdn2":
        fla_rows[shape] = (both, peak)
    fla = fla_rows.get(shape)
    ratio = f"{both / fla[0]:5.2f}x {peak / fla[1]:5.2f}x" if fla else ""
    print(f"{shape[0]}x{shape[1]:<6} {name:<18} {fwd:8.3f} {both:9.3f} {peak:8.0f}   {ratio}", flush=True)


def decode_table(fused_recurrent_gdn2):
    """The decode step at each of BATCHES: ours (plain and in a CUDA graph) and fla's, with the state traffic."""
    copy = copy_bandwidth()
    print(f"\ndecode step, H={H} K=V={K}, fp32 state; copy bandwidth {copy:.2f} TB/s")
    for B in BATCHES:
        t, t_graph, t_fla = time_decode(B, fused_recurrent_gdn2)
        traffic = 2 * B * H * K * V * 4 / 1e12
        print(f"B={B:<4} ours {t:7.1f} us {traffic / (t * 1e-6):5.2f} TB/s ({traffic / (t * 1e-6) / copy:4.0%})"
              f" | in a CUDA graph {t_graph:6.1f} us {traffic / (t_graph * 1e-6):5.2f} TB/s | fla {t_fla:7.1f} us",
              flush=True)


if __name__ == "__main__":
    main()
