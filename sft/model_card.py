"""The adapter's README.md: YAML front matter the Hub reads, then how to use the adapter."""

from pathlib import Path

import yaml

CARD = "README.md"


def headline_metrics(metrics: dict) -> list[dict]:
    """The model-index results: eval loss now, and the exact-match figures an eval adds later."""
    results = []
    if metrics.get("eval_loss") is not None:
        results.append({"type": "loss", "name": "eval loss", "value": round(metrics["eval_loss"], 4)})
    return results


def write_model_card(folder: Path, config, metrics: dict) -> None:
    args, lora = config.args, config.lora
    name = Path(args.output).name
    front = {
        "base_model": args.base_model,
        "library_name": "peft",
        "tags": ["loradock", "lora", "sft", "trl"],
        "loradock": {
            "base_model_revision": metrics.get("base_model_revision"),
            "dataset_sha256": metrics.get("dataset_sha256"),
            "lora": {"r": lora.get("r"), "alpha": lora.get("lora_alpha"), "target_modules": lora.get("target_modules")},
        },
    }
    results = headline_metrics(metrics)
    if results:
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation"},
            "dataset": {"type": "json", "name": Path(args.eval_data or args.data).name},
            "metrics": results,
        }]}]
    body = f"""
# {name}

A LoRA adapter for `{args.base_model}`, instruction-tuned with loradock (TRL `SFTTrainer` + PEFT LoRA,
rank {lora.get('r')}) on `{Path(args.data).name}` (sha256 `{str(metrics.get('dataset_sha256'))[:12]}`).

| | |
|---|---|
| train loss | {metrics.get('train_loss')} |
| eval loss before / after | {metrics.get('eval_loss_before')} / {metrics.get('eval_loss')} |
| steps | {metrics.get('steps')} |
| tokens/s | {metrics.get('tokens_per_second')} |

The chat template it was trained with is in `tokenizer_config.json` / `chat_template.jinja`; serve it
with that template. The full training configuration is in `run_config.yaml`.

## Use with PEFT

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
```

## Evaluate

```bash
loradock eval --base-model {args.base_model} --adapter PATH --data HELDOUT.jsonl
```
"""
    text = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body
    (folder / CARD).write_text(text, encoding="utf-8")
