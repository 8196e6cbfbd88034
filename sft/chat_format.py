"""The chat format of loradock's tiny base model, and the check every chat template must pass.

A model's template is saved with it, copied unchanged into every adapter folder by training and
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


def check_chat_template(tokenizer) -> str:
    """The template to train with: the tokenizer's own (or the --chat-template file it was given), as
    it is. The same text is saved with the adapter and serves it; the tokens trained are found from
    its {% generation %} markers where it has them, else by rendering (`sft.assistant_masks`).

    Raises:
        LoradockError: the tokenizer has no chat template, or it is not valid Jinja.
    """
    from jinja2 import TemplateError, TemplateSyntaxError

    template = tokenizer.chat_template
    if template is None:
        raise LoradockError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no chat template",
            "use an instruct/chat model, or pass --chat-template FILE.jinja",
        )
    try:  # compiled before anything is rendered; what the template says about this one chat does not matter here
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    except TemplateSyntaxError as e:
        raise LoradockError(f"the chat template of {tokenizer.name_or_path!r} is not valid Jinja: line {e.lineno}: "
                            f"{e.message}", "fix the template, or pass --chat-template FILE.jinja") from None
    except TemplateError:
        pass
    return template
