"""Tokenizers: a byte-level BPE trained on your data, or GPT-2's BPE through tiktoken.

Both kinds are byte-level, so any valid Unicode string survives ``decode(encode(text))`` exactly,
and both end every document with the one special token ``<|endoftext|>`` (``tok.eot_id``).

``encode`` treats the literal string ``"<|endoftext|>"`` inside text as ordinary characters: only
the data pipeline inserts the real separator, so a document that quotes it cannot forge one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from slmkit.errors import SlmError

EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
# GPT-2's pre-tokenizer regex, exactly as tiktoken's "gpt2" (r50k_base) encoding uses it.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
META_FILE = "tokenizer_meta.json"


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters, used by every byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _token_str_to_bytes(token: str) -> bytes:
    """Bytes of a byte-level token string; added tokens outside the byte alphabet are plain UTF-8."""
    table = _unicode_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _bytes_to_token_str(data: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in data)


class Tokenizer:
    """A trained or loaded tokenizer; build one with ``train_bpe``, ``load_gpt2`` or ``load_tokenizer``."""

    eot_token = EOT

    def __init__(self, kind: str, *, hf=None, enc=None, gpt2_dir: Path | None = None) -> None:
        self.kind = kind
        self._hf = hf  # tokenizers.Tokenizer, for kind "bpe"
        self._enc = enc  # tiktoken.Encoding, for kind "gpt2"
        self._gpt2_dir = gpt2_dir  # where encoder.json/vocab.bpe came from, if they came from files
        self._id_bytes: list[bytes] | None = None
        # The chat template (``slmkit.chat``'s JSON dict) when the tokenizer carries chat tokens:
        # saved in tokenizer_meta.json, so the run, its data and its exports render one prompt.
        self.chat_template: dict | None = None
        if kind == "bpe":
            # Plain encode must never produce the separator from text that merely contains it.
            hf.encode_special_tokens = True
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
            self.eot_id = hf.token_to_id(EOT)
            if self.eot_id is None:
                raise SlmError(f"the BPE tokenizer has no {EOT} token: run slm prepare again")
        elif kind == "gpt2":
            self.vocab_size = enc.n_vocab
            self.eot_id = enc.eot_token
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}")

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    # --- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a literal ``<|endoftext|>`` in it is encoded as ordinary text."""
        if self.kind == "gpt2":
            return self._enc.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many texts at once, on all cores."""
        if self.kind == "gpt2":
            return self._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        # encode_batch_fast skips the character offsets we never use (tokenizers >= 0.20).
        fast = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    # --- decoding -----------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw UTF-8 bytes of the tokens; a token may hold part of a character, so stream with this."""
        ids = self._check_ids(ids)
        if self.kind == "gpt2":
            return self._enc.decode_bytes(ids)
        if self._id_bytes is None:
            self._id_bytes = [_token_str_to_bytes(self._hf.id_to_token(i)) for i in range(self.vocab_size)]
        table = self._id_bytes
        return b"".join(table[i] for i in ids)

    @property
    def special_ids(self) -> list[int]:
        """Ids of the special tokens (``<|endoftext|>``, and any other added as special): markers
        that stand for no text."""
        if self.kind == "gpt2":
            return sorted(self._enc.encode_single_token(t) for t in self._enc.special_tokens_set)
        return sorted(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text that each id stands for, 0 for the special tokens: bits per byte
        counts the loss of text tokens over their bytes (as lm-eval-harness and nanochat do), so a
        model is not charged for predicting document boundaries that have no bytes."""
        special = set(self.special_ids)
        return [0 if i in special else len(self.decode_bytes([i])) for i in range(self.vocab_size)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the tokens; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- files --------------------------------------------------------------------------------

    def _gpt2_vocab(self) -> tuple[dict[str, int], list[str]]:
        """GPT-2's ``encoder.json`` dict and ``vocab.bpe`` merge lines (without the header)."""
        if self._gpt2_dir is not None:
            return _read_gpt2_files(self._gpt2_dir, f"tokenizer folder {self._gpt2_dir}")
        return _gpt2_vocab_from_ranks(self._enc._mergeable_ranks)

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer files and ``tokenizer_meta.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "bpe":
            self._hf.save(str(directory / "tokenizer.json"))
        elif self._gpt2_dir is not None:
            for name in ("encoder.json", "vocab.bpe"):
                src, dst = self._gpt2_dir / name, directory / name
                if not (dst.exists() and os.path.samefile(src, dst)):
                    shutil.copyfile(src, dst)
        else:  # came from tiktoken's cache, so there are no files to copy: rebuild them
            encoder, merges = self._gpt2_vocab()
            (directory / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
            (directory / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        if self.chat_template is not None:
            meta["chat_template"] = self.chat_template
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def to_hf_tokenizer_json(self) -> str:
        """The tokenizer as a Hugging Face ``tokenizer.json`` string (for exporting a model)."""
        if self.kind == "bpe":
            return self._hf.to_str()  # encode_special_tokens is runtime state, never serialised
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        encoder, merges = self._gpt2_vocab()
        hf = HFTokenizer(models.BPE(vocab=encoder, merges=[tuple(m.split(" ")) for m in merges]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOT])
        return hf.to_str()


# --- constructors -----------------------------------------------------------------------------


def train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` tokens (256 bytes + ``<|endoftext|>`` + merges).

    The result may be smaller than ``vocab_size`` when the corpus runs out of pairs to merge.
    """
    if vocab_size < 257:
        raise SlmError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least 257 "
            "(256 bytes + <|endoftext|>)"
        )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # Every byte gets a token up front, so no input can ever be out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    hf.train_from_iterator(_batched(docs, 1000), trainer=trainer)
    return Tokenizer("bpe", hf=hf)


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    # Batches let the tokenizers library pre-tokenize in parallel.
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _no_tiktoken_cache():
    # tiktoken caches even local files, keyed by path only, so a changed file would load stale.
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def _read_gpt2_files(directory: Path, what: str) -> tuple[dict[str, int], list[str]]:
    """Read ``encoder.json`` and the merges of ``vocab.bpe`` from ``directory``."""
    try:
        encoder = json.loads((directory / "encoder.json").read_text(encoding="utf-8"))
        lines = (directory / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    except FileNotFoundError as e:
        raise SlmError(f"{what} has no {Path(e.filename).name}: it needs encoder.json and vocab.bpe") from None
    except (ValueError, OSError) as e:
        raise SlmError(f"{what}: cannot read encoder.json/vocab.bpe ({e})") from None
    return encoder, [line for line in lines[1:] if line.strip()]


def _gpt2_from_dir(directory: Path, what: str) -> Tokenizer:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    for name in ("encoder.json", "vocab.bpe"):
        if not (directory / name).is_file():
            raise SlmError(f"{what} has no {name}: it needs encoder.json and vocab.bpe")
    try:
        with _no_tiktoken_cache():
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(directory / "vocab.bpe"), encoder_json_file=str(directory / "encoder.json")
            )
    except Exception as e:  # a truncated or mismatched pair of files fails deep inside tiktoken
        raise SlmError(f"{what}: encoder.json/vocab.bpe are corrupt or do not match ({type(e).__name__})") from None
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_EOT_ID + 1,
    )
    return Tokenizer("gpt2", enc=enc, gpt2_dir=directory)


def load_gpt2() -> Tokenizer:
    """GPT-2's tokenizer: from ``$SLM_GPT2_DIR`` (encoder.json + vocab.bpe), else tiktoken's cache/network."""
    env = os.environ.get("SLM_GPT2_DIR")
    if env:
        return _gpt2_from_dir(Path(env), f"SLM_GPT2_DIR={env}")
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception:  # offline: requests' ConnectionError, or anything else from the download
        raise SlmError(
            "cannot load the GPT-2 tokenizer (not in tiktoken's cache and no network): "
            "set SLM_GPT2_DIR to a folder with encoder.json and vocab.bpe"
        ) from None
    return Tokenizer("gpt2", enc=enc)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer written by ``Tokenizer.save`` (no network needed)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise SlmError(f"{meta_path} is missing: run slm prepare to create the tokenizer")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (ValueError, KeyError, TypeError):
        raise SlmError(f"{meta_path} is corrupt: run slm prepare again") from None
    if kind == "gpt2":
        tok = _gpt2_from_dir(directory, f"tokenizer folder {directory}")
    elif kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise SlmError(f"{path} is missing: run slm prepare again")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception:  # tokenizers raises a bare Exception for malformed JSON
            raise SlmError(f"{path} is corrupt: run slm prepare again") from None
        tok = Tokenizer("bpe", hf=hf)
    else:
        raise SlmError(f"{meta_path} names an unknown tokenizer kind {kind!r}: run slm prepare again")
    if (tok.vocab_size, tok.eot_id) != (meta.get("vocab_size"), meta.get("eot_id")):
        raise SlmError(f"{meta_path} does not match the tokenizer files next to it: run slm prepare again")
    template = meta.get("chat_template")
    if template is not None and not isinstance(template, dict):
        raise SlmError(f"{meta_path}: chat_template must be a JSON object: run slm prepare again")
    tok.chat_template = template
    return tok


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run byte-pair merging on ``token`` using only merges ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def _gpt2_vocab_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """Rebuild GPT-2's encoder.json and merges from tiktoken's ranks.

    Each multi-byte token is the merge of the two parts that BPE with all lower-ranked merges
    leaves it in, which recovers vocab.bpe exactly.
    """
    encoder = {_bytes_to_token_str(b): r for b, r in ranks.items()}
    encoder[EOT] = GPT2_EOT_ID
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _bpe_split(ranks, token, rank)
            merges.append(f"{_bytes_to_token_str(left)} {_bytes_to_token_str(right)}")
    return encoder, merges


__all__ = ["EOT", "Tokenizer", "load_gpt2", "load_tokenizer", "train_bpe"]
