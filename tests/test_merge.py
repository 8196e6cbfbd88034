"""`loradock merge`: DoRA and IA3 adapters merged into full models that give the adapter's greedy
answers (transformers, and vLLM through `loradock serve --base-model DIR`), the methods and inputs
it refuses, and the card of a merge pushed to the registry."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ASSETS, ServeProcess

HELDOUT = ASSETS / "tasks" / "reverse" / "heldout.jsonl"
PROMPTS = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines()[:10]]
CONVERSATIONS = [[{"role": "user", "content": p}] for p in PROMPTS]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_adapter(model, folder: Path, base_model_dir: Path) -> Path:
    """The PEFT model saved as loradock's training would leave it: base recorded by name, tokenizer beside it."""
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "loradock/tiny-chat"}))
    for name in TOKENIZER_FILES:
        shutil.copy(base_model_dir / name, folder / name)
    return folder


def build_adapter(kind: str, folder: Path, base_model_dir: Path) -> Path:
    """A DoRA, IA3, prompt-tuning or prefix-tuning adapter on the tiny base, with weights that change its answers."""
    import torch
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    configs = {
        "dora": LoraConfig(r=8, use_dora=True, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
        "ia3": IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
        "prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix-tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir), configs[kind])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:  # IA3 scales start at 1: spread them so the answers change
                param.mul_(1 + 0.5 * torch.randn_like(param))
    return save_adapter(model, folder, base_model_dir)


@pytest.fixture(scope="module")
def adapters(base_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-adapters")
    return {kind: build_adapter(kind, root / kind, base_model_dir)
            for kind in ("dora", "ia3", "prompt-tuning", "prefix-tuning")}


def answers(model_dir: Path, adapter: Path | None = None, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers from transformers (+ PEFT with `adapter`), with the tokenizer saved in the folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.evaluate import generate

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter or model_dir)
    return generate(model, tokenizer, CONVERSATIONS, max_new_tokens=max_new_tokens, batch_size=5)


def text_files(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.iterdir() if p.suffix in (".json", ".jinja", ".md"))


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_a_merged_model_answers_as_its_adapter(kind, cli, adapters, base_model_dir, loradock_home, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "merged"
    result = cli("merge", adapters[kind], "--output", out, "--data", HELDOUT, "--limit", "10",
                 "--max-new-tokens", "24")
    assert result.code == 0, result.text[-3000:]
    assert "greedy answers identical on 10 held-out prompts" in result.out and str(out) in result.out
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", *TOKENIZER_FILES} <= {
        p.name for p in out.iterdir()}
    assert (out / "chat_template.jinja").read_text() == (adapters[kind] / "chat_template.jinja").read_text()

    merged, adapter, base = answers(out), answers(base_model_dir, adapters[kind]), answers(base_model_dir)
    assert merged == adapter
    assert sum(m != b for m, b in zip(merged, base)) >= 3, (merged, base)

    card = ModelCard.load(out / "README.md").data
    assert card.base_model == "loradock/tiny-chat" and {"loradock", "merged", kind} <= set(card.tags)
    weights_sha = __import__("hashlib").sha256((adapters[kind] / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert card.loradock["merged_from"] == {"folder": kind, "weights_sha256": weights_sha, "method": kind}
    check = card.loradock["check"]
    assert check["identical_greedy_tokens"] is True and check["prompts"] == 10 and check["data"] == HELDOUT.name
    assert check["answers_differing_from_base"] >= 3
    written = text_files(out)
    for path in (tmp_path, base_model_dir, loradock_home, adapters[kind]):
        assert str(path) not in written
    assert json.loads((out / "config.json").read_text()).get("_name_or_path") in (None, "loradock/tiny-chat")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left behind


@pytest.mark.parametrize("kind, words", [
    ("prompt-tuning", ["prompt-tuning adapter, which does not merge", "loradock serve"]),
    ("prefix-tuning", ["prefix-tuning adapter, which does not merge", "loradock eval"]),
])
def test_methods_that_do_not_merge_are_refused_with_what_to_do(kind, words, cli, adapters, tmp_path):
    result = cli("merge", adapters[kind], "--output", tmp_path / "merged")
    assert result.code == 2
    assert all(w in result.err for w in words), result.err
    assert not any(tmp_path.iterdir())


def test_an_existing_output_is_refused_and_replaced_with_overwrite(cli, adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("merge", adapters["ia3"], "--output", out, "--limit", "4", "--max-new-tokens", "8")
    assert result.code == 2 and "already exists and is not empty" in result.err and "--overwrite" in result.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = cli("merge", adapters["ia3"], "--output", out, "--limit", "4", "--max-new-tokens", "8", "--overwrite")
    assert result.code == 0, result.text[-3000:]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_the_default_prompts_and_output(cli, adapters, loradock_home, tmp_path, monkeypatch):
    """No --data and no run_config.yaml: the shipped held-out prompts; no --output: under $LORADOCK_HOME."""
    from huggingface_hub import ModelCard

    adapter = shutil.copytree(adapters["dora"], tmp_path / "dora-default")
    result = cli("merge", adapter, "--limit", "8", "--max-new-tokens", "8")
    assert result.code == 0, result.text[-3000:]
    out = loradock_home / "merged" / "dora-default"
    try:
        check = ModelCard.load(out / "README.md").data.loradock["check"]
        assert check["data"] == "loradock's shipped held-out prompts" and check["prompts"] == 8
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_folder_that_is_not_an_adapter_is_refused(cli, base_model_dir, tmp_path):
    result = cli("merge", base_model_dir, "--output", tmp_path / "merged")
    assert result.code == 2 and "is not a PEFT adapter folder: there is no adapter_config.json" in result.err
    result = cli("merge", tmp_path / "nothing-here", "--output", tmp_path / "merged")
    assert result.code == 2 and "neither a folder nor a registry adapter" in result.err
    assert not (tmp_path / "merged").exists()


def test_an_unknown_base_is_refused(cli, adapters, tmp_path):
    adapter = shutil.copytree(adapters["dora"], tmp_path / "orphan")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/no/such/base"}))
    result = cli("merge", adapter, "--output", tmp_path / "merged")
    assert result.code == 2 and "'/no/such/base'" in result.err and "base_model_name_or_path" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orphan"]


def test_a_failed_write_leaves_no_staging_folder(adapters, base_model_dir, tmp_path):
    """The output appearing while the merge runs: the staged model is removed, the newcomer kept."""
    from loradock.errors import LoradockError
    from sft.merge import load_source, merge, save

    source = load_source(str(adapters["ia3"]))
    merged = merge(source, str(HELDOUT), limit=2, max_new_tokens=4)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    with pytest.raises(LoradockError, match="already exists and is not empty"):
        save(merged, source, out, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and [p.name for p in out.iterdir()] == ["theirs.txt"]


def test_push_records_the_source_adapter_and_its_commit(cli, hub_env, adapters, tmp_path):
    from huggingface_hub import HfApi

    result = cli("push", adapters["dora"], "alice/dora-source", "--tag", "v1")
    assert result.code == 0, result.text
    source_commit = result.out.split("commit ")[-1].strip()
    out = tmp_path / "merged"
    result = cli("merge", "alice/dora-source@v1", "--output", out, "--limit", "4", "--max-new-tokens", "8",
                 "--push", "alice/dora-merged")
    assert result.code == 0, result.text[-3000:]
    pushed_commit = result.out.split("commit ")[-1].split()[0]
    info = HfApi(endpoint=hub_env.url, token=hub_env.write_token).model_info("alice/dora-merged")
    assert info.sha == pushed_commit
    assert {"model.safetensors", "config.json", "README.md", "chat_template.jinja"} <= {s.rfilename for s in info.siblings}
    merged_from = info.card_data.loradock["merged_from"]
    assert merged_from == {"repo_id": "alice/dora-source", "revision": "v1", "commit": source_commit, "method": "dora"}
    assert info.card_data.base_model == "loradock/tiny-chat" and "merged" in info.card_data.tags
    assert hub_env.write_token not in text_files(out)


def test_merge_help_and_settings(run_cli):
    result = run_cli("merge", "--help")
    assert result.code == 0 and "ADAPTER" in result.out and "--push" in result.out and "$LORADOCK_HOME/merged" in result.out
    result = run_cli("merge", "--print-config", "--limit", "0", "--push", "not-a-repo-id")
    assert result.code == 2
    assert "no adapter" in result.err and "--limit 0" in result.err and "--push" in result.err


@pytest.mark.slow
def test_the_merged_model_serves_the_adapters_answers(cli, adapters, base_model_dir, tmp_path):
    """vLLM (`loradock serve --base-model DIR`, temperature 0) answers as PeftModel does with the adapter's template."""
    import os

    import httpx2

    out = tmp_path / "merged-dora"
    assert cli("merge", adapters["dora"], "--output", out, "--data", HELDOUT).code == 0
    expected = answers(base_model_dir, adapters["dora"], max_new_tokens=32)
    server = ServeProcess(["--base-model", str(out), "--max-model-len", "256"], tmp_path / "serve.log",
                          {**os.environ}).start()
    try:
        served = []
        for prompt in PROMPTS:
            response = httpx2.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                "model": str(out), "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 32})
            assert response.status_code == 200, response.text
            served.append((response.json()["choices"][0]["message"]["content"] or "").strip())
    finally:
        assert server.stop() == 0
    assert served == expected
