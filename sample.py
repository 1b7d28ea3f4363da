"""
Sample from a trained CARVE / GDN-2 model.

    python sample.py --out_dir=out/carve_shakespeare --prompt="ROMEO:" --max_new_tokens=500
    python sample.py --out_dir=out/carve_shakespeare --prompt_file=prompt.txt --temperature=0 --no_stream
    python sample.py --prompt="ROMEO:" --prompt="JULIET:" --num_samples=4    # 8 rows in one batch

The prompt is prefilled in one forward pass through the chunk kernel, then each new token costs one
step of the per-token kernel on the cached recurrent state (O(1) per token for CARVE / GDN-2 layers;
attention layers of a hybrid keep key and value buffers of the full length, prompt plus new tokens).
The text goes to stdout, streamed token by token; everything else (checkpoint, model, speed) goes to
stderr, so `> out.txt` keeps just the text.
"""
import argparse
import codecs
import os
import sys
import time
from contextlib import nullcontext

import torch

from model import LM, ModelConfig, cache_offset, join_caches, set_cache_offset
from train import checkpoint_records, device_for, load_newest_checkpoint, load_weights


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits [B, V]: greedy when temperature == 0, else sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens and then to the smallest
    set whose probability reaches top_p (nucleus). Returns ids [B]."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # unsorted: the k-th best is the least of the k, and a decode step need not sort them
        kth_best = torch.topk(logits, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the best always stays
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # an exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p (what torch.multinomial does
    # for one sample), and unlike multinomial it records into a CUDA graph; the floor keeps p = 0 at 0
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


class CudaGraphStep:
    """`step(ids) -> next ids` (the model's one-token step on `cache`: every layer, the head, the
    sampling) replayed from CUDA graphs: one launch a token instead of some twenty a layer from Python,
    which is what bounds a plain step at small batches.

    The cache's tensors are static buffers, updated in place; its host-side counters (each layer's
    offset) are advanced here after a replay, as the step itself advances them. A recurrent layer's step
    takes one of two host paths (the step that completes a chunk also computes CARVE's next Delta), so
    there are up to two graphs, each captured after its kind of step has run `warmup` times as is: those
    runs compile and warm up the kernels, which must not happen during a capture (a compiled step
    compiles twice, and its kernels tune themselves on their first run, so it needs 2)."""

    def __init__(self, step, cache, chunk_size, generator=None, warmup=1):
        self.step, self.cache, self.chunk_size, self.generator, self.warmup = step, cache, chunk_size, generator, warmup
        self.recurrent = any("state" in layer for layer in cache)
        self.ids, self.graphs, self.outputs, self.runs = None, {}, {}, {False: 0, True: 0}

    def set_offsets(self, offsets):
        for layer, offset in zip(self.cache, offsets):
            set_cache_offset(layer, offset)

    def __call__(self, ids):
        offsets = [cache_offset(layer) for layer in self.cache]
        completes_chunk = self.recurrent and (offsets[0] + 1) % self.chunk_size == 0
        if self.runs[completes_chunk] < self.warmup:
            self.runs[completes_chunk] += 1
            return self.step(ids)
        if self.ids is None:
            self.ids = torch.empty_like(ids)
        self.ids.copy_(ids)
        if completes_chunk not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            if self.generator is not None:
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph):
                self.outputs[completes_chunk] = self.step(self.ids)
            self.set_offsets(offsets)   # the capture ran the host side only: undo its counting
            self.graphs[completes_chunk] = graph
        self.graphs[completes_chunk].replay()
        self.set_offsets([offset + 1 for offset in offsets])
        return self.outputs[completes_chunk]


def ids_to_host(ids):
    """Starts copying ids to the host behind the work queued so far; returns the function that waits for
    that copy alone and gives them as a list. The device can then run the next step, queued after the
    copy, while the host handles these ids: a step's host side (its bookkeeping and the graph launch)
    hides behind the previous step instead of adding to it."""
    if ids.device.type != "cuda":
        return ids.tolist
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(ids.device))   # the copy's stream, not the current device's

    def wait():
        copied.synchronize()
        return host.tolist()
    return wait


def decode_step(model, cache, pick, generator=None, cuda_graph=True, compile=False):
    """generate_samples' step, ids [B] -> next ids [B]: one token a row on top of the cached state, then
    pick(logits); replayed from CUDA graphs (CudaGraphStep) on a GPU unless cuda_graph=False. compile=True
    runs the step through torch.compile first, which fuses the norms, casts, residual adds and
    activations between the matrix products and the kernels into a few generated kernels. It compiles
    twice (the second call sees the position counters change and makes them symbolic; three times on
    the torch path, where the chunk-finishing step is a branch of its own), and anew for each model:
    dynamo stops compiling a function after 8 compiles and runs it as is (torch._dynamo.reset() starts
    over)."""
    def step(ids):
        return pick(model(ids[:, None], cache=cache)[0])
    if compile:
        step = torch.compile(step)
    if cuda_graph and model.embed.weight.is_cuda:
        return CudaGraphStep(step, cache, model.cfg.chunk_size, generator, warmup=2 if compile else 1)
    return step


@torch.inference_mode()
def generate_samples(model, prompt_ids, num_samples, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                     generator=None, eot=None, vocab_size=None, on_token=None, stop=None, cuda_graph=True,
                     compile=False):
    """Continue a prompt (a list of ids), or each of several prompts (a list of such lists), num_samples
    times, all rows as one batch: one decode step for all rows per token (decode_step: compiled with
    compile=True, on a GPU replayed from a CUDA graph unless cuda_graph=False). Prompts of one length are
    prefilled together in one pass; prompts of different lengths are prefilled apart, and the rows of the
    shorter ones decode on their own until they reach the next length, where the two batches join. So
    every row computes what it would alone, and the joined batch shares one position. Returns the new
    ids of each row, prompt by prompt (each at most max_new_tokens; a row ends early when it samples
    `eot`, which is not returned, or when stop(row, its new ids) is true after a token, which is kept).
    on_token(row, id) is called as each token is produced. vocab_size:
    sample only ids below it (a model's vocab is often padded past the tokenizer's, e.g. 50257 -> 50304)."""
    prompts = [prompt_ids] if prompt_ids and not isinstance(prompt_ids[0], (list, tuple)) else list(prompt_ids)
    if not prompts or not all(len(prompt) for prompt in prompts):
        raise ValueError("generate() needs non-empty prompts")
    rows = [prompt for prompt in prompts for _ in range(num_samples)]
    device = model.embed.weight.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
    max_len = max(map(len, rows)) + max_new_tokens

    def pick(logits):
        return sample_next(logits[:, -1, :vocab_size] if vocab_size else logits[:, -1], temperature, top_k, top_p,
                           generator)

    samples, finished = [[] for _ in rows], [max_new_tokens == 0] * len(rows)

    def record(row_ids, ids):
        for row, token in zip(row_ids, ids):
            if finished[row]:
                continue  # a finished row still steps with the batch; its tokens are dropped
            if eot is not None and token == eot:
                finished[row] = True
                continue
            samples[row].append(token)
            finished[row] = len(samples[row]) == max_new_tokens or (stop is not None and stop(row, samples[row]))
            if on_token is not None:
                on_token(row, token)

    active, cache, next_ids = [], None, None
    for length in sorted(set(map(len, rows))):
        group = [row for row in range(len(rows)) if len(rows[row]) == length]
        group_cache = model.init_cache(len(group), device, max_len=max_len, dtype=dtype)
        # prefill: the whole prompt in one pass; logits come back for the last position only
        group_ids = pick(model(torch.tensor([rows[row] for row in group], dtype=torch.long, device=device),
                               cache=group_cache)[0])
        if active:   # the shorter prompts' rows catch up, one plain step a token, then the batches join
            step = decode_step(model, cache, pick, generator, cuda_graph=False)
            while cache_offset(cache[0]) < length:
                record(active, next_ids.tolist())
                next_ids = step(next_ids)
            cache, next_ids = join_caches([cache, group_cache]), torch.cat([next_ids, group_ids])
        else:
            cache, next_ids = group_cache, group_ids
        active += group
    step = decode_step(model, cache, pick, generator, cuda_graph, compile)
    while True:
        ids = ids_to_host(next_ids)
        # the device runs the next step while the host records these ids, unless they are every row's last
        # (a row that samples eot ends one step later: that step's ids are dropped)
        if not all(finished[row] or len(samples[row]) + 1 == max_new_tokens for row in active):
            next_ids = step(next_ids)
        record(active, ids())
        if all(finished):
            return samples


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             eot=None, vocab_size=None):
    """generate_samples for one sample: its new ids."""
    return generate_samples(model, prompt_ids, 1, max_new_tokens, temperature, top_k, top_p, generator, eot,
                            vocab_size)[0]


def inference_weights(model, dtype):
    """The matrices of the Linear layers in `dtype`, so a decode step reads each once at half the bytes
    (under autocast, fp32 weights are read and cast every step); the embedding, the norms, the gates'
    parameters and the conv taps stay fp32 (a tied head stays with the embedding)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not model.embed.weight:
            module.to(dtype)


def fail(message):
    raise SystemExit(f"sample.py: error: {message}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default="out/carve_shakespeare",
                        help="run directory of train.py: its newest good checkpoint is used (default: %(default)s)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text (default: a newline); several --prompt run as one batch")
    parser.add_argument("--prompt_file", action="append", default=None,
                        help="read the prompt from this UTF-8 file instead; several files run as one batch")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top_k", type=int, default=200,
                        help="sample among the k most likely tokens; 0 = off (default: %(default)s)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="nucleus: the smallest set of tokens with probability >= p; 1 = off "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337, help="(default: %(default)s)")
    parser.add_argument("--num_samples", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1, ...; auto = cuda if available, else cpu (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast dtype; auto = bfloat16 on cuda (float16 without bf16 support), float32 on cpu")
    parser.add_argument("--no_stream", action="store_true", help="print each sample once it is complete")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: faster tokens (a 1.3B CARVE on an H200: 711 against 528 "
                             "a second at batch 1, docs/BENCHMARKS.md) after a one-time "
                             "compile at the first steps")
    parser.add_argument("--max_prompt_tokens", type=int, default=65536,
                        help="refuse longer prompts: one pass over them holds all their activations, and attention "
                             "layers grow with the square of the length (default: %(default)s)")
    args = parser.parse_args(argv)

    # -- check the arguments and the run directory before loading anything big
    if args.max_new_tokens < 0:
        fail(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        fail(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        fail(f"--top_k must be >= 0 (0 = off), got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        fail(f"--top_p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.num_samples < 1:
        fail(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.prompt is not None and args.prompt_file is not None:
        fail("give either --prompt or --prompt_file, not both")
    if args.prompt_file is not None:
        prompts = []
        for path in args.prompt_file:
            if not os.path.isfile(path):
                fail(f"--prompt_file {path!r} does not exist")
            try:
                with open(path, encoding="utf-8") as f:
                    prompts.append(f.read())
            except UnicodeDecodeError as e:
                fail(f"--prompt_file {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                     f"convert it, e.g. iconv -f latin1 -t utf-8")
    else:
        prompts = args.prompt or ["\n"]
    if "" in prompts:
        fail("a prompt is empty; the model needs at least one token to condition on (try --prompt='\\n')")

    how_to_train = (f"train a model into it first, e.g. "
                    f"python train.py configs/carve_shakespeare.py --out_dir={args.out_dir}")
    if not os.path.isdir(args.out_dir):
        fail(f"run directory {args.out_dir!r} does not exist; {how_to_train}")
    if not checkpoint_records(args.out_dir):
        fail(f"no checkpoint in {args.out_dir!r} (train.py writes ckpt_<step>.pt and ckpt_<step>.json there); "
             f"{how_to_train}")
    # the newest checkpoint whose sha256 matches its record, to CPU memory first (straight onto the GPU
    # it can run out of memory); a corrupt newer one is reported and skipped
    checkpoint, record = load_newest_checkpoint(args.out_dir, lambda line: print(line, file=sys.stderr))
    record_path = os.path.join(args.out_dir, record["checkpoint"][:-3] + ".json")
    ckpt_path = os.path.join(args.out_dir, record["checkpoint"])

    if record.get("task") == "mqar":
        fail(f"{args.out_dir} was trained on MQAR, which has no text to continue: score it with "
             f"python eval.py --out_dir={args.out_dir} --task=mqar")
    from prepare_data import get_tokenizer
    try:
        tokenizer = get_tokenizer(record.get("tokenizer"))
    except ValueError as e:
        fail(f"{record_path}: {e}")
    except RuntimeError as e:  # a BPE whose rank file is missing offline; the message says how to get it
        fail(str(e))
    prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
    for prompt, ids in zip(prompts, prompt_ids):
        if len(ids) == 0:
            fail(f"the prompt {prompt!r} encodes to no tokens")
    if max(map(len, prompt_ids)) > args.max_prompt_tokens:
        trained = checkpoint.get("config", {}).get("seq_len")
        fail(f"a prompt is {max(map(len, prompt_ids)):,} tokens, more than "
             f"--max_prompt_tokens={args.max_prompt_tokens:,}"
             f"{f' (the model trained on {trained:,}-token sequences)' if trained else ''}; shorten it, or raise "
             f"--max_prompt_tokens to prefill it in one pass anyway")
    if tokenizer.eot is not None:
        # prepare_data.py starts every document with eot: so does the prompt, as at the start of a text
        prompt_ids = [[tokenizer.eot] + ids for ids in prompt_ids]

    # -- device, precision, model
    device = device_for(args.device)
    dtype = args.dtype
    if dtype == "auto":
        # float16 where a GPU lacks bfloat16: decoding needs no loss scaling, which keeps train.py off float16
        dtype = "float32"
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    ptdtype = getattr(torch, dtype)
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)
    if device.type == "cuda":
        # cuDNN attention builds a new graph for each new key length, i.e. at every decode step of an
        # attn layer: bf16 decode of a hybrid ran 16x slower with it on an H200; flash/efficient remain
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(args.seed)

    model = LM(ModelConfig.from_dict(record["model_config"]))
    load_weights(model, checkpoint["model"], ckpt_path)
    step = checkpoint.get("step", record.get("step"))
    del checkpoint
    model.to(device).eval()
    cfg = model.cfg
    if ptdtype != torch.float32:
        inference_weights(model, ptdtype)

    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"
    print(f"checkpoint: {ckpt_path} (step {step}, val loss {fmt(record.get('val_loss'))}, "
          f"val bpb {fmt(record.get('val_bpb'))})", file=sys.stderr)
    print(f"model: mixer={cfg.mixer} n_layer={cfg.n_layer} d_model={cfg.d_model}, "
          f"{model.num_params(non_embedding=False) / 1e6:.2f}M params "
          f"({model.num_params() / 1e6:.2f}M non-embedding)", file=sys.stderr)
    lengths = ", ".join(str(len(ids)) for ids in prompt_ids)
    print(f"tokenizer: {tokenizer.name} | device: {device} {dtype} | "
          f"{f'prompts: {len(prompts)} of {lengths}' if len(prompts) > 1 else f'prompt: {lengths}'} tokens"
          f"{' (eot first)' if tokenizer.eot is not None else ''} | "
          f"temperature={args.temperature} top_k={args.top_k or None} top_p={args.top_p} seed={args.seed}",
          file=sys.stderr)
    print("-" * 15, file=sys.stderr)

    # -- generate; stdout carries only the text. The incremental decoder holds back the bytes of a
    # character split across tokens and prints U+FFFD for bytes that are not UTF-8.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # never crash on a terminal that can't show a character
    generator = torch.Generator(device=device).manual_seed(args.seed)
    n = args.num_samples * len(prompts)   # rows: each prompt's samples in turn
    stream = n == 1 and not args.no_stream   # the samples of a batch grow together: each is printed whole
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    step_times = []   # when each decode step's tokens arrived

    def on_token(row, token):
        produced[row] += 1
        if produced[row] > len(step_times):   # the first row to reach this step
            step_times.append(time.perf_counter())
        if stream:
            sys.stdout.write(decoder.decode(tokenizer.token_bytes(token)))
            sys.stdout.flush()

    produced = [0] * n
    if stream:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    t0 = time.perf_counter()
    with autocast:
        samples = generate_samples(model, prompt_ids, args.num_samples, args.max_new_tokens, args.temperature,
                                   args.top_k or None, args.top_p, generator, eot=tokenizer.eot,
                                   vocab_size=tokenizer.vocab_size, on_token=on_token, compile=args.compile)
    for i, new_ids in enumerate(samples):
        if not stream:
            if i > 0:
                sys.stdout.write("---------------\n")
            sys.stdout.write(prompts[i // args.num_samples]
                             + decoder.decode(b"".join(tokenizer.token_bytes(t) for t in new_ids)))
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        decoder.reset()
    sys.stdout.flush()

    # tokens/s counts generated tokens only; the first step's come from the prefill logits, and the
    # rate starts from the second decode step (the first one compiles the kernels on a GPU)
    generated = sum(len(ids) for ids in samples)
    stopped = sum(len(ids) < args.max_new_tokens for ids in samples)
    report = (f"{n} sample{'s' if n > 1 else ''}{' in one batch' if n > 1 else ''}: {generated} new tokens"
              f"{f' ({stopped} stopped at eot)' if stopped else ''}")
    if step_times:
        report += (f"; prefill {lengths} tokens{f' x {args.num_samples}' if args.num_samples > 1 else ''} in "
                   f"{(step_times[0] - t0) * 1e3:.1f} ms")
    if len(step_times) > 2:
        later = sum(max(0, len(ids) - 2) for ids in samples)
        report += f"; decode {later / (step_times[-1] - step_times[1]):.1f} tokens/s"
    print(report, file=sys.stderr)


if __name__ == "__main__":
    main()
