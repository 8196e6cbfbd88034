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
from dataclasses import dataclass, field

from hub.adapter import METHODS, SERVABLE_RANKS, nearest_servable_rank
from loradock import config as settings
from loradock.config import Section, check_fields
from loradock.home import DEFAULT_BASE_MODEL


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
LORA_DEFAULTS = METHODS["lora"].defaults
TRAINING_DEFAULTS = {
    "learning_rate": 2e-4, "logging_steps": 10, "report_to": "none", "save_strategy": "steps", "save_steps": 0.1,
    "save_total_limit": 2, "eval_strategy": "steps", "eval_steps": 0.2, "per_device_eval_batch_size": 32,
}
# Fields loradock sets itself; a user value would be overwritten, so it is refused instead.
MANAGED = {"output_dir": "--output", "resume_from_checkpoint": "--resume", "assistant_only_loss": None,
           "completion_only_loss": None, "dataset_text_field": None, "chat_template_path": "--chat-template"}


def upstream_section(name: str, module: str, class_name: str, defaults: dict) -> Section:
    """`name:` in YAML and `--name.KEY VALUE` flags: the fields of `module.class_name`, checked."""
    def check(values: dict, problems: list[str]) -> dict:
        import importlib

        cls = getattr(importlib.import_module(module), class_name)
        return check_fields(cls, values, problems, lambda key: f"--{name}.{key}")

    return Section(name, check, defaults=dict(defaults))


SECTIONS = (upstream_section("lora", "peft", METHODS["lora"].config_class, LORA_DEFAULTS),
            upstream_section("training", "trl", "SFTConfig", TRAINING_DEFAULTS))


@dataclass
class ResolvedConfig:
    """The merged settings, checked: `args` is ours; `lora` and `training` are keyword arguments
    for `LoraConfig` and `SFTConfig` (the device-dependent ones decided at `build` time)."""

    args: TrainArgs
    lora: dict
    training: dict

    def to_yaml_dict(self) -> dict:
        return {**dataclasses.asdict(self.args), "lora": dict(self.lora), "training": dict(self.training)}


def resolve(file_values: dict, cli_values: dict) -> ResolvedConfig:
    """Merge defaults, the YAML file and the command line; validate everything, raise once.

    Args:
        file_values: the YAML config (top-level keys plus `lora:` and `training:` sections).
        cli_values: flat {key: value} from the command line; keys are TrainArgs fields, alias
            names or `lora.KEY` / `training.KEY`; values may be strings to be converted.
    """
    resolved = settings.resolve(TrainArgs, file_values, cli_values, SECTIONS, ALIASES, what="the training configuration",
                                validate=lambda r: validate(ResolvedConfig(r.args, r.sections["lora"], r.sections["training"])))
    return ResolvedConfig(resolved.args, resolved.sections["lora"], resolved.sections["training"])


def validate(config: ResolvedConfig) -> list[str]:
    """Cross-field checks that no single type can express."""
    args, problems = config.args, []
    for name, flag in MANAGED.items():
        if name in config.training:
            problems.append(f"--training.{name} is set by loradock" + (f"; use {flag}" if flag else "; remove it"))
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


