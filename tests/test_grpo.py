"""`loradock train --objective grpo`: a GRPO child of a trained adapter, rewarded by graders, on the
tiny base (the real base's figures are bench/grpo_real.py's), and what it refuses."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ASSETS, write_jsonl

REVERSE = ASSETS / "tasks" / "reverse"

# A reward for the reverse task: the share of the reference's words in their place.
IN_PLACE = """
def in_place(answer, reference):
    words, expected = answer.split(), reference.split()
    return sum(a == b for a, b in zip(words, expected)) / len(expected)
"""


@pytest.mark.slow
def test_a_grpo_child_of_a_trained_adapter_records_its_parent_rewards_and_figures(cli, trained_adapters, tmp_path):
    parent = trained_adapters["reverse"]
    module = tmp_path / "rewards.py"
    module.write_text(IN_PLACE)
    train = write_jsonl(tmp_path / "train.jsonl", (REVERSE / "train.jsonl").read_text().splitlines()[:64])
    held = write_jsonl(tmp_path / "held.jsonl", (REVERSE / "heldout.jsonl").read_text().splitlines()[:16])
    output = tmp_path / "grpo"
    reward = f"python:{module}:in_place"
    result = cli("train", "--objective", "grpo", "--init-adapter", parent, "--data", train, "--eval-data", held,
                 "--output", output, "--reward", reward, "--reward", "regex:^",  # the second is always 1
                 "--lora-r", "16", "--lora-alpha", "32", "--max-steps", "6", "--batch-size", "8", "--lr", "1e-4",
                 "--training.max_completion_length", "16",
                 "--training.eval_steps", "6", "--training.logging_steps", "2", "--training.save_strategy", "no")
    assert result.code == 0, result.text[-3000:]
    # A reward the same for every answer of a batch teaches nothing: said once, counted every time.
    assert result.err.count("warning: reward regex:^ gave every answer of a batch 1.0: no learning signal") == 1

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["objective"] == "grpo" and metrics["steps"] == 6
    assert metrics["parent"] == {"repo_id": None, "revision": None, "commit": None, "base_model": "loradock/tiny-chat"}
    rewards = {r["name"]: r for r in metrics["rewards"]}
    assert rewards["regex:^"]["batches"] == rewards["regex:^"]["constant_batches"] == 6
    assert rewards[reward]["batches"] == 6 and rewards[reward]["failures"] == 0 and rewards[reward]["function"] == "in_place"
    # Held-out figures: the rewards first, then the built-in graders the parent was scored by.
    assert list(metrics["eval_metrics"]) == [reward, "regex:^", "exact_match", "rouge_l"]
    assert metrics["eval_metrics"]["regex:^"] == 1.0 and 0 < metrics["eval_metrics"][reward] <= 1
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_second"] > 0
    logged = [log for log in metrics["log_history"] if f"rewards/{reward}/mean" in log]
    assert logged and all(0 <= log[f"rewards/{reward}/mean"] <= 1 for log in logged)

    # The child continued the parent: same shapes, weights moved by GRPO.
    before, after = load_file(parent / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    card = (output / "README.md").read_text()
    assert "grpo" in card


def test_grpo_refuses_what_it_cannot_train(cli, tmp_path):
    data = ASSETS / "tasks" / "reverse" / "train.jsonl"

    def train(*flags: str):
        return cli("train", "--data", data, "--output", tmp_path / "out", "--print-config", *flags)

    no_reward = train("--objective", "grpo")
    assert no_reward.code == 2 and "--objective grpo needs a reward: pass --reward" in no_reward.err
    misspelt = train("--objective", "grpo", "--reward", "exactmatch")
    assert misspelt.code == 2 and "--reward: unknown grader 'exactmatch': did you mean exact_match?" in misspelt.err
    not_grpo = train("--reward", "exact_match")
    assert not_grpo.code == 2 and "--reward is the reward of --objective grpo" in not_grpo.err
    soft = train("--objective", "grpo", "--reward", "rouge_l", "--peft", "prompt-tuning")
    assert soft.code == 2 and "not prompt-tuning" in soft.err
    uneven = cli("train", "--objective", "grpo", "--reward", "rouge_l", "--data", data, "--output", tmp_path / "out",
                 "--batch-size", "6", "--max-steps", "1")
    assert uneven.code == 2 and "multiple of --training.num_generations" in uneven.err
    assert not (tmp_path / "out").exists()
    configured = train("--objective", "grpo", "--reward", "rouge_l")
    assert configured.code == 0 and "num_generations: 4" in configured.out and "rewards:\n- rouge_l" in configured.out


def test_a_fresh_grpo_adapter_with_held_out_data_and_no_generations(cli, tmp_path):
    """A new adapter (no --init-adapter), held-out data but --eval-generations 0: trained, nothing scored."""
    train = write_jsonl(tmp_path / "train.jsonl", (REVERSE / "train.jsonl").read_text().splitlines()[:16])
    held = write_jsonl(tmp_path / "held.jsonl", (REVERSE / "heldout.jsonl").read_text().splitlines()[:4])
    result = cli("train", "--objective", "grpo", "--reward", "rouge_l", "--data", train, "--eval-data", held,
                 "--eval-generations", "0", "--output", tmp_path / "fresh", "--max-steps", "2", "--batch-size", "4",
                 "--training.max_completion_length", "8", "--training.eval_steps", "2", "--training.save_strategy", "no")
    assert result.code == 0, result.text[-3000:]
    metrics = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    assert metrics["objective"] == "grpo" and metrics["parent"] is None and metrics["steps"] == 2
    assert metrics["eval_metrics"] is None and metrics["graders"] == [] and metrics["rewards"][0]["batches"] == 2
