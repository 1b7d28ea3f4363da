"""
Evaluate a checkpoint: perplexity and bits per byte on held-out token files or on raw text.

    python eval.py --out_dir=out/carve_shakespeare                          # the run's own val.bin
    python eval.py --out_dir=out/carve_shakespeare --data_dir=data/other_byte --split=train --max_tokens=1e6
    python eval.py --out_dir=out/carve_shakespeare --text=notes/ book.txt   # files, folders of .txt/.md
    python eval.py --out_dir=out/carve_shakespeare --task=passkey --contexts=1024,2048 --depths=0,50,100

The newest good checkpoint of --out_dir is used (train.py's rule: its sha256 must match its record).
Tokens are scored in windows of --seq_len (default: the length the model trained on); each window
predicts its tokens from the ones before it inside the window, as in training, so the numbers are
comparable with train.py's validation loss. Raw text is tokenised with the checkpoint's tokenizer,
each file one document starting with eot where the tokenizer has one (as prepare_data.py writes it).

Bits per byte = the summed loss in nats / ln 2 / the UTF-8 bytes the scored tokens spell: comparable
across tokenizers, unlike perplexity. Progress goes to stderr; the result is one line on stdout
(--json for a JSON object).

--task=passkey is an S-NIAH-style probe (RULER's single needle): a five-digit pass key stated once at
a given depth of repeated filler sentences, asked for at the end; the model's greedy continuation (the
prompt prefilled in one pass, then one decode step a token) must contain the number. Accuracy per
context length (in tokens) and depth (0% = the needle first, 100% = just before the question), over
--trials keys drawn from --seed. A model trained only on plays will fail it; the tool is for models
trained on such data, and for reporting that failure honestly.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from model import LM, ModelConfig
from prepare_data import get_tokenizer, local_documents, token_byte_lengths
from sample import generate
from train import load_newest_checkpoint

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def fail(message):
    raise SystemExit(f"eval.py: error: {message}")


def token_stream(args, record, tokenizer):
    """(tokens as an int64 numpy array, where they came from)."""
    if args.text:
        documents, description = local_documents(args.text)
        ids = []
        for text in documents:
            ids += ([tokenizer.eot] if tokenizer.eot is not None else []) + tokenizer.encode(text)
        return np.asarray(ids, dtype=np.int64), description
    data_dir = args.data_dir or record["data_dir"]
    meta_path, path = os.path.join(data_dir, "meta.json"), os.path.join(data_dir, f"{args.split}.bin")
    for needed in (meta_path, path):
        if not os.path.isfile(needed):
            fail(f"{needed} not found (--data_dir={data_dir!r}); give --data_dir of prepare_data.py's output or --text")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("tokenizer") != record["tokenizer"]:
        fail(f"{meta_path} holds {meta.get('tokenizer')!r} tokens, the checkpoint was trained on "
             f"{record['tokenizer']!r}")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r"), path


def passkey_prompt(tokenizer, context, depth, key):
    """Token ids of a passkey prompt of `context` tokens (within one filler sentence): filler with the
    needle at `depth` percent of it, then the question."""
    encode = tokenizer.encode
    fixed = len(encode(NEEDLE.format(key=key))) + len(encode(QUESTION))
    sentence = len(encode(FILLER))
    sentences = max(0, (context - fixed) // sentence)
    before = round(sentences * depth / 100)
    text = FILLER * before + NEEDLE.format(key=key) + FILLER * (sentences - before) + QUESTION
    return ([tokenizer.eot] if tokenizer.eot is not None else []) + encode(text)


def passkey(model, tokenizer, contexts, depths, trials, seed, autocast, log):
    """{(context, depth): accuracy} of the passkey probe; five digits a key, drawn from seed."""
    rng = np.random.default_rng(seed)
    keys = [str(k) for k in rng.integers(10000, 100000, size=trials)]
    accuracy = {}
    for context in contexts:
        for depth in depths:
            hits = 0
            for key in keys:
                prompt = passkey_prompt(tokenizer, context, depth, key)
                with autocast:
                    answer = generate(model, prompt, 8, temperature=0, eot=tokenizer.eot,
                                      vocab_size=tokenizer.vocab_size)
                hits += key in tokenizer.decode(answer)
            accuracy[(context, depth)] = hits / trials
            log(f"  context {context}, depth {depth}%: {hits}/{trials}")
    return accuracy


@torch.inference_mode()
def score(model, tokens, seq_len, batch_size, device, autocast, token_lengths, progress):
    """(summed loss in nats, scored tokens, UTF-8 bytes they spell) over windows of seq_len + 1 tokens,
    seq_len apart; the last, shorter window scores the rest."""
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    starts = list(range(0, max(1, len(tokens) - 1), seq_len))
    started = time.time()
    for i in range(0, len(starts), batch_size):
        windows = [np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts[i:i + batch_size]]
        width = max(len(w) for w in windows)
        batch = torch.full((len(windows), width), -1, dtype=torch.long)
        for row, window in enumerate(windows):
            batch[row, :len(window)] = torch.from_numpy(window)
        # padding after a window's end (-1) is never a target, and causality keeps it out of every prediction
        x, y = batch[:, :-1].clamp(min=0).to(device), batch[:, 1:].to(device)
        with autocast:
            _, mean_loss = model(x, y)   # the model's loss: fp32 softmax, no [tokens, vocab] logits kept
        scored = y[y >= 0].cpu().numpy()
        total_nats += mean_loss.item() * len(scored)
        total_tokens += len(scored)
        total_bytes += int(token_lengths[scored].sum())
        progress(total_tokens, total_nats, time.time() - started)
    return total_nats, total_tokens, total_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default="out/carve_shakespeare", help="run directory of train.py")
    parser.add_argument("--data_dir", default=None, help="token files of prepare_data.py (default: the run's)")
    parser.add_argument("--split", default="val", choices=["val", "train"], help="(default: %(default)s)")
    parser.add_argument("--text", nargs="+", default=None, help="score these text files / folders instead")
    parser.add_argument("--seq_len", type=int, default=0, help="window length; 0 = the run's seq_len")
    parser.add_argument("--max_tokens", type=float, default=0, help="score at most this many tokens; 0 = all")
    parser.add_argument("--batch_size", type=int, default=8, help="windows a forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    parser.add_argument("--json", action="store_true", help="print the result as a JSON object")
    parser.add_argument("--task", default="lm", choices=["lm", "passkey"], help="(default: %(default)s)")
    parser.add_argument("--contexts", default="1024,2048,4096,8192", help="passkey: context lengths in tokens")
    parser.add_argument("--depths", default="0,25,50,75,100", help="passkey: needle depths in percent")
    parser.add_argument("--trials", type=int, default=5, help="passkey: keys per setting (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="passkey: seed of the keys (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 0 or args.max_tokens < 0:
        fail("--batch_size must be at least 1, --seq_len and --max_tokens at least 0")
    if not os.path.isdir(args.out_dir):
        fail(f"run directory {args.out_dir!r} does not exist")

    checkpoint, record = load_newest_checkpoint(args.out_dir, lambda line: print(line, file=sys.stderr))
    try:
        tokenizer = get_tokenizer(record["tokenizer"])
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    seq_len = args.seq_len or checkpoint["config"]["seq_len"]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model = LM(ModelConfig.from_dict(record["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    del checkpoint
    if args.task == "passkey":
        try:
            contexts = [int(c) for c in args.contexts.split(",")]
            depths = [float(d) for d in args.depths.split(",")]
        except ValueError:
            fail(f"--contexts and --depths take numbers separated by commas, got {args.contexts!r}, {args.depths!r}")
        if args.trials < 1 or not all(0 <= d <= 100 for d in depths) or min(contexts) < 1:
            fail("--trials must be at least 1, --depths within 0..100, --contexts at least 1")
        print(f"passkey: {args.out_dir} (step {record['step']}), {args.trials} keys a setting, {device}", file=sys.stderr)
        accuracy = passkey(model, tokenizer, contexts, depths, args.trials, args.seed, autocast,
                           lambda line: print(line, file=sys.stderr))
        if args.json:
            print(json.dumps({"checkpoint_step": record["step"], "trials": args.trials, "accuracy":
                              [{"context": c, "depth": d, "accuracy": a} for (c, d), a in accuracy.items()]}))
        else:
            print("context \\ depth " + " ".join(f"{d:>6g}%" for d in depths))
            for c in contexts:
                print(f"{c:>15} " + " ".join(f"{accuracy[(c, d)]:7.0%}" for d in depths))
        return
    tokens, source = token_stream(args, record, tokenizer)
    if args.max_tokens:
        tokens = tokens[:int(args.max_tokens) + 1]
    if len(tokens) < 2:
        fail(f"{source} holds {len(tokens)} tokens: nothing to score")
    token_lengths = token_byte_lengths(tokenizer)   # for bits per byte over exactly the scored tokens
    print(f"eval: {args.out_dir} (step {record['step']}) on {source}: {len(tokens) - 1:,} tokens to score in windows "
          f"of {seq_len}, {device}", file=sys.stderr)
    last_report = [0.0]

    def progress(scored, nats, elapsed):
        if elapsed - last_report[0] >= 10:
            last_report[0] = elapsed
            print(f"  {scored:,} tokens, loss {nats / scored:.4f}, {scored / elapsed:,.0f} tokens/s", file=sys.stderr)

    nats, scored, text_bytes = score(model, tokens, seq_len, args.batch_size, device, autocast, token_lengths,
                                     progress)
    result = {"checkpoint_step": record["step"], "source": source, "tokens": scored, "bytes": text_bytes,
              "loss": nats / scored, "perplexity": math.exp(nats / scored),
              "bits_per_byte": nats / math.log(2) / text_bytes if text_bytes else None, "seq_len": seq_len}
    if args.json:
        print(json.dumps(result))
    else:
        bpb = f"{result['bits_per_byte']:.4f}" if text_bytes else "n/a"
        print(f"{source}: loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} | "
              f"bits/byte {bpb} | {scored:,} tokens, {text_bytes:,} bytes")


if __name__ == "__main__":
    main()
