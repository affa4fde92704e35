"""Chat conversations, rendered one way for training and for serving.

A conversation is a list of ``{"role", "content"}`` messages; the model's tokenizer renders it with its
chat template (saved with every fine-tuned model, so a served model renders what it was trained on).
Training learns the assistant turns' spans (:func:`render_chat`); serving sends the conversation
through the assistant's generation prompt (:func:`chat_prompt`): the same template, the same text.
Both tokenize it with :func:`chat_tokens`, so a message's content never yields a control token.
"""

from __future__ import annotations

import bisect
from typing import Any, Literal, get_args

ChatRole = Literal["system", "user", "assistant", "tool"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)
MAX_MESSAGES = 256
"""Most messages in one conversation, in training data and in a chat request alike (rendering a
conversation's assistant spans costs time quadratic in its turns)."""


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template refused the conversation."""


def _render(tok: Any, messages: list[dict[str, str]], template: str | None, generation_prompt: bool) -> str:
    if not (template or getattr(tok, "chat_template", None)):
        raise ChatTemplateError("the tokenizer has no chat template")
    try:
        return tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja errors, a template's raise_exception() (e.g. roles out of order)
        raise ChatTemplateError(f"the chat template refused these messages: {e}") from None


def chat_prompt(tok: Any, messages: list[dict[str, str]], template: str | None = None) -> str:
    """The conversation ending in the assistant's generation prompt: what a served model continues."""
    return _render(tok, messages, template, generation_prompt=True)


def render_chat(
    tok: Any, messages: list[dict[str, str]], template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span is what the template adds between :func:`chat_prompt` of the conversation before it
    and the conversation through this turn: the reply and its end-of-turn tokens, exactly what the
    model must produce after the generation prompt at serving time. Those prefixes are rendered with
    a short placeholder for every content, so the cost grows with the number of turns (capped at
    MAX_MESSAGES), not with turns times the conversation's length.
    """
    full, spans, _ = _render_chat(tok, messages, template)
    return full, spans


def encode_chat(
    tok: Any, messages: list[dict[str, str]], template: str | None = None
) -> tuple[str, list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Training's view of a conversation: the rendered text, :func:`chat_tokens`' ids and offsets,
    and the assistant spans of :func:`render_chat`, with the contents located once for both."""
    full, spans, contents = _render_chat(tok, messages, template)
    ids, offsets = chat_tokens(tok, full, messages, template, contents=contents)
    return full, ids, offsets, spans


def _render_chat(
    tok: Any, messages: list[dict[str, str]], template: str | None
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The rendered conversation, its assistant spans and where each content lies in it."""
    full = _render(tok, messages, template, False)
    marked = _Marked(tok, messages, template, False, full)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_prompt(tok, marked.messages[:i], template)
        through = _render(tok, marked.messages[: i + 1], template, False)
        if not (through.startswith(before) and marked.text.startswith(through)):
            raise ChatTemplateError(
                f"the chat template does not render this conversation turn by turn (at message {i}), so its replies cannot be located"
            )
        spans.append((marked.real(len(before)), marked.real(len(through))))
    return full, spans, marked.spans


class _Marked:
    """A conversation rendered with a unique placeholder for each content, and where each content
    lies in ``text``, the same conversation rendered (a template that trims contents is allowed)."""

    def __init__(self, tok: Any, messages: list[dict[str, str]], template: str | None, prompt: bool, text: str):
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        self.messages = [{**m, "content": k} for m, k in zip(messages, marks)]
        self.text = _render(tok, self.messages, template, prompt)
        for strip in (False, True):
            self.spans, self.moves, rebuilt, pos = [], [], [], 0  # moves: (marked end, real end) per content
            for m, mark in zip(messages, marks):
                at = self.text.find(mark, pos)
                if at == -1:  # the template leaves this message out
                    continue
                content = m["content"].strip() if strip else m["content"]
                rebuilt.append(self.text[pos:at])
                start = sum(map(len, rebuilt))
                rebuilt.append(content)
                self.spans.append((start, start + len(content)))
                pos = at + len(mark)
                self.moves.append((pos, start + len(content)))
            if "".join(rebuilt) + self.text[pos:] == text:
                return
        raise ChatTemplateError(
            "the chat template rewrites message contents, so they cannot be kept apart from its control tokens"
        )

    def real(self, position: int) -> int:
        """A position of the placeholder rendering (outside any placeholder) in the real one."""
        marked_end, real_end = next(((m, r) for m, r in reversed(self.moves) if m <= position), (0, 0))
        return position - marked_end + real_end


def chat_tokens(
    tok: Any,
    text: str,
    messages: list[dict[str, str]],
    template: str | None = None,
    generation_prompt: bool = False,
    contents: list[tuple[int, int]] | None = None,
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a rendered conversation and each token's character span, where only the template
    makes control tokens: a content holding ``<|im_end|><|im_start|>system`` is tokenized as that
    text (Hugging Face's ``split_special_tokens``), never as a turn boundary. Unless a content
    holds such a string, the ids are the plain tokenization of ``text``. ``contents``: where each
    message's content lies in ``text``, when the caller has located them already."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    if not special.intersection(ids):
        return ids, offsets
    if contents is None:  # in order, disjoint
        contents = _Marked(tok, messages, template, generation_prompt, text).spans
    starts = [a for a, _ in contents]

    def in_content(position: int) -> bool:
        k = bisect.bisect_right(starts, position) - 1
        return k >= 0 and position < contents[k][1]

    spoofed = [in_content(start) for start, _ in offsets]
    if not any(i in special and s for i, s in zip(ids, spoofed)):
        return ids, offsets
    out_ids, out_offsets, pos = [], [], 0  # the template's control tokens kept, the text between them plain
    for i, (start, end), s in [*zip(ids, offsets, spoofed), (None, (len(text), len(text)), False)]:
        if i is None or (i in special and not s):
            piece = tok(
                text[pos:start], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True
            )
            out_ids += piece["input_ids"]
            out_offsets += [(pos + a, pos + b) for a, b in piece["offset_mapping"]]
            if i is not None:
                out_ids.append(i)
                out_offsets.append((start, end))
            pos = end
    return out_ids, out_offsets
