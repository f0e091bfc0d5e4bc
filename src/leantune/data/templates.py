"""Prompt templates: a conversation (a list of ``{"role", "content"}`` messages ending with the assistant's
answer) to an ``Example(prompt, response)``.

``template="auto"`` uses the tokenizer's own chat template when it has one (``tokenizer.chat_template``) and
leantune's default template otherwise; ``"chat"`` insists on the tokenizer's; ``"default"`` always uses ours.

leantune's default template (for tokenizers without a chat template, e.g. base models and the built-in ones)::

    ### System:
    {system message}                  <- only when the conversation has one

    ### User:
    {user message}

    ### Assistant:
    {earlier assistant message}       <- earlier turns, if any, the same way

    ### Assistant:
                                      <- the prompt ends here, after "### Assistant:\\n"
    {the last assistant message}      <- the response: the only tokens with a loss (then EOS)

The end of the answer is always the tokenizer's EOS token, appended by the encoder: with a chat template, the
end-of-turn text that follows the answer is replaced by EOS (for Llama-3, Qwen and Mistral chat models EOS is that
end-of-turn token).
"""

from __future__ import annotations

from .encode import Example

TEMPLATES = ("auto", "chat", "default")
ROLES = ("system", "user", "assistant")
_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


class TemplateError(ValueError):
    pass


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise TemplateError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")


def alpaca_messages(instruction: str, input_text: str | None, output: str) -> list[dict]:
    """An alpaca row as a two-turn conversation; a non-empty ``input`` follows the instruction after a blank line."""
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def render_default(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """leantune's default template (see the module docstring)."""
    text = "".join(f"{_HEADERS[m['role']]}{m['content']}\n\n" for m in messages)
    return text + (_HEADERS["assistant"] if add_generation_prompt else "")


def uses_chat_template(tokenizer, template: str) -> bool:
    check_template(template)
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise TemplateError(
            "template='chat' but this tokenizer has no chat template; use template='auto' or 'default'"
        )
    return has and template != "default"


def conversation_example(messages: list[dict], tokenizer, template: str = "auto") -> Example:
    """The prompt is every message but the last, rendered up to where the assistant's answer begins; the response
    is the last (assistant) message as the template writes it."""
    answer = messages[-1]["content"]
    if not uses_chat_template(tokenizer, template):
        return Example(render_default(messages[:-1]), answer)
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja raises its own types (e.g. "roles must alternate"); say which row
        raise TemplateError(f"the tokenizer's chat template rejected this conversation: {e}") from None
    if not full.startswith(prompt):
        raise TemplateError(
            "the tokenizer's chat template renders the conversation differently with and without the answer, so "
            "the answer cannot be told apart from the prompt; use template='default'"
        )
    tail = full[len(prompt):]
    # Templates may trim the answer or put text before it (e.g. an empty reasoning block): keep that prefix as
    # part of the response, and drop the end-of-turn text after it (EOS takes its place).
    for needle in (answer, answer.strip()):
        at = tail.find(needle) if needle else -1
        if at >= 0:
            return Example(prompt, tail[:at + len(needle)])
    raise TemplateError(
        "the tokenizer's chat template does not copy the assistant's answer verbatim; use template='default'"
    )
