"""Continuing an adapter (`loradock train --init-adapter`), preference tuning (`--objective dpo`),
data from a registry dataset repo, `loradock data check --objective dpo`, and push's parent check,
through the real CLI, the session registry and the tiny base."""

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.conftest import ASSETS, write_jsonl

REVERSE = ASSETS / "tasks" / "reverse"
QUICK = ["--max-steps", "4", "--batch-size", "8", "--max-length", "64", "--eval-generations", "2", "--lr", "1e-3",
         "--training.save_strategy", "no", "--training.logging_steps", "2", "--training.eval_steps", "4",
         "--training.disable_tqdm", "true"]


def nothing_written(output: Path) -> bool:
    return not output.exists() and not (output.parent / f".{output.name}.loradock-run").exists()


def front_matter(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def reverse_rows(n: int, start: int = 0) -> list[dict]:
    lines = (REVERSE / "train.jsonl").read_text().splitlines()[start:start + n]
    return [json.loads(line) for line in lines]


def preference_rows(n: int, start: int = 0) -> list[dict]:
    """Pairs in the three forms TRL documents: the right reversal chosen, the words as given rejected."""
    rows = []
    for i, row in enumerate(reverse_rows(n, start)):
        wrong = row["prompt"].split(": ", 1)[1]
        if i % 3 == 0:
            rows.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": wrong})
        elif i % 3 == 1:
            rows.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                         "chosen": [{"role": "assistant", "content": row["response"]}],
                         "rejected": [{"role": "assistant", "content": wrong}]})
        else:
            user = {"role": "user", "content": row["prompt"]}
            rows.append({"chosen": [user, {"role": "assistant", "content": row["response"]}],
                         "rejected": [user, {"role": "assistant", "content": wrong}]})
    return rows


@pytest.fixture(scope="module")
def parent(tmp_path_factory, base_model_dir) -> Path:
    """A LoRA adapter of the tiny base (r 8, all linear layers) whose B matrices are not zero, so
    that starting from it is told apart from starting fresh; saved with its tokenizer, like training does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("parent") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    model.peft_config["default"].base_model_name_or_path = "loradock/tiny-chat"
    model.save_pretrained(folder, save_embedding_layers=False)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pushed_parent(parent, registry) -> tuple[str, str]:
    """The parent in the session registry as alice/dpo-parent, tagged v1: (repo id, commit sha)."""
    from hub.client import Registry

    result = Registry(registry.url, registry.write_token).push(str(parent), "alice/dpo-parent", tag="v1")
    return result.repo_id, result.commit


def lora_weights_at_start(patch) -> dict:
    """Patch both trainers' `train` to keep the adapter's LoRA tensors as they are when training starts."""
    from sft.trainer import LoradockDPOTrainer, LoradockSFTTrainer

    seen = {}
    for cls in (LoradockSFTTrainer, LoradockDPOTrainer):
        original = cls.train

        def train(self, *args, _original=original, **kwargs):
            seen.update({name.replace(".default.", "."): p.detach().clone()
                         for name, p in self.model.named_parameters() if "lora_" in name and ".default." in name})
            return _original(self, *args, **kwargs)

        patch.setattr(cls, "train", train)
    return seen


def assert_starts_from(seen: dict, folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    assert saved and set(saved) == set(seen)
    assert all(torch.equal(seen[name], tensor) for name, tensor in saved.items())


# --- preference rows ---------------------------------------------------------------------------

def test_preference_rows_in_each_form():
    from sft.preference_data import to_preference

    user = {"role": "user", "content": "q"}
    expected = ([user], "good", "bad")
    assert to_preference({"prompt": "q", "chosen": "good", "rejected": "bad"}) == expected
    assert to_preference({"prompt": [user], "chosen": [{"role": "assistant", "content": "good"}],
                          "rejected": [{"role": "assistant", "content": "bad"}]}) == expected
    assert to_preference({"chosen": [user, {"role": "assistant", "content": "good"}],
                          "rejected": [user, {"role": "assistant", "content": "bad"}]}) == expected
    with_system = to_preference({"system": "be brief", "prompt": "q", "chosen": "good", "rejected": "bad"})
    assert with_system[0] == [{"role": "system", "content": "be brief"}, user]
    assert to_preference({"question": "q", "chosen": "good", "rejected": "bad"}, {"question": "prompt"}) == expected


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "same_answers"),
    ({"prompt": "q", "chosen": "good", "rejected": "  "}, "empty_side"),
    ({"prompt": "q", "chosen": "good"}, "missing_field"),
    ({"chosen": "good", "rejected": "bad"}, "no_prompt"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "no_prompt"),
    ({"prompt": "q", "chosen": 3, "rejected": "bad"}, "wrong_type"),
])
def test_unusable_preference_rows_have_a_reason(row, reason):
    from sft.data import RowProblem
    from sft.preference_data import to_preference

    with pytest.raises(RowProblem) as problem:
        to_preference(row)
    assert problem.value.reason == reason


def test_data_check_reports_bad_preference_rows_with_row_numbers(cli, tmp_path):
    rows = preference_rows(12)
    rows[2] = {"prompt": "q", "chosen": "same", "rejected": "same"}
    rows[6] = {"prompt": "q", "chosen": "fine", "rejected": ""}
    rows[9] = {"prompt": "q", "chosen": "fine"}
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    result = cli("data", "check", "--objective", "dpo", data)
    assert result.code == 2, result.text
    out = result.text
    assert "rows read      12" in out and "rows kept      9" in out
    assert "same answers         1  rows 3" in out and "answers differ" in out
    assert "empty side           1  rows 7" in out and "write both answers" in out
    assert "missing field" in out and "rows 10" in out and "no 'rejected' field" in out
    assert "chosen:   <|user|>" in out and "rejected: <|user|>" in out and "⟦" in out
    assert "more than --max-bad-fraction" in out

    good = cli("data", "check", "--objective", "dpo", write_jsonl(tmp_path / "good.jsonl", preference_rows(12)))
    assert good.code == 0 and "ok: training would accept this data" in good.out and "tokens per row" in good.out


# --- refusals: a clear error, before anything is written ---------------------------------------

def variant_of(parent: Path, target: Path, **config) -> Path:
    import shutil

    shutil.copytree(parent, target)
    current = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**current, **config}))
    return target


def test_refusals_name_the_flag_and_write_nothing(cli, parent, tmp_path):
    sft_data = write_jsonl(tmp_path / "train.jsonl", reverse_rows(16))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    other_base = variant_of(parent, tmp_path / "other-base", base_model_name_or_path="someone/other-base")
    cases = [
        (["--init-adapter", other_base, "--data", sft_data], ["base model 'someone/other-base'",
                                                              "pass --base-model someone/other-base"]),
        (["--init-adapter", parent, "--data", sft_data, "--lora-r", "16"], ["has r 8 and this run 16", "--lora-r 8"]),
        (["--init-adapter", parent, "--data", sft_data, "--target-modules", "q_proj,v_proj"],
         ["target_modules", "--peft.target_modules"]),
        (["--init-adapter", parent, "--data", sft_data, "--peft", "ia3"], ["is a lora adapter", "pass --peft lora"]),
        (["--objective", "dpo", "--data", prefs], ["--objective dpo", "pass --init-adapter"]),
        (["--init-adapter", tmp_path / "missing", "--data", sft_data], ["neither an adapter folder"]),
    ]
    for i, (args, expected) in enumerate(cases):
        output = tmp_path / f"out{i}"
        result = cli("train", *args, "--output", output, *QUICK)
        assert result.code == 2, (args, result.text)
        assert all(text in result.err for text in expected), (args, result.err)
        assert "Traceback" not in result.text and nothing_written(output), args


@pytest.mark.parametrize("bad,finding", [({"chosen": "same", "rejected": "same"}, "same answers"),
                                         ({"chosen": "fine", "rejected": ""}, "empty side")])
def test_dpo_refuses_unusable_pairs_before_training(cli, parent, tmp_path, bad, finding):
    rows = [{"prompt": row["prompt"], **bad} for row in reverse_rows(8)]
    output = tmp_path / "out"
    result = cli("train", "--objective", "dpo", "--init-adapter", parent, "--data",
                 write_jsonl(tmp_path / "prefs.jsonl", rows), "--output", output, *QUICK)
    assert result.code == 2 and finding in result.err and "rows 1, 2, 3, 4, 5, ..." in result.err, result.text
    assert nothing_written(output)


# --- continuing a parent ------------------------------------------------------------------------

@pytest.mark.slow
def test_sft_continues_a_local_folder(cli, parent, tmp_path):
    local = variant_of(parent, tmp_path / "parent", lora_alpha=32, lora_dropout=0.0)
    output = tmp_path / "child"
    with pytest.MonkeyPatch.context() as patch:
        seen = lora_weights_at_start(patch)
        result = cli("train", "--init-adapter", local, "--data", write_jsonl(tmp_path / "t.jsonl", reverse_rows(32)),
                     "--output", output, *QUICK)
    assert result.code == 0, result.text
    assert_starts_from(seen, local)
    assert "--init-adapter: lora_alpha 32 is the parent's (this run's 16 is not used)" in result.out
    run_config = yaml.safe_load((output / "run_config.yaml").read_text())
    assert run_config["objective"] == "sft" and run_config["init_adapter"] == str(local)
    assert run_config["parent"] == {"repo_id": None, "revision": None, "commit": None, "base_model": "loradock/tiny-chat"}
    assert run_config["peft"]["lora_alpha"] == 32 and run_config["peft"]["lora_dropout"] == 0.0
    assert json.loads((output / "adapter_config.json").read_text())["lora_alpha"] == 32
    ours = front_matter(output)["loradock"]
    assert ours["objective"] == "sft" and ours["parent"]["base_model"] == "loradock/tiny-chat"
    assert ours["lora"]["alpha"] == 32


@pytest.mark.slow
def test_sft_continues_a_registry_adapter_pinned_to_its_commit(cli, hub_env, pushed_parent, parent, tmp_path):
    repo_id, commit = pushed_parent
    output = tmp_path / "child"
    with pytest.MonkeyPatch.context() as patch:
        seen = lora_weights_at_start(patch)
        result = cli("train", "--init-adapter", f"{repo_id}@v1", "--data",
                     write_jsonl(tmp_path / "t.jsonl", reverse_rows(32)), "--output", output, *QUICK)
    assert result.code == 0, result.text
    assert_starts_from(seen, parent)
    run_config = yaml.safe_load((output / "run_config.yaml").read_text())
    assert run_config["parent"] == {"repo_id": repo_id, "revision": "v1", "commit": commit,
                                    "base_model": "loradock/tiny-chat"}
    assert run_config["init_adapter"] == f"{repo_id}@{commit}"  # a re-run reads the same commit
    assert front_matter(output)["loradock"]["parent"]["commit"] == commit
    assert json.loads((output / "metrics.json").read_text())["parent"]["commit"] == commit

    from loradock.config import load_yaml
    from sft.config import resolve

    again = resolve(load_yaml(str(output / "run_config.yaml")), {})  # the record is not a setting
    assert again.args.init_adapter == f"{repo_id}@{commit}" and again.args.objective == "sft"


@pytest.mark.slow
def test_dpo_from_a_registry_parent_on_registry_data(cli, hub_env, pushed_parent, parent, tmp_path, base_model_dir):
    """A few DPO steps: the reference is the parent (the first held-out loss is ln 2, the policy
    being the parent too), the card says objective dpo and the parent's commit, and the data's
    registry commit is recorded."""
    import torch
    from safetensors.torch import load_file

    from hub.client import hub_api

    repo_id, commit = pushed_parent
    api = hub_api(hub_env.url, hub_env.write_token)
    api.create_repo("alice/dpo-votes", repo_type="dataset", exist_ok=True)
    rows = "".join(json.dumps(row) + "\n" for row in preference_rows(24))
    data_commit = api.upload_file(path_or_fileobj=rows.encode(), path_in_repo="prefs.jsonl", repo_id="alice/dpo-votes",
                                  repo_type="dataset").oid
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(6, start=100))
    output = tmp_path / "v2"
    with pytest.MonkeyPatch.context() as patch:
        seen = lora_weights_at_start(patch)
        result = cli("train", "--objective", "dpo", "--init-adapter", f"{repo_id}@v1",
                     "--data", "datasets/alice/dpo-votes@main/prefs.jsonl", "--eval-data", held,
                     "--output", output, *QUICK)
    assert result.code == 0, result.text
    assert_starts_from(seen, parent)

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["objective"] == "dpo" and metrics["steps"] == 4
    assert metrics["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-4)
    assert set(metrics["eval_metrics"]) == {"exact_match", "rouge_l"}
    assert metrics["dataset"] == {"repo_id": "alice/dpo-votes", "revision": "main", "commit": data_commit,
                                  "file": "prefs.jsonl"}
    front = front_matter(output)
    ours = front["loradock"]
    assert ours["objective"] == "dpo" and ours["parent"]["commit"] == commit and ours["parent"]["repo_id"] == repo_id
    assert ours["dataset"]["commit"] == data_commit and front["datasets"] == ["alice/dpo-votes"]
    assert "dpo" in front["tags"] and "DPOTrainer" in (output / "README.md").read_text()
    run_config = yaml.safe_load((output / "run_config.yaml").read_text())
    assert run_config["data"] == f"datasets/alice/dpo-votes@{data_commit}/prefs.jsonl"

    weights, before = load_file(output / "adapter_model.safetensors"), load_file(parent / "adapter_model.safetensors")
    assert set(weights) == set(before)  # TRL's frozen "ref" copy is not saved
    assert metrics["trainable_parameters"] == sum(t.numel() for t in before.values())  # nor counted as the base's
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    assert metrics["base_parameters"] == sum(p.numel() for p in base.parameters())
    assert any(not torch.equal(weights[name], before[name]) for name in weights)


def test_dataset_spelling_that_is_neither_is_refused(cli, tmp_path):
    result = cli("train", "--data", "datasets/alice", "--output", tmp_path / "out", *QUICK)
    assert result.code == 2 and "datasets/ORG/NAME@REVISION/FILE" in result.err


# --- push: a child of another base's parent is refused ------------------------------------------

def test_push_refuses_a_child_whose_base_differs_from_its_parents(hub_env, parent, tmp_path, run_cli):
    from hub.client import Registry, hub_api

    other = variant_of(parent, tmp_path / "other", base_model_name_or_path="someone/other-base")
    pushed = Registry(hub_env.url, hub_env.write_token).push(str(other), "alice/other-base-parent")
    child = variant_of(parent, tmp_path / "child")
    (child / "run_config.yaml").write_text(yaml.safe_dump({"base_model": "loradock/tiny-chat", "objective": "sft", "parent": {
        "repo_id": "alice/other-base-parent", "revision": "main", "commit": pushed.commit,
        "base_model": "loradock/tiny-chat"}}))
    result = run_cli("push", child, "alice/misbegotten-child")
    assert result.code == 2, result.text
    assert "'someone/other-base'" in result.err and "nothing was pushed" in result.err and "--init-adapter" in result.err
    assert not hub_api(hub_env.url, hub_env.write_token).repo_exists("alice/misbegotten-child")

    (child / "run_config.yaml").write_text(yaml.safe_dump({"parent": {
        "repo_id": None, "revision": None, "commit": None, "base_model": "someone/local-base"}}))
    result = run_cli("push", child, "alice/misbegotten-child")
    assert result.code == 2 and "'someone/local-base'" in result.err
