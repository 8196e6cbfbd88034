"""An adapter's model card: what it records (`CardInfo`), built from the adapter folder's files
and parsed back from the Hub's card metadata, both on huggingface_hub's `ModelCard` /
`ModelCardData` / `EvalResult`; and the README.md that training writes and push renders again."""

from dataclasses import dataclass, field
from pathlib import Path

from hub.adapter import CARD, CONFIG, METHODS, SERVED_AS, chat_template, method_of, read_json
from hub.adapter.records import CARD_FIELDS, CONFIG_FIELDS, RunRecord, is_count, is_number, read_run_config, sound


@dataclass
class Metric:
    type: str
    name: str
    value: float


@dataclass
class CardInfo:
    """What an adapter's card records: the Hub's fields plus loradock's own section."""

    base_model: str | None
    method: str | None
    settings: dict  # the method's card fields, e.g. LoRA's r, alpha, dropout, target_modules
    datasets: list[str] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)  # held-out figures, first = headline
    held_out: str | None = None  # the held-out data set's name
    base_model_revision: str | None = None
    dataset_sha256: str | None = None
    training: dict | None = None
    chat_template: str | None = None
    objective: str | None = None  # "sft" or "dpo"
    parent: dict | None = None  # the adapter it started from: {repo_id, revision, commit, base_model}; None: fresh
    dataset: dict | None = None  # the registry dataset its data came from: {repo_id, commit, file}; None: a local file

    @property
    def rank(self) -> int | None:
        rank = self.settings.get("r")
        return rank if is_count(rank) else None

    @property
    def headline(self) -> Metric | None:
        return self.metrics[0] if self.metrics else None

    @classmethod
    def from_folder(cls, folder: Path, adapter_config: dict | None = None) -> "CardInfo":
        """Built from the folder's own files (adapter_config, the run record, run_config, template),
        each field of the wrong type left out (`hub.adapter.records`). What the run was (its parent,
        data, figures) is the run record's; run_config.yaml, the recipe, fills in for a folder
        without a record. `adapter_config`: adapter_config.json as the caller has read it already."""
        folder = Path(folder)
        adapter = sound(read_json(folder / CONFIG) if adapter_config is None else adapter_config, CONFIG_FIELDS)[0]
        run, run_config = RunRecord.read(folder), read_run_config(folder)
        method = method_of(adapter)
        figures = []
        if run.eval_loss is not None:
            figures.append(Metric("loss", "eval loss", round(run.eval_loss, 4)))
        figures += [Metric(k, k.replace("_", " "), v) for k, v in run.eval_metrics.items()]
        if run.forgetting is not None:
            figures.append(Metric("forgetting", "general-ability perplexity against the base", run.forgetting))
        dataset = run.dataset or run_config.get("dataset")
        if dataset and dataset.get("repo_id"):
            datasets = [dataset["repo_id"]]
        else:
            datasets = [Path(run_config["data"]).name] if run_config.get("data") else []
        return cls(
            base_model=adapter.get("base_model_name_or_path") or run_config.get("base_model"),
            method=method.name if method else None, settings=method.card_settings(adapter) if method else {},
            datasets=datasets, metrics=figures,
            held_out=Path(run_config.get("eval_data") or run_config.get("data") or "held-out").name,
            base_model_revision=run.base_model_revision, dataset_sha256=run.dataset_sha256,
            training=run_config.get("training"), chat_template=chat_template(folder),
            # a record without `objective` was written before there was a choice: instruction tuning
            objective=run.objective or run_config.get("objective") or ("sft" if run.recorded or run_config else None),
            parent=run.parent or run_config.get("parent"), dataset=dataset)

    @classmethod
    def from_card_data(cls, data) -> "CardInfo":
        """Parsed from a card's metadata: a `ModelCardData` or the dict of its front matter. Anyone
        who can push writes a card, so a field of the wrong type is left out, never raised on."""
        from huggingface_hub import EvalResult, ModelCardData

        from hub.cards import readable

        if isinstance(data, dict):
            data = ModelCardData(**readable(data), ignore_metadata_errors=True)
        ours = sound(getattr(data, "loradock", None), CARD_FIELDS)[0]
        method = ours.get("method") or next((name for name in METHODS if name in ours), None)
        settings = ours.get(method) if isinstance(ours.get(method), dict) else {}
        results = [r for r in (data.eval_results if isinstance(data.eval_results, list) else [])
                   if isinstance(r, EvalResult) and isinstance(r.metric_type, str) and is_number(r.metric_value)]
        datasets = data.datasets if isinstance(data.datasets, list) else [data.datasets]
        return cls(
            base_model=data.base_model if isinstance(data.base_model, str) else None, method=method,
            settings=dict(settings), datasets=[d for d in datasets if isinstance(d, str)],
            metrics=[Metric(r.metric_type, r.metric_name if isinstance(r.metric_name, str) else r.metric_type,
                            r.metric_value) for r in results],
            held_out=results[0].dataset_name if results and isinstance(results[0].dataset_name, str) else None,
            base_model_revision=ours.get("base_model_revision"), dataset_sha256=ours.get("dataset_sha256"),
            training=ours.get("training"), chat_template=ours.get("chat_template"), objective=ours.get("objective"),
            parent=ours.get("parent"), dataset=ours.get("dataset"))

    def card_data(self, name: str):
        """The Hub's `ModelCardData` for this adapter (with `model-index` from the metrics)."""
        from huggingface_hub import EvalResult, ModelCardData

        results = [EvalResult(task_type="text-generation", dataset_type="json", dataset_name=self.held_out or "held-out",
                              metric_type=m.type, metric_name=m.name, metric_value=m.value) for m in self.metrics]
        ours = {"method": self.method, "base_model_revision": self.base_model_revision,
                "dataset_sha256": self.dataset_sha256, **({self.method: self.settings} if self.method else {}),
                "training": self.training, "chat_template": self.chat_template, "objective": self.objective,
                "parent": self.parent, "dataset": self.dataset}
        return ModelCardData(base_model=self.base_model, library_name="peft",
                             tags=["loradock", *([self.method] if self.method else []), self.objective or "sft", "trl"],
                             datasets=self.datasets or None, model_name=name if results else None,
                             eval_results=results or None, loradock=ours)


def build_card(folder: Path, repo_name: str | None = None):
    """The adapter's README.md as a `ModelCard`, rendered from its folder: never a token or a path."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    name = repo_name or folder.name
    info = CardInfo.from_folder(folder)
    data = info.card_data(name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{card_body(name, info)}")


def model_card(body: str, **metadata) -> str:
    """The README.md of a model (a base model, a merged one): `metadata` as the Hub's card front
    matter (`ModelCardData`'s fields: base_model, license, library_name, tags, ...), then `body`."""
    from huggingface_hub import ModelCard, ModelCardData

    return str(ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{body}"))


def write_card(folder: Path) -> None:
    (Path(folder) / CARD).write_text(str(build_card(folder)), encoding="utf-8")


def parent_phrase(parent: dict | None) -> str:
    """`, continued from `org/name` at commit abc123...` (empty for a fresh adapter)."""
    if not parent:
        return ""
    if parent.get("repo_id"):
        commit = f" at commit `{parent['commit']}`" if parent.get("commit") else ""
        return f", continued from `{parent['repo_id']}`{commit}"
    return ", continued from a local adapter"


def card_body(name: str, info: CardInfo) -> str:
    loss = next((m.value for m in info.metrics if m.type == "loss"), None)
    settings = ", ".join(f"{k} {v}" for k, v in info.settings.items() if k in ("r", "alpha"))
    trained_on = f" on `{info.datasets[0]}`" if info.datasets else ""
    described = f" ({settings.replace('r ', 'rank ', 1)})" if settings else ""
    method = METHODS.get(info.method or "")
    served = f"\nHow `loradock serve` serves it: {SERVED_AS[method.served_by]}.\n" if method else ""
    how = ("preference-tuned with\nloradock (TRL `DPOTrainer` + PEFT)" if info.objective == "dpo"
           else "instruction-tuned with\nloradock (TRL `SFTTrainer` + PEFT)")
    return f"""
# {name}

{"An" if (info.method or "").startswith(("i", "a")) else "A"} {info.method or 'PEFT'} adapter{described} for `{info.base_model}`, {how}{trained_on}{parent_phrase(info.parent)}.
{f"Held-out loss after training: {loss}." if loss is not None else ""}
{served}
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

base = AutoModelForCausalLM.from_pretrained("{info.base_model}")
model = PeftModel.from_pretrained(base, "{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```
"""
