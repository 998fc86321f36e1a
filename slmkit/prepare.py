"""Prepare: read documents, train or reuse a tokenizer, and tokenize them once into a DATA_DIR.

``prepare`` writes the data directory that ``slmkit.data`` reads (its layout is described there),
building it in a hidden sibling folder that replaces ``out_dir`` only when complete.

Input formats:

* ``.txt``: documents separated by lines that are exactly ``<|endoftext|>`` (surrounding
  whitespace on that line is ignored); a file without such lines is one document. Line endings
  are normalised to ``\\n`` and each document is stripped of leading/trailing whitespace.
* ``.jsonl``: one JSON object per line with a ``"text"`` string, taken verbatim.
* a directory: all ``.txt``/``.jsonl`` files below it, recursively, in sorted order.
* ``hf:OWNER/NAME`` (or ``hf:OWNER/NAME/path/in/repo.txt``): a Hugging Face dataset repo's
  ``.txt``/``.jsonl`` files, downloaded into the Hugging Face cache.

Empty (whitespace-only) documents are skipped everywhere.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import socket
import warnings
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from slmkit import __version__
from slmkit.data import DATA_META, SPLITS, token_dtype
from slmkit.errors import SlmError
from slmkit.files import atomic_dir, sha256_file

EOT_LINE = b"<|endoftext|>"
TEXT_EXTS = (".txt", ".jsonl")
# Repos whose file listing holds much more than text (archives, parquet): fetch just these.
HF_KNOWN_FILES = {"roneneldan/TinyStories": ["TinyStories-train.txt", "TinyStories-valid.txt"]}


# --- reading documents --------------------------------------------------------------------------


def _not_utf8(path: Path, data: bytes, offset: int, pos: int) -> SlmError:
    return SlmError(
        f"{path} is not UTF-8 (byte 0x{data[pos]:02x} at byte offset {offset + pos}): "
        f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}"
    )


def _read_txt(path: Path) -> Iterator[str]:
    # Binary lines keep exact byte offsets for error messages and avoid decoding separator lines.
    lines: list[bytes] = []
    start = offset = 0

    def finish() -> str:
        data = b"".join(lines)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, data, start, e.start) from None
        if start == 0:
            text = text.removeprefix("\ufeff")  # a BOM is an encoding marker, not text
        return text.replace("\r\n", "\n").strip()

    with open(path, "rb") as f:
        for line in f:
            if line.strip() == EOT_LINE:
                doc = finish()
                if doc:
                    yield doc
                lines = []
                start = offset + len(line)
            else:
                lines.append(line)
            offset += len(line)
    doc = finish()
    if doc:
        yield doc


def _read_jsonl(path: Path) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, raw, offset, e.start) from None
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
                why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise SlmError(
                    f"{path} line {lineno} is not valid JSON ({why}): "
                    'each line must be one object like {"text": "..."}'
                ) from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise SlmError(
                    f'{path} line {lineno} has no "text" string field: '
                    'each line must be one object like {"text": "..."}'
                )
            if text.strip():
                yield text


def _hub_reachable(endpoint: str) -> bool:
    """Whether the Hub answers at all: huggingface_hub retries a dead network for ~30 s per file."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing; let the library try
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


def _hf_files(spec: str) -> list[Path]:
    """Download the text files of ``OWNER/NAME[/FILE]`` from the Hugging Face Hub (or its cache)."""
    # Fail in seconds, not minutes, on a bad network; must be set before huggingface_hub is imported.
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    import huggingface_hub
    from huggingface_hub import constants

    parts = spec.split("/")
    if len(parts) < 2 or not all(parts):
        raise SlmError(f"hf:{spec} is not of the form hf:OWNER/NAME (e.g. hf:roneneldan/TinyStories)")
    repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
    if inner and not inner.lower().endswith(TEXT_EXTS):
        raise SlmError(f"hf:{spec} is not a .txt or .jsonl file: name one, or just hf:{repo}")
    # Offline, files downloaded before still come from the cache; listing a repo needs the network.
    offline = constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT)
    try:
        if inner:
            names = [inner]
        elif repo in HF_KNOWN_FILES:
            names = HF_KNOWN_FILES[repo]
        elif offline:
            raise ConnectionError("offline")
        else:
            listing = huggingface_hub.list_repo_files(repo, repo_type="dataset")
            names = sorted(n for n in listing if n.lower().endswith(TEXT_EXTS))
        paths = [
            Path(
                huggingface_hub.hf_hub_download(
                    repo, name, repo_type="dataset", etag_timeout=10, local_files_only=offline
                )
            )
            for name in names
        ]
    except Exception as e:  # connection, auth, missing repo/file: all mean "use a local file"
        why = "offline and not in the Hugging Face cache" if offline else f"{type(e).__name__}: no such dataset?"
        raise SlmError(f"cannot download hf:{spec} ({why}): pass a local .txt or .jsonl file instead") from None
    if not paths:
        raise SlmError(f"hf:{repo} has no .txt or .jsonl files: pass a local file instead")
    return paths


def _expand(inputs: Iterable[str | Path]) -> list[Path]:
    """Turn input specs into the list of files to read, checking every one up front."""
    files: list[Path] = []
    for spec in inputs:
        if str(spec).startswith("hf:"):
            files += _hf_files(str(spec)[3:])
            continue
        path = Path(spec)
        if not path.exists():
            raise SlmError(f"input {path} does not exist: check the path")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTS)
            if not found:
                raise SlmError(f"directory {path} has no .txt or .jsonl files: point to a folder with your text")
            files += found
        elif path.suffix.lower() in TEXT_EXTS:
            files.append(path)
        else:
            raise SlmError(
                f"input {path} has unsupported extension '{path.suffix}': use .txt (documents separated "
                'by <|endoftext|> lines) or .jsonl (one {"text": ...} object per line)'
            )
    return files


def _iter_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield from (_read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_txt(path))


def _as_list(inputs: str | Path | Iterable[str | Path]) -> list[str | Path]:
    # A lone path string would otherwise be iterated character by character.
    return [inputs] if isinstance(inputs, (str, Path)) else list(inputs)


def read_documents(inputs: list[str]) -> Iterator[str]:
    """Stream the non-empty documents of ``inputs`` (files, directories, ``hf:`` repos), in order.

    Paths are checked (and ``hf:`` files downloaded) when called; file contents are read lazily.
    """
    return _iter_files(_expand(_as_list(inputs)))


# --- prepare ------------------------------------------------------------------------------------


def _tokenizer_dir(path: Path) -> Path:
    """The folder holding the tokenizer files: ``path`` itself (a data directory or a tokenizer
    folder) or ``path/tokenizer`` (a run directory)."""
    from slmkit.tokenizer import META_FILE

    for candidate in (path, path / "tokenizer"):
        if (candidate / META_FILE).is_file():
            return candidate
    raise SlmError(f"{path} has no tokenizer ({META_FILE}): give a data directory from slm prepare or a run directory")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SlmError(f"{out_dir} exists and is not a directory: choose another output folder")
    if out_dir.is_dir() and not (out_dir / DATA_META).exists() and any(out_dir.iterdir()):
        raise SlmError(
            f"{out_dir} is not empty and is not a data directory (no meta.json): "
            "choose a new or empty output folder"
        )


def _split_plan(files: list[Path], val_files: list[Path], val_fraction: float, seed: int):
    """A function that streams ``(document, is_val)`` pairs, the same on every call.

    With ``val_files`` they are the validation set. Otherwise a seeded random ``val_fraction`` of
    the documents goes to val (at least one, and at least one left for training); a corpus of a
    single document is split by characters instead, its last ``val_fraction`` going to val.
    """
    if val_files:
        if next(_iter_files(files), None) is None:
            raise SlmError(f"no documents in {', '.join(map(str, files))}: the inputs are empty")
        if next(_iter_files(val_files), None) is None:
            raise SlmError(f"validation inputs {', '.join(map(str, val_files))} contain no documents")

        def stream() -> Iterator[tuple[str, bool]]:
            yield from ((doc, False) for doc in _iter_files(files))
            yield from ((doc, True) for doc in _iter_files(val_files))

        return stream

    n = sum(1 for _ in _iter_files(files))  # a cheap pass that also validates every file up front
    if n == 0:
        raise SlmError(f"no documents in {', '.join(map(str, files))}: the inputs are empty")
    if n == 1:
        doc = next(_iter_files(files))
        if len(doc) < 2:
            raise SlmError(f"{files[0]} holds too little text to split into train and val: add more text")
        cut = min(len(doc) - 1, max(1, round(len(doc) * (1 - val_fraction))))
        pairs = [(doc[:cut], False), (doc[cut:], True)]
        return lambda: iter(pairs)

    n_val = min(n - 1, max(1, round(n * val_fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    return lambda: ((doc, bool(v)) for doc, v in zip(_iter_files(files), is_val))


# After a newline that sits between two non-space characters, GPT-2-style pre-tokenizers always
# start a new pre-token, so encoding the two sides separately gives exactly the same ids.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_PIECE_CHARS = 1_000_000


def _pieces(doc: str) -> Iterator[str]:
    """Cut a long document into ~_PIECE_CHARS pieces that encode to the same ids as the whole.

    This keeps memory bounded and all cores busy for a huge file without separators; a
    document with no safe cut (one giant line) stays whole.
    """
    start = 0
    while len(doc) - start > _PIECE_CHARS:
        m = _SAFE_CUT.search(doc, start + _PIECE_CHARS)
        if m is None:
            break
        yield doc[start : m.start()]
        start = m.start()
    yield doc[start:]


def _chunks(pairs: Iterable[tuple[str, bool]], max_chars: int = 4_000_000) -> Iterator[list[tuple[str, bool, bool]]]:
    """Group ``(doc, is_val)`` into lists of ``(piece, is_val, ends_doc)`` of about ``max_chars``."""
    # Big enough for encode_batch to keep every core busy, small enough to bound memory.
    chunk, size = [], 0
    for doc, is_val in pairs:
        *head, last = _pieces(doc)
        chunk += [(piece, is_val, False) for piece in head] + [(last, is_val, True)]
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _tokenize_into(tok, stream, outputs: dict[bool, Any], dtype, total_bytes: int) -> dict[str, dict[str, int]]:
    """Encode every document, append ``eot_id`` to each, and append the ids to the split's file."""
    from tqdm import tqdm

    stats = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None) as bar:
        for chunk in _chunks(stream):
            encoded = tok.encode_batch([piece for piece, _, _ in chunk])
            flat: dict[bool, list[int]] = {False: [], True: []}
            done = 0
            for (piece, is_val, ends_doc), ids in zip(chunk, encoded):
                st = stats[SPLITS[is_val]]
                flat[is_val].extend(ids)
                if ends_doc:
                    flat[is_val].append(tok.eot_id)
                    st["documents"] += 1
                nbytes = len(piece.encode("utf-8"))
                st["bytes"] += nbytes
                done += nbytes
            for is_val, ids in flat.items():
                np.asarray(ids, dtype=dtype).tofile(outputs[is_val])
                stats[SPLITS[is_val]]["tokens"] += len(ids)
            bar.update(min(done, bar.total - bar.n))
        bar.update(bar.total - bar.n)  # file sizes include separators/JSON, so top the bar up
    return stats


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 4096,
    tokenizer: str = "bpe",
    val_inputs: list[str] | None = None,
    val_fraction: float = 0.05,
    seed: int = 1337,
    tokenizer_from: str | Path | None = None,
) -> dict:
    """Tokenize ``inputs`` into the data directory ``out_dir`` and return its meta.

    The BPE is trained on the training documents only (``tokenizer="gpt2"`` ignores
    ``vocab_size``). ``tokenizer_from`` reuses the tokenizer of an existing data directory, run
    directory or tokenizer folder instead, so that a model can go on training on new data, or
    be evaluated on it. Everything is built in a hidden sibling folder and moved onto ``out_dir``
    only when complete, so a failure leaves an existing data directory as it was.
    """
    from slmkit.tokenizer import load_gpt2, load_tokenizer, train_bpe

    out_dir = Path(out_dir)
    reused = load_tokenizer(_tokenizer_dir(Path(tokenizer_from))) if tokenizer_from is not None else None
    if tokenizer not in ("bpe", "gpt2"):
        raise SlmError(f"tokenizer '{tokenizer}' is not known: choose bpe or gpt2")
    if not val_inputs and not 0 < val_fraction < 1:
        raise SlmError(f"val_fraction {val_fraction} must be between 0 and 1 (e.g. 0.05)")
    _check_out_dir(out_dir)
    files = _expand(_as_list(inputs))
    val_files = _expand(_as_list(val_inputs)) if val_inputs else []
    both = {p.resolve() for p in files} & {p.resolve() for p in val_files}
    if both:
        raise SlmError(f"{sorted(both)[0]} is both a training and a validation input: use it in only one")
    stream = _split_plan(files, val_files, val_fraction, seed)

    with atomic_dir(out_dir) as tmp:
        if reused is not None:
            tok = reused
        elif tokenizer == "bpe":
            tok = train_bpe((doc for doc, is_val in stream() if not is_val), vocab_size)
        else:
            tok = load_gpt2()
        dtype = token_dtype(tok.vocab_size)
        sources = files + val_files
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            total = sum(p.stat().st_size for p in sources)
            stats = _tokenize_into(tok, stream(), {False: ftrain, True: fval}, dtype, total)
        tok.save(tmp)
        meta = {
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "tokenizer": tok.kind,
            "eot_id": tok.eot_id,
            "train": stats["train"],
            "val": stats["val"],
            "val_fraction": None if val_files else val_fraction,
            "seed": seed,
            "tokenizer_from": None if tokenizer_from is None else str(tokenizer_from),
            "sources": [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sources],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "slmkit_version": __version__,
        }
        (tmp / DATA_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# --- built-in corpus ----------------------------------------------------------------------------

# Modules whose docstrings are long, plain English prose; import order is fixed for determinism.
_CORPUS_MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "dis", "doctest", "email", "enum", "fractions", "ftplib", "functools", "glob",
    "gzip", "hashlib", "heapq", "html.parser", "http.client", "http.cookiejar", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox",
    "math", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "platform", "poplib", "pprint", "pydoc", "queue", "random", "re", "selectors", "shlex", "shutil",
    "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "xmlrpc.client", "zipfile",
]  # fmt: skip


def builtin_corpus() -> list[str]:
    """English text that ships with Python, for the offline quickstart (about 1-2 MB).

    The reference-manual topics of ``pydoc_data`` (one document each), then the module, class,
    function and method docstrings of a fixed list of standard-library modules.
    """
    import importlib

    docs: list[str] = []
    seen: set[str] = set()

    def add(text: str | None) -> None:
        text = (text or "").strip()
        if len(text) >= 40 and text not in seen:  # one-liners like "Return self." teach nothing
            seen.add(text)
            docs.append(text)

    try:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            add(topics[name])
    except ImportError:  # some distributions strip pydoc_data; the docstrings still suffice
        pass
    with warnings.catch_warnings():  # deprecated modules/aliases warn when touched
        warnings.simplefilter("ignore")
        for mod_name in _CORPUS_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
            add(inspect.getdoc(mod))
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or inspect.ismodule(obj):
                    continue
                # Skip what the module merely imports, but keep a package's own submodules' objects.
                owner = getattr(obj, "__module__", None) or ""
                if owner != mod.__name__ and not owner.startswith(mod.__name__ + "."):
                    continue
                add(inspect.getdoc(obj))
                if inspect.isclass(obj):
                    for attr, member in sorted(vars(obj).items()):
                        if not attr.startswith("_") and callable(member):
                            add(inspect.getdoc(member))
    return docs


# --- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slm prepare``."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".txt, .jsonl, a directory of those, or hf:OWNER/NAME[/FILE]")
    parser.add_argument("--out", required=True, help="DATA_DIR to write")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "gpt2"],
                        help="train a byte-level BPE on the corpus, or use GPT-2's (50,257 tokens)")
    parser.add_argument("--val-input", nargs="+", metavar="PATH", help="validation text (else --val-fraction)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--tokenizer-from", metavar="DIR",
                        help="reuse the tokenizer of this data or run directory (no new BPE is trained); "
                             "required for chat records, whose template tokens are added to it")
    chat = parser.add_argument_group("chat / instruction records (.jsonl, see slmkit/chat.py)")
    chat.add_argument("--train-on", default="all", choices=["all", "last"], help="assistant turns to learn")
    chat.add_argument("--context", type=int, help="longest example in tokens (default: the base run's block_size)")
    chat.add_argument("--show", type=int, default=0, metavar="N", help="print N examples, learned part marked")


def run_cli(args: argparse.Namespace) -> int:
    if not any(str(spec).startswith("hf:") for spec in args.input):
        from slmkit import prepare_chat

        files = _expand(args.input)
        if prepare_chat.first_record_is_chat(files):
            return prepare_chat.run_prepare_cli(args, files, _expand(args.val_input) if args.val_input else [])
    meta = prepare(args.input, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                   val_inputs=args.val_input, val_fraction=args.val_fraction, seed=args.seed,
                   tokenizer_from=args.tokenizer_from)
    for split in SPLITS:
        m = meta[split]
        print(f"{split:5s} {m['documents']:>9,} documents {m['tokens']:>12,} tokens {m['bytes']:>13,} bytes")
    print(f"wrote {args.out} (vocab {meta['vocab_size']}, {meta['tokenizer']} tokenizer)")
    return 0


__all__ = ["add_arguments", "builtin_corpus", "prepare", "read_documents", "run_cli"]
