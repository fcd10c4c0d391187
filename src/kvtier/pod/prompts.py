"""A request's prompt tokens, as the engine will see them, so the router's keys are the engine's.

vLLM tokenizes a completion's text with the special tokens the tokenizer adds
(``add_special_tokens`` defaults to true there) and a chat by rendering the model's chat
template to text (``add_generation_prompt`` true, ``continue_final_message`` false by
default) and tokenizing it without special tokens. The router does the same with the model's
own tokenizer; a test pins router keys = engine keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtier.errors import KvtierError


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

    def chat_tokens(self, body: dict[str, Any]) -> list[int]:
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
        special = bool(body.get("add_special_tokens", False))
        return list(self._tok.encode(text, add_special_tokens=special))


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
