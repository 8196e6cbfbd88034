"""The adapter contract (`hub.adapter`): the method table, the card built and parsed in one place,
the `org/name[@revision]` grammar and the refusals of `check_folder`, without a server."""

import json
import typing

import pytest

from hub.adapter import METHODS, SERVABLE_RANKS, SERVED_AS, AdapterRef, method_of, nearest_servable_rank
from hub.adapter.card import CardInfo, build_card
from hub.adapter.checks import ServedBase, check_folder
from loradock.errors import AdapterRefused, LoradockError
from tests.conftest import adapter_folder


def test_every_method_names_its_peft_config_and_how_it_is_served():
    import peft

    for method in METHODS.values():
        config_class = getattr(peft, method.config_class)
        fields = set(config_class.__dataclass_fields__)
        assert set(method.defaults) <= fields, method.name
        assert set(method.card_fields.values()) <= fields, method.name
        assert method.served_by in SERVED_AS and method.why and method.trains, method.name
        built = config_class(**method.defaults)
        assert built.peft_type.value == method.peft_type
        assert method_of({"peft_type": method.peft_type, **method.identity}) is method
        assert method_of(json.loads(json.dumps(built.to_dict(), default=str))) is method, method.name


def test_each_method_is_told_apart_from_its_peft_types_others():
    assert METHODS["lora"].served_by == METHODS["rslora"].served_by == "vllm-lora"
    assert method_of({"peft_type": "LORA"}) is METHODS["lora"]
    assert method_of({"peft_type": "LORA", "use_dora": True}) is METHODS["dora"]
    assert method_of({"peft_type": "LORA", "use_dora": True, "use_rslora": True}) is METHODS["dora"]
    assert method_of({"peft_type": "LORA", "use_rslora": True}) is METHODS["rslora"]
    assert method_of({"peft_type": "PREFIX_TUNING"}) is METHODS["prefix-tuning"]
    assert method_of({"peft_type": "VERA"}) is None
    assert {m.served_by for m in METHODS.values()} == set(SERVED_AS)


def test_servable_ranks_match_vllm_and_the_nearest_is_on_a_log_scale():
    from vllm.config.lora import MaxLoRARanks

    assert SERVABLE_RANKS == typing.get_args(MaxLoRARanks)
    assert [nearest_servable_rank(r) for r in (4, 12, 100, 300, 1000)] == [8, 16, 128, 320, 512]


@pytest.mark.parametrize("spec,repo_id,revision", [("alice/reverse", "alice/reverse", "main"),
                                                    ("alice/reverse@v1", "alice/reverse", "v1"),
                                                    ("a/b@" + "c" * 40, "a/b", "c" * 40),
                                                    ("a/b@feature/x", "a/b", "feature/x")])
def test_the_name_grammar(spec, repo_id, revision):
    ref = AdapterRef.parse(spec)
    assert (ref.repo_id, ref.revision) == (repo_id, revision)
    assert str(ref) == spec.removesuffix("@main")
    assert AdapterRef.looks_like(spec)


@pytest.mark.parametrize("spec,message", [("noslash", "needs a namespace"), ("a/b/c", "invalid repo id"),
                                          ("a/b@abc1234", "short or malformed commit sha"),
                                          ("a/b@bad rev", "not a valid revision")])
def test_bad_names_are_refused_with_the_fix(spec, message):
    with pytest.raises(LoradockError, match=message) as e:
        AdapterRef.parse(spec)
    assert e.value.fix
    assert not AdapterRef.looks_like("loradock-tiny") and not AdapterRef.looks_like("a/b/c")


def test_the_card_is_built_and_parsed_in_one_place(tmp_path):
    from huggingface_hub import ModelCard

    folder = adapter_folder(tmp_path / "a")
    (folder / "metrics.json").write_text(json.dumps({"eval_loss": 0.123456, "eval_metrics": {"exact_match": 0.9},
                                                     "dataset_sha256": "ab" * 32, "base_model_revision": "cd" * 32}))
    (folder / "run_config.yaml").write_text("data: x/train.jsonl\neval_data: x/heldout.jsonl\ntraining: {max_steps: 5}\n")
    built = CardInfo.from_folder(folder)
    card = ModelCard(str(build_card(folder, "alice/a")))  # what the Hub and huggingface_hub read back
    parsed = CardInfo.from_card_data(card.data)
    assert parsed == built
    assert built.method == "lora" and built.rank == 8 and built.headline.value == 0.1235
    assert [m.type for m in built.metrics] == ["loss", "exact_match"] and built.held_out == "heldout.jsonl"
    assert card.data.to_dict()["model-index"][0]["name"] == "alice/a"
    assert CardInfo.from_card_data(card.data.to_dict()) == built  # from list_models' cardData too


def test_check_folder_names_every_reason_at_once(tmp_path):
    folder = adapter_folder(tmp_path / "a", base="someone/else")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 64, "bias": "all",
                                                            "modules_to_save": ["lm_head"]}))
    with pytest.raises(AdapterRefused) as e:
        check_folder(folder, ServedBase("loradock/tiny-chat", "unused", max_lora_rank=16))
    reasons = " | ".join(e.value.reasons)
    assert len(e.value.reasons) == 4
    for words in ("trained on base model 'someone/else'", "restart with --max-lora-rank 64", "modules_to_save",
                  "trains biases"):
        assert words in reasons
    assert e.value.problem.startswith("adapter a cannot be served here: ")


@pytest.mark.parametrize("peft_type,extra,words", [
    ("VERA", {}, "VERA adapter of a kind loradock does not know (it knows lora, rslora"),
    ("PREFIX_TUNING", {}, "prefix-tuning adapter, which cannot be served (the prefix enters each layer's KV cache"),
    ("ADAPTION_PROMPT", {}, "llama-adapter adapter, which cannot be served"),
    ("LORA", {"use_dora": True}, "dora adapter, which vLLM cannot hot-swap"),
    ("IA3", {}, "ia3 adapter, which vLLM cannot hot-swap")])
def test_methods_the_server_cannot_hot_swap_are_refused_with_the_way_they_can_run(tmp_path, peft_type, extra, words):
    folder = adapter_folder(tmp_path / "p")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "loradock/tiny-chat",
                                                            "peft_type": peft_type, **extra}))
    with pytest.raises(AdapterRefused) as e:
        check_folder(folder, ServedBase("loradock/tiny-chat", "unused", 16))
    assert words in e.value.problem
    fix = {"PREFIX_TUNING": "loradock eval", "ADAPTION_PROMPT": "loradock eval", "LORA": "loradock merge",
           "IA3": "loradock merge", "VERA": "it knows"}[peft_type]
    assert fix in e.value.problem
