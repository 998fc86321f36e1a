"""llama2.c's files, both ways: ``model.bin`` and ``tokenizer.bin`` for Karpathy's ``run.c``/``runq.c``.

``export_llama2c`` writes a Llama-flavoured model (RMSNorm, rotary positions, SwiGLU, no biases,
GQA allowed) as

    model.bin      version 0 (``run.c``): 7 int32 (dim, hidden_dim, layers, heads, kv heads,
                   vocab size, negative when the head is not shared with the embedding, context),
                   then float32 tensors; or with ``quantize="int8"`` version 2 (``runq.c``): a
                   256-byte header (magic "ak42", version 2, the 7 ints, a shared-classifier byte,
                   the group size), the norm gains in float32, then every matrix as int8 values
                   with one float32 scale per group of ``group_size`` values.
    tokenizer.bin  the largest token length, then per token a float32 merge score, a length and
                   the token's bytes.

llama2.c's conventions are fixed in its C code: generation starts from token 1 and stops when it
samples token 1, bytes that no token spells are encoded as id 3 + byte. So the export permutes
slmkit's vocabulary (the embedding and head rows with it): ``<|endoftext|>`` becomes id 1 (it
means "document boundary" in both), the single byte b id 3 + b, and the other tokens fill ids 0
and 2, then 259 onwards, in their merge order. ``run.c``'s encoder merges the adjacent pair whose
concatenation has the highest score, so merged tokens score -0, -1, -2, ... in merge order (earlier
merges first); special tokens score -1e30, below the -1e10 its search starts from, so text never
merges into them. Its rotary embedding rotates adjacent pairs (2i, 2i+1) where slmkit rotates
halves (i, i + D/2): the query and key rows are permuted to match, and back on import.

``import_llama2c`` reads version 0 or 2 (dequantized) and a ``tokenizer.bin`` into a RUN_DIR,
so the published llama2.c checkpoints (stories15M/42M/110M) can be fine-tuned here. A file is
checked against its header before anything is allocated (see ``read_model_bin``).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.errors import SlmError
from slmkit.export.common import EOT, export_meta, interleave_rope_rows, output_dir, split_rope_rows, write_json
from slmkit.model import GPT, ModelConfig

MAGIC = 0x616B3432  # "ak42": version 1 and 2 files
V2_HEADER = 256
CONFIG = struct.Struct("<7i")
V2_START = struct.Struct("<Ii7iBi")  # magic, version, the config, shared classifier, group size
RUN_C_THETA = 10000.0  # run.c's rotary base and RMSNorm epsilon are constants in its code
RUN_C_EPS = 1e-5
NO_MERGE = -1e30  # run.c's merge search starts at -1e10 and needs a higher score
MAX_DIM = 1 << 20  # any sane dimension is far below; a forged header is refused before allocating
BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


# --- export -----------------------------------------------------------------------------------


def check_exportable(config: ModelConfig) -> None:
    """Refuse, in one line naming the setting, a model that ``run.c`` cannot compute."""
    rules = [
        (config.positions == "rope", f"model.positions={config.positions!r}: run.c uses rotary positions (rope)"),
        (config.norm == "rmsnorm", f"model.norm={config.norm!r}: run.c normalizes with RMSNorm"),
        (config.activation == "swiglu", f"model.activation={config.activation!r}: run.c's MLP is SwiGLU"),
        (not config.bias, "model.bias=true: run.c's layers have no biases"),
        (config.rope_theta == RUN_C_THETA,
         f"model.rope_theta={config.rope_theta:g}: run.c's rotary base is fixed at {RUN_C_THETA:g}"),
        (config.head_dim * config.n_head == config.n_embd,
         f"model.head_size={config.head_size}: run.c's heads are dim/n_heads wide (a pruned model)"),
        (config.norm_eps == RUN_C_EPS, f"model.norm_eps={config.norm_eps:g}: run.c's RMSNorm epsilon is fixed at 1e-5"),
    ]
    for ok, why in rules:
        if not ok:
            raise SlmError(f"cannot export to llama2.c: {why} (only Llama-flavoured models fit its format)")


def token_bytes(tokenizer: Any) -> tuple[list[bytes], set[int]]:
    """Each id's bytes (a special token's are its name) and the set of special ids."""
    special = set(tokenizer.special_ids)
    return [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)], special


def llama2c_order(tokenizer: Any) -> list[int]:
    """llama2.c id -> slmkit id: ``<|endoftext|>`` at 1, byte b at 3 + b, the rest in id order."""
    pieces, special = token_bytes(tokenizer)
    if tokenizer.vocab_size < 259:
        raise SlmError(f"cannot export to llama2.c: its layout needs at least 259 tokens, the tokenizer has "
                       f"{tokenizer.vocab_size}: train one with a larger vocab_size")
    byte_id: dict[int, int] = {}
    for i, p in enumerate(pieces):
        if len(p) == 1 and i not in special:
            byte_id.setdefault(p[0], i)
    missing = [b for b in range(256) if b not in byte_id]
    if missing:
        raise SlmError(f"cannot export to llama2.c: no token is the single byte 0x{missing[0]:02X} "
                       "(llama2.c expects every byte at ids 3-258)")
    fixed = {1: tokenizer.eot_id, **{3 + b: i for b, i in byte_id.items()}}
    rest = iter(i for i in range(tokenizer.vocab_size) if i not in set(fixed.values()))
    return [fixed[n] if n in fixed else next(rest) for n in range(tokenizer.vocab_size)]


def llama2c_tensors(model: GPT, order: list[int] | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The tensors of ``model`` in llama2.c's order and orientation (vocabulary rows permuted by
    ``order``, llama2.c id -> slmkit id), and its header fields. The list is: embedding, then per
    kind over all layers: attention norm, wq, wk, wv, wo, MLP norm, w1 (gate), w2 (down), w3 (up),
    then the final norm and, for an untied head, the classifier."""
    c = model.config
    check_exportable(c)
    H, KV, D, hidden = c.n_head, c.kv_heads, c.head_dim, c.hidden_dim
    perm = torch.tensor(order if order is not None else list(range(c.vocab_size)))
    qkv = [b.attn.qkv.weight.detach().split([H * D, KV * D, KV * D]) for b in model.blocks]
    blocks = list(model.blocks)
    parts = {
        "embedding": [model.tok_emb.weight.detach()[perm]],
        "rms_att": [b.norm1.weight for b in blocks],
        "wq": [interleave_rope_rows(q, H) for q, _, _ in qkv],
        "wk": [interleave_rope_rows(k, KV) for _, k, _ in qkv],
        "wv": [v for _, _, v in qkv],
        "wo": [b.attn.proj.weight for b in blocks],
        "rms_ffn": [b.norm2.weight for b in blocks],
        "w1": [b.mlp.up.weight[:hidden] for b in blocks],
        "w2": [b.mlp.down.weight for b in blocks],
        "w3": [b.mlp.up.weight[hidden:] for b in blocks],
        "rms_final": [model.norm.weight],
    }
    if not c.tie_embeddings:
        parts["wcls"] = [model.lm_head.weight.detach()[perm]]
    header = dict(dim=c.n_embd, hidden_dim=hidden, n_layers=c.n_layer, n_heads=H, n_kv_heads=KV,
                  vocab_size=c.vocab_size, seq_len=c.block_size, shared=c.tie_embeddings)
    return {k: [t.detach().float().contiguous() for t in v] for k, v in parts.items()}, header


def group_size_for(dim: int, hidden_dim: int) -> int:
    """The int8 group: the largest of 64, 32, ... 1 dividing both matmul input sizes (runq.c
    quantizes activations by the same groups, so the group must divide dim and hidden_dim)."""
    gs = 64
    while dim % gs or hidden_dim % gs:
        gs //= 2
    return gs


def quantize_q80(w: torch.Tensor, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of ``gs`` consecutive values: w ~ q * scale, scale = max|w| / 127."""
    g = w.reshape(-1, gs)
    scale = g.abs().amax(dim=1) / 127.0
    q = torch.where(scale[:, None] > 0, g / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None], 0.0)
    return q.round().to(torch.int8).numpy(), scale.float().numpy()


def write_model_bin(model: GPT, path: Path, order: list[int] | None = None, version: int = 0) -> dict[str, Any]:
    """``model`` as llama2.c's ``model.bin``, version 0 (float32, run.c) or 2 (int8, runq.c); returns the header."""
    parts, h = llama2c_tensors(model, order)
    config = (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["vocab_size"], h["seq_len"])
    with open(path, "wb") as f:
        if version == 0:
            vocab = h["vocab_size"] if h["shared"] else -h["vocab_size"]  # llama2.c's sign convention
            f.write(CONFIG.pack(*config[:5], vocab, config[6]))
            for name, tensors in parts.items():
                for t in tensors:
                    f.write(t.numpy().tobytes())
                if name == "rms_final":  # run.c skips the two old rotary tables (seq_len * head_size / 2 each)
                    f.write(bytes(4 * h["seq_len"] * (h["dim"] // h["n_heads"])))
        elif version == 2:
            gs = group_size_for(h["dim"], h["hidden_dim"])
            h["group_size"] = gs
            f.write(V2_START.pack(MAGIC, 2, *config, int(h["shared"]), gs).ljust(V2_HEADER, b"\0"))
            for name in ("rms_att", "rms_ffn", "rms_final"):
                for t in parts[name]:
                    f.write(t.numpy().tobytes())
            for name in ("embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"):
                for t in parts.get(name, []):
                    q, s = quantize_q80(t, gs)
                    f.write(q.tobytes())
                    f.write(s.tobytes())
        else:
            raise SlmError(f"llama2.c model.bin version {version} is not written: choose 0 (run.c) or 2 (runq.c)")
    return h


def write_tokenizer_bin(tokenizer: Any, path: Path, order: list[int]) -> None:
    """``tokenizer.bin`` for ``order`` (llama2.c id -> slmkit id): each token's bytes (byte 0 as
    ``<0x00>``, which run.c decodes to the byte: a C string cannot hold it) and its merge score."""
    pieces, special = token_bytes(tokenizer)
    rank = {i: k for k, i in enumerate(i for i in order if len(pieces[i]) > 1 and i not in special)}
    entries = []
    for i in order:
        piece = b"<0x00>" if pieces[i] == b"\0" else pieces[i]
        score = NO_MERGE if i in special else -float(rank[i]) if i in rank else 0.0
        entries.append(struct.pack("<fi", score, len(piece)) + piece)
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        f.write(b"".join(entries))


def export_llama2c(model: GPT, tokenizer: Any, out: str | Path, quantize: str | None = None) -> Path:
    """Write ``model.bin`` (version 0, or 2 with ``quantize="int8"``), ``tokenizer.bin`` and
    ``slmkit_export.json`` into the folder ``out``."""
    check_exportable(model.config)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise SlmError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    order = llama2c_order(tokenizer)
    version = 2 if quantize == "int8" else 0
    with output_dir(Path(out)) as tmp:
        h = write_model_bin(model, tmp / "model.bin", order, version)
        write_tokenizer_bin(tokenizer, tmp / "tokenizer.bin", order)
        write_json(tmp / "slmkit_export.json", export_meta(
            model, tokenizer, "llama2c", llama2c_version=version, group_size=h.get("group_size"),
            reader="runq.c" if version == 2 else "run.c", llama2c_to_slmkit_ids=order))
    return Path(out)


# --- import -----------------------------------------------------------------------------------


def _fail(path: Path, why: str) -> SlmError:
    return SlmError(f"{path}: {why}")


def _shapes(h: dict[str, int]) -> list[tuple[str, int]]:
    """(name, values) of every tensor after the norms' layout in version 0's order."""
    d, f, L, kv = h["dim"], h["hidden_dim"], h["n_layers"], h["dim"] // h["n_heads"] * h["n_kv_heads"]
    return [("embedding", h["vocab_size"] * d), ("rms_att", L * d), ("wq", L * d * d), ("wk", L * d * kv),
            ("wv", L * d * kv), ("wo", L * d * d), ("rms_ffn", L * d), ("w1", L * d * f), ("w2", L * f * d),
            ("w3", L * f * d), ("rms_final", d)] + ([] if h["shared"] else [("wcls", h["vocab_size"] * d)])


def _check_header(path: Path, h: dict[str, int]) -> None:
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
        if not 0 < h[name] <= MAX_DIM:
            raise _fail(path, f"the header's {name} is {h[name]}: not a llama2.c model.bin (truncated or corrupt?)")
    if h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"] or (h["dim"] // h["n_heads"]) % 2:
        raise _fail(path, f"impossible shape in the header: dim {h['dim']}, {h['n_heads']} heads, "
                          f"{h['n_kv_heads']} kv heads (heads must divide dim into even sizes, kv heads divide heads)")


def read_model_bin(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and float32 tensors (llama2.c's layout, flat) of a version 0 or 2 ``model.bin``.

    The header's sizes must add up to the file's size exactly, checked before any tensor is read,
    so a forged header cannot make us allocate more than the file holds."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path} does not exist: pass llama2.c's model.bin")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V2_HEADER)
    if len(head) < CONFIG.size:
        raise _fail(path, f"{size} bytes is too short for a llama2.c model.bin header (truncated?)")
    if struct.unpack_from("<I", head)[0] == MAGIC:
        if len(head) < V2_START.size:
            raise _fail(path, "truncated inside its version 2 header")
        _, version, *config, shared, gs = V2_START.unpack_from(head)
        if version != 2:
            raise _fail(path, f"llama2.c model.bin version {version}: slmkit reads version 0 (run.c) and 2 "
                              "(runq.c); export it again with llama2.c's export.py --version 0")
    else:
        version, config, gs = 0, list(CONFIG.unpack_from(head)), 0
        shared = config[5] > 0  # llama2.c's sign convention: negative means an untied classifier
        config[5] = abs(config[5])
    h = dict(zip(("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"), config))
    h.update(version=version, shared=bool(shared))
    _check_header(path, h)
    shapes = _shapes(h)
    head_size = h["dim"] // h["n_heads"]
    if version == 0:
        expected = CONFIG.size + 4 * (sum(n for _, n in shapes) + h["seq_len"] * head_size)
    else:
        if not 0 < gs <= MAX_DIM or h["dim"] % gs or h["hidden_dim"] % gs:
            raise _fail(path, f"group size {gs} does not divide dim {h['dim']} and hidden_dim {h['hidden_dim']}")
        h["group_size"] = gs
        expected = V2_HEADER + sum(4 * n if n_ in ("rms_att", "rms_ffn", "rms_final") else n + 4 * (n // gs)
                                   for n_, n in shapes)
    if size != expected:
        raise _fail(path, f"the header describes {expected:,} bytes, the file has {size:,} "
                          f"({'truncated' if size < expected else 'extra data'}, or not this header's model)")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    if version == 0:
        off = CONFIG.size
        for name, n in shapes:
            out[name] = np.frombuffer(raw, np.float32, n, off).copy()
            off += 4 * n
            if name == "rms_final":
                off += 4 * h["seq_len"] * head_size
    else:
        off = V2_HEADER
        for name in ("rms_att", "rms_ffn", "rms_final"):  # the float32 gains come first
            n = dict(shapes)[name]
            out[name] = np.frombuffer(raw, np.float32, n, off).copy()
            off += 4 * n
        for name, n in shapes:
            if name.startswith("rms"):
                continue
            chunks = []  # runq.c's layout: per layer, the int8 values and then their scales
            each = n if name in ("embedding", "wcls") else n // h["n_layers"]
            for _ in range(n // each):
                q = np.frombuffer(raw, np.int8, each, off).astype(np.float32)
                s = np.frombuffer(raw, np.float32, each // gs, off + each)
                chunks.append((q.reshape(-1, gs) * s[:, None]).reshape(-1))
                off += each + 4 * (each // gs)
            out[name] = np.concatenate(chunks)
    del raw
    return h, out


def model_from_llama2c(h: dict[str, Any], t: dict[str, np.ndarray]) -> GPT:
    """An slmkit GPT computing what run.c computes with these tensors (same ids)."""
    d, f, L, H, KV = h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]
    config = ModelConfig(vocab_size=h["vocab_size"], block_size=h["seq_len"], n_layer=L, n_head=H,
                         n_kv_head=None if KV == H else KV, n_embd=d, mlp_hidden=f, bias=False, norm="rmsnorm",
                         positions="rope", activation="swiglu", tie_embeddings=h["shared"],
                         rope_theta=RUN_C_THETA, norm_eps=RUN_C_EPS)
    model = GPT(config)
    kv = d // H * KV
    g = {k: torch.from_numpy(v) for k, v in t.items()}
    layer = {k: g[k].view(L, -1) for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")}
    with torch.no_grad():
        model.tok_emb.weight.copy_(g["embedding"].view(-1, d))
        for i, b in enumerate(model.blocks):
            q = split_rope_rows(layer["wq"][i].view(d, d), H)
            k = split_rope_rows(layer["wk"][i].view(kv, d), KV)
            b.attn.qkv.weight.copy_(torch.cat([q, k, layer["wv"][i].view(kv, d)]))
            b.attn.proj.weight.copy_(layer["wo"][i].view(d, d))
            b.norm1.weight.copy_(layer["rms_att"][i])
            b.norm2.weight.copy_(layer["rms_ffn"][i])
            b.mlp.up.weight.copy_(torch.cat([layer["w1"][i].view(f, d), layer["w3"][i].view(f, d)]))
            b.mlp.down.weight.copy_(layer["w2"][i].view(d, f))
        model.norm.weight.copy_(g["rms_final"])
        if not h["shared"]:
            model.lm_head.weight.copy_(g["wcls"].view(-1, d))
    return model.eval()


def read_tokenizer_bin(path: str | Path, vocab_size: int) -> tuple[list[bytes], list[float]]:
    """The pieces (raw, as stored) and scores of a ``tokenizer.bin`` that must hold ``vocab_size`` tokens."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path} does not exist: pass llama2.c's tokenizer.bin")
    data = path.read_bytes()
    if len(data) < 4:
        raise _fail(path, "too short for a llama2.c tokenizer.bin (truncated?)")
    pieces, scores, off = [], [], 4
    while off < len(data):
        if off + 8 > len(data):
            raise _fail(path, f"truncated inside token {len(pieces)}")
        score, n = struct.unpack_from("<fi", data, off)
        if n < 0 or off + 8 + n > len(data):
            raise _fail(path, f"token {len(pieces)} claims {n} bytes, the file has {len(data) - off - 8} left "
                              "(truncated or not a tokenizer.bin)")
        pieces.append(data[off + 8: off + 8 + n])
        scores.append(score)
        off += 8 + n
    if len(pieces) != vocab_size:
        raise _fail(path, f"holds {len(pieces)} tokens, the model's vocabulary is {vocab_size}: "
                          "pass the tokenizer.bin this model was trained with")
    return pieces, scores


def tokenizer_from_llama2c(pieces: list[bytes], scores: list[float], path: Path) -> tuple[Any, str]:
    """An slmkit (byte-level BPE) Tokenizer with llama2.c's ids, and a note on how faithful it is.

    Two kinds of file: one that slmkit wrote (id 1 is ``<|endoftext|>``) gets back its byte-level
    BPE exactly: GPT-2's pre-tokenizer and, for each token, the one merge that rank-by-score
    merging leaves it in (the merges of the original, as tiktoken recovers GPT-2's). A
    sentencepiece vocabulary (llama2.c's own, id 1 is ``<s>``) becomes what run.c's encoder does:
    a leading space (sentencepiece's dummy prefix), no pre-tokenizer, and every adjacent pair whose
    concatenation is a token may merge, the highest score first. Its ids 0 and 2 become special
    tokens ``<unk>`` and ``</s>``, id 1 is ``<|endoftext|>``.
    """
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from slmkit.tokenizer import Tokenizer, _bpe_split, _bytes_to_token_str

    ours = pieces[1] == EOT.encode() if len(pieces) > 1 else False
    if len(pieces) < 259:
        raise _fail(path, f"{len(pieces)} tokens: llama2.c's layout has <unk>, <s>, </s> and 256 bytes at ids 0-258")
    special = {1: EOT} if ours else {0: "<unk>", 1: EOT, 2: "</s>"}
    special.update({i: p.decode("utf-8", "replace") for i, p in enumerate(pieces)
                    if scores[i] <= -1e10 and i not in special})  # run.c never merges into these
    # A piece "<0xXX>" stands for the byte; where another piece spells the same bytes, that one is
    # what run.c's encoder finds, and the byte piece keeps its literal text (models trained on
    # sentencepiece's output never see it).
    decoded = [bytes([int(m.group(1), 16)]) if (m := BYTE_PIECE.fullmatch(p)) else p for p in pieces]
    owner: dict[bytes, int] = {}
    for i in sorted(range(len(pieces)), key=lambda i: BYTE_PIECE.fullmatch(pieces[i]) is not None):
        if i not in special:
            owner.setdefault(decoded[i], i)
    vocab: dict[str, int] = {}
    for i, p in enumerate(pieces):
        text = special.get(i) or _bytes_to_token_str(decoded[i] if owner.get(decoded[i]) == i else p)
        if not text or text in vocab:
            raise _fail(path, f"tokens {vocab.get(text, '?')} and {i} have the same text {text!r}")
        vocab[text] = i
    missing = [b for b in range(256) if bytes([b]) not in owner]
    if missing:
        raise _fail(path, f"no token is the byte 0x{missing[0]:02X}: slmkit's tokenizers are byte-level")
    merged = sorted((i for b, i in owner.items() if len(b) > 1), key=lambda i: (-scores[i], i))
    rank = {decoded[i]: k for k, i in enumerate(merged)}
    merges: list[tuple[str, str]] = []
    for k, i in enumerate(merged):
        token = decoded[i]
        splits = [(token[:j], token[j:]) for j in range(1, len(token))]
        if ours:  # the original's one merge
            parts = _bpe_split(rank, token, k)
            splits = [tuple(parts)] if len(parts) == 2 else splits
        merges += [(_bytes_to_token_str(a), _bytes_to_token_str(b)) for a, b in splits
                   if a in owner and b in owner]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    if ours:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        note = "slmkit's own byte-level BPE, merges recovered from the scores"
    else:
        hf.normalizer = normalizers.Prepend(" ")
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        note = ("run.c's encoder (leading space, highest-score merges); characters of 3-4 UTF-8 bytes "
                "stay bytes where sentencepiece has one piece (a byte-level BPE can only merge into tokens)")
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
    tok = Tokenizer("bpe", hf=hf)
    if tok.vocab_size != len(pieces) or tok.eot_id != 1:
        raise _fail(path, f"could not build a tokenizer with its {len(pieces)} ids (got {tok.vocab_size})")
    return tok, note


def load_llama2c(model_path: str | Path, tokenizer_path: str | Path) -> tuple[GPT, Any, str]:
    """Model, tokenizer and a note on the tokenizer from llama2.c's ``model.bin`` and ``tokenizer.bin``."""
    h, tensors = read_model_bin(model_path)
    pieces, scores = read_tokenizer_bin(tokenizer_path, h["vocab_size"])
    tokenizer, note = tokenizer_from_llama2c(pieces, scores, Path(tokenizer_path))
    return model_from_llama2c(h, tensors), tokenizer, note


def import_llama2c(model_path: str | Path, tokenizer_path: str | Path, run_dir: str | Path) -> tuple[Path, str]:
    """Write llama2.c's files as a new RUN_DIR at step 0 (``rundir.create_run``) that ``slm train``
    continues; returns it and the tokenizer note."""
    from slmkit.rundir import create_run
    from slmkit.train import TrainConfig

    model, tokenizer, note = load_llama2c(model_path, tokenizer_path)
    cfg = TrainConfig()
    run = create_run(run_dir, model, tokenizer, cfg, imported_from=str(Path(model_path).resolve()),
                     tokenizer_note=note)
    return run, note


# --- slm import-llama2c -----------------------------------------------------------------------


def add_import_arguments(parser: Any) -> None:
    parser.add_argument("model", help="llama2.c's model.bin (version 0, as run.c reads, or version 2 int8)")
    parser.add_argument("tokenizer", help="the tokenizer.bin that goes with it")
    parser.add_argument("--out", required=True, help="new RUN_DIR to create")


def run_import(args: Any) -> int:
    run_dir, note = import_llama2c(args.model, args.tokenizer, args.out)
    from slmkit.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir, which="last")
    print(f"imported {args.model} into {run_dir}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocab {tokenizer.vocab_size}; tokenizer: {note}")
    print(f"continue with: slm prepare --input CORPUS --tokenizer-from {run_dir} --out DATA_DIR; "
          f"slm train --data DATA_DIR --out {run_dir}")
    return 0
