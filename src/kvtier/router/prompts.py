"""A request's prompt tokens, as the engine will see them, so the router's keys are the engine's.

vLLM tokenizes a completion's text with the special tokens the tokenizer adds
(``add_special_tokens`` defaults to true there) and a chat by rendering the model's chat
template to text (``add_generation_prompt`` true, ``continue_final_message`` false by
default) and tokenizing it without special tokens. The router does the same with the model's
own tokenizer; a test pins router keys = engine keys.

A chat's rendered text is tokenized piece by piece between the tokenizer's special tokens
(``<|im_start|>``...), which a tokenizer splits out before anything else, and the pieces are
remembered: a returning turn re-tokenizes only its new messages. Tokenizers whose special
tokens strip or normalize their surroundings are tokenized whole.
"""

from __future__ import annotations

import re
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.errors import KvtierError

PIECE_TOKENS = 4_000_000  # tokens of chat pieces remembered (16 MB of ids)


LAZY_CHARS = 6000  # a new piece longer than this is tokenized at first only in part


@dataclass
class Leading:
    """A prompt's leading tokens (exact), whether they are all of it, its length (estimated
    when not), and how to get all of it."""

    tokens: list[int]
    complete: bool
    total: int
    finish: Callable[[], list[int]] | None

    @classmethod
    def of(cls, tokens: list[int]) -> Leading:
        """All of a prompt's tokens."""
        return cls(tokens, True, len(tokens), None)

    def whole(self) -> Leading:
        """All of the prompt (tokenized now, if it was not)."""
        if self.complete or self.finish is None:
            return self
        return Leading.of(self.finish())


class PromptError(ValueError):
    """The request has no prompt the router can read (the engine will say why)."""


class Prompter:
    """Token ids of OpenAI completion and chat requests, with one model's tokenizer."""

    def __init__(self, model_dir: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - installed with kvtier's serve extra
            raise KvtierError("the router needs transformers: run `make install`") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise KvtierError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
        self._pieces: OrderedDict[str, array[int]] = OrderedDict()  # least recently used first
        self._remembered = 0  # tokens in _pieces
        self._special: dict[str, int] = {}
        self._splitter: re.Pattern[str] | None = None
        added = getattr(self._tok, "added_tokens_decoder", {}) or {}
        plain = all(
            not (
                getattr(t, "lstrip", False)
                or getattr(t, "rstrip", False)
                or getattr(t, "normalized", False)
            )
            for t in added.values()
        )
        if added and plain and getattr(self._tok, "is_fast", False):
            self._special = {t.content: i for i, t in added.items()}
            longest_first = sorted(self._special, key=len, reverse=True)
            self._splitter = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def tokens(self, path: str, body: dict[str, Any]) -> list[int]:
        """The prompt tokens of a request to ``path`` (``/v1/completions`` or
        ``/v1/chat/completions``); raises PromptError when there is none to read."""
        if path.endswith("/chat/completions"):
            return self.chat_tokens(body)
        return self.completion_tokens(body)

    def completion_tokens(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: the first prompt decides where it goes
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if not isinstance(prompt, str):
            raise PromptError("prompt must be a string or a list of token ids")
        special = body.get("add_special_tokens", True)
        return list(self._tok.encode(prompt, add_special_tokens=bool(special)))

    def leading(self, path: str, body: dict[str, Any], chunk: int) -> Leading:
        """The prompt's leading tokens, without tokenizing a long piece of new text whole:
        a chat's remembered pieces, then at least two chunks' worth into the first long new
        piece (from a cut at a space between words, where a tokenizer's pre-tokens split
        too). The rest can wait: chunk keys chain, so chunks after one that no engine holds
        are held nowhere. Completions, and chats of known pieces, come whole."""
        if not path.endswith("/chat/completions") or body.get("add_special_tokens", False):
            whole = self.tokens(path, body)
            return Leading.of(whole)
        text = self.chat_text(body)
        if self._splitter is None:
            whole = self.encode_pieces(text)
            return Leading.of(whole)
        ids: list[int] = []
        pieces = [p for p in self._splitter.split(text) if p]
        for i, piece in enumerate(pieces):
            special = self._special.get(piece)
            if special is not None:
                ids.append(special)
                continue
            known = self._pieces.get(piece)
            if known is not None or len(piece) <= LAZY_CHARS:
                ids.extend(self.encode_pieces(piece))
                continue
            want = (len(ids) // chunk + 2) * chunk - len(ids)
            head, chars = self._head(piece, want)
            per_token = chars / max(len(head), 1)
            rest = len(piece) - chars + sum(len(p) for p in pieces[i + 1 :])
            estimate = len(ids) + len(head) + int(rest / per_token)
            ids.extend(head)
            return Leading(ids, False, estimate, lambda: self.encode_pieces(text))
        return Leading.of(ids)

    def _head(self, piece: str, want: int) -> tuple[list[int], int]:
        """At least ``want`` leading tokens of ``piece`` (fewer if it has fewer), tokenized
        from a cut just before a single space between words; and the characters they cover."""
        cut = want * 6 + 64
        while True:
            if cut >= len(piece):
                whole = self.encode_pieces(piece)
                return whole, len(piece)
            at = cut
            while at > 1 and not (
                piece[at] == " "
                and not piece[at - 1].isspace()
                and at + 1 < len(piece)
                and not piece[at + 1].isspace()
            ):
                at -= 1
            if at > 1:
                head = list(self._tok.encode(piece[:at], add_special_tokens=False))
                if len(head) >= want:
                    return head, at
            cut *= 2

    def chat_text(self, body: dict[str, Any]) -> str:
        """A chat request rendered through the model's template, as vLLM renders it."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise PromptError("messages must be a non-empty list")
        kwargs = dict(body.get("chat_template_kwargs") or {})
        continue_final = bool(body.get("continue_final_message", False))
        try:
            text = self._tok.apply_chat_template(
                _plain(messages),
                tokenize=False,
                add_generation_prompt=bool(body.get("add_generation_prompt", not continue_final)),
                continue_final_message=continue_final,
                **kwargs,
            )
        except Exception as exc:  # jinja errors on odd messages: the engine will answer them
            raise PromptError(f"chat template: {exc}") from None
        if not isinstance(text, str):
            raise PromptError("the chat template did not render to text")
        return text

    def chat_tokens(self, body: dict[str, Any]) -> list[int]:
        text = self.chat_text(body)
        if body.get("add_special_tokens", False):
            return list(self._tok.encode(text, add_special_tokens=True))
        return self.encode_pieces(text)

    def encode_pieces(self, text: str) -> list[int]:
        """``text``'s tokens without added special tokens: the same as the tokenizer's, from
        remembered pieces between special tokens where it can."""
        if self._splitter is None:
            return list(self._tok.encode(text, add_special_tokens=False))
        ids: list[int] = []
        for piece in self._splitter.split(text):
            if not piece:
                continue
            special = self._special.get(piece)
            if special is not None:
                ids.append(special)
                continue
            known = self._pieces.get(piece)
            if known is None:
                known = array("I", self._tok.encode(piece, add_special_tokens=False))
                self._pieces[piece] = known
                self._remembered += len(known)
                while self._remembered > PIECE_TOKENS and self._pieces:
                    _, dropped = self._pieces.popitem(last=False)
                    self._remembered -= len(dropped)
            else:
                self._pieces.move_to_end(piece)
            ids.extend(known)
        return ids


def _plain(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages whose content is a list of text parts, joined as vLLM joins them."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise PromptError("each message must be an object")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if isinstance(p, dict)]
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out
