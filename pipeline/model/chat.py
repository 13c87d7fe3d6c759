"""The chat format the models are prompted with: ``System: ...`` / ``User: ...`` / ``Assistant: ...`` lines, ending
with ``Assistant:`` for the reply; the reply ends at the next ``\\nUser:``.

The chat route renders it with :func:`render`; :data:`CHAT_TEMPLATE_JINJA` is the same format as a Jinja template,
the form Hugging Face tokenizers (``apply_chat_template``) and ``/tokenizer_info`` clients expect.
"""

from __future__ import annotations

from collections.abc import Iterable

CHAT_STOP = "\nUser:"

# Newlines only inside expressions: Hugging Face renders templates with trim_blocks, which drops a newline that
# follows a block tag.
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif %}"
)


def render(messages: Iterable[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """``(role, content)`` pairs as prompt text."""
    text = "\n".join(f"{role.capitalize()}: {content}" for role, content in messages)
    return text + "\nAssistant:" if add_generation_prompt else text
