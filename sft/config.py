"""The training configuration: loradock's own options, PEFT's `LoraConfig` and TRL's `SFTConfig`.

A YAML config has three parts, and every command-line flag lands in one of them:

    base_model: loradock/tiny-chat      # loradock's own options (TrainArgs below)
    data: sft/assets/tasks/reverse/train.jsonl
    lora:                               # any field of peft.LoraConfig
      r: 16
    training:                           # any field of trl.SFTConfig / transformers.TrainingArguments
      learning_rate: 2.0e-3

`--lora.KEY VALUE` and `--training.KEY VALUE` set any upstream field; the short flags (`--lr`,
`--lora-r`, ...) are aliases for the common ones. Precedence: defaults < YAML < command line.
Every problem is collected and reported at once, naming the flag to change.
"""

import dataclasses
import difflib
import enum
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loradock.errors import LoradockError
from loradock.home import DEFAULT_BASE_MODEL

# Ranks vLLM can serve (`vllm.config.lora.MaxLoRARanks`, 0.32); a test keeps this in step with vLLM.
SERVABLE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class TrainArgs:
    """loradock's own options. The first line of each `help` is what `--help` shows."""

    base_model: str = field(default=DEFAULT_BASE_MODEL, metadata={
        "help": "base model: a Hub id (Qwen/Qwen2.5-0.5B-Instruct), a local folder, or the built-in tiny model"})
    data: str | None = field(default=None, metadata={
        "help": "training data: .jsonl, .json, .csv, .parquet or a saved datasets folder"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data, in the same formats"})
    eval_split: float = field(default=0.0, metadata={
        "help": "fraction of --data held out for evaluation when there is no --eval-data (e.g. 0.1)"})
    output: str | None = field(default=None, metadata={"help": "folder the finished adapter is written to"})
    columns: str | None = field(default=None, metadata={
        "help": "rename data fields, ours=theirs: prompt=question,response=answer"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a .jinja chat template with {% generation %} markers, for a model whose own has none"})
    max_bad_fraction: float = field(default=0.05, metadata={
        "help": "abort when more than this fraction of rows is bad"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last complete checkpoint of an interrupted run into the same --output"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing adapter in --output"})


# Short flags for the most used upstream fields: flag -> (section, field).
ALIASES = {
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "lora_alpha"),
    "lora_dropout": ("lora", "lora_dropout"),
    "target_modules": ("lora", "target_modules"),
    "epochs": ("training", "num_train_epochs"),
    "max_steps": ("training", "max_steps"),
    "lr": ("training", "learning_rate"),
    "batch_size": ("training", "per_device_train_batch_size"),
    "max_length": ("training", "max_length"),
    "packing": ("training", "packing"),
    "seed": ("training", "seed"),
}

# loradock's defaults where they differ from PEFT's and TRL's (LoRA rather than full fine-tuning).
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
TRAINING_DEFAULTS = {
    "learning_rate": 2e-4, "logging_steps": 10, "report_to": "none", "save_strategy": "steps", "save_steps": 0.1,
    "save_total_limit": 2, "eval_strategy": "steps", "eval_steps": 0.2, "per_device_eval_batch_size": 32,
}
# Fields loradock sets itself; a user value would be overwritten, so it is refused instead.
MANAGED = {"output_dir": "--output", "resume_from_checkpoint": "--resume", "assistant_only_loss": None,
           "completion_only_loss": None, "dataset_text_field": None, "chat_template_path": "--chat-template"}


def _upstream():
    from peft import LoraConfig
    from trl import SFTConfig

    return {"lora": LoraConfig, "training": SFTConfig}


@dataclass
class ResolvedConfig:
    """The merged settings, checked: `args` is ours; `lora` and `training` are keyword arguments
    for `LoraConfig` and `SFTConfig` (the device-dependent ones decided at `build` time)."""

    args: TrainArgs
    lora: dict
    training: dict

    def to_yaml_dict(self) -> dict:
        return {**dataclasses.asdict(self.args), "lora": dict(self.lora), "training": dict(self.training)}


def load_yaml(path: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LoradockError(f"config file {path!r} does not exist", "pass --config sft/configs/NAME.yaml") from None
    except yaml.YAMLError as e:
        raise LoradockError(f"config file {path!r} is not valid YAML: {e}", "fix the YAML syntax") from None
    if not isinstance(loaded, dict):
        raise LoradockError(f"config file {path!r} must be a mapping of keys to values", "see sft/configs/*.yaml")
    return loaded


def resolve(file_values: dict, cli_values: dict) -> ResolvedConfig:
    """Merge defaults, the YAML file and the command line; validate everything, raise once.

    Args:
        file_values: the YAML config (top-level keys plus `lora:` and `training:` sections).
        cli_values: flat {key: value} from the command line; keys are TrainArgs fields, alias
            names or `lora.KEY` / `training.KEY`; values may be strings to be coerced.
    """
    problems: list[str] = []
    ours = {f.name: f for f in dataclasses.fields(TrainArgs)}
    merged = {"args": {}, "lora": dict(LORA_DEFAULTS), "training": dict(TRAINING_DEFAULTS)}

    def place(key: str, value, origin: str) -> None:
        key = key.replace("-", "_")
        section, _, name = key.rpartition(".")
        if not section and key in ALIASES:
            section, name = ALIASES[key]
        if not section:
            if name not in ours:
                problems.append(_unknown(origin, name, [*ours, *ALIASES]))
                return
            section = "args"
        elif section not in ("lora", "training"):
            problems.append(f"{origin}: unknown section {section!r}; use lora.KEY or training.KEY")
            return
        merged[section][name] = value

    for key, value in file_values.items():
        if key in ("lora", "training") and isinstance(value, dict):
            for name, item in value.items():
                place(f"{key}.{name}", item, f"config {key}.{name}")
        else:
            place(key, value, f"config key {key!r}")
    for key, value in cli_values.items():
        place(key, value, f"--{key.replace('_', '-') if '.' not in key else key}")

    args = _coerce_fields(TrainArgs, merged["args"], problems, prefix="--")
    upstream = _upstream()
    lora = _coerce_fields(upstream["lora"], merged["lora"], problems, prefix="--lora.")
    training = _coerce_fields(upstream["training"], merged["training"], problems, prefix="--training.")
    for name, flag in MANAGED.items():
        if name in training:
            problems.append(f"--training.{name} is set by loradock" + (f"; use {flag}" if flag else "; remove it"))
    resolved = ResolvedConfig(TrainArgs(**args), lora, training)
    problems += validate(resolved)
    if problems:
        raise LoradockError("the training configuration has problems:\n  - " + "\n  - ".join(problems),
                            "change the flags or config keys named above")
    return resolved


def validate(config: ResolvedConfig) -> list[str]:
    """Cross-field checks that no single type can express."""
    args, problems = config.args, []
    if not args.data:
        problems.append("no training data: pass --data FILE (or `data:` in the config)")
    if not args.output:
        problems.append("no output folder: pass --output DIR (or `output:` in the config)")
    if not 0.0 <= args.eval_split < 1.0:
        problems.append(f"--eval-split {args.eval_split} must be in [0, 1), e.g. 0.1")
    if args.eval_data and args.eval_split:
        problems.append("--eval-data and --eval-split both given: pass only one")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        problems.append(f"--max-bad-fraction {args.max_bad_fraction} must be between 0 and 1")
    rank = config.lora.get("r")
    if isinstance(rank, int) and rank not in SERVABLE_RANKS:
        nearest = nearest_servable_rank(rank)
        problems.append(f"--lora-r {rank} is a rank vLLM cannot serve (it serves {', '.join(map(str, SERVABLE_RANKS))}); "
                        f"use --lora-r {nearest}")
    max_length = config.training.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 8):
        problems.append(f"--max-length {max_length} must be a whole number of tokens >= 8")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        value = config.training.get(name)
        if isinstance(value, int) and value < 1:
            problems.append(f"--training.{name} {value} must be at least 1")
    return problems


def nearest_servable_rank(rank: int) -> int:
    """The servable rank closest on a log scale (ranks are compared by ratio: 4 -> 8, 12 -> 16)."""
    return min(SERVABLE_RANKS, key=lambda r: (abs(math.log2(r) - math.log2(max(rank, 1))), -r))


def _unknown(origin: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{origin}: unknown option {name!r}{hint}"


def _coerce_fields(cls, values: dict, problems: list[str], prefix: str) -> dict:
    """Values converted to the types `cls` declares (command-line strings, YAML's `1e-3`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    out = {}
    for name, value in values.items():
        flag = f"{prefix}{name.replace('_', '-') if prefix == '--' else name}"
        if name not in fields:
            problems.append(_unknown(flag, name, fields))
            continue
        try:
            out[name] = coerce(hints.get(name, fields[name].type), value)
        except (TypeError, ValueError):
            problems.append(f"{flag} {value!r} is not a valid {_type_name(hints.get(name, fields[name].type))}")
    return out


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # upstream annotations that do not resolve: fall back to the raw ones
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def coerce(tp, value):
    """`value` as type `tp`; strings are parsed, other values are checked. Raises ValueError."""
    if isinstance(tp, str):  # an annotation we could not resolve: accept YAML's own typing
        return yaml.safe_load(value) if isinstance(value, str) else value
    origin, members = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "null":  # YAML's spelling; "none" is a real value (report_to: none)
            if type(None) in members:
                return None
        candidates = [m for m in members if m is not type(None)]
        takes_list = any(typing.get_origin(m) is list for m in candidates)
        if type(value) in candidates and not (isinstance(value, str) and takes_list and "," in value):
            return value  # already one of the allowed types ("all-linear" stays a string)
        for member in candidates:
            try:
                return coerce(member, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE | FALSE:
            return value.lower() in TRUE
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(value)
        return [coerce(members[0], item.strip() if isinstance(item, str) else item) for item in items] if members else items
    if origin is dict or tp is dict:
        parsed = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(parsed, dict):
            raise ValueError(value)
        return parsed
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value).value if not isinstance(value, tp) else value.value
    return yaml.safe_load(value) if isinstance(value, str) else value
