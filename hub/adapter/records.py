"""The fields of an adapter's files that loradock reads, each with the one type it trusts:
adapter_config.json (`CONFIG_FIELDS`), the run's records metrics.json and run_config.yaml
(`METRICS_FIELDS`, `RUN_CONFIG_FIELDS`), and loradock's own section of the card (`CARD_FIELDS`).

Anyone who can push writes these files, so every reader takes them through here: `sound` keeps
the fields of the right type and names the others. adapter_config.json is required: a field of the
wrong type refuses the adapter at push and before serving (`hub.adapter.checks`). The records and
the card are optional: serving, listing and the UI read them without their damaged fields
(`RunRecord.read`, `read_run_config`; a sound adapter is still served, its figure shown as none),
and `loradock push` refuses a folder whose records are damaged (`record_problems`), each problem
naming the file and the field.

The run record (`RunRecord`) is what training writes about itself, one type for its writer and
every reader:

    from hub.adapter.records import RunRecord
    RunRecord.read("runs/reverse").eval_loss  # a number, or None
"""

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hub.adapter import CONFIG, METRICS, RUN_CONFIG


@dataclass(frozen=True)
class Kind:
    """What a field holds: its name in a message, and the test a value passes (None always does)."""

    name: str
    test: Callable[[object], bool]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def record(*names: str) -> Kind:
    """A mapping whose `names`, where set, are text (other keys are free)."""
    return Kind(f"a mapping of {', '.join(names)} (each text)", lambda v: isinstance(v, dict) and all(
        v.get(name) is None or isinstance(v[name], str) for name in names))


TEXT = Kind("text", lambda v: isinstance(v, str))
TEXTS = Kind("text or a list of texts", lambda v: isinstance(v, str) or (
    isinstance(v, list) and all(isinstance(x, str) for x in v)))
NUMBER = Kind("a finite number", is_number)
COUNT = Kind("a whole number", is_count)
MAPPING = Kind("a mapping", lambda v: isinstance(v, dict))
SCORES = Kind("a mapping of metric names to numbers", lambda v: isinstance(v, dict) and all(
    isinstance(k, str) and is_number(x) for k, x in v.items()))
ENTRIES = Kind("a list of mappings", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v))
PARENT = record("repo_id", "revision", "commit", "base_model")
DATASET = record("repo_id", "revision", "commit", "file")

# adapter_config.json beyond what `hub.adapter.checks` checks itself (`r`, `rank_pattern`).
CONFIG_FIELDS = {
    "base_model_name_or_path": TEXT, "peft_type": TEXT, "target_modules": TEXTS, "feedforward_modules": TEXTS,
    "lora_alpha": NUMBER, "lora_dropout": NUMBER, "num_virtual_tokens": COUNT, "encoder_hidden_size": COUNT,
    "num_transformer_submodules": COUNT, "adapter_len": COUNT, "adapter_layers": COUNT,
}
METRICS_FIELDS = {
    "objective": TEXT, "method": TEXT, "base_model": TEXT, "base_model_revision": TEXT, "parent": PARENT,
    "dataset": DATASET, "dataset_sha256": TEXT, "train_data": record("path", "sha256"),
    "eval_data": record("path", "sha256"), "held_out_sha256": TEXT, "train_loss": NUMBER, "eval_loss_before": NUMBER,
    "eval_loss": NUMBER, "eval_metrics_before": SCORES, "eval_metrics": SCORES, "steps": COUNT, "epochs": NUMBER,
    "processes": COUNT, "global_batch": COUNT, "trainable_parameters": COUNT, "base_parameters": COUNT,
    "train_runtime_s": NUMBER, "total_runtime_s": NUMBER, "train_tokens": COUNT, "tokens_per_second": NUMBER,
    "peak_memory": MAPPING, "resumed_from_step": COUNT, "log_history": ENTRIES, "graders": ENTRIES, "rewards": ENTRIES,
    "general": MAPPING,
}
RUN_CONFIG_FIELDS = {
    "base_model": TEXT, "data": TEXT, "eval_data": TEXT, "objective": TEXT, "training": MAPPING,
    "parent": PARENT, "dataset": DATASET,
}
CARD_FIELDS = {  # the card's `loradock:` section (the method's own settings are a mapping under its name)
    "method": TEXT, "base_model_revision": TEXT, "dataset_sha256": TEXT, "training": MAPPING,
    "chat_template": TEXT, "objective": TEXT, "parent": PARENT, "dataset": DATASET,
}


def shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def sound(values, fields: dict[str, Kind]) -> tuple[dict, list[str]]:
    """(`values` without the fields that do not hold their kind, a phrase naming each of those);
    ({}, []) for anything but a mapping. Fields not in `fields` pass as they are."""
    if not isinstance(values, dict):
        return {}, []
    bad = {name for name, kind in fields.items() if values.get(name) is not None and not kind.test(values[name])}
    return ({k: v for k, v in values.items() if k not in bad},
            [f"{name} is {shown(values[name])}, not {fields[name].name}" for name in sorted(bad)])


def parsed(path: Path):
    """The data in a JSON or YAML file. Raises ValueError (or OSError) when it cannot be read."""
    import yaml

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(" ".join(str(e).split())) from None


def read_record(folder: Path, name: str, fields: dict[str, Kind]) -> tuple[dict, list[str]]:
    """(the sound fields of the file `name` of the folder, what is wrong with it); ({}, []) without one."""
    path = Path(folder) / name
    if not path.exists():
        return {}, []
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        values = parsed(path)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON's and UnicodeDecodeError too
        return {}, [f"{name} is not readable {kind} ({e})"]
    if values is None:
        return {}, []
    if not isinstance(values, dict):
        return {}, [f"{name} holds {shown(values)}, not a mapping of fields"]
    values, problems = sound(values, fields)
    return values, [f"{name}: {problem}" for problem in problems]


def read_metrics(folder: Path) -> dict:
    """metrics.json's fields, without the damaged ones ({} without the file)."""
    return read_record(folder, METRICS, METRICS_FIELDS)[0]


def read_run_config(folder: Path) -> dict:
    """run_config.yaml's fields, without the damaged ones ({} without the file)."""
    return read_record(folder, RUN_CONFIG, RUN_CONFIG_FIELDS)[0]


def record_problems(folder: Path) -> list[str]:
    """What is damaged in the folder's metrics.json and run_config.yaml, file and field named."""
    return [problem for name, fields in ((METRICS, METRICS_FIELDS), (RUN_CONFIG, RUN_CONFIG_FIELDS))
            for problem in read_record(folder, name, fields)[1]]


def config_field_problems(config: dict) -> list[str]:
    """adapter_config.json's fields of the wrong type, each with the file named and the fix."""
    return [f"{CONFIG}: {problem}; re-save the adapter with PEFT's save_pretrained"
            for problem in sound(config, CONFIG_FIELDS)[1]]



@dataclass(frozen=True)
class RunRecord:
    """What a training run records about itself, as `loradock train` writes it (metrics.json) and
    the card, lineage, promote, compare and the comparison screen read it. Read from a file, a field
    of the wrong type is left out (`read_metrics`): anyone who can push writes one."""

    objective: str | None = None  # "sft", "dpo" or "grpo"
    method: str | None = None  # the PEFT method's name
    base_model: str | None = None
    base_model_revision: str | None = None  # the base weights' sha256 (or the Hub commit)
    parent: dict | None = None  # the adapter it continued: {repo_id, revision, commit, base_model}; None: fresh
    dataset: dict | None = None  # the registry dataset its rows came from: {repo_id, revision, commit, file}
    dataset_sha256: str | None = None  # of the rows trained on
    train_data: dict | None = None  # {path, sha256, rows read, kept, dropped, ...}
    eval_data: dict | None = None
    held_out_sha256: str | None = None  # what the held-out figures were scored on
    train_loss: float | None = None
    eval_loss_before: float | None = None
    eval_loss: float | None = None
    eval_metrics_before: dict = field(default_factory=dict)  # {grader name: mean score} untrained
    eval_metrics: dict = field(default_factory=dict)  # the same, trained
    graders: list = field(default_factory=list)  # the settings of each grader that made those figures, in order
    rewards: list = field(default_factory=list)  # a GRPO run's reward graders: settings, batches, constant batches, failures
    general: dict | None = None  # the forgetting guard: {sample, sha256, rows, base_perplexity, perplexity, forgetting}
    steps: int | None = None
    epochs: float | None = None
    processes: int | None = None
    global_batch: int | None = None
    trainable_parameters: int | None = None
    base_parameters: int | None = None
    train_runtime_s: float | None = None
    total_runtime_s: float | None = None
    train_tokens: int | None = None
    tokens_per_second: float | None = None
    peak_memory: dict | None = None  # {device, mib}
    resumed_from_step: int | None = None
    log_history: list = field(default_factory=list)  # the Trainer's, one entry per logged step

    @classmethod
    def from_dict(cls, values: dict) -> "RunRecord":
        """The record in `values` (a metrics.json's mapping): its sound fields; the rest ignored."""
        kept = sound(values, METRICS_FIELDS)[0]
        return cls(**{f.name: kept[f.name] for f in dataclasses.fields(cls) if kept.get(f.name) is not None})

    @classmethod
    def read(cls, folder: Path) -> "RunRecord":
        """The folder's metrics.json (an empty record without one)."""
        return cls.from_dict(read_metrics(folder))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n"

    @property
    def recorded(self) -> bool:
        """Whether a training run wrote this (an adapter pushed without loradock has no record)."""
        return self != RunRecord()

    @property
    def held_out(self) -> str | None:
        """What the held-out figures were scored on (the prompts and references; for a run that
        did not record those, its held-out file)."""
        return self.held_out_sha256 or (self.eval_data or {}).get("sha256")

    @property
    def headline(self) -> tuple[str, float] | None:
        """The held-out figure the revision is judged by: its first grader's (exact match, then ROUGE-L,
        when the run named none)."""
        return next(iter(self.eval_metrics.items()), None)

    @property
    def forgetting(self) -> float | None:
        """The forgetting guard's figure: how much higher the general sample's perplexity is with the
        adapter than without it (0.1: 10%); None when not measured."""
        value = (self.general or {}).get("forgetting")
        return value if is_number(value) else None

    def figure_against(self, other: "RunRecord") -> tuple[str, float, float] | None:
        """(name, this run's, the other's) of the first held-out figure both runs made, in this run's order:
        a GRPO child scored by its reward and the built-in graders compares with its parent on the
        first of them the parent was scored by too."""
        return next(((name, value, other.eval_metrics[name]) for name, value in self.eval_metrics.items()
                     if name in other.eval_metrics), None)

    def grader(self, name: str) -> dict | None:
        """The settings of the grader that made the figure `name` (None for a run that recorded none)."""
        return next((g for g in self.graders if g.get("name") == name), None)

    def data(self) -> str:
        """Where its rows came from, for a person: a registry dataset at its commit, else the file's name."""
        sha = (self.dataset_sha256 or "")[:12]
        dataset = self.dataset or {}
        where = (f"datasets/{dataset['repo_id']}@{(dataset.get('commit') or '?')[:12]}/{dataset.get('file')}"
                 if dataset.get("repo_id") else Path((self.train_data or {}).get("path") or "?").name)
        return f"{where} (sha256 {sha or '?'})"
