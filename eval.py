"""
Evaluate a checkpoint: perplexity and bits per byte on held-out token files or on raw text.

    python eval.py --out_dir=out/carve_shakespeare                          # the run's own val.bin
    python eval.py --out_dir=out/carve_shakespeare --data_dir=data/other_byte --split=train --max_tokens=1e6
    python eval.py --out_dir=out/carve_shakespeare --text=notes/ book.txt   # files, folders of .txt/.md

The newest good checkpoint of --out_dir is used (train.py's rule: its sha256 must match its record).
Tokens are scored in windows of --seq_len (default: the length the model trained on); each window
predicts its tokens from the ones before it inside the window, as in training, so the numbers are
comparable with train.py's validation loss. Raw text is tokenised with the checkpoint's tokenizer,
each file one document starting with eot where the tokenizer has one (as prepare_data.py writes it).

Bits per byte = the summed loss in nats / ln 2 / the UTF-8 bytes the scored tokens spell: comparable
across tokenizers, unlike perplexity. Progress goes to stderr; the result is one line on stdout
(--json for a JSON object).
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
from prepare_data import get_tokenizer, local_documents
from train import load_newest_checkpoint


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
    tokens, source = token_stream(args, record, tokenizer)
    if args.max_tokens:
        tokens = tokens[:int(args.max_tokens) + 1]
    if len(tokens) < 2:
        fail(f"{source} holds {len(tokens)} tokens: nothing to score")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model = LM(ModelConfig.from_dict(record["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    del checkpoint
    # bytes each token spells (eot none), for bits per byte over exactly the scored tokens
    token_lengths = np.array([len(tokenizer.token_bytes(i)) for i in range(model.cfg.vocab_size)], dtype=np.int64)
    if tokenizer.eot is not None:
        token_lengths[tokenizer.eot] = 0
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
