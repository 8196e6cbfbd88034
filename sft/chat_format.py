"""The chat format of loradock's tiny base model, and the checks every chat template must pass.

The same template is saved with the base model, copied into every adapter folder by training and
used by the server, so a model is asked questions exactly the way it was taught to answer them.
"""

from loradock.errors import LoradockError

USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
ROLES = ("system", "user", "assistant")

# `{% generation %}` marks the tokens an assistant-only loss trains on; the end-of-turn token is
# inside it, so the model learns to stop. Any role outside ROLES is a template error, not silence.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] ~ '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] ~ '<|end|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def training_chat_template(tokenizer) -> str:
    """The template to train with: the tokenizer's own when it marks assistant tokens with
    `{% generation %}`, else TRL's training variant of it for the model families TRL knows.

    Raises:
        LoradockError: the template has no generation markers and TRL has no variant for it.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template is None:
        raise LoradockError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no chat template",
            "use an instruct/chat model, or pass --chat-template FILE.jinja with {% generation %} markers",
        )
    if has_generation_markers(template):
        return template
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched is None:
        raise LoradockError(
            f"the chat template of {tokenizer.name_or_path!r} does not mark assistant tokens with "
            "{% generation %}, so the loss cannot be limited to the response",
            "pass --chat-template FILE.jinja: the model's template with {% generation %}...{% endgeneration %} "
            "around each assistant turn, end-of-turn token included",
        )
    return patched
