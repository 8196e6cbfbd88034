"""An adapter's README.md, rendered from the files of its folder: YAML front matter the Hub reads
(`base_model`, `library_name: peft`, `tags`, `datasets`, `model-index`) plus loradock's own
section (base model revision, dataset sha256, LoRA settings, the resolved training configuration,
the chat template used in training), then how to use the adapter.

Training writes it; `loradock push` renders it again from the same files, so a card always
describes the folder it is pushed with. It never contains a token or a local path.
"""

import json
from pathlib import Path

import yaml

CARD = "README.md"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(folder / "tokenizer_config.json").get("chat_template")


def front_matter(folder: Path, repo_name: str | None = None) -> dict:
    adapter = _read_json(folder / "adapter_config.json")
    metrics = _read_json(folder / "metrics.json")
    try:
        run_config = yaml.safe_load((folder / "run_config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        run_config = {}
    base = adapter.get("base_model_name_or_path") or run_config.get("base_model")
    data_name = Path(run_config["data"]).name if run_config.get("data") else None
    front = {"base_model": base, "library_name": "peft", "tags": ["loradock", "lora", "sft", "trl"]}
    if data_name:
        front["datasets"] = [data_name]
    results = []
    if metrics.get("eval_loss") is not None:
        results.append({"type": "loss", "name": "eval loss", "value": round(metrics["eval_loss"], 4)})
    for name, value in (metrics.get("eval_metrics") or {}).items():
        results.append({"type": name, "name": name.replace("_", " "), "value": value})
    if results:
        held_out = Path(run_config.get("eval_data") or run_config.get("data") or "held-out").name
        front["model-index"] = [{"name": repo_name or folder.name, "results": [{
            "task": {"type": "text-generation"}, "dataset": {"type": "json", "name": held_out}, "metrics": results}]}]
    front["loradock"] = {
        "base_model_revision": metrics.get("base_model_revision"),
        "dataset_sha256": metrics.get("dataset_sha256"),
        "lora": {"r": adapter.get("r"), "alpha": adapter.get("lora_alpha"), "dropout": adapter.get("lora_dropout"),
                 "target_modules": _plain(adapter.get("target_modules"))},
        "training": run_config.get("training"),
        "chat_template": chat_template(folder),
    }
    return front


def _plain(value):
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def render_card(folder: Path, repo_name: str | None = None) -> str:
    folder = Path(folder)
    front = front_matter(folder, repo_name)
    base, lora = front["base_model"], front["loradock"]["lora"]
    name = repo_name or folder.name
    loss = next((r["value"] for m in front.get("model-index", []) for r in m["results"][0]["metrics"]
                 if r["type"] == "loss"), None)
    body = f"""
# {name}

A LoRA adapter (rank {lora['r']}, alpha {lora['alpha']}) for `{base}`, instruction-tuned with loradock
(TRL `SFTTrainer` + PEFT LoRA){f" on `{front['datasets'][0]}`" if front.get('datasets') else ""}.
{f"Held-out loss after training: {loss}." if loss is not None else ""}

The chat template it was trained with travels in this repo (`chat_template.jinja`,
`tokenizer_config.json`) and is the one to serve it with. The training configuration is in
`run_config.yaml`, the figures in `metrics.json`.

## Use it through `loradock serve` (OpenAI API)

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
answer = client.chat.completions.create(
    model="{name}",  # or "{name}@<tag or commit sha>" for a pinned revision
    messages=[{{"role": "user", "content": "..."}}],
)
print(answer.choices[0].message.content)
```

## Use it with PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body


def write_model_card(folder: Path) -> None:
    folder = Path(folder)
    (folder / CARD).write_text(render_card(folder), encoding="utf-8")
