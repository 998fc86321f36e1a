"""Conversations: a chat model's reply to the turns so far, rendered with the run's chat template.

A run fine-tuned on chat records carries its template with its tokenizer
(``tokenizer.chat_template``, see ``slmkit.chat``). The prompt is ``chat.render_prompt`` of the
turns (it ends with the assistant's header), the reply is generated until the template's end token
(a stop id, so it ends on the token itself, never on text that looks like it) and the template's
special tokens are never shown. ``slm chat``, ``slm generate --chat`` and a server all go through
``ChatSession.prompt`` and ``stream_reply``.

The context rule for a conversation: the reply needs room, so the prompt is kept within
``block_size - min(max_new_tokens, block_size // 2)`` tokens by dropping the oldest exchanges
(a user turn and the assistant turns after it); the system prompt and the newest user turn are
always kept, and when they alone do not fit in the context the message is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from slmkit import chat
from slmkit.errors import SlmError
from slmkit.generate.sampling import SamplingConfig
from slmkit.generate.text import stream_ids

Turn = tuple[str, str]

NO_TEMPLATE = ("has no chat template (it was not fine-tuned on chat records): fine-tune it with "
               "slm prepare --input CHATS.jsonl --tokenizer-from RUN --out SFT_DIR and "
               "slm finetune RUN --data SFT_DIR --out CHAT_RUN, then chat with CHAT_RUN")


@dataclass
class Prompt:
    """A rendered conversation: the ids to generate from, the turns they hold, and how many of
    the oldest turns were left out to fit the context."""

    ids: list[int]
    turns: list[Turn]
    dropped: int


class ChatSession:
    """What generating a reply with a tokenizer's chat template needs: the template, the ids that
    end a reply (``stop_ids``: the end-of-turn token) and those never shown (``hidden``: every
    special token). Raises SlmError (naming ``source`` and the fix) when the tokenizer has no template."""

    def __init__(self, tokenizer, source: str = "the run") -> None:
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise SlmError(f"{source} {NO_TEMPLATE}")
        self.tokenizer, self.template = tokenizer, template
        special = chat.special_ids(tokenizer, template)
        self.end_id = special[template["end"]]
        self.stop_ids = [self.end_id]
        self.hidden = frozenset(tokenizer.special_ids)

    def render(self, turns: Sequence[Turn]) -> list[int]:
        """``chat.render_prompt`` of ``turns``: the ids up to and including the assistant's header."""
        for role, _ in turns:
            if role not in self.template["roles"]:
                raise SlmError(f"unknown role {role!r}: use one of {', '.join(self.template['roles'])}")
        return chat.render_prompt(turns, self.tokenizer, self.template)

    def prompt(self, turns: Sequence[Turn], block_size: int, max_new_tokens: int) -> Prompt:
        """The prompt for a reply to ``turns`` (the last one the user's), cut to the context rule
        of the module docstring: the oldest exchanges go first."""
        turns = list(turns)
        if not turns or turns[-1][0] != "user":
            raise SlmError("a conversation to reply to must end with a user turn")
        budget = block_size - min(max_new_tokens, block_size // 2)
        system = [t for t in turns[:1] if t[0] == "system"]
        rest = turns[len(system):]
        dropped = 0
        ids = self.render(system + rest)
        while len(ids) > budget and len(rest) > 1:
            cut = 1
            while cut < len(rest) - 1 and rest[cut][0] != "user":  # the whole exchange goes
                cut += 1
            rest, dropped = rest[cut:], dropped + cut
            ids = self.render(system + rest)
        if len(ids) >= block_size:
            what = "the system prompt and the message take" if system else "the message takes"
            raise SlmError(f"{what} {len(ids)} tokens with the template, but the model's context holds "
                           f"{block_size}: shorten it")
        return Prompt(ids, system + rest, dropped)


def stream_reply(model, session: ChatSession, prompt_ids: list[int], cfg: SamplingConfig) -> Iterator[str]:
    """The reply to a rendered conversation (``ChatSession.prompt(...).ids``), as text pieces while
    it is generated: up to the end-of-turn token, special tokens never shown, stop strings applied."""
    yield from stream_ids(model, session.tokenizer, prompt_ids, cfg, stop_ids=session.stop_ids, hidden=session.hidden)


def reply(model, tokenizer, turns: Sequence[Turn], cfg: SamplingConfig) -> str:
    """The assistant's reply to ``turns`` (``[(role, content), ...]``, the last one the user's) as text."""
    session = ChatSession(tokenizer)
    prompt = session.prompt(turns, model.config.block_size, cfg.max_new_tokens)
    return "".join(stream_reply(model, session, prompt.ids, cfg))
