"""
Train a CARVE / GDN-2 / Transformer / hybrid language model.

    python train.py configs/carve_shakespeare.py                      # one process (CPU or one GPU)
    python train.py carve_shakespeare --lr=1e-3 --out_dir=out/carve_lr1e-3   # bare config name, overrides
    torchrun --standalone --nproc_per_node=8 train.py configs/carve_1b3.py

A config file is plain Python that assigns some of the keys in DEFAULTS below; `--key=value`
arguments after it override them (values are Python literals; anything else is a string).
The global batch is `batch_tokens`; gradient accumulation is derived from the world size, so one
process and N processes train on the same batches and give the same loss curve.
A run is resumable exactly: `--init_from=resume` continues from the newest good checkpoint in out_dir
(ckpt_<step>.pt with its record ckpt_<step>.json).
"""
import ast
import difflib
import glob
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from carve_kernel import backend_for, chunk_triton_supports
from model import LM, ModelConfig
from prepare_data import mqar_examples

DEFAULTS = dict(
    # I/O
    out_dir="out/carve_shakespeare",
    data_dir="data/shakespeare_byte",   # train.bin, val.bin, meta.json written by prepare_data.py
    task="lm",                          # 'lm': the token files of data_dir; 'mqar': recall examples made from
    #                                     mqar_seed (prepare_data.mqar_examples), seq_len tokens each
    mqar_pairs=16,                      # MQAR: key-value pairs an example (each queried once)
    mqar_train_examples=100000,         # MQAR: the training set, seen in epochs
    mqar_test_examples=3000,            # MQAR: the evaluation set, drawn apart from the training set
    mqar_power_a=0.01,                  # MQAR: query distances follow a power law of this exponent (Zoology's)
    mqar_seed=0,                        # MQAR: the data's seed (seed is the model's and the order's)
    init_from="scratch",                # 'scratch' or 'resume' (from the newest good checkpoint in out_dir)
    keep_checkpoints=3,                 # checkpoints kept in out_dir (ckpt_<step>.pt), the newest ones
    tokenizer="",                       # if set, must match the data's tokenizer (a guard, not a choice)
    # model: every ModelConfig field (vocab_size 0 = take it from the data's meta.json; doc_start_token
    # is set from the data by reset_at_eot)
    **{**{f.name: f.default for f in fields(ModelConfig) if f.name != "doc_start_token"}, "vocab_size": 0},
    reset_at_eot=False,                 # documents packed in a sequence (each starts with eot) don't see each other
    # batch: batch_tokens is the global batch; accumulation = batch_tokens / (micro_batch_size * seq_len * world)
    seq_len=256,
    micro_batch_size=16,
    batch_tokens=4096,
    # optimiser: AdamW, linear warm-up then cosine from lr to min_lr over lr_decay_steps
    max_steps=1000,
    lr_decay_steps=0,                   # 0 = max_steps; set it to extend a run without changing its schedule
    warmup_steps=100,
    lr=1e-3,
    min_lr=1e-4,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,                      # clip the global gradient norm to this; 0 = no clipping
    max_skipped_steps=10,               # steps skipped for a non-finite loss or gradient before the run stops
    # evaluation, logging, checkpoints (a checkpoint is written at every evaluation and at the end)
    eval_interval=250,
    eval_tokens=65536,                  # validation tokens per evaluation (a fixed set of windows)
    log_interval=10,
    # system
    seed=1337,
    device="auto",                      # 'auto' = cuda if available, else cpu
    dtype="auto",                       # 'auto' = bfloat16 autocast on cuda, float32 on cpu; or 'bfloat16', 'float32'
    compile=False,
    activation_checkpointing=False,     # recompute each block in the backward: less memory, ~1/3 more compute
    peak_tflops=0.0,                    # for MFU; 0 = look it up from the GPU name, unknown -> no MFU
    # wandb (off by default; WANDB_MODE=offline works without a network)
    wandb_log=False,
    wandb_project="carve",
    wandb_run_name="",
)
MODEL_KEYS = [f.name for f in fields(ModelConfig)]
# What a resumed run may change: how long it runs (a note says when the learning-rate schedule moves with
# it), how it evaluates, reports and keeps checkpoints, and where and how it computes the same steps (the
# device and its precision). Every other key says what is trained, on what and how, and must equal the
# checkpoint's (the run's own record of them): data_dir too, since another folder can hold another corpus
# of the same tokenizer (moved data: a link from the old path).
RESUME_MAY_CHANGE = {"init_from", "out_dir", "max_steps", "lr_decay_steps", "eval_interval", "eval_tokens",
                     "mqar_test_examples", "log_interval", "keep_checkpoints", "device", "dtype", "compile",
                     "activation_checkpointing", "micro_batch_size", "max_skipped_steps", "peak_tflops", "wandb_log",
                     "wandb_project", "wandb_run_name"}
DERIVED_KEYS = ("doc_start_token",)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


# ---------------------------------------------------------------------------------------------
# configuration

def resolve_config_path(arg):
    """A path, or a bare name such as carve_1b3 that lives in configs/."""
    candidates = [arg, os.path.join(CONFIG_DIR, arg), os.path.join(CONFIG_DIR, arg + ".py")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
    stem = os.path.splitext(os.path.basename(arg))[0]
    close = difflib.get_close_matches(stem, known, n=1, cutoff=0.6)  # no suggestion beats a far-fetched one
    hint = f" Did you mean configs/{close[0]}.py?" if close else ""
    raise SystemExit(f"error: config file {arg!r} not found.{hint} Available: {', '.join(known)}")


# What a bare `python train.py [--key=value ...]` trains: the small default run. DEFAULTS alone would build
# the 1.3B model (ModelConfig's defaults) on the Shakespeare bytes.
DEFAULT_CONFIG = "carve_shakespeare"

USAGE = f"""usage: python train.py [CONFIG] [--key=value ...]

CONFIG is a config file; a bare name such as carve_1b3 resolves in configs/; without one,
configs/{DEFAULT_CONFIG}.py. --key=value overrides a key after the config (values are Python literals;
anything else is a string). Keys and their defaults, which a config file (also the one applied without
CONFIG) changes:"""


def print_help():
    # The comments beside the keys in DEFAULTS (and beside ModelConfig's fields in model.py, which DEFAULTS
    # takes in one line) are the documentation. Reading them from the source keeps one copy of each, where
    # a parallel table of help texts would drift from the code it describes.
    key_line = re.compile(r"\s*(\w+)\s*(?::[^=]*)?=[^#]*(?:#\s*(.*))?")
    model_comments = {m[1]: m[2] for m in map(key_line.match, inspect.getsource(ModelConfig).splitlines()) if m}
    block = open(__file__).read().split("\nDEFAULTS = dict(\n", 1)[1].split("\n)\n", 1)[0]
    print(USAGE)
    lines = [line.strip() for line in block.splitlines()]
    for previous, line in zip([""] + lines, lines):
        if line.startswith("#  "):  # the key above's comment, continued: under that comment
            print(" " * 42 + line[1:].strip())
            continue
        if line.startswith("#"):  # a group heading, perhaps over several lines
            print(line if previous.startswith("#") else "\n" + line)
            continue
        if line.startswith("**"):  # the ModelConfig fields
            entries = [(key, model_comments.get(key)) for key in MODEL_KEYS if key in DEFAULTS]
        else:
            entries = [key_line.match(line).groups()]
        for key, comment in entries:
            print(f"  {f'--{key}={DEFAULTS[key]!r}':<38}  {comment or ''}".rstrip())


def check_key(key, source):
    if key in DERIVED_KEYS:
        raise SystemExit(f"error: {key!r} in {source} is set from the data; use reset_at_eot=True")
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SystemExit(f"error: unknown config key {key!r} in {source}{hint}")


def check_type(key, value, source):
    expected = type(DEFAULTS[key])
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise SystemExit(f"error: config key {key!r} in {source} must be {expected.__name__}, "
                         f"got {type(value).__name__} {value!r}" + (" (True or False)" if expected is bool else ""))
    return value


# Values the types alone allow but the run cannot use: each the least it may be. Checked here, so that a
# bad one is a line naming the key rather than a ZeroDivisionError or an optimiser's ValueError later.
AT_LEAST = {**dict.fromkeys(("seq_len", "micro_batch_size", "batch_tokens", "max_steps", "eval_interval",
                             "eval_tokens", "log_interval", "keep_checkpoints", "mqar_pairs", "mqar_train_examples",
                             "mqar_test_examples"), 1),
            **dict.fromkeys(("lr", "min_lr", "warmup_steps", "lr_decay_steps", "weight_decay", "grad_clip",
                             "max_skipped_steps", "peak_tflops", "beta1", "beta2"), 0)}


def load_config(argv):
    """DEFAULTS, then one config file (a path or a bare name in configs/; configs/carve_shakespeare.py when
    there is none), then the --key=value overrides, each checked."""
    spaced = [arg for arg in argv if arg.startswith("--") and "=" not in arg]
    if spaced:   # before the config files: the value after it would be taken for one
        raise SystemExit(f"error: expected --key=value, got {spaced[0]!r}")
    if all(arg.startswith("--") for arg in argv):
        argv = [DEFAULT_CONFIG, *argv]
    files = [arg for arg in argv if not arg.startswith("--")]
    paths = [resolve_config_path(arg) for arg in files]   # one not there (or max_steps=3 without --) first
    if len(files) > 1:
        raise SystemExit(f"error: {len(files)} config files ({', '.join(files)}); give one (a config file can run "
                         f"another: configs/gdn2_1b3.py runs carve_1b3.py), then --key=value overrides")
    if argv[0] != files[0]:
        raise SystemExit(f"error: the config file {files[0]!r} comes after {argv[0]!r}, and would undo it: put the "
                         f"config file first, then --key=value overrides")
    config = dict(DEFAULTS)
    path = paths[0]
    namespace = {"__file__": os.path.abspath(path)}
    try:
        exec(compile(open(path).read(), path, "exec"), namespace)
    except Exception as e:   # a config file is Python: its own error, in one line that names it
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)]
        where = ((e.filename, e.lineno) if isinstance(e, SyntaxError) else
                 ([f for f in frames if f[0] == path] or frames)[-1])
        message = (str(getattr(e, "msg", None) or e).splitlines() or [""])[0]
        raise SystemExit(f"error: config file {path} failed: {type(e).__name__}: {message} "
                         f"({where[0]}, line {where[1]})")
    for key, value in namespace.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        check_key(key, path)
        config[key] = check_type(key, value, path)
    for arg in argv[1:]:   # the overrides, after the file
        key, _, text = arg[2:].partition("=")
        check_key(key, "the command line")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as --mixer=carve
        if isinstance(DEFAULTS[key], str) and not isinstance(value, str):
            value = text  # --tokenizer=gpt2 style values that happen to parse as literals
        config[key] = check_type(key, value, "the command line")
    try:  # the model's own checks (mixer names, gate activation), as one line
        ModelConfig.from_dict(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    for key, least in AT_LEAST.items():
        if config[key] < least:
            raise SystemExit(f"error: {key}={config[key]!r}: must be at least {least}")
    if not config["beta1"] < 1 or not config["beta2"] < 1:
        raise SystemExit(f"error: beta1={config['beta1']!r}, beta2={config['beta2']!r}: each must be below 1")
    if config["min_lr"] > config["lr"]:
        raise SystemExit(f"error: min_lr={config['min_lr']!r} is above lr={config['lr']!r}: the schedule decays from lr "
                         f"to min_lr (min_lr=0 decays to nothing)")
    if not config["out_dir"]:
        raise SystemExit("error: out_dir is empty: name the folder for the run's checkpoints and log")
    # float16 would need loss scaling, which this loop does not do; bfloat16 has float32's range
    if config["dtype"] not in ("auto", "bfloat16", "float32"):
        raise SystemExit(f"error: dtype={config['dtype']!r}: expected 'auto' (bfloat16 autocast on a GPU, float32 "
                         f"on a CPU), 'bfloat16' or 'float32'")
    return config


# ---------------------------------------------------------------------------------------------
# data

def read_data_meta(data_dir):
    """data_dir/meta.json of prepare_data.py, checked: a missing or mangled file is one line naming it."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        how = ("python prepare_data.py --source /tmp/kjv.txt shakespeare (README, 'Offline machines')"
               if "kjv" in os.path.basename(os.path.normpath(data_dir)) else "python prepare_data.py")
        raise SystemExit(f"error: {meta_path} not found (data_dir={data_dir!r}). Prepare data first, e.g.: {how}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {meta_path} is not valid JSON ({e}); re-run prepare_data.py for {data_dir!r}")
    missing = [key for key in ("tokenizer", "vocab_size", "dtype", "val") if key not in meta]
    if missing or not isinstance(meta.get("vocab_size"), int) or meta.get("dtype") not in ("uint16", "uint32"):
        raise SystemExit(f"error: {meta_path} lacks or mangles {', '.join(missing) or 'vocab_size or dtype'} "
                         f"(expected prepare_data.py's keys: tokenizer, vocab_size, dtype uint16/uint32, val); "
                         f"re-run prepare_data.py for {data_dir!r}")
    if meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1:
        raise SystemExit(f"error: {meta_path} says vocab_size {meta['vocab_size']} in {meta['dtype']} "
                         f"tokens, which cannot hold it; re-run prepare_data.py for {data_dir!r}")
    return meta


def token_file(data_dir, split, meta):
    """(data_dir/<split>.bin as a read-only memmap, its path), checked to hold whole tokens of meta's dtype."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; re-run prepare_data.py for {data_dir!r}")
    dtype = np.dtype(meta["dtype"])
    if os.path.getsize(path) % dtype.itemsize:
        raise SystemExit(f"error: {path} is not a whole number of {dtype} tokens "
                         f"(meta.json says dtype {meta['dtype']!r}); re-run prepare_data.py")
    return np.memmap(path, dtype=dtype, mode="r"), path


def check_token_ids(top, meta, path):
    """The largest token id read (top) must be below the data's vocab_size: a bad file (random bytes, another
    tokenizer's tokens) would otherwise index past the embedding."""
    if top >= meta["vocab_size"]:
        raise SystemExit(f"error: {path} holds token id {top}, not below the vocab_size "
                         f"{meta['vocab_size']} of its meta.json: the file is damaged or from another "
                         f"tokenizer; re-run prepare_data.py")


def largest_token_id(tokens):
    """The largest id in a token file, read in chunks (the file may not fit in memory); -1 if it is empty."""
    return max((int(np.max(tokens[i:i + (1 << 24)])) for i in range(0, len(tokens), 1 << 24)), default=-1)


class TokenData:
    """Flat token files from prepare_data.py. Training sequence i of the run (counted over the
    whole run, so it is the data position) is read from a window chosen by a per-epoch affine
    permutation of the file's windows: every window once per epoch, no state to save but i.
    Token ids are checked against the vocabulary: val.bin whole at the start, train.bin batch by batch
    (a scan of 100B tokens would hold up the start)."""

    def __init__(self, data_dir, seq_len, seed):
        self.meta = read_data_meta(data_dir)
        self.seq_len, self.seed = seq_len, seed
        self.paths = {}
        self.splits = {}
        for split in ("train", "val"):
            tokens, path = token_file(data_dir, split, self.meta)
            if len(tokens) < 2 * seq_len + 2:
                raise SystemExit(f"error: {path} holds {len(tokens)} tokens, too few for seq_len={seq_len}")
            self.splits[split], self.paths[split] = tokens, path
        # val.bin is read whole at every evaluation: check it now rather than at the first evaluation
        check_token_ids(largest_token_id(self.splits["val"]), self.meta, self.paths["val"])
        self.n_windows = (len(self.splits["train"]) - 1) // seq_len - 1

    def _window(self, tokens, start):
        chunk = torch.from_numpy(tokens[start:start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def train_window_start(self, i):
        epoch, j = divmod(i, self.n_windows)
        rng = np.random.default_rng([self.seed, epoch])
        while True:  # a multiplier coprime to n_windows makes j -> a*j+b mod n a permutation
            a = int(rng.integers(1, max(2, self.n_windows)))
            if math.gcd(a, self.n_windows) == 1:
                break
        b, shift = int(rng.integers(0, self.n_windows)), int(rng.integers(0, self.seq_len))
        return ((a * j + b) % self.n_windows) * self.seq_len + shift

    def train_batch(self, first, count):
        """Training sequences first .. first+count-1 as (x, y) [count, seq_len] int64."""
        pairs = [self._window(self.splits["train"], self.train_window_start(i)) for i in range(first, first + count)]
        x, y = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
        check_token_ids(int(max(x.max(), y.max())), self.meta, self.paths["train"])
        return x, y

    def val_windows(self, n):
        """n fixed, evenly spaced validation windows (the same at every evaluation)."""
        tokens = self.splits["val"]
        n = min(n, (len(tokens) - 1) // self.seq_len)
        starts = np.linspace(0, len(tokens) - self.seq_len - 1, n).astype(np.int64)
        return [self._window(tokens, int(s)) for s in starts]


MQAR_VOCAB = 8192   # vocab_size 0 with task='mqar': Zoology's vocabulary


def mqar_split(config, split, count=None, pairs=None, seq_len=None):
    """(inputs, targets) of a run's MQAR 'train' or 'test' set: streams 0 and 1 of its mqar_seed, so the two
    never share a draw; count, pairs and seq_len default to the run's (eval.py asks for other settings)."""
    count = count or config[f"mqar_{split}_examples"]
    return mqar_examples(count, seq_len or config["seq_len"], pairs or config["mqar_pairs"],
                         config["vocab_size"] or MQAR_VOCAB, [config["mqar_seed"], ("train", "test").index(split)],
                         config["mqar_power_a"])


class MQARData:
    """MQAR examples (prepare_data.mqar_examples) in TokenData's interface: training sequence i is
    example i of a per-epoch shuffle of the training set; the evaluation windows are the test set.
    Only the value after each query is a target (the others are -1), so the loss and the accuracy are
    over the recalls."""

    def __init__(self, config):
        self.meta = {"tokenizer": "mqar", "vocab_size": config["vocab_size"] or MQAR_VOCAB, "eot": None, "val": None}
        self.seed = config["seed"]
        try:
            self.train, self.test = mqar_split(config, "train"), mqar_split(config, "test")
        except ValueError as e:
            raise SystemExit(f"error: task='mqar': {e}")
        self.order_epoch, self.order = -1, None

    def train_batch(self, first, count):
        rows = []
        for i in range(first, first + count):
            epoch, j = divmod(i, len(self.train[0]))
            if epoch != self.order_epoch:
                self.order_epoch = epoch
                self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train[0]))
            rows.append(self.order[j])
        return torch.from_numpy(self.train[0][rows]), torch.from_numpy(self.train[1][rows])

    def val_windows(self, n):
        """The whole test set, whatever n: accuracy is over all of it."""
        return [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in zip(*self.test)]


def config_conflicts(trained, config):
    """{key: (the value a run trained with, the value in config)} of the keys a resume may not change
    (all but RESUME_MAY_CHANGE; a key added since the run counts at its default, one this code lacks, a
    fork's, as 'absent here'). The keys the data decides count only where config sets them: not a
    vocab_size of 0 or an empty tokenizer (a config not yet matched to the data), nor doc_start_token
    (reset_at_eot's, compared itself)."""
    unknown = {k: (trained[k], "absent here") for k in trained.keys() - DEFAULTS.keys() - set(DERIVED_KEYS)}
    trained = {**DEFAULTS, **trained}
    unset = {"doc_start_token"} | {k for k in ("vocab_size", "tokenizer") if not config[k]}
    return {**unknown, **{k: (trained.get(k), v) for k, v in config.items()
                          if k not in RESUME_MAY_CHANGE | unset and trained.get(k) != v}}


def match_config_to_data(config, data, resumed_config=None):
    """Checks the config (and the config of the run it resumes) against the data, and fills in what the data
    decides: tokenizer, vocab_size (0: the data's), doc_start_token (eot with reset_at_eot, else -1)."""
    meta = data.meta
    if config["tokenizer"] and config["tokenizer"] != meta["tokenizer"]:
        raise SystemExit(f"error: tokenizer={config['tokenizer']!r} but {config['data_dir']}/meta.json says the data "
                         f"was tokenised with {meta['tokenizer']!r}; re-run prepare_data.py --tokenizer "
                         f"{config['tokenizer']} or change data_dir")
    if config["vocab_size"] == 0:
        config["vocab_size"] = meta["vocab_size"]
    if config["vocab_size"] < meta["vocab_size"]:
        raise SystemExit(f"error: vocab_size={config['vocab_size']} is smaller than the data's vocabulary "
                         f"({meta['vocab_size']}, tokenizer {meta['tokenizer']!r} in {config['data_dir']}/meta.json)")
    config["doc_start_token"] = -1
    if config["reset_at_eot"]:
        if meta.get("eot") is None:
            raise SystemExit(f"error: reset_at_eot=True, but the data in {config['data_dir']} has no eot token "
                             f"(tokenizer {meta['tokenizer']!r}); documents cannot be told apart")
        config["doc_start_token"] = meta["eot"]
    if resumed_config and resumed_config["tokenizer"] != meta["tokenizer"]:
        raise SystemExit(f"error: the checkpoint was trained on tokenizer {resumed_config['tokenizer']!r}, "
                         f"but {config['data_dir']} holds {meta['tokenizer']!r} tokens")
    config["tokenizer"] = meta["tokenizer"]


def load_data(config, resumed_config=None):
    """The run's data, token files (task 'lm') or recall examples ('mqar'), matched to the config
    (match_config_to_data)."""
    if config["task"] not in ("lm", "mqar"):
        raise SystemExit(f"error: task={config['task']!r}: expected 'lm' (token files) or 'mqar' (recall examples)")
    if config["task"] == "lm":
        data = TokenData(config["data_dir"], config["seq_len"], config["seed"])
    else:
        data = MQARData(config)
    match_config_to_data(config, data, resumed_config)
    return data


# ---------------------------------------------------------------------------------------------
# checkpoints

def keep_log_until(log_path, step):
    """Keeps the lines of a run's log.jsonl up to `step`, where it starts: a run killed after its newest
    checkpoint (or before its first) logged steps that it trains again, which would be in the log twice."""
    if not os.path.isfile(log_path):
        return

    def logged_step(line):   # None for a line torn by a kill (unfinished, or not JSON)
        try:
            return json.loads(line)["step"] if line.endswith("\n") else None
        except (ValueError, KeyError, TypeError):
            return None
    with open(log_path) as f:
        lines = [line for line in f if 0 < (logged_step(line) or 0) <= step]   # none for a fresh run

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    atomic_write(log_path, write)


def atomic_write(path, write):
    """write(tmp_path), flushed to disk, then renamed over path: a crash at any moment (kill -9, power)
    leaves either the old file or the new one, never a part of either."""
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself on disk
    finally:
        os.close(directory)


def write_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def non_finite_tensors(state, prefix=""):
    """Names of the floating-point tensors in a nested dict/list that hold NaN or Inf."""
    if torch.is_tensor(state):
        return [prefix] if state.is_floating_point() and not torch.isfinite(state).all() else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    return [name for key, value in items for name in non_finite_tensors(value, f"{prefix}.{key}".strip("."))]


def save_checkpoint(config, model, optimizer, step, data_position, wandb_run_id, last_eval, log):
    """out_dir/ckpt_<step>.pt, then its record ckpt_<step>.json (sha256 of the .pt, step, val loss, model
    config) and a copy of that record as out_dir/meta.json; then the oldest beyond keep_checkpoints go.
    The record is written after the checkpoint, so a checkpoint without one was never finished. Weights
    or optimiser state that are not finite are never written: the run stops, the last good checkpoint stays."""
    out_dir = config["out_dir"]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "data_position": data_position, "config": config, "model_config": {k: config[k] for k in MODEL_KEYS},
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
             "wandb_run_id": wandb_run_id}
    bad = non_finite_tensors({"model": state["model"], "optimizer": state["optimizer"]})
    if bad:
        kept = checkpoint_records(out_dir)
        raise SystemExit(f"error: at step {step} {len(bad)} tensors are not finite (first: {bad[0]}); no checkpoint "
                         f"written, the newest one stays ({kept[0] if kept else 'none yet'})")
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    record = {"checkpoint": os.path.basename(path), "sha256": sha256_of(path), "model_config": state["model_config"],
              "tokenizer": config["tokenizer"], "data_dir": config["data_dir"], "step": step,
              "tokens_seen": step * config["batch_tokens"], "data_position": data_position,
              "val_loss": last_eval.get("val_loss"), "val_bpb": last_eval.get("val_bpb"), "task": config["task"],
              **{key: value for key, value in last_eval.items() if key.startswith("val_acc")}, "config": config,
              "num_params": model.num_params(), "torch_version": torch.__version__,
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(record, path[:-3] + ".json")
    write_json(record, os.path.join(out_dir, "meta.json"))
    for old in checkpoint_records(out_dir)[config["keep_checkpoints"]:]:
        for stale in (old[:-5] + ".pt", old):   # the checkpoint first: a record never points at nothing
            if os.path.exists(stale):
                os.remove(stale)
    log(f"checkpoint: {path}")


def checkpoint_records(out_dir):
    """The records ckpt_<step>.json in out_dir, newest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.json")), reverse=True)


def _unwrapped(name):
    """A parameter's name without the prefixes of the wrappers it was saved through, nested in any order
    (train.py's own nesting, DDP around torch.compile, gives `module._orig_mod.`)."""
    while name.startswith(("_orig_mod.", "module.")):
        name = name.split(".", 1)[1]
    return name


def load_weights(model, state_dict, source):
    """model.load_state_dict(state_dict), or SystemExit with one line saying what does not fit: a checkpoint
    from another version of model.py, whose parameters had other names or shapes. Names saved through a
    torch.compile or DDP wrapper (`_orig_mod.`, `module.`) load as the plain model's."""
    hint = "it was saved by another version of model.py (git log -- model.py shows when parameters changed)"
    state_dict = {_unwrapped(name): t for name, t in state_dict.items()}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:   # a shape differs; torch's message gives each on a line of its own
        raise SystemExit(f"error: {source} does not fit this model.py: {str(e).splitlines()[1].strip().rstrip('.')}; "
                         f"{hint}")
    if missing or unexpected:
        found = [f"it {what} (first: {names[0]})" for names, what in
                 ((missing, f"lacks {len(missing)} of this model's tensors"),
                  (unexpected, f"holds {len(unexpected)} this model does not have")) if names]
        raise SystemExit(f"error: {source} does not fit this model.py: {', '.join(found)}; {hint}")


def load_newest_checkpoint(out_dir, log=print, step=None):
    """(checkpoint, record) of the newest checkpoint in out_dir whose file matches the sha256 in its record
    and loads; each newer one that does not is reported in one line. SystemExit if none is good. With
    `step`, the checkpoint of that step only."""
    records, problems = checkpoint_records(out_dir), []
    if not records:
        raise SystemExit(f"error: no checkpoint in {out_dir} (train.py writes ckpt_<step>.pt and its record "
                         f"ckpt_<step>.json there)")
    if step is not None:
        wanted = os.path.join(out_dir, f"ckpt_{step:08d}.json")
        if wanted not in records:
            steps = ", ".join(str(int(os.path.basename(r)[5:-5])) for r in reversed(records))
            raise SystemExit(f"error: no checkpoint of step {step} in {out_dir}; it has steps {steps} (train.py "
                             f"keeps the newest keep_checkpoints)")
        records = [wanted]
    for record_path in records:
        try:
            with open(record_path) as f:
                record = json.load(f)
            path = os.path.join(out_dir, record["checkpoint"])
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing")
            if sha256_of(path) != record["sha256"]:
                raise ValueError(f"{path} is corrupt (its sha256 differs from the one in {record_path})")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # CPU first: no GPU OOM
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            problems.append(problem if out_dir in problem else f"{record_path}: {problem}")
            log(f"warning: {problems[-1]}; trying an older checkpoint")
            continue
        if problems:
            log(f"using {path} (step {record['step']}), the newest good checkpoint")
        unknown = sorted(set(record["model_config"]) - set(MODEL_KEYS))
        if unknown:
            raise SystemExit(f"error: {path} was trained with model keys this model.py does not have "
                             f"({', '.join(unknown)}): other code made it (another version or a fork); use that code")
        missing = {f.name: f.default for f in fields(ModelConfig) if f.name not in record["model_config"]}
        if missing:   # a key added to ModelConfig after the run: its default is the model as the run knew it
            log(f"note: {path} predates the model keys " + ", ".join(f"{k} (taken as {v!r})" for k, v in missing.items()))
            for config in (record["model_config"], checkpoint["model_config"], checkpoint["config"]):
                config.update(missing)
        return checkpoint, record
    raise SystemExit(f"error: no good checkpoint in {out_dir}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# training

def decay_steps(config):
    """The steps the learning rate decays over: lr_decay_steps, or the whole run (0)."""
    return config["lr_decay_steps"] or config["max_steps"]


def lr_at(step, config):
    if step < config["warmup_steps"]:
        return config["lr"] * (step + 1) / config["warmup_steps"]
    progress = min(1.0, (step - config["warmup_steps"]) / max(1, decay_steps(config) - config["warmup_steps"]))
    return config["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (config["lr"] - config["min_lr"])


def peak_flops(config, device):
    if config["peak_tflops"]:
        return config["peak_tflops"] * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H100", 989), ("H200", 989), ("H800", 989), ("A100", 312)):
            if key in name:
                return tflops * 1e12  # dense bf16 tensor-core peak from the data sheet
    return None


def initial_model(config):
    """The run's model before its first step, drawn on the CPU right after torch.manual_seed(seed): eval.py
    rebuilds it to tell how far a trained model moved from its start."""
    torch.manual_seed(config["seed"])
    return LM(ModelConfig.from_dict(config))


def device_for(name, local_rank=0):
    """The torch.device for a --device value: 'auto' is this rank's GPU if torch sees one, else the CPU; a bare
    'cuda' is this rank's GPU (torch.cuda.set_device needs an index). Made current on CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device={name} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device={name}, but this torch ({torch.__version__}) sees no CUDA GPU: "
                             f"use --device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device={name} is cuda:{device.index}, but this machine has "
                             f"{torch.cuda.device_count()} GPUs (under torchrun: --nproc_per_node at most that)")
        torch.cuda.set_device(device)
    return device


def autocast_for(config, device):
    """bf16 autocast for dtype 'bfloat16', or 'auto' on a GPU; none (fp32) otherwise."""
    use_bf16 = config["dtype"] == "bfloat16" or (config["dtype"] == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def accumulate_gradients(model, micro_batches, accum, autocast, ddp, sparse_targets=False):
    """Forward and backward of a step's `accum` micro-batches (x, y), each loss divided by accum; returns
    their summed loss. Under DDP the gradients are all-reduced with the last micro-batch only.
    sparse_targets: the loss over the scored positions alone (LM.forward)."""
    loss_sum = 0.0
    for micro, (x, y) in enumerate(micro_batches):
        sync = nullcontext() if (not ddp or micro == accum - 1) else model.no_sync()
        with sync:  # no_sync must cover the forward too, or DDP syncs anyway
            with autocast:
                _, loss = model(x, y, sparse_targets=sparse_targets)
            (loss / accum).backward()
        loss_sum = loss_sum + loss.detach()
    return loss_sum


def apply_update(model, optimizer, loss_sum, grad_clip, ddp):
    """Clips the gradients and steps the optimiser, unless the loss or the gradient norm is not finite
    on some rank; returns (grad_norm, whether the update was applied). The gradients are the same on
    every rank after DDP's all-reduce, so is their norm; the loss is not. One host sync a step: the
    price of never applying a NaN update."""
    # grad_clip 0 is no clipping, as in nanoGPT (clip_grad_norm_ with max_norm 0 would zero every gradient)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied


@torch.no_grad()
def evaluate(model, data, config, rank, world, device, autocast):
    """Mean validation loss (nats per target) over a fixed window set, summed over ranks; bits per byte
    for text, the fraction of targets predicted exactly (argmax) for a task with scored positions (MQAR),
    also on each example's first and last scored position alone (whether recall holds for the later
    queries, as eval.py --task=mqar's accuracy by query order shows in full)."""
    model.eval()
    windows = data.val_windows(max(1, config["eval_tokens"] // config["seq_len"]))[rank::world]
    scored = config["task"] != "lm"
    # one tensor, so that a single all_reduce sums them over the ranks
    names = ("loss", "targets", "right", "first_queries", "right_first", "last_queries", "right_last")
    total = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i in range(0, len(windows), config["micro_batch_size"]):
        x = torch.stack([w[0] for w in windows[i:i + config["micro_batch_size"]]]).to(device)
        y = torch.stack([w[1] for w in windows[i:i + config["micro_batch_size"]]]).to(device)
        scored_at = y >= 0
        with autocast:
            if scored:   # one forward gives both the loss and the predictions
                logits = model(x)[0]
                loss_sum = F.cross_entropy(logits[scored_at].float(), y[scored_at], reduction="sum")
                right = logits.argmax(-1) == y
            else:
                loss_sum = model(x, y)[1] * scored_at.sum()
                right = torch.zeros_like(scored_at)
        order = scored_at.cumsum(dim=1)
        first, last = scored_at & (order == 1), scored_at & (order == order[:, -1:])
        counts = [scored_at.sum(), right.sum(), first.sum(), (right & first).sum(), last.sum(), (right & last).sum()]
        total += torch.stack([loss_sum.double(), *(c.double() for c in counts)]).to(device)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    sums = dict(zip(names, total.tolist()))
    val_loss = sums["loss"] / sums["targets"]
    if scored:
        return {"val_loss": val_loss, "val_acc": sums["right"] / sums["targets"],
                "val_acc_first_query": sums["right_first"] / sums["first_queries"],
                "val_acc_last_query": sums["right_last"] / sums["last_queries"]}
    val_meta = data.meta["val"]
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) * val_meta["tokens"] / val_meta["bytes"]}


def main(argv):
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    config = load_config(argv)
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = device_for(config["device"], int(os.environ.get("LOCAL_RANK", 0)))
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)

    tokens_per_micro = config["micro_batch_size"] * config["seq_len"]
    if config["batch_tokens"] % (tokens_per_micro * world):
        fits = [m for m in range(config["micro_batch_size"], 0, -1)
                if config["batch_tokens"] % (m * config["seq_len"] * world) == 0][:4]
        hint = (f"; --micro_batch_size={' or '.join(map(str, fits))} fits" if fits else
                "; no micro_batch_size fits: change batch_tokens or seq_len")
        raise SystemExit(f"error: batch_tokens={config['batch_tokens']} must be a multiple of micro_batch_size * "
                         f"seq_len * world_size = {config['micro_batch_size']} * {config['seq_len']} * {world}{hint}")
    accum = config["batch_tokens"] // (tokens_per_micro * world)
    if config["init_from"] not in ("scratch", "resume"):
        raise SystemExit(f"error: init_from must be 'scratch' or 'resume', got {config['init_from']!r}")
    checkpoint = None
    if config["init_from"] == "resume":
        checkpoint, _ = load_newest_checkpoint(config["out_dir"], log)
    elif checkpoint_records(config["out_dir"]):
        raise SystemExit(f"error: {config['out_dir']} already holds checkpoints; pass --init_from=resume to continue "
                         f"that run, or choose another --out_dir (nothing was overwritten)")

    data = load_data(config, checkpoint and checkpoint["config"])
    if checkpoint is not None:
        old = checkpoint["config"]
        changed = config_conflicts(old, config)
        if changed:
            raise SystemExit(f"error: --init_from=resume continues the run in {config['out_dir']} as it was trained, "
                             f"but " + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
                             + f"; pass its values (its config is in {config['out_dir']}/meta.json) or train into "
                             f"another --out_dir")
        if decay_steps(old) != decay_steps(config):
            at = checkpoint["step"]
            log(f"note: the learning-rate schedule changes: it decays over {decay_steps(config)} steps, not "
                f"{decay_steps(old)} (lr at step {at}: {lr_at(at, old):.2e} -> {lr_at(at, config):.2e}); "
                f"--lr_decay_steps={decay_steps(old)} keeps it")

    chunk_kernels_fit = chunk_triton_supports(config["head_k_dim"], config["head_v_dim"], config["chunk_size"])
    if device.type == "cuda" and not chunk_kernels_fit:
        log(f"note: head_k_dim={config['head_k_dim']}, head_v_dim={config['head_v_dim']}, chunk_size="
            f"{config['chunk_size']}: the Triton chunk kernels take head dims 16, 32, 64 or 128 and chunk sizes that "
            f"are multiples of 16; this run takes the much slower torch path")
    model = initial_model(config).to(device)
    model.activation_checkpointing = config["activation_checkpointing"]
    optimizer = torch.optim.AdamW(model.optim_groups(config["weight_decay"]), lr=config["lr"],
                                  betas=(config["beta1"], config["beta2"]), fused=device.type == "cuda")
    step, data_position, wandb_run_id = 0, 0, None
    if checkpoint is not None:
        load_weights(model, checkpoint["model"], f"the checkpoint of step {checkpoint['step']} in {config['out_dir']}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, data_position, wandb_run_id = checkpoint["step"], checkpoint["data_position"], checkpoint["wandb_run_id"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        del checkpoint
    if step >= config["max_steps"]:
        log(f"nothing to train: the run in {config['out_dir']} is at step {step} of max_steps={config['max_steps']}; "
            f"a larger --max_steps extends it")
        if ddp:
            dist.destroy_process_group()
        return
    raw_model = model
    if config["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_for(config, device)

    os.makedirs(config["out_dir"], exist_ok=True)
    if master and config["wandb_log"]:
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: wandb_log=True but wandb is not installed: pip install wandb")
        run = wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or None,
                         id=wandb_run_id, resume="allow", config=config)
        wandb_run_id = run.id
    flops_per_token = raw_model.flops_per_token(config["seq_len"])
    peak = peak_flops(config, device)
    backend = backend_for(raw_model.embed.weight)
    kernels = f"{backend} kernels" + (", the chunk in torch" if backend == "triton" and not chunk_kernels_fit else "")
    log(f"model: {raw_model.num_params():,} parameters in the blocks ({config['mixer']}), "
        f"{raw_model.num_params(False):,} in all | device {device} ({kernels}) | "
        f"world {world} | grad accumulation {accum} | "
        f"{'resuming at step ' + str(step) if step else 'from scratch'}")

    stop_requested, stop_signal = False, signal.SIGTERM   # SIGTERM: another rank's signal stopped this one

    def request_stop(signum, frame):
        nonlocal stop_requested, stop_signal
        stop_requested, stop_signal = True, signum  # finish the step in flight, checkpoint, exit: nothing is lost
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    last_eval = {}
    log_path = os.path.join(config["out_dir"], "log.jsonl")
    if master:
        keep_log_until(log_path, step)

    def publish(metrics, at_step=None):
        """On the master rank: one line of out_dir/log.jsonl for this step (or at_step), and wandb if it is on."""
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": at_step or step, **metrics}) + "\n")
            if config["wandb_log"]:
                wandb.log(metrics, step=at_step or step)
    t_last, tokens_since, skipped, stop = time.time(), 0, 0, False
    seqs_per_micro = config["micro_batch_size"]
    while step < config["max_steps"]:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        def micro_batches():
            for micro in range(accum):
                # the step's sequences data_position .. +batch_tokens/seq_len are dealt out micro-major, rank-minor
                first = data_position + (micro * world + rank) * seqs_per_micro
                x, y = data.train_batch(first, seqs_per_micro)
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss_sum = accumulate_gradients(model, micro_batches(), accum, autocast, ddp,
                                        sparse_targets=config["task"] != "lm")
        grad_norm, applied = apply_update(model, optimizer, loss_sum, config["grad_clip"], ddp)
        if not applied:
            skipped += 1
            log(f"step {step + 1}: non-finite {'loss' if not torch.isfinite(loss_sum) else 'gradient'}, "
                f"update skipped ({skipped} of at most max_skipped_steps={config['max_skipped_steps']})")
            publish({"skipped_steps": skipped}, at_step=step + 1)   # the step it skipped, as the line above says
            if skipped > config["max_skipped_steps"]:
                kept = checkpoint_records(config["out_dir"])
                raise SystemExit(f"error: {skipped} steps had a non-finite loss or gradient (max_skipped_steps="
                                 f"{config['max_skipped_steps']}); stopped at step {step + 1}. "
                                 + (f"The newest checkpoint, {kept[0][:-5]}.pt, is from before; " if kept else
                                    "No checkpoint was written; ")
                                 + "try a lower lr or a longer warm-up")
        step += 1
        data_position += config["batch_tokens"] // config["seq_len"]
        tokens_since += config["batch_tokens"]

        # read once a step: a signal that lands later in the step counts at the next one, or under DDP one rank
        # would evaluate while another went on to the next step's all-reduce
        stop = stop_requested
        if ddp:  # every rank must agree to stop at the same step
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if step % config["log_interval"] == 0 or step == config["max_steps"] or stop:
            if ddp:
                dist.all_reduce(loss_sum)  # gloo has no AVG
            train_loss = loss_sum.item() / (accum * world)
            elapsed = time.time() - t_last
            tokens_per_s = tokens_since / elapsed
            mfu = flops_per_token * tokens_per_s / (peak * world) if peak else None
            log(f"step {step}/{config['max_steps']} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm "
                f"{grad_norm.item():.3f} | {tokens_per_s:,.0f} tok/s | mfu {f'{mfu:.1%}' if mfu else '-'}")
            publish({"loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                     "tokens_per_s": tokens_per_s, "mfu": mfu})
            t_last, tokens_since = time.time(), 0
        if step % config["eval_interval"] == 0 or step == config["max_steps"] or stop:
            last_eval = evaluate(model, data, config, rank, world, device, autocast)
            second = (f"val acc {last_eval['val_acc']:.4f} (first query {last_eval['val_acc_first_query']:.3f}, last "
                      f"{last_eval['val_acc_last_query']:.3f})" if "val_acc" in last_eval else
                      f"val bpb {last_eval['val_bpb']:.4f}")
            log(f"step {step} | val loss {last_eval['val_loss']:.4f} | {second}")
            publish(last_eval)
            if master:
                save_checkpoint(config, raw_model, optimizer, step, data_position, wandb_run_id, last_eval, log)
            t_last, tokens_since = time.time(), 0  # evaluation is not training: count from here
        if stop:
            log(f"stopped at step {step}; checkpoint in {config['out_dir']}; continue with --init_from=resume")
            break
    if master and config["wandb_log"]:
        wandb.finish()
    if ddp:
        dist.barrier()  # rank 0 may still be writing the checkpoint: leave the group together
        dist.destroy_process_group()
    if stop:   # a shell's exit status for a signal (130, 143): a script can tell a stop from the end
        raise SystemExit(128 + stop_signal)


def out_of_memory_error(e):
    """One line for a run that ran out of GPU memory: torch's own numbers (what it asked for, what was free),
    without its per-process list, and what would work. The newest checkpoint is untouched."""
    sizes = [s for s in str(e).split(". ") if s.startswith(("Tried to allocate", "GPU "))]
    return (f"error: out of GPU memory ({'; '.join(sizes) or str(e).splitlines()[0]}); lower --micro_batch_size "
            f"(gradient accumulation keeps batch_tokens, the batch of a step), set --activation_checkpointing=True, "
            f"or run fewer jobs on this GPU; --init_from=resume continues from the newest checkpoint")


if __name__ == "__main__":
    status = 0
    try:
        try:
            main(sys.argv[1:])
        except torch.OutOfMemoryError as e:  # each rank's own GPU: every rank that meets it says so
            print(out_of_memory_error(e), file=sys.stderr)
            raise SystemExit(1) from None
    except SystemExit as e:
        if "RANK" not in os.environ:
            raise
        if isinstance(e.code, str):   # under torchrun every rank meets the same error: rank 0 says it, once
            if int(os.environ["RANK"]) == 0:
                print(e.code, file=sys.stderr)
            status = 1
        else:
            status = e.code or 0     # 130 or 143 after a signal, on every rank
    if "RANK" in os.environ:
        # Under torchrun on CPU (gloo), a rank sometimes aborts in the interpreter's teardown after all
        # work is done ("terminate called without an active exception": about 1 suite run in 4 here),
        # which torchrun reports as a failed run. Everything is written and the group is destroyed,
        # so leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
