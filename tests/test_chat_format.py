"""The chat template a run trains with: ours, TRL's training variant of a known model's, or a refusal."""

import copy
from pathlib import Path

import pytest
import trl

from loradock.errors import LoradockError
from sft.chat_format import training_chat_template

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"


def test_our_template_is_used_as_it_is(tokenizer):
    assert training_chat_template(tokenizer) == tokenizer.chat_template


def test_qwen2_5s_template_gets_trls_training_variant(tokenizer):
    """The path a real Hub model takes (Qwen/Qwen2.5-0.5B-Instruct ships this template, without markers)."""
    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = (TRL_TEMPLATES / "qwen2_5.jinja").read_text()
    template = training_chat_template(qwen)
    assert template == (TRL_TEMPLATES / "qwen2_5_training.jinja").read_text()
    assert "{% generation %}" in template or "{%- generation %}" in template


def test_an_unknown_template_without_markers_is_refused_with_the_fix(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(LoradockError, match="does not mark assistant tokens") as e:
        training_chat_template(plain)
    assert "--chat-template" in e.value.fix
