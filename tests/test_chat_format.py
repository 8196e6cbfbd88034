"""The chat template a run trains with (the model's own, as it is) and the tokens it trains: each
assistant answer and the token that ends its turn, for the real templates of nine model families.

The fast tests tokenize with a byte-level BPE trained here on a few lines (no base model needed),
given each family's special tokens so that every end-of-turn marker is one token.
"""

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loradock.errors import LoradockError
from sft.chat_format import CHAT_TEMPLATE, check_chat_template
from sft.data_check import MARK_CLOSE, MARK_OPEN, check_data, enforce
from tests.conftest import write_jsonl

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"  # SOURCES.md there names each model


@dataclass
class Family:
    special: list[str]  # each becomes one token of the test tokenizer
    end_of_turn: str
    bos: str | None = None
    eos: str | None = None
    system: bool = True  # the template renders a system turn the way it renders the prompt it answers
    trims: bool = False  # the template strips whitespace around an answer
    added: list[str] = field(default_factory=list)  # tokens that are not special (Qwen3's think tags)


FAMILIES = {
    "smollm2": Family(["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "qwen2_5": Family(["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "qwen3": Family(["<|im_start|>", "<|im_end|>"], "<|im_end|>", added=["<think>", "</think>"]),
    "llama3_2": Family(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
                       bos="<|begin_of_text|>", trims=True),
    "gemma3": Family(["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", bos="<bos>", trims=True),
    "gemma2": Family(["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", bos="<bos>", system=False, trims=True),
    # Its system prompt goes into the last user turn, and a conversation ending with an answer has none
    # (test_mistral_drops_a_system_prompt_from_what_it_trains_and_is_refused).
    "mistral_nemo": Family(["[INST]", "[/INST]"], "</s>", bos="<s>", eos="</s>", system=False),
    "phi3_5": Family(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>", eos="<|endoftext|>"),
    "aya_expanse": Family(["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
                           "<|CHATBOT_TOKEN|>"], "<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", trims=True),
}

SYSTEM = {"role": "system", "content": "Be brief."}
# The answers also appear in the prompts, and the last one ends in a newline a trimming template drops.
SINGLE = [{"role": "user", "content": "Reverse the words: cat dog"}, {"role": "assistant", "content": "dog cat"}]
MULTI = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"},
         {"role": "user", "content": "Now say no, twice, not yes."}, {"role": "assistant", "content": "no no\n"}]


TINY_FORMAT = Family(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>")  # sft.chat_format's


@pytest.fixture(scope="module")
def text_tokenizer():
    """A fast byte-level BPE tokenizer (every string tokenizes; offsets map to characters) trained on
    the test conversations, with "dogs" frequent enough to be one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    lines = [m["content"] for m in [SYSTEM, *SINGLE, *MULTI]] + ["dogs " * 20]
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def family_tokenizer(tokenizer, family: Family):
    """A copy of `tokenizer` with the family's special tokens added, each one token."""
    tokenizer = copy.deepcopy(tokenizer)
    special = {"additional_special_tokens": family.special}
    special.update({k: v for k, v in (("bos_token", family.bos), ("eos_token", family.eos)) if v})
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(family.added)
    return tokenizer


def conversations(family: Family) -> list[list[dict]]:
    return [SINGLE, MULTI] + ([[SYSTEM, *SINGLE], [SYSTEM, *MULTI]] if family.system else [])


def trained_runs(tokenizer, example) -> list[str]:
    """Each run of trained tokens, decoded."""
    runs, run = [], []
    for token, trained in zip(example.input_ids, example.assistant_masks):
        if trained:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    return [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in runs + ([run] if run else [])]


def check_chats(tmp_path, tokenizer, template: str, chats: list[list[dict]]):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat} for chat in chats])
    return check_data(path, tokenizer, template, max_length=256)


def test_our_template_is_used_as_it_is(tokenizer):
    assert check_chat_template(tokenizer) == tokenizer.chat_template


def test_a_template_without_markers_is_kept_as_it_is(text_tokenizer):
    """Qwen2.5's template has no {% generation %} markers. It used to be swapped for TRL's training
    variant, which the adapter was then saved and served with; now it is trained as it is."""
    qwen = copy.deepcopy(text_tokenizer)
    qwen.chat_template = (TEMPLATES / "qwen2_5.jinja").read_text()
    assert check_chat_template(qwen) == (TEMPLATES / "qwen2_5.jinja").read_text()
    assert qwen.chat_template == (TEMPLATES / "qwen2_5.jinja").read_text()


@pytest.mark.parametrize("given", [False, True], ids=["the model's own", "--chat-template"])
def test_the_adapter_is_saved_with_the_template_as_it_is(tmp_path, text_tokenizer, given):
    """What training saves into the adapter folder (`load_tokenizer`, then `save_pretrained`) is the
    model's template, or the --chat-template file, byte for byte: Qwen3's, with no markers."""
    from sft.train import load_tokenizer

    base, template = tmp_path / "base", TEMPLATES / "qwen3.jinja"
    own = copy.deepcopy(text_tokenizer)
    own.chat_template = CHAT_TEMPLATE if given else template.read_text()
    own.save_pretrained(base)
    tokenizer = load_tokenizer(str(base), str(template) if given else None)
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "chat_template.jinja").read_bytes() == template.read_bytes()


def test_a_template_that_is_not_jinja_is_refused(text_tokenizer):
    broken = copy.deepcopy(text_tokenizer)
    broken.chat_template = "{% for m in messages %}{{ m['content'] }}"
    with pytest.raises(LoradockError, match="is not valid Jinja: line 1") as e:
        check_chat_template(broken)
    assert "--chat-template" in e.value.fix


@pytest.mark.parametrize("name", FAMILIES)
def test_each_familys_answers_and_end_of_turn_tokens_are_trained(tmp_path, text_tokenizer, name):
    """Single and multi-turn, with and without a system turn: the trained tokens are exactly each
    answer (as the template writes it) and the token that ends its turn, and the report marks them."""
    family = FAMILIES[name]
    tokenizer = family_tokenizer(text_tokenizer, family)
    chats = conversations(family)
    report = check_chats(tmp_path, tokenizer, (TEMPLATES / f"{name}.jinja").read_text(), chats)
    assert report.rows_kept == len(chats) and not report.dropped
    for chat, example in zip(chats, report.kept):
        answers = [m["content"].strip() if family.trims else m["content"] for m in chat if m["role"] == "assistant"]
        assert trained_runs(tokenizer, example) == [answer + family.end_of_turn for answer in answers], chat
    assert report.example.count(MARK_OPEN) == 1  # row 1's one answer, its end-of-turn token marked with it
    assert f"{MARK_OPEN}dog cat{family.end_of_turn}{MARK_CLOSE}" in report.example


def test_our_template_without_its_markers_trains_the_same_tokens(tmp_path, text_tokenizer):
    """The tiny base's template marks answer and end-of-turn token with {% generation %}; found by
    rendering instead, the tokens and the mask are the same."""
    tokenizer = family_tokenizer(text_tokenizer, TINY_FORMAT)
    plain = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    chats = [SINGLE, MULTI, [SYSTEM, *MULTI]]
    marked, found = (check_chats(tmp_path, tokenizer, template, chats) for template in (CHAT_TEMPLATE, plain))
    rows = [[(e.input_ids, e.assistant_masks) for e in report.kept] for report in (marked, found)]
    assert rows[0] == rows[1] and len(rows[0]) == len(chats)
    assert found.example == marked.example


def test_mistral_drops_a_system_prompt_from_what_it_trains_and_is_refused(tmp_path, text_tokenizer):
    """Mistral's template writes the system prompt into the last user turn only, so a conversation
    that ends with an answer is rendered without it, unlike the prompt the model is asked at serving."""
    family = FAMILIES["mistral_nemo"]
    chats = [SINGLE, [SYSTEM, *SINGLE]]
    with pytest.raises(LoradockError) as e:
        check_chats(tmp_path, family_tokenizer(text_tokenizer, family), (TEMPLATES / "mistral_nemo.jinja").read_text(),
                    chats)
    assert "row 2, turn 3: the conversation rendered up to this answer with the generation prompt" in e.value.problem
    assert "--chat-template FILE.jinja" in e.value.fix and "{% generation %}" in e.value.fix
    # the two renderings, from where they part
    assert "with the generation prompt: '<s>[INST]' ⟂ 'Be brief.\\n\\nReverse the words" in e.value.details
    assert "with the answer:            '<s>[INST]' ⟂ 'Reverse the words: cat dog[/INST]dog cat</s>'" \
        in e.value.details


UNLOCATABLE = {
    # template, the words of the refusal. The first one was refused before for having no {% generation %}
    # markers at all; now it is refused because nothing ends an answer's turn.
    "no end-of-turn": ("{% for m in messages %}{{ m['content'] }}{% endfor %}",
                       "nothing follows the answer in its turn"),
    "answer rewritten": ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | upper + '<|end|>' }}"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
                         "is not in the rendering as it is"),
    "generation prompt not the answer's start": ((TEMPLATES / "deepseek_r1_distill.jinja").read_text(),
                                                 "is not the start of it rendered with the answer"),
    # "dog" + "s" is one token ("▁dogs"), so no token boundary is where the answer ends
    "answer's end inside a token": ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + 's\n' }}"
                                    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
                                    "holds the answer's end and what follows it"),
}


@pytest.mark.parametrize("case", UNLOCATABLE)
def test_a_template_whose_answers_cannot_be_located_is_refused(tmp_path, text_tokenizer, case):
    template, words = UNLOCATABLE[case]
    chat = [{"role": "user", "content": "Say cat dog"}, {"role": "assistant", "content": "cat dog"}]
    with pytest.raises(LoradockError) as e:
        check_chats(tmp_path, family_tokenizer(text_tokenizer, TINY_FORMAT), template, [chat])
    assert e.value.problem.startswith("row 1, turn 2: ") and words in e.value.problem, e.value.problem
    assert "has no {% generation %} markers" in e.value.problem
    assert "--chat-template FILE.jinja" in e.value.fix and "{% generation %}" in e.value.fix
    heading, shown = e.value.details.split("\n", 1)
    assert heading == "row 1 rendered, around the place it goes wrong (⟂):" and " ⟂ " in shown


@pytest.mark.parametrize("name,chat,words", [
    ("gemma2", [SYSTEM, *SINGLE], "turns system, user, assistant: System role not supported"),
    ("gemma3", [SINGLE[0], *SINGLE], "turns user, user, assistant: Conversation roles must alternate"),
    ("mistral_nemo", [SINGLE[0], *SINGLE], "turns user, user, assistant: After the optional system message"),
])
def test_a_conversation_the_template_refuses_is_a_bad_row_with_the_fix(tmp_path, text_tokenizer, name, chat, words):
    """The template's raise_exception is the row's problem, counted against --max-bad-fraction."""
    tokenizer = family_tokenizer(text_tokenizer, FAMILIES[name])
    report = check_chats(tmp_path, tokenizer, (TEMPLATES / f"{name}.jinja").read_text(), [SINGLE, chat, SINGLE])
    assert report.rows_kept == 2 and [n for n, _ in report.dropped["template_refused"]] == [2]
    assert report.dropped["template_refused"][0][1].startswith(words)
    rendered = report.render()
    assert "template refused" in rendered and "--chat-template FILE.jinja that accepts them" in rendered
    with pytest.raises(LoradockError, match=r"1 of 3 rows .* are bad") as e:
        enforce(report, max_bad_fraction=0.05)
    assert "System role" in e.value.details or "alternate" in e.value.details


def test_an_answer_after_a_space_trains_the_token_the_model_writes(tmp_path, text_tokenizer):
    """Mistral's v3 templates write " " + answer after [/INST]: the model writes " dog" as one token,
    so that token is trained, its space included; text of another turn never is."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                "'[/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    mistral = family_tokenizer(text_tokenizer, Family(["[INST]", "[/INST]"], "</s>", bos="<s>", eos="</s>"))
    (example,) = check_chats(tmp_path, mistral, template, [SINGLE]).kept
    assert trained_runs(mistral, example) == [" dog cat</s>"]
    assert mistral.convert_ids_to_tokens(example.input_ids)[-4:] == ["[/INST]", "Ġdog", "Ġcat", "</s>"]


@pytest.mark.slow
def test_training_with_a_template_without_markers_keeps_it_byte_for_byte(cli, tmp_path):
    """`loradock train --chat-template` with the tiny base's format, without {% generation %}: it
    trains on the answers found by rendering, and the adapter folder holds the given template."""
    template = tmp_path / "plain.jinja"
    template.write_bytes(CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "").encode())
    rows = [{"prompt": f"Repeat the words: w{i} x{i}", "response": f"w{i} x{i}"} for i in range(16)]
    output = tmp_path / "adapter"
    result = cli("train", "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--output", output,
                 "--chat-template", template, "--max-steps", "3", "--batch-size", "4", "--max-length", "64",
                 "--lora-r", "8", "--eval-generations", "0", "--training.save_strategy", "no")
    assert result.code == 0, result.text
    assert f"{MARK_OPEN}w0 x0<|end|>{MARK_CLOSE}" in result.out  # the data check's example, printed first
    assert (output / "chat_template.jinja").read_bytes() == template.read_bytes()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 3 and math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert 0 < metrics["train_data"]["trained_tokens"] < metrics["train_data"]["tokens"]
