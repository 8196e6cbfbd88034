"""The training configuration: loradock's own options, the PEFT method's config and TRL's `SFTConfig`.

A YAML config has three parts, and every command-line flag lands in one of them:

    base_model: loradock/tiny-chat      # loradock's own options (TrainArgs below)
    data: sft/assets/tasks/reverse/train.jsonl
    peft:                               # the method (hub.adapter.METHODS), then any field of its
      method: lora                      # PEFT config class (LoraConfig for lora, IA3Config for ia3, ...)
      r: 16
    training:                           # any field of trl.SFTConfig / transformers.TrainingArguments
      learning_rate: 2.0e-3             # (of trl.DPOConfig with `objective: dpo`)

`--peft METHOD`, `--peft.KEY VALUE` and `--training.KEY VALUE` set them from the command line; the
short flags (`--lr`, `--lora-r`, ...) are aliases for the common ones. A `lora:` section (and
`--lora.KEY`) is read as `peft: {method: lora, ...}`. Precedence: defaults < YAML < command line.
Every problem is collected and reported at once, naming the flag to change.
"""

import dataclasses
from dataclasses import dataclass, field

import difflib

from hub.adapter import METHODS, SERVABLE_RANKS, Method, nearest_servable_rank
from loradock import config as settings
from loradock.config import REGISTRY_HELP, TOKEN_HELP, Section, check_fields
from loradock.home import default_base_model
from sft.distributed import launch_problems


@dataclass
class TrainArgs:
    """loradock's own options. The first line of each `help` is what `--help` shows."""

    base_model: str = field(default_factory=default_base_model, metadata={
        "help": "base model: an embedded one (loradock/smollm2-135m-instruct-q4_1, the default unless "
                "$LORADOCK_BASE_MODEL names another; loradock/tiny-chat), a local folder, or a Hub id "
                "(Qwen/Qwen2.5-0.5B-Instruct)"})
    data: str | None = field(default=None, metadata={
        "help": "training data: .jsonl, .json, .csv, .parquet or a saved datasets folder, or a file of a registry "
                "dataset repo as datasets/ORG/NAME@REVISION/FILE (downloaded, pinned to its commit)"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data, in the same forms"})
    eval_split: float = field(default=0.0, metadata={
        "help": "fraction of --data held out for evaluation when there is no --eval-data (e.g. 0.1)"})
    output: str | None = field(default=None, metadata={"help": "folder the finished adapter is written to"})
    columns: str | None = field(default=None, metadata={
        "help": "rename data fields, ours=theirs: prompt=question,response=answer"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a .jinja chat template to train, save and serve with instead of the base model's own"})
    max_bad_fraction: float = field(default=0.05, metadata={
        "help": "abort when more than this fraction of rows is bad"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last complete checkpoint of an interrupted run into the same --output"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing adapter in --output"})
    eval_generations: int = field(default=32, metadata={
        "help": "held-out prompts answered (greedy) at each evaluation and scored by the graders; 0: loss only"})
    graders: list[str] = field(default_factory=list, metadata={
        "one": "grader", "metavar": "NAME[:ARG]",
        "help": "what scores the held-out answers (`loradock eval --grader`'s names); the first is the figure "
                "`promote` judges by (none: exact_match and rouge_l)"})
    objective: str = field(default="sft", metadata={
        "help": "sft (instruction tuning, TRL SFTTrainer), dpo (preference tuning of --init-adapter, TRL "
                "DPOTrainer; `training:` then sets DPOConfig) or grpo (reinforcement on --reward graders' scores of "
                "sampled answers to the data's prompts, TRL GRPOTrainer; `training:` then sets GRPOConfig)"})
    rewards: list[str] = field(default_factory=list, metadata={
        "one": "reward", "metavar": "NAME[:ARG]",
        "help": "with --objective grpo: a grader whose score of each sampled answer is its reward (`--grader`'s "
                "names; the data's response is the reference); several are summed"})
    init_adapter: str | None = field(default=None, metadata={
        "help": "start from this adapter's weights instead of a fresh one: a registry adapter REPO@REVISION "
                "(pulled, pinned to its commit) or a local adapter folder; its method, shapes and base must match"})
    registry: str | None = field(default=None, metadata={
        "help": "for --init-adapter REPO@REVISION and --data datasets/...: " + REGISTRY_HELP, "environment": True})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True, "environment": True})
    nproc: int = field(default=1, metadata={
        "help": "training processes on this machine, started with torchrun (gloo on a CPU, one per GPU on CUDA); "
                "the global batch is --batch-size x processes x gradient_accumulation_steps"})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "launch with `accelerate launch` and this config as `accelerate config` writes it (multi-node, "
                "FSDP, DeepSpeed: sft/configs/accelerate/); --nproc, if given, overrides its num_processes"})


# Short flags for the most used upstream fields: flag -> (section, field).
ALIASES = {
    "peft": ("peft", "method"),
    "lora_r": ("peft", "r"),
    "lora_alpha": ("peft", "lora_alpha"),
    "lora_dropout": ("peft", "lora_dropout"),
    "target_modules": ("peft", "target_modules"),
    "num_virtual_tokens": ("peft", "num_virtual_tokens"),
    "epochs": ("training", "num_train_epochs"),
    "max_steps": ("training", "max_steps"),
    "lr": ("training", "learning_rate"),
    "batch_size": ("training", "per_device_train_batch_size"),
    "max_length": ("training", "max_length"),
    "packing": ("training", "packing"),
    "seed": ("training", "seed"),
}

OBJECTIVES = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}  # --objective -> the TRL config of `training:`
# What training records in run_config.yaml beside the settings (the parent and data it resolved);
# read back with --config, they are not settings and are left out.
RECORDED = ("parent", "dataset", "eval_dataset")

# loradock's defaults where they differ from TRL's (each method's PEFT defaults are in its METHODS entry).
DEFAULT_MAX_LENGTH = 1024  # SFTConfig's
TRAINING_DEFAULTS = {
    "learning_rate": 2e-4, "logging_steps": 10, "report_to": "none", "save_strategy": "steps", "save_steps": 0.1,
    "save_total_limit": 2, "eval_strategy": "steps", "eval_steps": 0.2, "per_device_eval_batch_size": 32,
}
# Fields loradock sets itself; a user value would be overwritten, so it is refused instead.
MANAGED = {"output_dir": "--output", "resume_from_checkpoint": "--resume", "assistant_only_loss": None,
           "completion_only_loss": None, "dataset_text_field": None, "chat_template_path": "--chat-template"}


# Fields of a PEFT config that loradock sets itself (or that only PEFT sets).
PEFT_MANAGED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                "peft_version", "tokenizer_name_or_path"}


def method_named(name, problems: list[str]) -> Method | None:
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name), list(METHODS), n=1)
    problems.append(f"--peft {name!r} is not a method loradock trains" + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" (methods: {', '.join(METHODS)}; `loradock methods` says what each trains and how it is served)")
    return None


def check_peft(values: dict, problems: list[str]) -> dict:
    """`peft:`: the method, then the fields of its PEFT config class over the method's defaults."""
    import peft

    values = dict(values)
    name = values.pop("method", "lora")
    method = method_named(name, problems)
    if method is None:
        return {"method": name}
    config_class = getattr(peft, method.config_class)
    fields = [f.name for f in dataclasses.fields(config_class) if f.name not in PEFT_MANAGED]
    given = {}
    for name, value in values.items():
        if name in PEFT_MANAGED:
            problems.append(f"--peft.{name} is set by loradock; remove it")
        elif name not in fields:
            problems.append(field_of_another_method(method, name, fields))
        else:
            given[name] = value
    if method.config_class == "PromptTuningConfig" and given.get("prompt_tuning_init_text"):
        given.setdefault("prompt_tuning_init", "TEXT")  # the text is the initialisation; PEFT wants both
    checked = settings.check_fields(config_class, given, problems, lambda key: f"--peft.{key}")
    return {"method": method.name, **{k: v for k, v in method.defaults.items() if k != "task_type"}, **checked}


def field_of_another_method(method: Method, name: str, fields: list[str]) -> str:
    import peft

    owners = [m.name for m in METHODS.values()
              if m is not method and name in {f.name for f in dataclasses.fields(getattr(peft, m.config_class))}]
    close = difflib.get_close_matches(name, fields, n=1)
    text = f"--peft.{name}: unknown option {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
    if owners:
        text += f"; it is a field of {', '.join(owners)}, not of {method.name} (choose the method with --peft)"
    return text + f"; {method.name} ({method.config_class}) takes: {', '.join(fields)}"


def upstream_section(name: str, module: str, class_name: str, defaults: dict) -> Section:
    """`name:` in YAML and `--name.KEY VALUE` flags: the fields of `module.class_name`, checked."""
    def check(values: dict, problems: list[str]) -> dict:
        import importlib

        cls = getattr(importlib.import_module(module), class_name)
        return check_fields(cls, values, problems, lambda key: f"--{name}.{key}")

    return Section(name, check, defaults=dict(defaults))


# GRPO's where they differ from TRL's: fewer, shorter samples than its defaults (8 of up to 256 tokens),
# sized for a CPU and the short answers of instruction tasks; raise them on a GPU.
GRPO_DEFAULTS = {**TRAINING_DEFAULTS, "num_generations": 4, "max_completion_length": 128}


def sections_for(objective) -> tuple[Section, ...]:
    """`training:` is checked against the objective's TRL config (an unknown objective is reported by `validate`)."""
    name = OBJECTIVES.get(objective, "SFTConfig")
    defaults = GRPO_DEFAULTS if objective == "grpo" else TRAINING_DEFAULTS
    return Section("peft", check_peft), upstream_section("training", "trl", name, defaults)


@dataclass
class ResolvedConfig:
    """The merged settings, checked: `args` is ours; `peft` names the method and holds the keyword
    arguments of its PEFT config class; `training` those of `SFTConfig` (the device-dependent ones
    decided at `build` time)."""

    args: TrainArgs
    peft: dict
    training: dict

    @property
    def method(self) -> Method:
        return METHODS[self.peft["method"]]

    @property
    def peft_settings(self) -> dict:
        """The PEFT config's keyword arguments (the method's name left out)."""
        return {k: v for k, v in self.peft.items() if k != "method"}

    def to_yaml_dict(self) -> dict:
        """The run's recipe: every setting but where this machine reaches the registry (and with what token)."""
        recipe = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(self.args)
                  if not f.metadata.get("environment")}
        return {**recipe, "peft": dict(self.peft), "training": dict(self.training)}


def legacy_lora(file_values: dict, cli_values: dict) -> tuple[dict, dict]:
    """A `lora:` section and `--lora.KEY` flags, read as `peft:` with method lora."""
    file_values, cli_values = dict(file_values), dict(cli_values)
    lora = file_values.pop("lora", None)
    if isinstance(lora, dict):
        peft_values = dict(file_values.get("peft") or {})
        peft_values.setdefault("method", "lora")
        file_values["peft"] = {**lora, **peft_values}
    elif lora is not None:
        file_values["lora"] = lora  # not a mapping: reported as an unknown key
    cli_values = {("peft." + k[len("lora."):] if k.startswith("lora.") else k): v for k, v in cli_values.items()}
    return file_values, cli_values


def resolve(file_values: dict, cli_values: dict) -> ResolvedConfig:
    """Merge defaults, the YAML file and the command line; validate everything, raise once.

    Args:
        file_values: the YAML config (top-level keys plus `peft:` (or `lora:`) and `training:` sections).
        cli_values: flat {key: value} from the command line; keys are TrainArgs fields, alias
            names or `peft.KEY` / `lora.KEY` / `training.KEY`; values may be strings to be converted.
    """
    file_values, cli_values = legacy_lora(file_values, cli_values)
    file_values = {k: v for k, v in file_values.items() if k not in RECORDED}
    objective = cli_values.get("objective", file_values.get("objective", "sft"))
    resolved = settings.resolve(TrainArgs, file_values, cli_values, sections_for(objective), ALIASES, what="the training configuration",
                                validate=lambda r: validate(ResolvedConfig(r.args, r.sections["peft"], r.sections["training"])))
    return ResolvedConfig(resolved.args, resolved.sections["peft"], resolved.sections["training"])


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
    problems += objective_problems(config)
    if args.eval_generations < 0:
        problems.append(f"--eval-generations {args.eval_generations} must be 0 (loss only) or more")
    problems += grader_problems(args.graders)
    problems += launch_problems(args)
    if config.peft.get("method") not in METHODS:
        return problems  # reported by the peft section
    problems += method_problems(config)
    max_length = config.training.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 8):
        problems.append(f"--max-length {max_length} must be a whole number of tokens >= 8")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        value = config.training.get(name)
        if isinstance(value, int) and value < 1:
            problems.append(f"--training.{name} {value} must be at least 1")
    return problems


def objective_problems(config: ResolvedConfig) -> list[str]:
    args = config.args
    if args.objective not in OBJECTIVES:
        close = difflib.get_close_matches(str(args.objective), list(OBJECTIVES), n=1)
        return [f"--objective {args.objective!r} is not one loradock trains" + (f"; did you mean {close[0]!r}?" if close
                else "") + f" (objectives: {', '.join(OBJECTIVES)})"]
    if args.rewards and args.objective != "grpo":
        return [f"--reward is the reward of --objective grpo, and the objective is {args.objective}: pass "
                "--objective grpo, or name held-out graders with --grader"]
    if args.objective == "grpo":
        problems = [] if args.rewards else [
            "--objective grpo needs a reward: pass --reward NAME[:ARG] (a grader: exact_match, rouge_l, regex:PATTERN, "
            "json_schema:FILE, python:MODULE:FUNCTION)"]
        method = METHODS.get(config.peft.get("method"))
        if method is not None and method.prompt_learning:
            problems.append(f"--objective grpo trains LoRA-family and ia3 adapters here, not {method.name}: choose "
                            "another --peft, or an --init-adapter of one of those")
        return problems + [p.replace("--grader", "--reward", 1) for p in grader_problems(args.rewards)]
    if args.objective != "dpo":
        return []
    problems = []
    if not args.init_adapter:
        problems.append("--objective dpo tunes an existing adapter against itself, and none was given: pass "
                        "--init-adapter REPO@REVISION (or an adapter folder), e.g. the SFT adapter to improve")
    method = METHODS.get(config.peft.get("method"))
    if method is not None and method.prompt_learning:
        problems.append(f"--objective dpo does not train {method.name} adapters here (TRL's reference copy of a "
                        "soft prompt is not supported by loradock); use a LoRA-family or ia3 parent")
    return problems


def peft_refusals(config: ResolvedConfig) -> list[str]:
    """What PEFT's own config class refuses in these settings (it checks combinations on creation)."""
    settings = config.peft_settings
    if str(settings.get("prompt_tuning_init", "")).upper().endswith("TEXT"):
        settings["tokenizer_name_or_path"] = config.args.base_model  # set by training, to the base's
    try:
        config.method.peft_config(settings)
    except (ValueError, TypeError) as e:
        return [f"--peft: {config.method.config_class} refuses these settings: {e}"]
    return []


def method_problems(config: ResolvedConfig) -> list[str]:
    """What the chosen method needs of the other settings."""
    method, problems = config.method, []
    rank = config.peft.get("r")
    if method.served_by == "vllm-lora" and isinstance(rank, int) and rank not in SERVABLE_RANKS:
        nearest = nearest_servable_rank(rank)
        problems.append(f"--lora-r {rank} is a rank vLLM cannot serve (it serves {', '.join(map(str, SERVABLE_RANKS))}); "
                        f"use --lora-r {nearest}")
    virtual = config.peft.get("num_virtual_tokens")
    if method.prompt_learning and (not isinstance(virtual, int) or virtual < 1):
        problems.append(f"--peft.num_virtual_tokens {virtual} must be at least 1")
    elif method.soft_prompt:
        max_length = config.training.get("max_length") or DEFAULT_MAX_LENGTH
        if isinstance(max_length, int) and max_length - virtual < 8:
            problems.append(f"--peft.num_virtual_tokens {virtual} leaves {max_length - virtual} of --max-length "
                            f"{max_length} for the rows (the soft prompt takes positions too); lower "
                            f"--peft.num_virtual_tokens or raise --max-length to at least {virtual + 8}")
    problems += peft_refusals(config)
    if method.prompt_learning and config.training.get("packing"):
        problems.append(f"--packing does not work with {method.name}: its virtual tokens go in front of each row, and "
                        "a packed block holds several; drop --packing")
    return problems


def grader_problems(specs: list[str]) -> list[str]:
    """Each grader name that does not parse, with its fix."""
    from loradock import graders
    from loradock.errors import LoradockError

    problems = []
    for spec in specs:
        try:
            graders.parse(spec)
        except LoradockError as e:
            problems.append(f"--grader: {e.problem} ({e.fix})")
    return problems
