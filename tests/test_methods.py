"""The PEFT family through `loradock train --peft METHOD`: every method trains, saves, reloads with
PEFT and changes the model's output; what a method cannot do is refused before any work; and
`loradock methods` / `loradock methods compare` tell them apart."""

import json
from pathlib import Path

import pytest
import yaml

from hub.adapter import METHODS, UNSUPPORTED, method_of
from tests.conftest import write_jsonl
from tests.test_train import nothing_written, small_split

# A short run per method, at a learning rate that moves its few parameters in 20 steps.
STEPS = ["--max-steps", "20", "--batch-size", "16", "--max-length", "64", "--eval-generations", "8",
         "--training.logging_steps", "10", "--training.eval_steps", "10", "--training.save_strategy", "no",
         "--training.disable_tqdm", "true"]
LEARNING_RATES = {"lora": "2e-3", "rslora": "2e-3", "dora": "2e-3"}


def logits(model, tokenizer, text: str):
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0, -1]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_saves_reloads_and_changes_the_output(method, run_cli, base_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, held = small_split(tmp_path, n_train=128, n_eval=16)
    output = tmp_path / method
    extra = ["--peft.prompt_tuning_init_text", "Reverse the words"] if method == "prompt-tuning" else []
    result = run_cli("train", "--peft", method, "--data", train, "--eval-data", held, "--output", output,
                     "--lr", LEARNING_RATES.get(method, "1e-2"), *STEPS, *extra)
    assert result.code == 0, result.text
    config = json.loads((output / "adapter_config.json").read_text())
    assert method_of(config) is METHODS[method]
    assert config["base_model_name_or_path"] == "loradock/tiny-chat"
    assert str(base_model_dir) not in (output / "adapter_config.json").read_text()  # no path of this machine
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["trainable_parameters"] > 0
    assert set(metrics["eval_metrics"]) == {"exact_match", "rouge_l"}
    card = yaml.safe_load((output / "README.md").read_text().split("---")[1])
    assert card["loradock"]["method"] == method and method in card["tags"]

    tokenizer = AutoTokenizer.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the words: a b c"}], tokenize=False,
                                           add_generation_prompt=True)
    before = logits(base, tokenizer, prompt)
    adapted = PeftModel.from_pretrained(base, output).eval()
    after = logits(adapted, tokenizer, prompt)
    assert not torch.allclose(before, after, atol=1e-4), "the trained adapter does not change the output"
    if METHODS[method].served_by == "eval":  # what it is for: `loradock eval` runs it through PEFT
        report = tmp_path / "report.json"
        result = run_cli("eval", "--adapter", output, "--data", held, "--limit", "4", "--output", report)
        assert result.code == 0, result.text
        assert set(json.loads(report.read_text())["metrics"]) == {"base", "adapter"}


@pytest.mark.slow
def test_llama_adapter_on_another_architecture_is_refused_before_training(run_cli, base_model_dir, tmp_path):
    import shutil

    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    llama = AutoConfig.from_pretrained(base_model_dir)
    other = tmp_path / "tiny-qwen2"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=llama.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base_model_dir / name, other / name)
    train, held = small_split(tmp_path, n_train=32, n_eval=8)
    output = tmp_path / "out"
    result = run_cli("train", "--peft", "llama-adapter", "--base-model", other, "--data", train, "--eval-data", held,
                     "--output", output, *STEPS)
    assert result.code == 2
    assert "--peft llama-adapter needs a base of type llama or mistral" in result.err and "is a qwen2 model" in result.err
    assert nothing_written(output)
    result = run_cli("train", "--peft", "llama-adapter", "--peft.adapter_layers", "9", "--data", train, "--output", output,
                     *STEPS)
    assert result.code == 2 and "--peft.adapter_layers 9: loradock/tiny-chat has 4 layers" in result.err


def test_a_model_with_nothing_to_train_is_refused():
    import torch

    from loradock.errors import LoradockError
    from sft.train import check_trainable

    with pytest.raises(LoradockError, match="the adapter has no trainable parameter"):
        check_trainable(torch.nn.Linear(4, 4).requires_grad_(False))
    check_trainable(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("tensors,words", [
    ({}, "holds no tensor"),
    ({"base_model.model.x.lora_A.weight": "zeros", "base_model.model.x.lora_B.weight": "zeros"}, "every tensor"),
    ({"base_model.model.x.lora_A.weight": "zeros", "base_model.model.x.lora_B.weight": "ones"}, "LoRA A matrices"),
    ({"base_model.model.x.lora_A.weight": "ones", "base_model.model.x.lora_B.weight": "zeros"}, None),
    ({"prompt_embeddings": "ones"}, None)])
def test_saved_weights_that_are_empty_or_zero_are_found(tmp_path, tensors, words):
    import torch
    from safetensors.torch import save_file

    from hub.adapter.checks import saved_weight_problems

    path = tmp_path / "adapter_model.safetensors"
    save_file({name: getattr(torch, kind)(2, 4) for name, kind in tensors.items()}, path)
    problems = saved_weight_problems(path)
    assert (words in problems[0]) if words else problems == []


def test_the_methods_command_names_each_method_its_serving_and_what_is_not_supported(run_cli):
    result = run_cli("methods")
    assert result.code == 0
    for method in METHODS.values():
        assert f"{method.name:<14} {method.config_class} ({method.peft_type})" in result.out
    assert "served: hot-swapped through soft-prompt embeddings" in result.out
    assert "served: evaluation only (`loradock eval`)" in result.out
    assert "served after merging into a full model" in result.out
    assert "bottleneck" in result.out and "transformers ~=4.57" in result.out and set(UNSUPPORTED) == {"bottleneck"}


@pytest.mark.slow
def test_methods_compare_writes_the_table_json_and_chart(run_cli, base_model_dir, tmp_path):
    from sft.compare import COLUMNS

    train, held = small_split(tmp_path, n_train=64, n_eval=8)
    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump({"data": str(train), "eval_data": str(held), "peft": {"method": "lora", "r": 8},
                                      "training": {"per_device_train_batch_size": 16, "max_length": 64}}))
    out = tmp_path / "compare"
    result = run_cli("methods", "compare", "--config", config, "--methods", "lora,ia3,prompt-tuning", "--steps", "5",
                     "--output", out, "--eval-generations", "4")
    assert result.code == 0, result.text
    table = (out / "methods.md").read_text().splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and len(table) == 5
    rows = json.loads((out / "methods.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lora", "ia3", "prompt-tuning"]
    for row in rows:
        assert row["trainable_parameters"] > 0 and row["adapter_bytes"] > 0 and row["peak_memory"]["mib"] > 0
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["rouge_l"] <= 1 and row["served"]
    assert rows[0]["trainable_parameters"] > rows[1]["trainable_parameters"]  # LoRA trains more than IA3's scales
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_compare_refuses_unknown_methods_and_configs_without_held_out_data(run_cli, tmp_path):
    config = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "response": "b"}])
    yaml_file = tmp_path / "task.yaml"
    yaml_file.write_text(yaml.safe_dump({"data": str(config)}))
    result = run_cli("methods", "compare", "--config", yaml_file, "--methods", "lora,bottleneck")
    assert result.code == 2 and "unknown method bottleneck" in result.err
    result = run_cli("methods", "compare", "--config", yaml_file, "--output", tmp_path / "o")
    assert result.code == 2 and "has no held-out data" in result.err and not Path(tmp_path / "o").exists()
