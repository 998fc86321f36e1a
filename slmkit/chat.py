"""Chat and instruction data: reading the common record forms, the chat template, and rendering a
conversation to token ids with the mask of what is learned.

Record forms, recognised per JSONL line, each becoming a list of ``(role, content)`` turns with roles
``system``, ``user`` and ``assistant``:

* OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* prompt / completion: ``{"prompt": "...", "completion": "..."}``
* Alpaca: ``{"instruction": "...", "input": "..." (optional, may be empty), "output": "..."}``;
  the user turn is the instruction, followed by a blank line and the input when there is one
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``

The template (``DEFAULT_TEMPLATE``, plain JSON data so a run and its exports can carry it) renders::

    <|endoftext|><|system|>SYSTEM<|end|>\\n<|user|>QUESTION<|end|>\\n<|assistant|>ANSWER<|end|>\\n

``<|endoftext|>`` opens the conversation as it opened every pretraining document; each turn is its
role's token, the content right after it, ``<|end|>`` and a newline. Content sits alone between two
special tokens, so a Hugging Face tokenizer given ``chat_template_jinja`` text splits it into the same
pieces we encode and produces the same ids. A prompt for generation ends with ``<|assistant|>``;
generation stops at ``<|end|>``.

The loss mask comes from the rendered ids themselves: each piece is encoded on its own and the
ids are concatenated, so the mask can never disagree with the tokens. Supervised by default: every
assistant turn's content and its ``<|end|>``; ``train_on="last"``: only the last assistant turn's.

The SFT DATA_DIR that ``slm prepare`` writes from these records is ``slmkit.prepare_chat``'s.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError
from slmkit.tokenizer import EOT, Tokenizer

ROLES = ("system", "user", "assistant")
FORMS = ("messages", "prompt/completion", "alpaca", "sharegpt")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TRAIN_ON = ("all", "last")

Turn = tuple[str, str]

DEFAULT_TEMPLATE: dict[str, Any] = {
    "name": "slmkit-chat",
    "version": 1,
    "begin": EOT,  # opens every conversation, as it opened (separated) every pretraining document
    "roles": {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"},
    "end": "<|end|>",  # end of a turn: supervised after an assistant turn, so the model learns to stop
    "separator": "\n",  # after each turn's end, for readability; never supervised
}


# --- records ------------------------------------------------------------------------------------


class _Bad(ValueError):
    """A record that is not one of the forms; the caller adds the file and line."""


def _text(obj: dict, key: str, *, optional: bool = False) -> str:
    value = obj.get(key, "" if optional else None)
    if not isinstance(value, str):
        raise _Bad(f'"{key}" must be a string, not {type(value).__name__ if key in obj else "missing"}')
    return value


def _turn_list(items: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Turn]:
    if not isinstance(items, list) or not items:
        raise _Bad(f'"{field}" must be a non-empty list')
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _Bad(f'{field}[{i}] must be an object with "{role_key}" and "{content_key}"')
        role = item.get(role_key)
        if role not in roles:
            known = ", ".join(sorted(roles))
            raise _Bad(f'{field}[{i}] has unknown {role_key} {json.dumps(role)} (known: {known})')
        content = item.get(content_key)
        if not isinstance(content, str):
            raise _Bad(f'{field}[{i}].{content_key} must be a string')
        turns.append((roles[role], content))
    return turns


def parse_record(obj: Any) -> tuple[str, list[Turn]]:
    """The form (one of ``FORMS``) and the ``(role, content)`` turns of one decoded JSON record.

    Raises ``ValueError`` saying what is wrong; ``read_chat_jsonl`` adds the file and line.
    """
    if not isinstance(obj, dict):
        raise _Bad("a line must be a JSON object")
    if "messages" in obj:
        form, turns = "messages", _turn_list(obj["messages"], "messages", "role", "content", {r: r for r in ROLES})
    elif "conversations" in obj:
        form, turns = "sharegpt", _turn_list(obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    elif "instruction" in obj or "output" in obj:
        instruction, extra, output = _text(obj, "instruction"), _text(obj, "input", optional=True), _text(obj, "output")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        form, turns = "alpaca", [("user", user), ("assistant", output)]
    elif "prompt" in obj or "completion" in obj:
        form, turns = "prompt/completion", [("user", _text(obj, "prompt")), ("assistant", _text(obj, "completion"))]
    else:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        raise _Bad(f"is not a chat record (keys: {keys})")
    if not any(role == "assistant" for role, _ in turns):
        raise _Bad("has no assistant turn: there is nothing to learn")
    for role, content in turns:
        if role == "assistant" and not content.strip():
            raise _Bad("has an empty assistant turn")
    return form, turns


def is_chat_record(obj: Any) -> bool:
    """Whether a decoded JSONL line looks like a chat/instruction record rather than ``{"text": ...}``."""
    keys = {"messages", "conversations", "instruction", "output", "prompt", "completion"}
    return isinstance(obj, dict) and "text" not in obj and bool(keys & obj.keys())


def read_chat_jsonl(path: str | Path) -> tuple[list[list[Turn]], Counter]:
    """Every conversation of a JSONL file and how many lines of each form it held.

    A bad line (not UTF-8, not JSON, an unknown form or role, an empty assistant turn, a wrong
    type) raises one ``SlmError`` naming the file and line number.
    """
    path = Path(path)
    convs: list[list[Turn]] = []
    forms: Counter = Counter()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                form, turns = parse_record(json.loads(line))
            except UnicodeDecodeError:
                raise SlmError(f"{path} line {lineno} is not UTF-8: convert the file to UTF-8") from None
            except (json.JSONDecodeError, RecursionError):
                raise SlmError(f"{path} line {lineno} is not valid JSON: each line must be one JSON object") from None
            except _Bad as e:
                raise SlmError(
                    f"{path} line {lineno} {e}: use messages, prompt/completion, instruction/output or "
                    "conversations records"
                ) from None
            convs.append(turns)
            forms[form] += 1
    return convs, forms


# --- the template -------------------------------------------------------------------------------


def template_tokens(template: dict) -> list[str]:
    """The template's special tokens: its begin token, the role tokens and the end token."""
    return [template["begin"], *template["roles"].values(), template["end"]]


def render_text(turns: Sequence[Turn], template: dict = DEFAULT_TEMPLATE, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as ``chat_template_jinja``'s template renders it."""
    parts = [template["begin"]]
    for role, content in turns:
        parts += [template["roles"][role], content, template["end"], template["separator"]]
    if add_generation_prompt:
        parts.append(template["roles"]["assistant"])
    return "".join(parts)


def chat_template_jinja(template: dict = DEFAULT_TEMPLATE) -> str:
    """The template as a Hugging Face ``chat_template`` (Jinja), rendering what ``render_text`` does.

    Every literal is a Jinja expression, so the text is the same whatever the environment's
    ``trim_blocks``/``lstrip_blocks`` (transformers sets both).
    """
    lit = json.dumps  # a JSON string is a valid Jinja string literal for these characters
    roles = template["roles"]
    branches = "".join(
        f"{'{% if' if i == 0 else '{% elif'} message['role'] == {lit(role)} %}}{{{{ {lit(token)} }}}}"
        for i, (role, token) in enumerate(roles.items())
    )
    return (
        f"{{{{ {lit(template['begin'])} }}}}"
        "{% for message in messages %}"
        f"{branches}"
        "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
        f"{{{{ message['content'] }}}}{{{{ {lit(template['end'] + template['separator'])} }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {lit(roles['assistant'])} }}}}{{% endif %}}"
    )


# --- tokens -------------------------------------------------------------------------------------


def add_chat_tokens(tok: Tokenizer, template: dict = DEFAULT_TEMPLATE) -> Tokenizer:
    """A tokenizer with the template's special tokens that ``tok`` lacks added after its vocabulary.

    Every base id keeps its meaning (new ids start at ``tok.vocab_size``), so a base model's
    weights still fit; its embedding grows at fine-tune time (``grow_embeddings``). GPT-2's
    tokenizer becomes the equivalent Hugging Face BPE (``to_hf_tokenizer_json``) so the added tokens
    are saved with it, and so is ``template`` (``Tokenizer.chat_template``). ``tok`` itself is not changed.
    """
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(tok.to_hf_tokenizer_json())
    missing = [t for t in template_tokens(template) if hf.token_to_id(t) is None]
    if missing:
        hf.add_special_tokens(missing)
    out = Tokenizer("bpe", hf=hf)
    out.chat_template = template
    base = tok.vocab_size
    for t in missing:
        if out._hf.token_to_id(t) < base:  # pragma: no cover - tokenizers always appends
            raise SlmError(f"adding {t} to the tokenizer renumbered its vocabulary")
    return out


def special_ids(tok: Tokenizer, template: dict = DEFAULT_TEMPLATE) -> dict[str, int]:
    """Token -> id for the template's special tokens in ``tok`` (a tokenizer from ``add_chat_tokens``)."""
    special = set(tok.special_ids)
    out = {}
    for token in template_tokens(template):
        i = tok._hf.token_to_id(token) if tok.kind == "bpe" else None
        if i is None or i not in special:
            raise SlmError(f"the tokenizer has no special token {token}: add the chat tokens (slm prepare does)")
        out[token] = i
    return out


def render_ids(
    turns: Sequence[Turn], tok: Tokenizer, template: dict = DEFAULT_TEMPLATE, *, train_on: str = "all"
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per id, whether it is supervised (learned as a target).

    Pieces are encoded one by one and concatenated, special tokens as their ids, so the mask is
    read off the very ids the model sees. Supervised: each assistant turn's content and its end
    token (``train_on="all"``), or only the last assistant turn's (``"last"``).
    """
    if train_on not in TRAIN_ON:
        raise SlmError(f"train_on {train_on!r} is not known: choose all or last")
    last = max(i for i, (role, _) in enumerate(turns) if role == "assistant") if train_on == "last" else -1
    sid = special_ids(tok, template)
    ids, mask = [sid[template["begin"]]], [False]
    end = sid[template["end"]]
    sep = tok.encode(template["separator"])
    for i, (role, content) in enumerate(turns):
        learn = role == "assistant" and (train_on == "all" or i == last)
        body = tok.encode(content)
        ids += [sid[template["roles"][role]], *body, end, *sep]
        mask += [False] + [learn] * (len(body) + 1) + [False] * len(sep)
    return ids, mask


def render_prompt(turns: Sequence[Turn], tok: Tokenizer, template: dict = DEFAULT_TEMPLATE) -> list[int]:
    """Ids of the conversation so far followed by the assistant's header: the prompt to generate from.

    The reply is generated until the end token (``special_ids(tok, template)[template["end"]]``).
    """
    sid = special_ids(tok, template)
    ids = [sid[template["begin"]]]
    sep = tok.encode(template["separator"])
    for role, content in turns:
        ids += [sid[template["roles"][role]], *tok.encode(content), sid[template["end"]], *sep]
    return ids + [sid[template["roles"]["assistant"]]]


def show_example(ids: Sequence[int], mask: Sequence[bool], tok: Tokenizer, *, color: bool | None = None) -> str:
    """The rendered text with its supervised runs marked: green on a terminal, else ``[[...]]``."""
    color = sys.stdout.isatty() if color is None else color
    opened, closed = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tok.decode(ids[start:i])
            out.append(opened + text + closed if mask[start] else text)
            start = i
    return "".join(out)


# --- model --------------------------------------------------------------------------------------


def grow_embeddings(model, new_vocab_size: int) -> None:
    """Grow a ``GPT``'s token embedding (and an untied head) to ``new_vocab_size`` rows, in place.

    Old rows are kept exactly; new rows start at the mean of the old ones, so a new token begins
    as an "average" token instead of a random direction that the head scores arbitrarily.
    """
    import torch
    from torch import nn

    old = model.config.vocab_size
    if new_vocab_size < old:
        raise SlmError(f"cannot shrink the vocabulary from {old} to {new_vocab_size}")
    if new_vocab_size == old:
        return

    def grown(weight: torch.Tensor) -> nn.Parameter:
        extra = weight.detach().mean(0, keepdim=True).expand(new_vocab_size - old, -1)
        return nn.Parameter(torch.cat([weight.detach(), extra]), requires_grad=weight.requires_grad)

    emb = model.tok_emb
    model.tok_emb = nn.Embedding(new_vocab_size, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
    model.tok_emb.weight = grown(emb.weight)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
        model.lm_head.out_features = new_vocab_size  # a head LoRA adapter sizes its B from it
    else:
        head = model.lm_head
        model.lm_head = nn.Linear(head.in_features, new_vocab_size, bias=False,
                                  device=head.weight.device, dtype=head.weight.dtype)
        model.lm_head.weight = grown(head.weight)
    model.config.vocab_size = new_vocab_size


__all__ = [
    "DEFAULT_TEMPLATE",
    "FORMS",
    "ROLES",
    "add_chat_tokens",
    "chat_template_jinja",
    "grow_embeddings",
    "is_chat_record",
    "parse_record",
    "read_chat_jsonl",
    "render_ids",
    "render_prompt",
    "render_text",
    "show_example",
    "special_ids",
]
