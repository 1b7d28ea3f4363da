"""Training-step benchmark on one GPU: tokens/s, MFU and peak memory of train.py's optimizer step for
whole models, eager and compiled, optionally against an LM of the same shape built from
flash-linear-attention's GatedDeltaNet2 layer.

    python bench_train.py configs/carve_1b3.py gdn2_1b3           # each config, eager and compiled
    python bench_train.py carve_1b3 --fla                         # also the fla GatedDeltaNet2 LM
    python bench_train.py carve_1b3 --seq_len=2048 --compile 0    # --key=value overrides every config; eager only
    python bench_train.py carve_1b3 --steps 20 --warmup 5 --accum 4 --profile

Configs load exactly as in train.py (a path, or a bare name in configs/; `--key=value` overrides are
checked the same way and apply to every config). The step is train.py's: bf16 autocast, fused AdamW
over model.optim_groups with the config's betas and weight decay, gradient clipping, `--accum`
micro-steps of micro_batch_size x seq_len tokens, activation checkpointing if the config sets it. The
tokens are random (uniform over the vocabulary, the config's seed; vocab_size 0 means 50304).

--accum defaults to 2 micro-steps per optimizer step, not the config's batch_tokens: the 1.3B recipe
would take 32 on one GPU, some 15 s per step on an H200. The micro-steps dominate either way; with 2,
the optimizer step and the gradient clipping weigh about 16x more per token than in the real run, so
tokens/s here is a slight underestimate.

tokens/s = tokens per optimizer step / mean time of the --steps steps after --warmup steps (the
first steps compile and allocate the optimizer state); MFU = model.flops_per_token(seq_len) * tokens/s /
the GPU's dense bf16 peak (train.py's peak_flops; --peak_tflops=... sets it); peak GiB = most memory
allocated during the timed steps; kept GiB = what one micro-batch's forward keeps for its backward
(memory allocated after the forward less before it, measured after the timed steps). --profile adds
the device time of one more step by kind of kernel (chunk kernels, matrix products, attention,
everything else) and its top 15 kernels (torch.profiler).

--fla: the reference is model.py's LM with every mixer replaced by flash-linear-attention's
GatedDeltaNet2 (same d_model, layers, heads and head dims, SwiGLU, vocabulary, conv size), so only
the token mixer differs; it runs eager and compiled like the configs, the faster one being the
reference of the ratios in the summary. Install it with `pip install --no-deps fla-core==0.6.0
flash-linear-attention==0.6.0` (pure Python; it needs einops and transformers); without it the fla
runs are skipped. Record results in docs/BENCHMARKS.md with the machine and versions this prints.
"""
import argparse
import dataclasses
import gc
import os
import sys
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType

import train
from model import LM, ModelConfig

SYNTHETIC_VOCAB = 50304  # vocab_size 0 means "from the data" in train.py; with no data, GPT-2's padded size
TOP_KERNELS = 15
# What an fla reference LM and its step depend on: configs that agree on these keys share one reference.
SHAPE_KEYS = ("vocab_size", "n_layer", "d_model", "n_head", "head_k_dim", "head_v_dim", "mlp_hidden", "conv_size",
              "norm_eps", "tie_embeddings", "seq_len", "micro_batch_size", "activation_checkpointing", "dtype")

# Substrings (lower case) of kernel names, checked in this order. Chunk kernels: ours are _chunk_*;
# fla's GDN-2 runs chunk_* kernels plus its WY representation, triangular solve and q/k l2norm, which
# ours do inside the chunk kernels. Matrix products: cuBLAS / cuBLASLt / CUTLASS kernels go by names
# such as sm90_xmma_gemm_*, nvjet_tst_*, cutlass3x_*, ampere_bf16_s16816gemm_*, splitKreduce_kernel;
# triton_tem_* are Inductor's (matrix-product) templates under max-autotune. Attention (SDPA's flash,
# memory-efficient and cuDNN kernels) comes before them: the memory-efficient one is a CUTLASS kernel.
CHUNK_PATTERNS = ("chunk", "recompute_w_u", "solve_tril", "merge_16x16", "prepare_wy", "l2norm")
ATTENTION_PATTERNS = ("fmha", "flash", "sdpa", "attention")
MATMUL_PATTERNS = ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90", "cublas", "matmul", "splitkreduce",
                   "triton_tem_")
KIND_LABELS = {"chunk": "chunk kernels", "matmul": "matrix products", "attention": "attention",
               "other": "everything else"}


def kernel_kind(name):
    """'chunk', 'attention', 'matmul' or 'other' for a device kernel's name."""
    lowered = name.lower()
    if any(pattern in lowered for pattern in CHUNK_PATTERNS):
        return "chunk"
    if any(pattern in lowered for pattern in ATTENTION_PATTERNS):
        return "attention"
    if any(pattern in lowered for pattern in MATMUL_PATTERNS):
        return "matmul"
    return "other"


# ---------------------------------------------------------------------------------------------
# models

def import_fla_layer():
    """flash-linear-attention's GatedDeltaNet2 layer class, or None (with one line saying why)."""
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")  # its Triton kernels, as in bench_kernels.py
    try:
        import fla
        from fla.layers import GatedDeltaNet2
    except Exception as e:  # noqa: BLE001  (a missing dependency of fla shows up as any import error)
        print(f"flash-linear-attention not importable ({type(e).__name__}: {e}): no fla runs", flush=True)
        return None
    print(f"flash-linear-attention {fla.__version__}", flush=True)
    return GatedDeltaNet2


def fla_reference_lm(model_config, GatedDeltaNet2):
    """model.py's LM (embedding, RMSNorm, SwiGLU, final norm, head, cross-entropy over fp32 logits) with
    every mixer replaced by fla's GatedDeltaNet2 of the same shape: only the token mixer differs.
    Built on GDN-2's config, so flops_per_token counts GDN-2's token mixing for the MFU."""

    class FlaMixer(GatedDeltaNet2):
        def forward(self, x, cache=None, doc_id=None):
            # Block calls mixer(x, cache, doc_id); the layer returns (output, attentions, cache).
            # use_qk_l2norm_in_kernel=True is fixed inside the layer.
            return super().forward(x)[0]

    cfg = dataclasses.replace(model_config, mixer="gdn2")
    model = LM(cfg)
    for i, block in enumerate(model.blocks):
        block.mixer = FlaMixer(hidden_size=cfg.d_model, head_dim=cfg.head_k_dim, num_heads=cfg.n_head,
                               expand_v=cfg.head_v_dim / cfg.head_k_dim, conv_size=cfg.conv_size,
                               norm_eps=cfg.norm_eps, layer_idx=i)
    return model


def model_config_of(config):
    return ModelConfig.from_dict({**config, "vocab_size": config["vocab_size"] or SYNTHETIC_VOCAB})


def shape_of(config):
    return tuple(config[key] for key in SHAPE_KEYS)


def format_mfu(mfu):
    return f"{mfu:.1%}" if mfu else "-"


# ---------------------------------------------------------------------------------------------
# measurement

def synthetic_batches(config, vocab_size, accum):
    """accum micro-batches (x, y) of random tokens, reused by every step: the data loader is not timed."""
    gen = torch.Generator(device="cuda").manual_seed(config["seed"])
    shape = (config["micro_batch_size"], config["seq_len"] + 1)
    batches = []
    for _ in range(accum):
        tokens = torch.randint(vocab_size, shape, device="cuda", generator=gen)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def make_step(model, optimizer, batches, config):
    """One optimizer step with train.py's own functions (less the learning-rate schedule and DDP)."""
    autocast = train.autocast_for(config, torch.device("cuda"))

    def step():
        loss_sum = train.accumulate_gradients(model, batches, len(batches), autocast, ddp=False)
        train.apply_update(model, optimizer, loss_sum, config["grad_clip"], ddp=False)
    return step


def device_times(step):
    """{kernel name: ms of device time} of one call of step() (kernels replayed from a CUDA graph included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ms_per_kernel = defaultdict(float)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:  # kernels and copies, not the CPU ops that launch them
            ms_per_kernel[event.name] += event.device_time_total / 1e3
    return ms_per_kernel


def print_profile(ms_per_kernel, step_ms):
    """Prints device_times' result by kind of kernel and its top kernels."""
    total = sum(ms_per_kernel.values())
    if not total:
        print("    the profiler recorded no device kernels for this step", flush=True)
        return
    ms_per_kind = defaultdict(float)
    for name, ms in ms_per_kernel.items():
        ms_per_kind[kernel_kind(name)] += ms
    print(f"    one step: {total:.3f} ms of device time (timed step {step_ms:.3f} ms)")
    for kind, label in KIND_LABELS.items():
        print(f"      {label:<16} {ms_per_kind[kind]:9.3f} ms {ms_per_kind[kind] / total:6.1%}")
    print(f"    top {TOP_KERNELS} kernels:")
    for name, ms in sorted(ms_per_kernel.items(), key=lambda item: -item[1])[:TOP_KERNELS]:
        print(f"      {ms:9.3f} ms {ms / total:6.1%}  {name[:110]}")
    print(flush=True)


def measure(name, build_model, config, compiled, args):
    """Builds the model, trains args.warmup + args.steps steps, prints the row and returns its numbers."""
    torch.manual_seed(config["seed"])
    with torch.device("cuda"):  # initialise on the GPU: a 1.3B model's init on the CPU takes a while
        model = build_model()
    model.activation_checkpointing = config["activation_checkpointing"]
    optimizer = torch.optim.AdamW(model.optim_groups(config["weight_decay"]), lr=config["lr"],
                                  betas=(config["beta1"], config["beta2"]), fused=True)
    flops_per_token = model.flops_per_token(config["seq_len"])
    run = torch.compile(model) if compiled else model
    batches = synthetic_batches(config, model.cfg.vocab_size, args.accum)
    step = make_step(run, optimizer, batches, config)
    tokens_per_step = args.accum * config["micro_batch_size"] * config["seq_len"]

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    kept_gib = kept_for_backward(run, batches[0], config) / 2 ** 30
    optimizer.zero_grad(set_to_none=True)

    tokens_per_s = tokens_per_step / (step_ms / 1e3)
    peak = train.peak_flops(config, torch.device("cuda"))
    mfu = flops_per_token * tokens_per_s / peak if peak else None
    mode = "compiled" if compiled else "eager"
    print(f"{name:<40} {mode:<9} {tokens_per_s:10,.0f} {step_ms:9.1f} {format_mfu(mfu):>6} {peak_gib:8.1f} "
          f"{kept_gib:8.1f}", flush=True)
    if args.profile:
        print_profile(device_times(step), step_ms)
    return {"name": name, "mode": mode, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_gib": peak_gib,
            "kept_gib": kept_gib, "shape": shape_of(config)}


def kept_for_backward(model, batch, config):
    """Bytes one micro-batch's forward keeps for its backward (the activations, and what the loss keeps);
    the backward then runs, leaving gradients for the caller to drop."""
    x, y = batch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with train.autocast_for(config, torch.device("cuda")):
        _, loss = model(x, y)
    kept = torch.cuda.memory_allocated() - before
    loss.backward()
    return kept


def release_gpu_memory():
    """Frees what the last run left (its model and optimizer are gone with measure's frame)."""
    torch._dynamo.reset()  # compiled graphs can hold the old model's tensors, and count towards recompile limits
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------
# the command

def parse_args():
    parser = argparse.ArgumentParser(
        usage="python bench_train.py CONFIG [CONFIG ...] [--key=value ...] [options]", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)  # --s=1 is no --steps
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step (default: %(default)s)")
    parser.add_argument("--compile", choices=("0", "1", "both"), default="both",
                        help="0 eager, 1 torch.compile(model), both (default); the configs' compile key is not used")
    parser.add_argument("--fla", action="store_true", help="also an LM of each shape with fla's GatedDeltaNet2")
    parser.add_argument("--profile", action="store_true", help="device time of one step by kind of kernel")
    args, rest = parser.parse_known_args()
    if args.steps < 1 or args.warmup < 0 or args.accum < 1:
        parser.error("--steps and --accum must be at least 1, --warmup at least 0")
    return args, load_configs(parser, rest)


def load_configs(parser, rest):
    """[(name, config)] of the config files among the arguments argparse did not know, each with the
    --key=value overrides among them, as train.py loads and checks them (all before any GPU work)."""
    overrides = [arg for arg in rest if arg.startswith("--")]
    names = [arg for arg in rest if not arg.startswith("--")]
    if not names:
        parser.error("give at least one config, e.g. configs/carve_1b3.py or carve_1b3")
    return [(os.path.splitext(os.path.basename(arg))[0], train.load_config([arg] + overrides)) for arg in names]


def main():
    args, configs = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    import triton  # here, not at the top: a CPU-only install may lack it and should still get the line above

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"python bench_train.py {' '.join(sys.argv[1:])}", flush=True)
    GatedDeltaNet2 = import_fla_layer() if args.fla else None
    modes = {"0": [False], "1": [True], "both": [False, True]}[args.compile]

    results, fla_references = [], {}  # every run's row; the fla reference row of each shape
    for config_name, config in configs:
        model_config = model_config_of(config)
        print(f"\n{config_name}: {model_config.mixer}, {model_config.n_layer} layers, d_model {model_config.d_model}, "
              f"vocab {model_config.vocab_size}; {args.accum} x {config['micro_batch_size']} x {config['seq_len']} "
              f"tokens per step; activation checkpointing {'on' if config['activation_checkpointing'] else 'off'}")
        print(f"{'run':<40} {'mode':<9} {'tokens/s':>10} {'step ms':>9} {'MFU':>6} {'peak GiB':>8} {'kept GiB':>8}",
              flush=True)
        for compiled in modes:
            results.append(measure(config_name, lambda: LM(model_config), config, compiled, args))
            release_gpu_memory()
        if GatedDeltaNet2 is None or shape_of(config) in fla_references:
            continue
        fla_rows = []
        for compiled in modes:
            try:
                fla_rows.append(measure(f"fla GatedDeltaNet2 LM ({config_name} shape)",
                                        lambda: fla_reference_lm(model_config, GatedDeltaNet2), config, compiled, args))
            except Exception as e:  # noqa: BLE001  (a failing fla run, e.g. under torch.compile, spares the rest)
                first_line = next(iter(str(e).splitlines()), "")
                print(f"fla GatedDeltaNet2 LM, {'compiled' if compiled else 'eager'}: failed "
                      f"({type(e).__name__}: {first_line})", flush=True)
            release_gpu_memory()
        if fla_rows:
            fla_references[shape_of(config)] = max(fla_rows, key=lambda row: row["tokens_per_s"])
            results += fla_rows

    print_summary(results, fla_references)


def print_summary(results, fla_references):
    """Every run as a Markdown table row (for docs/BENCHMARKS.md), with ratios to the fla reference of its shape."""
    print("\n| run | mode | tokens/s | MFU | peak GiB | kept GiB | tokens/s vs fla | peak vs fla |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        reference = fla_references.get(row["shape"])
        name = row["name"] + (" (the reference)" if row is reference else "")
        ratios = "- | -"
        if reference:
            ratios = (f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x | "
                      f"{row['peak_gib'] / reference['peak_gib']:.2f}x")
        print(f"| {name} | {row['mode']} | {row['tokens_per_s']:,.0f} | {format_mfu(row['mfu'])} | "
              f"{row['peak_gib']:.1f} | {row['kept_gib']:.1f} | {ratios} |", flush=True)



if __name__ == "__main__":
    main()
