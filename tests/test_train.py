"""`loradock train` through the real CLI: what it writes, what it refuses, and resuming."""

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from loradock.procs import Service, loradock_command
from tests.conftest import ASSETS, run_loradock, write_jsonl

REVERSE = ASSETS / "tasks" / "reverse"
QUICK = ["--max-steps", "30", "--lr", "1e-3", "--batch-size", "16", "--lora-r", "8", "--max-length", "64",
         "--training.logging_steps", "10", "--training.eval_steps", "15"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_split(tmp_path: Path, n_train=256, n_eval=32) -> tuple[Path, Path]:
    train = (REVERSE / "train.jsonl").read_text().splitlines()[:n_train]
    held = (REVERSE / "heldout.jsonl").read_text().splitlines()[:n_eval]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "eval.jsonl", held)


# A user's grader for the reverse task: the share of the prompt's words the answer keeps.
WORDS_KEPT = '''
def words_kept(answer, prompt):
    words = prompt.split(":", 1)[1].split()
    return sum(word in answer.split() for word in words) / len(words)
'''
WORDS = r"regex:^[a-z]+( [a-z]+)*$"


def nothing_written(output: Path) -> bool:
    return not output.exists() and not (output.parent / f".{output.name}.loradock-run").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_model_dir):
    """One short training run shared by the checks of its output: (adapter folder, the base model's
    parameters just before `trainer.train()`, the trained model's parameters after the run)."""
    from loradock.cli import main
    from sft.trainer import LoradockSFTTrainer

    tmp = tmp_path_factory.mktemp("train")
    train, held = small_split(tmp)
    (tmp / "reverse_graders.py").write_text(WORDS_KEPT)
    graders = ["--grader", "exact_match", "rouge_l", WORDS, f"python:{tmp / 'reverse_graders.py'}:words_kept"]
    output, seen = tmp / "adapter", {}
    original_train = LoradockSFTTrainer.train

    def train_and_keep_the_model(self, *args, **kwargs):
        # As TRL's test_train_peft_model: a copy of the base parameters before training, the model after.
        seen["before"] = {name: p.detach().clone() for name, p in self.model.named_parameters() if "lora_" not in name}
        result = original_train(self, *args, **kwargs)
        seen["model"] = self.model
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LoradockSFTTrainer, "train", train_and_keep_the_model)
        code = main(["train", "--data", str(train), "--eval-data", str(held), "--output", str(output), *QUICK, *graders])
    assert code == 0
    return output, seen["before"], dict(seen["model"].named_parameters())


@pytest.mark.slow
def test_writes_a_complete_adapter_folder(trained):
    output, _, _ = trained
    for name in ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "run_config.yaml", "metrics.json", "README.md"]:
        assert (output / name).is_file(), name
    assert not list(output.glob("*.bin")) and not (output.parent / ".adapter.loradock-run").exists()
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "loradock/tiny-chat" and config["r"] == 8
    assert "{% generation %}" in (output / "chat_template.jinja").read_text().replace("{%- generation -%}", "{% generation %}")
    card = (output / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "loradock/tiny-chat" and front["library_name"] == "peft"


@pytest.mark.slow
def test_base_weights_unchanged_and_lora_weights_changed(trained):
    import torch
    from safetensors.torch import load_file

    output, base_before, after = trained
    # The base's own layers (q_proj.base_layer, embeddings, norms) as they were, to the bit.
    assert any(".base_layer." in name for name in base_before) and any("embed_tokens" in name for name in base_before)
    changed = [name for name, before in base_before.items() if not torch.equal(before, after[name])]
    assert not changed, changed
    assert all(not p.requires_grad for name, p in after.items() if "lora_" not in name)
    lora_b = [p for name, p in after.items() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # PEFT starts every B at zero: training moved them
    weights = load_file(output / "adapter_model.safetensors")
    saved_b = [t for name, t in weights.items() if "lora_B" in name]
    assert saved_b and all(t.abs().sum() > 0 for t in saved_b)  # and the saved adapter has them


@pytest.mark.slow
def test_metrics_are_honest(trained):
    output, _, _ = trained
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["steps"] == 30 and metrics["tokens_per_second"] > 0 and metrics["train_runtime_s"] > 0
    assert metrics["dataset_sha256"] == sha256(output.parent / "train.jsonl")
    train_logs = [log for log in metrics["log_history"] if "loss" in log]
    assert train_logs and all(0 < log["trained_token_fraction"] < 1 and log["tokens_per_second"] > 0 for log in train_logs)
    assert any("eval_loss" in log for log in metrics["log_history"])
    evaluations = [log for log in metrics["log_history"] if "eval_loss" in log]
    assert all(0 <= log["eval_exact_match"] <= 1 and 0 <= log["eval_rouge_l"] <= 1 for log in evaluations)
    # The graders named, in their order: the first is the headline; each figure's grader is recorded.
    kept = next(name for name in metrics["eval_metrics"] if name.endswith(":words_kept"))
    assert list(metrics["eval_metrics"]) == ["exact_match", "rouge_l", WORDS, kept] and metrics["eval_metrics_before"]
    assert all(0 <= log[f"eval_{WORDS}"] <= 1 and 0 <= log[f"eval_{kept}"] <= 1 for log in evaluations)
    # The user's grader read each row's prompt (without it, it raises and scores 0), and training moved its figure.
    assert 0 < metrics["eval_metrics"][kept] < 1 and metrics["eval_metrics"][kept] != metrics["eval_metrics_before"][kept]
    recorded = {g["name"]: g for g in metrics["graders"]}
    assert recorded[WORDS] == {"name": WORDS, "grader": "regex", "pattern": WORDS[len("regex:"):]}
    assert recorded[kept]["function"] == "words_kept" and recorded[kept]["sha256"] == sha256(output.parent / "reverse_graders.py")
    assert metrics["method"] == "lora" and 0 < metrics["trainable_parameters"] < metrics["base_parameters"]
    general = metrics["general"]  # the forgetting guard, on the shipped general sample
    assert general["rows"] == 48 and general["base_perplexity"] > 1 and general["perplexity"] > 1
    assert general["forgetting"] == pytest.approx(general["perplexity"] / general["base_perplexity"] - 1, abs=1e-3)
    card = yaml.safe_load((output / "README.md").read_text().split("---")[1])
    scores = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"loss": round(metrics["eval_loss"], 4), **metrics["eval_metrics"], "forgetting": general["forgetting"]}


@pytest.mark.slow
def test_run_config_reloads_to_the_same_configuration(trained):
    from loradock.config import load_yaml
    from sft.config import resolve

    output, _, _ = trained
    saved = load_yaml(str(output / "run_config.yaml"))
    again = resolve(saved, {})
    recorded = ("parent", "dataset", "eval_dataset")  # what training records beside the settings
    assert all(saved[key] is None for key in recorded)
    settings = {k: v for k, v in saved.items() if k not in recorded}
    assert again.to_yaml_dict() == {**settings, "peft": again.peft, "training": again.training}
    assert again.peft == {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
    assert again.training["max_steps"] == 30 and again.training["learning_rate"] == 1e-3
    assert again.args.output == str(output)


@pytest.mark.slow
def test_existing_output_is_not_overwritten_without_the_flag(trained, cli):
    output, _, _ = trained
    before = sha256(output / "adapter_model.safetensors")
    result = cli("train", "--data", output.parent / "train.jsonl", "--output", output, *QUICK)
    assert result.code == 2 and "already exists and is not empty" in result.err and "--overwrite" in result.err
    assert sha256(output / "adapter_model.safetensors") == before


# --- bad input: a clear message, and nothing written ---------------------------------------------

def test_too_many_bad_rows_abort_with_the_report(cli, tmp_path):
    rows = (REVERSE / "train.jsonl").read_text().splitlines()[:18] + ['{"prompt": "x"}', "not json"]
    output = tmp_path / "out"
    result = cli("train", "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--output", output, *QUICK)
    assert result.code == 2
    assert "2 of 20 rows" in result.err and "more than --max-bad-fraction 0.05" in result.err
    assert "missing field" in result.err and "malformed JSON" in result.err and "rows 19" in result.err
    assert nothing_written(output)


def test_no_trainable_token_aborts(cli, tmp_path):
    train, _ = small_split(tmp_path, n_train=20)
    output = tmp_path / "out"
    result = cli("train", "--data", train, "--output", output, "--max-length", "8", "--max-bad-fraction", "1")
    assert result.code == 2 and "no trainable token remains" in result.err and "over max length" in result.err
    assert nothing_written(output)


def test_unservable_rank_is_refused_before_any_work(cli, tmp_path):
    train, _ = small_split(tmp_path, n_train=20)
    output = tmp_path / "out"
    result = cli("train", "--data", train, "--output", output, "--lora-r", "12")
    assert result.code == 2 and "use --lora-r 16" in result.err and nothing_written(output)


def test_nan_loss_stops_the_run_without_an_adapter(cli, tmp_path):
    train, _ = small_split(tmp_path, n_train=64)
    output = tmp_path / "out"
    result = cli("train", "--data", train, "--output", output, "--max-steps", "6", "--batch-size", "8",
                 "--lr", "1e30", "--training.max_grad_norm", "0")
    assert result.code == 2, result.text
    assert "loss became nan" in result.err or "loss became inf" in result.err
    assert "lower the learning rate" in result.err and not output.exists()


def test_rows_the_template_does_not_train_are_reported_and_refused(cli, tmp_path):
    # A template that trains only on answers containing LEARN: most rows have no trained token.
    template = tmp_path / "picky.jinja"
    template.write_text(
        "{%- for m in messages -%}{{- '<|' ~ m['role'] ~ '|>' -}}"
        "{%- if m['role'] == 'assistant' and 'LEARN' in m['content'] -%}"
        "{%- generation -%}{{- m['content'] ~ '<|end|>' -}}{%- endgeneration -%}"
        "{%- else -%}{{- m['content'] ~ '<|end|>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")
    rows = [{"prompt": f"p{i}", "response": "LEARN this" if i == 0 else "skip"} for i in range(40)]
    output = tmp_path / "out"
    result = cli("train", "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--output", output,
                 "--chat-template", template, "--max-steps", "10")
    assert result.code == 2, result.text
    assert "39 of 40 rows" in result.err and "no trained token" in result.err and "rows 2, 3, 4, 5, 6, ..." in result.err
    assert nothing_written(output)


def test_a_batch_with_every_label_masked_stops_the_run(base_model_dir, tokenizer, tmp_path):
    """The guard inside the loss: a batch with no trained token raises instead of TRL's silent zero loss."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from sft.data_check import Example, to_dataset
    from sft.trainer import LoradockSFTTrainer, TrainingAborted

    rows = [Example(1, [], [5, 6, 7, 8], [0, 0, 1, 1])]
    trainer = LoradockSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_model_dir), processing_class=tokenizer,
        args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1),
        train_dataset=to_dataset(rows), peft_config=LoraConfig(r=8, target_modules="all-linear"))
    trainer.model.train()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.full((1, 4), -100)}
    with pytest.raises(TrainingAborted, match="has every label masked"):
        trainer.compute_loss(trainer.model, batch)
    batch["labels"] = torch.tensor([[-100, -100, 7, 8]])
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


# --- resume ----------------------------------------------------------------------------------------

def interrupt_after_checkpoint(args: list, checkpoints: Path, min_step: int, log: Path, crash: bool = True) -> Service:
    """Run `loradock train ARGS` in its own process group and, once checkpoint >= min_step is complete,
    kill -9 it (`crash`) or SIGTERM it as a terminal's interrupt would; returns the stopped service."""
    run = Service("loradock train", loradock_command(*args), log, grace=30)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and run.process.poll() is None:
            done = [int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*") if (c / "trainer_state.json").exists()]
            if done and max(done) >= min_step:
                break
            time.sleep(0.1)
        assert run.process.poll() is None, "the run ended before it could be interrupted"
    finally:
        run.kill() if crash else run.stop()
    return run


@pytest.mark.slow
@pytest.mark.parametrize("method,lr", [("lora", "1e-3"), ("prompt-tuning", "3e-2")])
def test_resume_continues_from_the_last_complete_checkpoint(tmp_path, base_model_dir, method, lr):
    train, held = small_split(tmp_path)
    output = tmp_path / "adapter"
    args = ["train", "--peft", method, "--data", train, "--eval-data", held, "--output", output, "--max-steps", "80",
            "--lr", lr, "--batch-size", "16", "--max-length", "64", "--training.save_steps", "10",
            "--training.eval_steps", "40", "--eval-generations", "4"]
    interrupt_after_checkpoint(args, tmp_path / ".adapter.loradock-run" / "checkpoints", min_step=20,
                                    log=tmp_path / "killed-run.log")
    assert not output.exists(), "a killed run must not leave a finished-looking adapter"

    changed = run_loradock(*args, "--resume", "--lr", "2e-2")
    assert changed.returncode == 2 and "differs from the interrupted run's in training.learning_rate" in changed.stderr

    resumed = run_loradock(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 20 and metrics["steps"] == 80
    assert metrics["eval_loss"] < metrics["eval_loss_before"]  # measured by the killed run, kept for this one
    steps_logged = [log["step"] for log in metrics["log_history"] if "loss" in log]
    assert steps_logged == sorted(steps_logged) and steps_logged[-1] == 80
    assert not (tmp_path / ".adapter.loradock-run").exists()


def test_resume_with_nothing_to_resume(cli, tmp_path):
    train, _ = small_split(tmp_path, n_train=20)
    result = cli("train", "--data", train, "--output", tmp_path / "never", "--resume")
    assert result.code == 2 and "no complete checkpoint" in result.err


# --- a full disk ----------------------------------------------------------------------------------

# (disk size, flags): which write fills it. The adapter is about 330 KiB; a checkpoint, with the
# optimizer's state, about 1.2 MiB.
FULL_DISKS = {
    "the adapter": ("200k", ["--training.save_strategy", "no"]),  # safetensors, at publishing
    "a checkpoint's weights": ("300k", ["--training.save_steps", "2"]),  # safetensors, at step 2
    "a checkpoint's optimizer state": ("700k", ["--training.save_steps", "2"]),  # torch.save, at step 2
    "the second checkpoint": ("1600k", ["--training.save_steps", "2"]),  # step 4's; step 2's is kept
}


@pytest.mark.parametrize("filled_by", FULL_DISKS)
def test_training_onto_a_full_disk_stops_with_the_fix_and_nothing_half_written(base_model_dir, tmp_path, small_disks,
                                                                              filled_by):
    """`loradock train --output` on a disk too small for it (a tmpfs of its own): exit 2 with the
    folder, the space and the fix, no traceback, no adapter; only complete checkpoints stay, for
    --resume, and without one nothing at all."""
    from tests.conftest import on_a_small_disk

    size, flags = FULL_DISKS[filled_by]
    train = write_jsonl(tmp_path / "train.jsonl", (REVERSE / "train.jsonl").read_text().splitlines()[:64])
    disk, listing = tmp_path / "disk", tmp_path / "listing"
    disk.mkdir()
    output = disk / "out"
    command = loradock_command("train", "--data", train, "--output", output, "--max-steps", 4, "--batch-size", 8,
                               "--max-length", 64, "--lora-r", 8, "--training.disable_tqdm", "true", *flags)
    then_list = ["sh", "-c", '"$@"; code=$?; cd "$0" && find . | sort > "$LISTING"; exit $code', disk, *command]
    result = subprocess.run(on_a_small_disk(disk, size, then_list), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "LISTING": str(listing)})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"error: the disk holding {disk} is full while training into --output {output}: writing " in result.stderr
    assert "were left there; no adapter was written\nfix: free space on that disk" in result.stderr
    left = listing.read_text().split()
    assert "./out" not in left
    if filled_by == "the second checkpoint":
        assert "then run the same command with --resume to continue from checkpoint-2" in result.stderr
        checkpoints = {name for p in left if p.startswith("./.out.loradock-run/checkpoints/")
                       and "checkpoint" in (name := p.split("/")[3])}
        assert checkpoints == {"checkpoint-2"} and "./.out.loradock-run/adapter" not in left
    else:
        assert "this run needs more than" in result.stderr and "--training.save_total_limit 1" in result.stderr
        assert left == ["."], left
