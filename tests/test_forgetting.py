"""The forgetting guard on a trained adapter of the tiny base: the general sample's perplexity with
the adapter and without it, measured on the same weights."""

import json
import math

import pytest

from sft.forgetting import GENERAL, answer_tokens, forgetting, general_sample, perplexity


def test_the_general_sample_ships_with_answers_a_template_renders_as_a_suffix(tokenizer):
    items = general_sample()
    assert len(items) == 48 == len(GENERAL.read_text().splitlines())
    rendered = [answer_tokens(tokenizer, c, a) for c, a in items]
    assert all(r is not None and len(r[0]) > r[1] for r in rendered)  # every answer has tokens to score


@pytest.mark.slow
def test_forgetting_compares_the_adapter_with_its_own_base(trained_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.base_model import resolve_base_model

    adapter = trained_adapters["reverse"]
    base_path = resolve_base_model(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    alone, rows = perplexity(base, tokenizer, general_sample())
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    figures = forgetting(model, tokenizer)
    assert rows == figures["rows"] == 48
    assert figures["base_perplexity"] == pytest.approx(alone, rel=1e-4)  # disabled, the adapter is the base
    assert math.isfinite(figures["perplexity"]) and figures["perplexity"] != figures["base_perplexity"]
    assert figures["forgetting"] == round(figures["perplexity"] / figures["base_perplexity"] - 1, 4)
    assert len(figures["sha256"]) == 64 and figures["sample"] == "general.jsonl"
