"""Chat conversations, rendered one way for training and for serving.

A conversation is a list of ``{"role", "content"}`` messages; the model's tokenizer renders it with its
chat template (saved with every fine-tuned model, so a served model renders what it was trained on).
Training learns the assistant turns' spans (:func:`render_chat`); serving sends the conversation
through the assistant's generation prompt (:func:`chat_prompt`): the same template, the same text.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

ChatRole = Literal["system", "user", "assistant", "tool"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)


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
    model must produce after the generation prompt at serving time.
    """
    full, spans = _render(tok, messages, template, False), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = chat_prompt(tok, messages[:i], template), _render(tok, messages[: i + 1], template, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"the chat template does not render this conversation turn by turn (at message {i}), so its replies cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans
