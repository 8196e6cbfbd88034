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


# --- damaged records and cards: read without their damaged fields, refused at push ----------------

DAMAGED_RECORDS = {  # case: (file, its text, words the push refusal names)
    "metrics-list": ("metrics.json", '{"eval_metrics": [1, 2]}',
                     "metrics.json: eval_metrics is [1, 2], not a mapping of metric names to numbers"),
    "metrics-string-loss": ("metrics.json", '{"eval_loss": "x"}', 'metrics.json: eval_loss is "x", not a finite number'),
    "metrics-not-json": ("metrics.json", '{"eval_loss": ', "metrics.json is not readable JSON"),
    "metrics-string-train-loss": ("metrics.json", '{"train_loss": "low", "steps": -1}',
                                  'metrics.json: steps is -1, not a whole number; metrics.json: train_loss is "low", '
                                  'not a finite number'),
    "metrics-a-list": ("metrics.json", "[0.25]", "metrics.json holds [0.25], not a mapping of fields"),
    "run-config-types": ("run_config.yaml", "data: 7\nparent: alice/x\ntraining: [1]\n",
                         "run_config.yaml: data is 7, not text; run_config.yaml: parent is \"alice/x\", not a mapping"),
    "run-config-not-yaml": ("run_config.yaml", "data: [", "run_config.yaml is not readable YAML"),
}


@pytest.mark.parametrize("case", DAMAGED_RECORDS)
def test_damaged_records_are_read_without_them_and_refused_at_push(tmp_path, case):
    """The card (and so serving and listing) leaves a damaged field out; push names it and sends nothing
    (the endpoint here answers nothing)."""
    from hub.client import Registry

    name, text, words = DAMAGED_RECORDS[case]
    folder = adapter_folder(tmp_path / case)
    (folder / name).write_text(text)
    card = CardInfo.from_folder(folder)
    assert (card.method, card.rank, card.headline, card.parent) == ("lora", 8, None, None)
    assert "model-index" not in build_card(folder, "alice/a").data.to_dict()
    with pytest.raises(LoradockError) as e:
        Registry("http://127.0.0.1:9", "unused").push(str(folder), "alice/damaged")
    assert words in e.value.problem and "nothing was pushed" in e.value.fix, e.value.message


def test_the_run_record_is_one_type_from_training_to_every_reader(tmp_path):
    """What training writes (`RunRecord.to_json`) reads back whole; a damaged field is left out and
    the sound ones beside it kept; the card takes the run's parent and data from the record."""
    from hub.adapter.records import RunRecord

    parent = {"repo_id": "alice/a", "revision": "v1", "commit": "c" * 40, "base_model": "loradock/tiny-chat"}
    dataset = {"repo_id": "alice/votes", "revision": "main", "commit": "d" * 40, "file": "sft.jsonl"}
    written = RunRecord(objective="dpo", method="lora", parent=parent, dataset=dataset, steps=12, train_loss=0.5,
                        eval_metrics={"exact_match": 0.75, "rouge_l": 0.9}, held_out_sha256="e" * 64,
                        peak_memory={"device": "cpu", "mib": 812.5}, log_history=[{"step": 1, "loss": 2.0}])
    folder = adapter_folder(tmp_path / "a")
    (folder / "metrics.json").write_text(written.to_json())
    assert RunRecord.read(folder) == written
    assert written.headline == ("exact_match", 0.75) and written.held_out == "e" * 64
    assert written.data() == f"datasets/alice/votes@{'d' * 12}/sft.jsonl (sha256 ?)"
    card = CardInfo.from_folder(folder)  # no run_config.yaml: the record alone says what the run was
    assert (card.parent, card.dataset, card.objective, card.datasets) == (parent, dataset, "dpo", ["alice/votes"])
    damaged = json.loads(written.to_json()) | {"steps": "twelve", "peak_memory": 5}
    assert RunRecord.from_dict(damaged) == RunRecord(**{**vars(written), "steps": None, "peak_memory": None})
    assert not RunRecord.read(tmp_path / "nothing").recorded


def test_a_damaged_field_leaves_the_sound_ones_beside_it(tmp_path):
    folder = adapter_folder(tmp_path / "a")
    (folder / "metrics.json").write_text(json.dumps({"eval_loss": 0.25, "eval_metrics": {"exact_match": "high"},
                                                     "dataset_sha256": 7, "base_model_revision": "cd" * 32}))
    (folder / "run_config.yaml").write_text("data: x/train.jsonl\neval_data: 7\nobjective: dpo\n")
    card = CardInfo.from_folder(folder)
    assert [(m.name, m.value) for m in card.metrics] == [("eval loss", 0.25)]
    assert (card.dataset_sha256, card.base_model_revision) == (None, "cd" * 32)
    assert (card.datasets, card.held_out, card.objective) == (["train.jsonl"], "train.jsonl", "dpo")


def test_a_card_of_wrong_types_is_read_without_them(tmp_path):
    """A card's metadata, as a listing gives it, may hold anything a pusher wrote: what has the wrong
    type is left out, the rest is read."""
    folder = adapter_folder(tmp_path / "a")
    (folder / "metrics.json").write_text(json.dumps({"eval_loss": 0.25}))
    sound = build_card(folder, "alice/a").data.to_dict()
    ours = sound["loradock"]
    damaged = {**sound, "tags": 7, "datasets": {"x": 1}, "self": 1, "ignore_metadata_errors": "no", "eval_results": 7,
               "loradock": {**ours, "parent": "alice/x", "training": [1], "lora": {**ours["lora"], "r": "8"}}}
    card = CardInfo.from_card_data(damaged)
    assert (card.base_model, card.method, card.headline) == ("loradock/tiny-chat", "lora", CardInfo.from_folder(folder).headline)
    assert (card.rank, card.parent, card.training, card.datasets) == (None, None, None, [])
    bare = CardInfo.from_card_data({"base_model": 7, "loradock": 7, "model-index": "x", "library_name": "peft"})
    assert bare == CardInfo(None, None, {}, held_out=None)


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


# --- broken weights: refused before serving and before publishing -------------------------------

Q, V = "base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj"


def tiny_lora(folder, base_model_dir, spoil=lambda tensors, config: None):
    """A valid rank-8 LoRA of the tiny base on two layers (q_proj 128->128, down_proj 384->128), with
    `spoil(tensors, config)` changing one thing in place first."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {f"{Q}.lora_A.weight": torch.randn(8, 128), f"{Q}.lora_B.weight": torch.randn(128, 8),
               f"{V}.lora_A.weight": torch.randn(8, 384), f"{V}.lora_B.weight": torch.randn(128, 8)}
    config = {"base_model_name_or_path": "loradock/tiny-chat", "peft_type": "LORA", "r": 8, "lora_alpha": 16,
              "target_modules": ["q_proj", "down_proj"]}
    changed = spoil(tensors, config)
    config = config if changed is None or isinstance(changed, torch.Tensor) else changed
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _set(tensors, name, value):
    tensors[name] = value


BROKEN = {  # case: (spoil, words every refusal must contain)
    "nan": (lambda t, c: t[f"{Q}.lora_B.weight"].__setitem__((3, 1), float("nan")),
            f"{Q}.lora_B.weight holds 1 NaN value"),
    "inf": (lambda t, c: t[f"{V}.lora_A.weight"][0].fill_(float("-inf")), f"{V}.lora_A.weight holds 384 infinite values"),
    "f64": (lambda t, c: _set(t, f"{Q}.lora_A.weight", t[f"{Q}.lora_A.weight"].double()),
            f"{Q}.lora_A.weight is F64"),
    "i8": (lambda t, c: _set(t, f"{V}.lora_B.weight", t[f"{V}.lora_B.weight"].to(__import__("torch").int8)),
           f"{V}.lora_B.weight is I8"),
    "a-b-ranks-disagree": (lambda t, c: _set(t, f"{Q}.lora_B.weight", t[f"{Q}.lora_B.weight"][:, :4].clone()),
                           f"{Q}.lora_A.weight has rank 8 but {Q}.lora_B.weight has rank 4"),
    "ranks-disagree-with-r": (lambda t, c: {**c, "r": 16}, f"{Q}.lora_A.weight has rank 8 but adapter_config.json says r 16"),
    "rank-4096-under-r-8": (lambda t, c: t.update({f"{V}.lora_A.weight": __import__("torch").randn(4096, 384),
                                                   f"{V}.lora_B.weight": __import__("torch").randn(128, 4096)}),
                            f"{V}.lora_A.weight has rank 4096 but adapter_config.json says r 8"),
    "three-d": (lambda t, c: _set(t, f"{Q}.lora_A.weight", t[f"{Q}.lora_A.weight"].reshape(8, 8, 16)),
                f"{Q}.lora_A.weight has shape [8, 8, 16]: a LoRA matrix is 2-D"),
    "lone-a": (lambda t, c: t.pop(f"{V}.lora_B.weight"), f"{V}.lora_A.weight has no lora_B"),
    "zero-r": (lambda t, c: {**c, "r": 0}, "r 0 in adapter_config.json is not a LoRA rank: it must be a positive integer"),
    "negative-r": (lambda t, c: {**c, "r": -8}, "r -8 in adapter_config.json is not a LoRA rank"),
    "string-r": (lambda t, c: {**c, "r": "8"}, "r '8' in adapter_config.json is not a LoRA rank"),
    "bad-rank-pattern": (lambda t, c: {**c, "rank_pattern": {"q_proj": 0}},
                         "rank_pattern['q_proj'] 0 in adapter_config.json is not a LoRA rank"),
    "string-alpha": (lambda t, c: {**c, "lora_alpha": "16"}, 'adapter_config.json: lora_alpha is "16", not a finite number'),
    "numbered-target-module": (lambda t, c: {**c, "target_modules": ["q_proj", 7]},
                               'adapter_config.json: target_modules is ["q_proj", 7], not text or a list of texts'),
    "numbered-base-model": (lambda t, c: {**c, "base_model_name_or_path": 7},
                            "adapter_config.json: base_model_name_or_path is 7, not text"),
    "config-is-a-list": (lambda t, c: [c], "adapter_config.json holds a JSON list, not an object"),
    "config-is-a-string": (lambda t, c: "LORA", "adapter_config.json holds a JSON string, not an object"),
}


@pytest.fixture
def tiny_base(base_model_dir):
    return ServedBase("loradock/tiny-chat", str(base_model_dir), max_lora_rank=16)


def test_a_tiny_valid_lora_passes_both_checks_and_per_module_ranks_are_read(tmp_path, base_model_dir, tiny_base):
    from hub.adapter.checks import check_publishable

    assert check_folder(tiny_lora(tmp_path / "ok", base_model_dir), tiny_base)["r"] == 8
    patterned = tiny_lora(tmp_path / "patterned", base_model_dir, lambda t, c: (
        t.update({f"{V}.lora_A.weight": t[f"{V}.lora_A.weight"][:4].clone(),
                  f"{V}.lora_B.weight": t[f"{V}.lora_B.weight"][:, :4].clone()}), {**c, "rank_pattern": {"down_proj": 4}})[1])
    assert check_folder(patterned, tiny_base)["rank_pattern"] == {"down_proj": 4}
    assert [rel for rel, _ in check_publishable(patterned, 2**30)] == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_weights_and_configs_are_refused_before_serving_naming_the_tensor(tmp_path, base_model_dir, tiny_base,
                                                                                 case):
    spoil, words = BROKEN[case]
    folder = tiny_lora(tmp_path / case, base_model_dir, spoil)
    with pytest.raises(AdapterRefused) as e:
        check_folder(folder, tiny_base)
    assert words in e.value.problem, e.value.problem


@pytest.mark.parametrize("case", BROKEN)
def test_loradock_push_refuses_the_same_before_uploading(tmp_path, base_model_dir, case):
    """`Registry.push` checks the folder before it opens a connection: the endpoint here answers nothing."""
    from hub.client import Registry

    spoil, words = BROKEN[case]
    folder = tiny_lora(tmp_path / case, base_model_dir, spoil)
    with pytest.raises(LoradockError) as e:
        Registry("http://127.0.0.1:9", "unused").push(str(folder), "alice/broken")
    assert words in e.value.problem and e.value.fix, e.value.message
    assert "nothing was pushed" in e.value.fix


def test_the_finiteness_scan_reads_each_version_of_a_file_once(tmp_path, base_model_dir, tiny_base, monkeypatch):
    import safetensors

    from hub.adapter import checks

    folder = tiny_lora(tmp_path / "a", base_model_dir)
    opened, real = [], safetensors.safe_open

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    check_folder(folder, tiny_base)
    reads = len(opened)
    check_folder(folder, tiny_base)
    check_folder(folder, tiny_base)
    assert reads >= 1 and len(opened) == reads + 2  # the header again each time, the tensors never again
    spoiled = tiny_lora(tmp_path / "b", base_model_dir, BROKEN["nan"][0])
    (folder / "adapter_model.safetensors").write_bytes((spoiled / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterRefused, match="NaN"):  # rewritten in place: a new version, scanned again
        check_folder(folder, tiny_base)
    assert checks.nonfinite_tensors.cache_info().hits >= 2


@pytest.mark.parametrize("spoil,words", [
    (lambda f: (f / "chat_template.jinja").write_bytes(b"{{ \xff }}"), "chat_template.jinja is not readable UTF-8 text"),
    (lambda f: ((f / "chat_template.jinja").unlink(), (f / "tokenizer_config.json").write_text('{"chat_template": 7}')),
     "tokenizer_config.json: chat_template is 7, not text"),
], ids=["not-utf8", "not-text"])
def test_a_chat_template_that_is_not_text_is_refused_at_push_and_before_serving(tmp_path, spoil, words):
    from hub.adapter.checks import check_publishable

    folder = adapter_folder(tmp_path / "a")
    spoil(folder)
    with pytest.raises(AdapterRefused) as refused:
        check_folder(folder, ServedBase("loradock/tiny-chat", "unused", 16))
    with pytest.raises(LoradockError) as unpublished:
        check_publishable(folder, 2**30)
    for error in (refused.value, unpublished.value):
        assert words in error.problem and "save_pretrained" in error.problem, error.problem
    assert "nothing was pushed" in unpublished.value.fix and CardInfo.from_folder(folder).chat_template is None


def test_a_weights_file_that_is_not_safetensors_is_refused_by_name(tmp_path, tiny_base):
    folder = adapter_folder(tmp_path / "junk")  # random bytes where the weights should be
    with pytest.raises(AdapterRefused, match="adapter_model.safetensors is not a readable safetensors file"):
        check_folder(folder, tiny_base)
