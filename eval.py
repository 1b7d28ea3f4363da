"""
Evaluate a checkpoint: perplexity and bits per byte on held-out token files or on raw text.

    python eval.py --out_dir=out/carve_shakespeare                          # the run's own val.bin
    python eval.py --out_dir=out/carve_shakespeare --data_dir=data/other_byte --split=train --max_tokens=1e6
    python eval.py --out_dir=out/carve_shakespeare --text notes/ book.txt   # files, folders of .txt/.md
    python eval.py --out_dir=out/carve_shakespeare --task=passkey --contexts=1024,2048 --depths=0,50,100
    python eval.py --out_dir=out/mqar --task=mqar --mqar_pairs=32

The newest good checkpoint of --out_dir is used (train.py's rule: its sha256 must match its record);
--step=N takes the checkpoint of step N instead.
Tokens are scored in windows of --seq_len (default: the length the model trained on); each window
predicts its tokens from the ones before it inside the window, in the run's precision (train.py's
dtype: bfloat16 on a GPU by default), as in training, so the numbers are comparable with train.py's
validation loss. Raw text is tokenised with the checkpoint's tokenizer,
each file one document starting with eot where the tokenizer has one (as prepare_data.py writes it).

Bits per byte = the summed loss in nats / ln 2 / the UTF-8 bytes the scored tokens spell: comparable
across tokenizers, unlike perplexity. Progress goes to stderr; the result is one line on stdout
(--json for a JSON object).

--task=mqar scores multi-query associative recall (train.py --task=mqar trains on it): the fraction of
queried values the model predicts exactly (argmax at the query), over examples of prepare_data.py's
mqar_examples. By default the checkpoint's own test set (its seq_len, mqar_pairs, mqar_seed); --seq_len,
--mqar_pairs and --examples ask for other settings (the test stream of the same seed). It also gives
the accuracy by the query's order in its example (accuracy_by_query_order, first to last): whether
recall holds for the later queries, further from the pairs. On a GPU it can differ from the run's own
record in the fourth decimal: eval.py scores --batch_size examples at a time, train.py its micro-batch,
and in bf16 other shapes round differently and flip a few near-tied argmaxes (on a CPU they agree).

--task=harness runs lm-evaluation-harness tasks (pip install lm-eval) through HarnessAdapter, e.g.
--harness_tasks=wikitext,lambada_openai,piqa,hellaswag,arc_easy,winogrande; the harness downloads their
datasets (--harness_include: a folder of your own task YAML files, local data included). A prediction
sees at most --seq_len tokens (the harness's max_length: its windows over long texts, contexts cut from
the left), so that the numbers compare with the harness's own; --harness_full_context scores every token
on all before it instead.

--task=gates reports, per recurrent layer, what the erase gate does on the run's text (65,536 tokens
unless --max_tokens says otherwise): its mean (erase_rate) and, for CARVE, the distribution of the
content shift Delta (delta_abs_mean, delta_p5, delta_p50, delta_p95), the norms of U and D (U_norm,
D_norm; U starts at zero) and how far D moved from its random start, D_moved = |D - D_0| / |D_0|, with
D_0 from the run's initial model rebuilt from its seed as train.py built it (a second model on the CPU,
made only for a CARVE checkpoint); and the loss on the same text (loss, nats per token), for CARVE also
with Delta taken away from the trained model, without training it again (loss_without_content_shift: U
set to 0): what the content shift is worth to it. Run it on a CARVE and a GDN-2 checkpoint to compare
their erase rates, and with --step on checkpoints along a run (train.py keeps the newest keep_checkpoints) to follow
Delta over training; `plot.py gates` draws such lines. On an MQAR checkpoint it runs on the test examples
(as --task=mqar chooses them) and reports the accuracy instead of the loss, also without Delta
(accuracy, accuracy_without_content_shift): whether recall rests on the content shift.
--without_content_shift takes the shift away (U = 0) before any other task: the passkey probe, the
harness, a text's loss.

--task=passkey is an S-NIAH-style probe (RULER's single needle): a five-digit pass key stated once at a
given depth of repeated filler (blocks of five short sentences), asked for at the end; the model's
greedy continuation (the prompt prefilled in one pass, then one decode step a token) must contain the
number. Accuracy per context length (in tokens) and depth (0% = the needle first, 100% = just before the
question), over --trials keys drawn from --seed; with --json also the number of filler blocks between
the needle and the question, which mostly decides whether a recurrent model still holds the key. A
model trained only on plays will fail it; the tool is for models trained on such data (prepare_data.py
--source passkey writes a corpus of them), and for reporting that failure honestly.
"""
import argparse
import difflib
import json
import math
import os
import sys
import time

import numpy as np
import torch

import model as model_module
from model import LM, ModelConfig, join_caches
from prepare_data import (PASSKEY_KEYS, document_ids, get_tokenizer, local_documents, passkey_blocks, passkey_text,
                          token_byte_lengths)
from sample import generate, generate_samples
from train import (autocast_for, check_token_ids, device_for, initial_model, largest_token_id, load_newest_checkpoint,
                   load_weights, mqar_split, read_data_meta, token_file)


GATE_TOKENS = 65536   # --task=gates reads this many tokens of a text unless --max_tokens says otherwise


def fail(message):
    raise SystemExit(f"eval.py: error: {message}")


def token_stream(args, record, tokenizer):
    """(the tokens to score, at most --max_tokens + 1, as a 1-D integer array: int64 from --text, the token
    file's own dtype mapped from disk otherwise; where they came from)."""
    scored = args.max_tokens or (GATE_TOKENS if args.task == "gates" else 0)
    cap = int(scored) + 1 if scored else None
    if args.text:
        documents, description = local_documents(args.text, flag="--text")
        ids = []
        for text in documents:
            ids += document_ids(tokenizer, text)
        return np.asarray(ids[:cap], dtype=np.int64), description
    data_dir = args.data_dir or record["data_dir"]
    meta = read_data_meta(data_dir)   # train.py's checks: a damaged file is one line naming it
    if meta["tokenizer"] != record["tokenizer"]:
        fail(f"{os.path.join(data_dir, 'meta.json')} holds {meta['tokenizer']!r} tokens, the checkpoint was trained "
             f"on {record['tokenizer']!r}")
    tokens, path = token_file(data_dir, args.split, meta)
    tokens = tokens[:cap]
    check_token_ids(largest_token_id(tokens), meta, path)   # the ids scored, before they index the embedding
    return tokens, path


def passkey(model, tokenizer, contexts, depths, trials, seed, autocast, log):
    """The passkey probe, a row for each context and depth: its accuracy, and how many filler blocks lay
    between the needle and the question (the mean over the keys; with a BPE a key's spelling can change
    how many blocks fit): what mostly decides whether a recurrent model still holds the key. Five digits
    a key, drawn from seed."""
    rng = np.random.default_rng(seed)
    keys = [str(k) for k in rng.integers(PASSKEY_KEYS.start, PASSKEY_KEYS.stop, size=trials)]
    fits = {context: {key: passkey_blocks(tokenizer, context, key) for key in keys} for context in contexts}
    for context, blocks in fits.items():   # all before the first answer; the same at every depth
        if min(blocks.values()) < 0:
            needed = max(len(document_ids(tokenizer, passkey_text(0, 0, key))) for key in keys)
            fail(f"--contexts: {context} tokens cannot hold the needle and the question, {needed} tokens without "
                 f"filler; every context must be at least that")
    rows = []
    for context in contexts:
        for depth in depths:
            hits, after = 0, []
            for key in keys:
                blocks = fits[context][key]
                before = round(blocks * depth / 100)
                after.append(blocks - before)
                prompt = document_ids(tokenizer, passkey_text(before, blocks - before, key))
                with autocast:
                    answer = generate(model, prompt, 8, temperature=0, eot=tokenizer.eot,
                                      vocab_size=tokenizer.vocab_size)
                hits += key in tokenizer.decode(answer)
            rows.append({"context": context, "depth": depth, "accuracy": hits / trials,
                         "filler_blocks_after_needle": float(np.mean(after))})
            log(f"  context {context}, depth {depth}%: {hits}/{trials} "
                f"({np.mean(after):g} filler blocks between needle and question)")
    return rows


class Progress:
    """A line on stderr at most every `seconds`: how many of `total` (requests, tokens) are done, and how fast."""

    def __init__(self, what, total, unit="requests", seconds=10.0):
        self.what, self.total, self.unit, self.seconds = what, total, unit, seconds
        self.started = self.last = time.time()

    def __call__(self, done):
        now = time.time()
        if now - self.last >= self.seconds:
            self.last = now
            print(f"  {self.what}: {done:,} of {self.total:,} {self.unit}, {done / (now - self.started):,.1f}/s",
                  file=sys.stderr)


# lm-eval's generation settings this adapter follows (lm-eval 0.4.13 reads the same keys): the stop strings,
# the most tokens to generate under any of the names tasks give them (the first given wins, in this order),
# and sampling. Other keys (num_beams, ...) are ignored, with one warning naming them.
GENERATION_LIMIT_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GENERATION_KEYS = {"until", "do_sample", "temperature", "top_k", "top_p", *GENERATION_LIMIT_KEYS}


def generation_settings(gen_kwargs, default_tokens=256):
    """(stop strings, most new tokens, temperature, top_k, top_p) of a generate_until request, as lm-eval
    reads its gen_kwargs: greedy unless do_sample is true, or unset with a temperature above 0; empty stop
    strings dropped (they would cut every text to nothing)."""
    until = gen_kwargs.get("until") or []
    until = [s for s in ([until] if isinstance(until, str) else until) if s]
    limit = next((gen_kwargs[k] for k in GENERATION_LIMIT_KEYS if gen_kwargs.get(k) is not None), default_tokens)
    temperature = float(gen_kwargs.get("temperature", 0.0))
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    top_k, top_p = gen_kwargs.get("top_k"), gen_kwargs.get("top_p")
    return (until, int(limit), temperature, int(top_k) if top_k is not None else None,
            float(top_p) if top_p is not None else None)


class HarnessAdapter:
    """lm-evaluation-harness's model interface for a checkpoint (its three request types; harness_model()
    makes it a subclass of the harness's LM). It scores what lm-eval's own HuggingFace model scores, from
    the model's cached state: a context is run once, and its continuations (the choices of a multiple-choice
    question) go on from copies of the state it left, in batches of at most batch_tokens tokens.

    max_length is the most tokens a prediction sees, as the harness's max_length: a context is cut from the
    left to fit it, and a long text is scored in the harness's disjoint windows (every token once, the
    first window from the start, each later one from a fresh state, the last one of full length), so the
    numbers are comparable with lm-eval's published ones. max_length=None scores every token of a text on
    everything before it instead, on one state in pieces of piece_tokens: a recurrent model's own reading,
    and not what the harness computes.

    Text is conditioned on the tokenizer's eot, as prepare_data.py starts every document (the harness does
    so for an empty context only); the byte tokenizer has none, so there a newline stands in. As in
    lm-eval, a context's trailing white space moves to its continuation, and a continuation's tokens are
    those the context plus continuation encodes to past the context's own; where a BPE merge crosses
    that boundary the continuation is encoded alone (lm-eval would leave the merged text unscored)."""

    def __init__(self, model, tokenizer, autocast, max_length=None, piece_tokens=4096, batch_tokens=8192,
                 generation_rows=32):
        self.model, self.tokenizer, self.autocast = model, tokenizer, autocast
        self.max_length, self.piece_tokens = max_length, piece_tokens
        self.batch_tokens, self.generation_rows = batch_tokens, generation_rows
        self.model_device = model.embed.weight.device
        self.start = [tokenizer.eot] if tokenizer.eot is not None else tokenizer.encode("\n")
        self.ignored_generation_keys = set()

    def _run(self, ids, cache, last_only=False):
        """log-softmax of the logits [rows, T, V] (fp32) of ids [rows, T] on top of cache."""
        with self.autocast:
            logits, _ = self.model(torch.as_tensor(ids, device=self.model_device), cache=cache, last_only=last_only)
        return torch.log_softmax(logits[..., :self.tokenizer.vocab_size].float(), dim=-1)

    def _split(self, context, continuation):
        """(context ids from the start token, continuation ids), the context cut to fit max_length."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        continuation_ids = whole[len(context_ids):]
        if whole[:len(context_ids)] != context_ids:   # the boundary merged: score the two apart
            continuation_ids = self.tokenizer.encode(continuation)
        context_ids = self.start + context_ids
        if self.max_length is not None:   # the harness's cut: context and continuation but its last token fit
            context_ids = context_ids[-max(1, self.max_length + 1 - len(continuation_ids)):]
        return context_ids, continuation_ids

    @torch.inference_mode()
    def loglikelihood(self, requests):
        """[(log p(continuation | context), whether greedy decoding gives the continuation)] per request;
        (0.0, True) for an empty continuation."""
        results = [None] * len(requests)
        by_context = {}
        for i, request in enumerate(requests):
            context_ids, continuation = self._split(*request.args)
            if continuation:
                by_context.setdefault(tuple(context_ids), []).append((i, continuation))
            else:
                results[i] = (0.0, True)
        progress, done = Progress("loglikelihood", len(requests)), len(requests) - sum(map(len, by_context.values()))
        for context_ids, asked in by_context.items():
            cache = self.model.init_cache(1, self.model_device)
            first = self._run([list(context_ids)], cache, last_only=True)[0, -1]   # predicts each first token
            end = 0
            while end < len(asked):   # batches of at most batch_tokens padded tokens, at least one continuation each
                begin, end, longest = end, end + 1, len(asked[end][1])
                while end < len(asked) and (end - begin + 1) * max(longest, len(asked[end][1])) <= self.batch_tokens:
                    longest = max(longest, len(asked[end][1]))
                    end += 1
                batch = asked[begin:end]
                rest = None
                if longest > 1:
                    # every continuation but its last token, padded: a position only sees those before it
                    rest = self._run([c[:-1] + [0] * (longest - len(c)) for _, c in batch],
                                     join_caches([cache] * len(batch)))
                for row, (i, continuation) in enumerate(batch):
                    predictions = [first] + [rest[row, t] for t in range(len(continuation) - 1)]
                    logprob = sum(float(p[token]) for p, token in zip(predictions, continuation))
                    greedy = all(int(p.argmax()) == token for p, token in zip(predictions, continuation))
                    results[i] = (logprob, greedy)
                done += len(batch)
                progress(done)
        return results

    def _windows(self, ids):
        """[(inputs, targets)] of a text's ids: each window's targets are the tokens its last len(targets)
        inputs predict; every id is a target once. One window (all of it from the start token) without
        max_length; with it the harness's disjoint windows of max_length inputs."""
        if not ids:
            return []
        length = self.max_length or len(ids)
        first = min(length, len(ids))
        windows, end = [(self.start + ids[:first - 1], ids[:first])], first
        while end < len(ids):
            new_end = min(end + length, len(ids))
            windows.append((ids[new_end - length - 1:new_end - 1], ids[end:new_end]))
            end = new_end
        return windows

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests):
        """[log p(text)] per request: every token of the text, in the windows of _windows, each run on a
        fresh state in pieces of piece_tokens."""
        results, progress = [], Progress("loglikelihood_rolling", len(requests))
        for request in requests:
            total = 0.0
            for inputs, targets in self._windows(self.tokenizer.encode(request.args[0])):
                cache, first_scored = self.model.init_cache(1, self.model_device), len(inputs) - len(targets)
                for start in range(0, len(inputs), self.piece_tokens):
                    piece = inputs[start:start + self.piece_tokens]
                    skip = max(0, first_scored - start)   # inputs before the window's targets only give context
                    if skip < len(piece):
                        wanted = targets[start + skip - first_scored:start + len(piece) - first_scored]
                        logprobs = self._run([piece], cache)[0, skip:]
                        total += float(logprobs.gather(-1, torch.tensor(wanted, device=self.model_device)[:, None]).sum())
                    else:
                        self._run([piece], cache, last_only=True)
            results.append(total)
            progress(len(results))
        return results

    def generate_until(self, requests):
        """[the continuation of the context, cut before the first of its stop strings] per request, read
        from gen_kwargs as the harness reads them (generation_settings): greedy unless they ask to sample,
        at most max_gen_toks tokens (default 256), a row ending at eot or as soon as its text holds a stop
        string. Requests with the same gen_kwargs go as one batch of up to generation_rows rows (those of
        similar length together); with max_length a context keeps its last max_length - max_gen_toks tokens."""
        results, progress, done = [None] * len(requests), Progress("generate_until", len(requests)), 0
        by_settings = {}
        for i, request in enumerate(requests):
            ignored = set(request.args[1]) - GENERATION_KEYS - self.ignored_generation_keys
            if ignored:
                print(f"  generate_until: ignoring gen_kwargs {sorted(ignored)} (not read by this adapter)",
                      file=sys.stderr)
                self.ignored_generation_keys |= ignored
            settings = generation_settings(request.args[1])
            by_settings.setdefault(repr(settings), (settings, []))[1].append(i)
        for (until, limit, temperature, top_k, top_p), indices in by_settings.values():
            if self.max_length is not None and limit >= self.max_length:   # lm-eval refuses it too
                raise ValueError(f"generate_until asks for {limit} new tokens, which leaves no context within "
                                 f"max_length={self.max_length} (eval.py's --seq_len); pass a larger --seq_len or "
                                 f"--harness_full_context")
            prompts = {}
            for i in indices:
                ids = self.start + self.tokenizer.encode(requests[i].args[0])
                prompts[i] = ids[-(self.max_length - limit):] if self.max_length is not None else ids
            indices = sorted(indices, key=lambda i: len(prompts[i]))

            def stop(row, ids):
                text = self.tokenizer.decode(ids)
                return any(s in text for s in until)
            for first in range(0, len(indices), self.generation_rows):
                rows = indices[first:first + self.generation_rows]
                with self.autocast:
                    samples = generate_samples(self.model, [prompts[i] for i in rows], 1, limit, temperature, top_k,
                                               top_p, eot=self.tokenizer.eot, vocab_size=self.tokenizer.vocab_size,
                                               stop=stop if until else None)
                for i, ids in zip(rows, samples):
                    text = self.tokenizer.decode(ids)
                    results[i] = text[:min([text.index(s) for s in until if s in text], default=len(text))]
                done += len(rows)
                progress(done)
        return results


def harness_model(model, tokenizer, autocast, max_length=None):
    """HarnessAdapter as a subclass of lm-evaluation-harness's LM (pip install lm-eval), for simple_evaluate."""
    from lm_eval.api.model import LM as HarnessLM

    class CarveHarnessLM(HarnessAdapter, HarnessLM):
        def __init__(self):
            HarnessLM.__init__(self)
            HarnessAdapter.__init__(self, model, tokenizer, autocast, max_length)

    return CarveHarnessLM()


def content_shift(o, content, chunk_size):
    """CARVE's Delta at every token [B, T, H, K] of sequences that start at position 0, from the layer's
    outputs o [B, T, H, V]: 0 in the first chunk, then U D m of the chunk before (m: its mean output)."""
    B, T, H, _ = o.shape
    D, U = (t.float().to(o.device) for t in content)
    chunks = T // chunk_size
    m = o[:, :chunks * chunk_size].reshape(B, chunks, chunk_size, H, -1).mean(2)        # [B, chunks, H, V]
    shift = torch.einsum("hkr,hrv,bchv->bchk", U, D, m)                               # Delta after chunk c
    return torch.cat([torch.zeros_like(shift[:, :1]), shift], 1).repeat_interleave(chunk_size, 1)[:, :T]


def window_batches(windows, batch_size, device):
    """The windows (equal lengths) stacked batch_size at a time, on the device."""
    for i in range(0, len(windows), batch_size):
        yield torch.as_tensor(np.stack(windows[i:i + batch_size]), device=device)


@torch.inference_mode()
def gate_statistics(model, windows, batch_size, autocast, initial=None):
    """Per recurrent layer, over the token windows (equal lengths): the erase gate b = sigmoid(b_logit + Delta)
    (its mean, the erase rate), CARVE's content shift Delta = U D m_{c-1} (mean |Delta| and its 5/50/95th
    percentiles over chunks, heads and channels) and the norms of U and D (U starts at 0: a norm above 0
    means it moved); with `initial`, the model before training (initial_model), how far D moved from its
    random start: |D - D_0| / |D_0|. Delta is recomputed from what each layer's chunk_carve call got and
    returned: m of a chunk is the mean of its outputs, as the kernels keep it. Everything stays on the
    model's device (moving every gate to the CPU made a GPU evaluation take minutes)."""
    layers = [i for i, block in enumerate(model.blocks) if hasattr(block.mixer, "kind")]
    erase_sum, gate_count, deltas = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0), {i: [] for i in layers}
    calls = []
    real = model_module.chunk_carve

    def recording(q, k, v, g, b_logit, w, content=None, *args, chunk_size=64, **kwargs):
        if kwargs.get("cu_seqlens") is not None:
            fail("--task=gates reads windows of one document each: a window holds a document start (eot) "
                 "after its first token; evaluate on text without them (--text) or a run without reset_at_eot")
        o, state = real(q, k, v, g, b_logit, w, content, *args, chunk_size=chunk_size, **kwargs)
        layer = layers[len(calls)]
        calls.append(layer)
        with torch.autocast(o.device.type, enabled=False):   # statistics in float32, not the model's bfloat16
            delta = content_shift(o.float(), content, chunk_size) if content is not None else 0
            erase_sum[layer] += torch.sigmoid(b_logit.float() + delta).sum()
        gate_count[layer] += b_logit.numel()
        if content is not None:
            deltas[layer].append(delta[:, chunk_size:].flatten())
        return o, state

    model_module.chunk_carve = recording
    try:
        for batch in window_batches(windows, batch_size, model.embed.weight.device):
            calls.clear()
            with autocast:
                model(batch)
    finally:
        model_module.chunk_carve = real
    result = []
    for i in layers:
        mixer = model.blocks[i].mixer
        row = {"layer": i, "mixer": mixer.kind, "erase_rate": float(erase_sum[i] / gate_count[i])}
        if deltas[i]:
            delta = torch.cat(deltas[i])
            # quantiles of a fixed random sample: torch.quantile takes at most 2^24 values
            sample = delta[torch.randint(len(delta), (1 << 20,), generator=torch.Generator().manual_seed(0))
                           .to(delta.device)]
            row.update(delta_abs_mean=float(delta.abs().mean()), **{
                f"delta_p{q}": float(sample.quantile(q / 100)) for q in (5, 50, 95)},
                U_norm=float(mixer.content_up.norm()), D_norm=float(mixer.content_down.norm()))
            if initial is not None:
                D_0 = initial.blocks[i].mixer.content_down.to(mixer.content_down.device)
                row["D_moved"] = float((mixer.content_down - D_0).norm() / D_0.norm())
        result.append(row)
    return result


def content_ups(model):
    """U of every CARVE layer with a content shift (Delta = U D m): zeroing them takes the shift away."""
    return [block.mixer.content_up for block in model.blocks if getattr(block.mixer, "has_content", False)]


@torch.inference_mode()
def content_shift_worth(model, measure):
    """(measure(), measure() with Delta = 0): what CARVE's content shift is worth to the trained model,
    measured by taking it away (U, hence Delta = U D m, set to 0 in every CARVE layer, then restored). A
    model whose shift learnt nothing useful loses nothing; one without CARVE layers has no shift (None)."""
    value = measure()
    ups = content_ups(model)
    if not ups:
        return value, None
    kept = [up.clone() for up in ups]
    try:
        for up in ups:
            up.zero_()
        without = measure()
    finally:
        for up, value_kept in zip(ups, kept):
            up.copy_(value_kept)
    return value, without


@torch.inference_mode()
def window_loss(model, windows, batch_size, autocast):
    """Mean loss in nats per token over the token windows (equal lengths; predicting tokens 1 .. T-1 of each)."""
    device = model.embed.weight.device
    with autocast:
        return sum(model(batch[:, :-1], batch[:, 1:])[1].item() * len(batch)
                   for batch in window_batches(windows, batch_size, device)) / len(windows)


@torch.inference_mode()
def mqar_accuracy(model, inputs, targets, batch_size, device, autocast):
    """(queries answered right, queries), each by the query's order in its example (first to last):
    the argmax at each scored position against its target, by order: whether recall holds for the later
    queries."""
    pairs = int((targets[0] >= 0).sum())
    right, total = np.zeros(pairs, dtype=np.int64), np.zeros(pairs, dtype=np.int64)
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[i:i + batch_size]).to(device)
        y = torch.from_numpy(targets[i:i + batch_size]).to(device)
        with autocast:
            predicted = model(x)[0].argmax(-1)
        scored = y >= 0
        order = (scored.cumsum(dim=1) - 1)[scored].cpu().numpy()
        right += np.bincount(order, weights=(predicted == y)[scored].cpu().numpy(), minlength=pairs).astype(np.int64)
        total += np.bincount(order, minlength=pairs)
    return right, total


@torch.inference_mode()
def score(model, tokens, seq_len, batch_size, device, autocast, token_lengths, progress):
    """(summed loss in nats, scored tokens, UTF-8 bytes they spell) over windows of seq_len + 1 tokens,
    seq_len apart; the last, shorter window scores the rest."""
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    starts = list(range(0, max(1, len(tokens) - 1), seq_len))
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
        progress(total_tokens)
    return total_nats, total_tokens, total_bytes


def gates(args, model, config, record, windows, autocast, metric):
    """--task=gates: the gate statistics over the windows, and metric = (name, measure): what the model scores
    on them (the loss on text, the accuracy on MQAR), as is and with the content shift taken away."""
    if not any(hasattr(block.mixer, "kind") for block in model.blocks):
        fail(f"{args.out_dir}: the model has no recurrent layer (mixer={model.cfg.mixer!r}): no erase gate "
             f"to report; use a CARVE or GDN-2 checkpoint")
    shift = bool(content_ups(model))
    if shift and len(windows[0]) <= model.cfg.chunk_size:
        fail(f"--task=gates: windows of {len(windows[0])} tokens; Delta changes only after each chunk of "
             f"{model.cfg.chunk_size}, so they must be longer (--seq_len={2 * model.cfg.chunk_size} or more gives "
             f"Delta whole chunks)")
    initial = initial_model(config) if shift else None
    rows = gate_statistics(model, windows, args.batch_size, autocast, initial)
    name, measure = metric
    value, without = content_shift_worth(model, measure)
    scores = {name: value, **({f"{name}_without_content_shift": without} if without is not None else {})}
    if args.json:
        print(json.dumps({"checkpoint_step": record["step"], **scores, "layers": rows}))
        return
    print(f"{'layer':>5} {'mixer':>5} {'erase_rate':>10}" + (
        f" {'mean|Delta|':>11} {'Delta_p5':>9} {'Delta_p50':>9} {'Delta_p95':>9} {'|U|':>7} {'|D|':>7} "
        f"{'D_moved':>7}"
        if shift else ""))
    for row in rows:
        print(f"{row['layer']:>5} {row['mixer']:>5} {row['erase_rate']:10.4f}" + (
            f" {row['delta_abs_mean']:11.2e} {row['delta_p5']:9.2e} {row['delta_p50']:9.2e} "
            f"{row['delta_p95']:9.2e} {row['U_norm']:7.3f} {row['D_norm']:7.3f} {row['D_moved']:7.4f}"
            if "delta_abs_mean" in row else ""))
    unit = " nats/token" if name == "loss" else ""
    print(f"{name} {value:.4f}{unit}" + (f"; with Delta = 0 (U zeroed in every CARVE layer): {without:.4f}, "
                                         f"{without - value:+.2e}" if without is not None else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default="out/carve_shakespeare",
                        help="run directory of train.py (default: %(default)s)")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint of this step (default: the newest good one)")
    parser.add_argument("--data_dir", default=None, help="token files of prepare_data.py (default: the run's)")
    parser.add_argument("--split", default="val", choices=["val", "train"], help="(default: %(default)s)")
    parser.add_argument("--text", nargs="+", default=None, help="score these text files / folders instead")
    parser.add_argument("--seq_len", type=int, default=0, help="window length; 0 = the run's seq_len")
    parser.add_argument("--max_tokens", "--eval_tokens", type=float, default=0,   # the second: train.py's name
                        help="score at most this many tokens; 0 = all (--task=gates: 65,536)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows a forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    parser.add_argument("--json", action="store_true", help="print the result as a JSON object")
    parser.add_argument("--task", default="lm", choices=["lm", "passkey", "mqar", "harness", "gates"],
                        help="(default: %(default)s)")
    parser.add_argument("--harness_tasks", default="wikitext,lambada_openai",
                        help="harness: lm-evaluation-harness task names, comma-separated (default: %(default)s)")
    parser.add_argument("--harness_include", default=None, help="harness: a folder of your own task YAML files")
    parser.add_argument("--limit", type=int, default=0, help="harness: examples a task; 0 = all")
    parser.add_argument("--num_fewshot", type=int, default=None, help="harness: few-shot examples (task default)")
    parser.add_argument("--harness_full_context", action="store_true",
                        help="harness: score every token on all before it, not in windows of --seq_len tokens "
                             "(lm-eval's max_length); not comparable with the harness's published numbers")
    parser.add_argument("--mqar_pairs", type=int, default=0, help="mqar: key-value pairs; 0 = the run's")
    parser.add_argument("--examples", type=int, default=0, help="mqar: examples; 0 = the run's mqar_test_examples")
    parser.add_argument("--contexts", default="1024,2048,4096,8192", help="passkey: context lengths in tokens")
    parser.add_argument("--depths", default="0,25,50,75,100", help="passkey: needle depths in percent")
    parser.add_argument("--trials", type=int, default=5, help="passkey: keys per setting (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="passkey: seed of the keys (default: %(default)s)")
    parser.add_argument("--without_content_shift", action="store_true",
                        help="take CARVE's content shift away first (U = 0 in every CARVE layer, so Delta = 0), "
                             "without training again: what it is worth to the task")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch_size={args.batch_size}: must be at least 1")
    if args.seq_len < 0:
        fail(f"--seq_len={args.seq_len}: must be at least 0 (0: the run's own seq_len)")
    if args.max_tokens < 0:
        fail(f"--max_tokens={args.max_tokens:g}: must be at least 0 (0: every token)")
    if not os.path.isdir(args.out_dir):
        fail(f"run directory {args.out_dir!r} does not exist")

    checkpoint, record = load_newest_checkpoint(args.out_dir, lambda line: print(line, file=sys.stderr), args.step)
    trained_on_mqar = checkpoint["config"].get("task") == "mqar"
    allowed = ("mqar", "gates") if trained_on_mqar else ("lm", "passkey", "harness", "gates")
    if args.task not in allowed:
        fail(f"the checkpoint was trained on {'MQAR' if trained_on_mqar else 'text'}: use --task="
             + (" or ".join(allowed) if trained_on_mqar else ", ".join(allowed[:-1]) + " or " + allowed[-1]))
    if not trained_on_mqar:
        try:
            tokenizer = get_tokenizer(record["tokenizer"])
        except (ValueError, RuntimeError) as e:
            fail(str(e))
    seq_len = args.seq_len or checkpoint["config"]["seq_len"]
    device = device_for(args.device)
    autocast = autocast_for(checkpoint["config"], device)   # the run's precision on this device
    model = LM(ModelConfig.from_dict(record["model_config"]))
    load_weights(model, checkpoint["model"], os.path.join(args.out_dir, record["checkpoint"]))
    model.to(device).eval()
    if args.without_content_shift:
        ups = content_ups(model)
        if not ups:
            fail(f"--without_content_shift: {args.out_dir} has no CARVE layer with a content shift (mixer "
                 f"{model.cfg.mixer!r}; CARVE layers with content_rank > 0 have one)")
        if args.task == "gates":
            fail("--without_content_shift: --task=gates reports the model with and without it already")
        with torch.no_grad():
            for up in ups:
                up.zero_()
        print(f"content shift taken away: U = 0 in {len(ups)} CARVE layers", file=sys.stderr)
    config = checkpoint["config"]
    del checkpoint
    if trained_on_mqar:
        pairs, count = args.mqar_pairs or config["mqar_pairs"], args.examples or config["mqar_test_examples"]
        try:
            inputs, targets = mqar_split(config, "test", count, pairs, seq_len)
        except ValueError as e:
            fail(str(e))
        print(f"{args.task}: {args.out_dir} (step {record['step']}), {count} examples of {seq_len} tokens, {pairs} "
              f"pairs, {device}", file=sys.stderr)
        if args.task == "gates":
            def accuracy():
                right, total = mqar_accuracy(model, inputs, targets, args.batch_size, device, autocast)
                return float(right.sum() / total.sum())
            gates(args, model, config, record, list(inputs), autocast, ("accuracy", accuracy))
            return
        right, total = mqar_accuracy(model, inputs, targets, args.batch_size, device, autocast)
        by_order = [float(r / t) for r, t in zip(right, total)]
        result = {"checkpoint_step": record["step"], "seq_len": seq_len, "mqar_pairs": pairs, "examples": count,
                  "accuracy": float(right.sum() / total.sum()), "accuracy_by_query_order": by_order}
        print(json.dumps(result) if args.json else
              f"mqar: accuracy {right.sum() / total.sum():.4f} ({right.sum():,} of {total.sum():,} queries; seq_len "
              f"{seq_len}, {pairs} pairs)\nby the query's order in its example, first to last: "
              + " ".join(f"{a:.3f}" for a in by_order))
        return
    if args.task == "harness":
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError:
            fail("--task=harness needs lm-evaluation-harness: pip install lm-eval")
        if args.harness_include and not os.path.isdir(args.harness_include):
            fail(f"--harness_include {args.harness_include!r} is not a folder (of task YAML files)")
        tasks, manager = args.harness_tasks.split(","), TaskManager(include_path=args.harness_include or None)
        for task in tasks:   # here rather than as the harness's traceback
            if task not in manager.all_tasks and not os.path.isfile(os.path.expanduser(task)):
                close = difflib.get_close_matches(task, manager.all_tasks, n=3)
                fail(f"--harness_tasks: {task!r} is not a task of lm-eval {lm_eval.__version__}"
                     + (f" (did you mean {', '.join(close)}?)" if close else "")
                     + (f" or of {args.harness_include}" if args.harness_include else ""))
        max_length = None if args.harness_full_context else seq_len
        print(f"harness: {args.out_dir} (step {record['step']}), tasks {args.harness_tasks}, "
              + (f"at most {seq_len} tokens a prediction (the harness's windows), " if max_length else
                 "every token on all before it (no windows), ") + str(device), file=sys.stderr)
        try:
            results = lm_eval.simple_evaluate(
                model=harness_model(model, tokenizer, autocast, max_length), tasks=tasks, num_fewshot=args.num_fewshot,
                limit=args.limit or None, task_manager=manager)
        except OSError as e:   # ConnectionError among them: the harness fetches each task's dataset
            fail(f"--task=harness could not load a dataset ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                 f"lm-eval's tasks download theirs from the Hugging Face Hub: run where it is reachable, or with "
                 f"HF_DATASETS_OFFLINE=1 and the datasets in its cache (a task of your own reads the files its YAML "
                 f"names)")
        if args.json:
            print(json.dumps({"checkpoint_step": record["step"], "max_length": max_length, "results": results["results"]},
                             default=str))
        else:
            print(lm_eval.utils.make_table(results))
        return
    if args.task == "passkey":
        try:
            contexts = [int(c) for c in args.contexts.split(",")]
            depths = [float(d) for d in args.depths.split(",")]
        except ValueError:
            fail(f"--contexts and --depths take numbers separated by commas, got {args.contexts!r}, {args.depths!r}")
        if args.trials < 1:
            fail(f"--trials={args.trials}: must be at least 1")
        if not all(0 <= d <= 100 for d in depths):
            fail(f"--depths={args.depths}: each must be within 0..100 (the share of the filler before the needle)")
        print(f"passkey: {args.out_dir} (step {record['step']}), {args.trials} keys a setting, {device}",
              file=sys.stderr)
        rows = passkey(model, tokenizer, contexts, depths, args.trials, args.seed, autocast,
                       lambda line: print(line, file=sys.stderr))
        if args.json:
            print(json.dumps({"checkpoint_step": record["step"], "trials": args.trials, "accuracy": rows}))
        else:
            accuracy = {(row["context"], row["depth"]): row["accuracy"] for row in rows}
            print("context \\ depth " + " ".join(f"{d:>6g}%" for d in depths))
            for c in contexts:
                print(f"{c:>15} " + " ".join(f"{accuracy[(c, d)]:7.0%}" for d in depths))
        return
    tokens, source = token_stream(args, record, tokenizer)
    if args.task == "gates":
        count = min(len(tokens) // seq_len, max(1, int(args.max_tokens or GATE_TOKENS) // seq_len))
        windows = [np.asarray(tokens[i * seq_len:(i + 1) * seq_len], dtype=np.int64) for i in range(count)]
        if not windows:
            fail(f"{source} holds fewer than seq_len={seq_len} tokens")
        print(f"gates: {args.out_dir} (step {record['step']}) on {count} windows of {seq_len} tokens of {source}",
              file=sys.stderr)
        gates(args, model, config, record, windows, autocast,
              ("loss", lambda: window_loss(model, windows, args.batch_size, autocast)))
        return
    if len(tokens) < 2:
        fail(f"{source} holds {len(tokens)} tokens: nothing to score")
    token_lengths = token_byte_lengths(tokenizer)   # for bits per byte over exactly the scored tokens
    print(f"eval: {args.out_dir} (step {record['step']}) on {source}: {len(tokens) - 1:,} tokens to score in windows "
          f"of {seq_len}, {device}", file=sys.stderr)
    nats, scored, text_bytes = score(model, tokens, seq_len, args.batch_size, device, autocast, token_lengths,
                                     Progress("eval", len(tokens) - 1, "tokens"))
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
