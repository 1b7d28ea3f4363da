"""Decode benchmark on one GPU: tokens/s and ms per step of sample.py's one-token step for whole models,
at several batch sizes and context lengths, beside the limit that reading the weights sets.

    python bench_decode.py carve_1b3 transformer_1b3                       # batch 1, 8, 64; context 1K and 16K
    python bench_decode.py carve_1b3 --batch 1 --context 1024 --no_graph   # also the plain (un-captured) step
    python bench_decode.py carve_1b3 --compile 1                           # only the compiled step
    python bench_decode.py carve_1b3 --batch 1 --context 1024 --profile    # and where a step's time goes

Configs load exactly as in train.py (a path, or a bare name in configs/; `--key=value` overrides apply
to every config). The model has random weights (vocab_size 0 means 50304), its Linear weights in bf16 as
sample.py holds them (inference_weights), under bf16 autocast. The step is sample.py's (decode_step:
the model's one-token step on the cache, sample_next at temperature 0.8 with top-k 200, replayed from
CUDA graphs unless --no_graph), with generate_samples' reading of each step's ids on the host while the
next step runs (sample.ids_to_host). With --compile (both by default) the step also runs through
torch.compile (sample.py --compile) before it is captured.

The cache is set as after `context` tokens instead of prefilling them: a recurrent layer's state and
an attention layer's keys and values random, its offset at `context`. A step's work does not depend
on the values, so this times what a step costs at that context without the prefill's memory (64 x 16K
tokens). The first 2 * chunk_size + 2 steps (compiled: 3 * chunk_size + 2) are not timed: they compile
the kernels and capture both graphs; then --steps steps are.

Limits beside each row, from the copy bandwidth measured in the same run (a 2 GiB device-to-device
copy): "weights" = batch x bandwidth / the bytes of the Linear weights, what reading them once a step
allows; "all bytes" adds what a step must also move: a recurrent layer's fp32 state read and written,
an attention layer's keys and values read.
"""
import argparse
import sys
import time

import torch

from bench_train import device_times, load_configs, model_config_of, print_profile
from model import LM, set_cache_offset
from sample import decode_step, ids_to_host, inference_weights, sample_next

DTYPE = torch.bfloat16


def copy_bandwidth():
    """Bytes per second of a 2 GiB device-to-device copy (read + write counted), best of 5."""
    src = torch.empty(2 ** 30, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def fill_cache(cache, context, gen):
    """The cache as after `context` tokens: random recurrent states and attention keys and values."""
    for layer in cache:
        if "state" in layer:
            state = layer["state"]
            for tensor in (state.S, state.o_sum, state.delta):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen, device=tensor.device))
        else:
            for key in ("k", "v"):
                layer[key][:, :, :context].normal_(generator=gen)
            layer["position"].fill_(context)
        set_cache_offset(layer, context)


def step_bytes(model, cache, context):
    """(bytes of the Linear weights, bytes a step must move in all: weights, states, keys and values)."""
    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    moved = weights
    for layer in cache:
        if "state" in layer:
            moved += 2 * layer["state"].S.numel() * 4
        else:
            moved += 2 * layer["k"][:, :, :context].numel() * layer["k"].element_size()
    return weights, moved


def measure(model, batch, context, steps, graph, compile, profile=False):
    """(ms per step, tokens per s, weight bytes, all bytes, kernels) of `steps` timed decode steps; kernels:
    with profile, device_times of one more step, else None."""
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(0)
    # untimed: every kind of step run as is (CudaGraphStep's warmup: 1, compiled 2) and then captured; the
    # chunk-finishing kind comes once every chunk_size steps
    warmup = (3 if compile else 2) * model.cfg.chunk_size + 2
    cache = model.init_cache(batch, max_len=context + warmup + steps + 1, dtype=DTYPE)
    fill_cache(cache, context, gen)
    if compile:   # a fresh compile for each cache: the earlier ones would count against dynamo's recompile limit
        torch._dynamo.reset()
    step = decode_step(model, cache, lambda logits: sample_next(logits[:, -1], 0.8, 200, None, gen), gen, graph,
                       compile)
    ids = torch.randint(model.cfg.vocab_size, (batch,), device=device, generator=gen)
    with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPE):
        for _ in range(warmup):
            ids = step(ids)
            ids.tolist()
        start = time.perf_counter()   # the .tolist() above waited for the device
        for _ in range(steps):   # as generate_samples: the next step runs while the host reads these ids
            tokens = ids_to_host(ids)
            ids = step(ids)
            tokens()
        ids.tolist()   # the last step
        seconds = time.perf_counter() - start
        kernels = device_times(lambda: step(ids)) if profile else None
    weights, moved = step_bytes(model, cache, context)
    return seconds / steps * 1e3, batch * steps / seconds, weights, moved, kernels


def parse_args():
    parser = argparse.ArgumentParser(usage="python bench_decode.py CONFIG [CONFIG ...] [--key=value ...] [options]",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--context", default="1024,16384",
                        help="comma-separated context lengths in tokens (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps (default: %(default)s)")
    parser.add_argument("--no_graph", action="store_true", help="also time the plain step, without CUDA graphs")
    parser.add_argument("--profile", action="store_true",
                        help="after each row, the device time of one more step by kind of kernel and its top kernels")
    parser.add_argument("--compile", choices=("0", "1", "both"), default="both",
                        help="the step through torch.compile or not (default: %(default)s)")
    args, rest = parser.parse_known_args()
    try:
        args.batch = [int(b) for b in args.batch.split(",")]
        args.context = [int(c) for c in args.context.split(",")]
    except ValueError:
        parser.error(f"--batch and --context take comma-separated integers, e.g. --batch 1,8,64; got "
                     f"{args.batch!r}, {args.context!r}")
    if min(args.batch) < 1 or min(args.context) < 0 or args.steps < 1:
        parser.error("--batch and --steps must be at least 1, --context at least 0")
    return args, load_configs(parser, rest)


def main():
    args, configs = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    import triton
    torch.backends.cuda.enable_cudnn_sdp(False)   # as sample.py: cuDNN attention rebuilds per key length
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton.__version__}, {time.strftime('%Y-%m-%d')}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"python bench_decode.py {' '.join(sys.argv[1:])}\n")
    print("| config | step | batch | context | ms / step | tokens/s | weights limit | all-bytes limit |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name, config in configs:
        model_config = model_config_of(config)
        torch.manual_seed(config["seed"])
        with torch.device("cuda"):
            model = LM(model_config).eval()
        inference_weights(model, DTYPE)
        compiles = {"0": [False], "1": [True], "both": [False, True]}[args.compile]
        for graph, compile in [(g, c) for g in ([True, False] if args.no_graph else [True]) for c in compiles]:
            for context in args.context:
                for batch in args.batch:
                    step = ("graph" if graph else "plain") + (" + compile" if compile else "")
                    row = f"| {name} | {step} | {batch} | {context:,} |"
                    try:
                        ms, tokens_per_s, weights, moved, kernels = measure(model, batch, context, args.steps, graph,
                                                                            compile, args.profile)
                    except torch.OutOfMemoryError:   # e.g. a Transformer's keys and values at 64 x 16K
                        print(f"{row} out of memory | - | - | - |", flush=True)
                    else:
                        print(f"{row} {ms:.2f} | {tokens_per_s:,.0f} | {batch * bandwidth / weights:,.0f} | "
                              f"{batch * bandwidth / moved:,.0f} |", flush=True)
                        if kernels is not None:
                            print_profile(kernels, ms)
                    torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
