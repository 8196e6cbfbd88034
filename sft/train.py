"""loradock train --config sft/configs/NAME.yaml [--key value ...]

Runs one training job with a PEFT method (`--peft`, LoRA by default): check the data, train with
TRL's SFTTrainer (`--objective sft`, instruction tuning) or DPOTrainer (`--objective dpo`,
preference tuning of `--init-adapter` against a frozen copy of itself), evaluate (held-out loss,
and the graders' scores of greedy answers to a sample of held-out prompts), check the saved weights, and publish
the adapter folder atomically. `--init-adapter REPO@REVISION|DIR` starts from an existing
adapter's weights (`sft.lineage`), which run_config.yaml and the card record as its `parent`.

Work happens in a hidden sibling of --output (`.NAME.loradock-run/`, holding the checkpoints that
--resume continues from); the finished folder is assembled there and renamed into place in one
step, so an interrupted run never leaves anything that looks like a finished adapter. A disk that
fills up ends the run with the problem and the fix (`sft.full_disk`).
"""

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import yaml

from hub.adapter import METRICS, REQUIRED_FILES, RUN_CONFIG, WEIGHTS
from hub.adapter.card import write_card
from hub.adapter.checks import saved_weight_problems
from hub.adapter.records import RunRecord
from loradock.errors import LoradockError
from loradock.graders import BUILT_IN, parse_all
from sft.base_model import BUILD_INFO, resolve_base_model
from sft.chat_format import check_chat_template
from sft.config import DEFAULT_MAX_LENGTH, ResolvedConfig
from sft.data import parse_columns
from sft.data_check import check_data, enforce, to_dataset
from sft.distributed import (LAUNCHED, check_in_step, check_processes, gathered_state_dict, global_batch_line,
                             is_main, main_first, on_main, wait_for_everyone)
from sft.forgetting import forgetting
from sft.full_disk import refusing_a_full_disk
from sft.held_out import (EVAL_BEFORE, final_evaluation, generation_scores, held_out_fingerprint, held_out_sample,
                           untrained_figures)
from sft.lineage import (DataSource, Parent, adopt_parent_settings, base_linear_names, parent_problems, resolve_data,
                         resolve_parent)
from sft.preference_data import check_preferences, to_preference_dataset


@dataclasses.dataclass
class RunPaths:
    output: Path  # where the finished adapter appears
    work: Path  # checkpoints and the folder being assembled

    @classmethod
    def for_output(cls, output: str) -> "RunPaths":
        out = Path(output)
        return cls(out, out.parent / f".{out.name}.loradock-run")

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"

    def last_complete_checkpoint(self) -> Path | None:
        """The newest checkpoint whose trainer_state.json (saved last) is complete and readable."""
        candidates = sorted(self.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for checkpoint in reversed(candidates):
            try:
                json.loads((checkpoint / "trainer_state.json").read_text())
                return checkpoint
            except (OSError, ValueError):
                continue
        return None


def prepare_output(config: ResolvedConfig, processes: int = 1) -> tuple[RunPaths, Path | None]:
    """Decide where to write and what to resume from, before any work is done."""
    args = config.args
    paths = RunPaths.for_output(args.output)
    if paths.output.exists() and any(paths.output.iterdir()) and not args.overwrite:
        raise LoradockError(f"--output {args.output} already exists and is not empty",
                            "choose another --output, or pass --overwrite to replace it")
    if not args.resume:
        return paths, None
    checkpoint = paths.last_complete_checkpoint()
    if checkpoint is None:
        raise LoradockError(f"--resume: no complete checkpoint of an earlier run into {args.output}",
                            "run without --resume to start from the beginning")
    saved = {"processes": 1, **yaml.safe_load((paths.work / RUN_CONFIG).read_text())}  # runs before --nproc had 1
    now = comparable(config, processes)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise LoradockError(f"--resume: the configuration differs from the interrupted run's in {', '.join(changed)}",
                            "resume with the same settings, or drop --resume to start over")
    return paths, checkpoint


# How the processes are launched may change on --resume (torchrun or accelerate, another config file);
# their number may not: the per-process random states and data shards of a checkpoint, and the global
# batch (per device x processes x accumulation), depend on it.
NOT_COMPARED = ("resume", "overwrite", "nproc", "accelerate_config", "registry", "token")


def comparable(config: ResolvedConfig, processes: int = 1) -> dict:
    """The settings that must match for a resume to continue the same run."""
    flat = {**{f"peft.{k}": v for k, v in config.peft.items()}, **{f"training.{k}": v for k, v in config.training.items()}}
    flat.update({k: v for k, v in dataclasses.asdict(config.args).items() if k not in NOT_COMPARED})
    flat["processes"] = processes
    return json.loads(json.dumps(flat, default=str))


def load_tokenizer(base_path: str, chat_template_file: str | None):
    """The base model's tokenizer, with the --chat-template file's text as its template when given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if chat_template_file:
        try:
            tokenizer.chat_template = Path(chat_template_file).read_text(encoding="utf-8")
        except OSError as e:
            raise LoradockError(f"cannot read --chat-template {chat_template_file}: {e.strerror}",
                                "pass a readable .jinja file") from None
    check_chat_template(tokenizer)  # never replaced: the adapter is saved and served with this template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def row_length_limit(config: ResolvedConfig) -> int:
    """The longest row, in tokens, the data check keeps: --max-length, less a soft prompt's positions."""
    max_length = config.training.get("max_length") or DEFAULT_MAX_LENGTH
    return max_length - config.peft["num_virtual_tokens"] if config.method.soft_prompt else max_length


def check_datasets(config: ResolvedConfig, tokenizer, data: DataSource, held: DataSource | None):
    """The data checks that gate training; returns (train report, train rows, eval rows, eval summary)."""
    args, max_length = config.args, row_length_limit(config)
    columns = parse_columns(args.columns)
    check = check_preferences if args.objective == "dpo" else check_data

    def checked(source: DataSource, flag: str):
        report = check(source.path, tokenizer, tokenizer.chat_template, max_length, columns)
        enforce(report, args.max_bad_fraction, flag)
        print(report.render(), flush=True)
        return report

    train = checked(data, "--data")
    if held:
        held_out = checked(held, "--eval-data")
        return train, train.kept, held_out.kept, held_out.summary()
    if args.eval_split:
        shuffled = train.kept[:]
        random.Random(config.training.get("seed", 42)).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * args.eval_split))
        if n_eval >= len(shuffled):
            raise LoradockError(f"--eval-split {args.eval_split} leaves no training rows out of {len(shuffled)}",
                                "use a smaller --eval-split or pass --eval-data")
        return train, shuffled[n_eval:], shuffled[:n_eval], {"split_of": args.data, "rows": n_eval}
    return train, train.kept, [], None


def check_parent(config: ResolvedConfig, base_path: str) -> Parent:
    """The --init-adapter parent, downloaded if need be, refused unless this run can continue it."""
    parent = resolve_parent(config.args.init_adapter, config.args.registry, config.args.token)
    problems = parent_problems(parent, config.method, config.peft_settings, config.args.base_model,
                               lambda: base_linear_names(base_path))
    if problems:
        raise LoradockError(f"--init-adapter {config.args.init_adapter} cannot be continued by this run",
                            "change the flags named below: a continued adapter keeps its parent's base model, method "
                            "and shapes; nothing was written", "\n".join(f"  - {p}" for p in problems))
    for note in adopt_parent_settings(parent, config.method, config.peft):
        if is_main():
            print(f"--init-adapter: {note}", flush=True)
    return parent


def lineage(config: ResolvedConfig, parent: Parent | None, data: DataSource, held: DataSource | None) -> dict:
    """What run_config.yaml records beside the settings: the parent and the data, pinned to commits."""
    args = config.args
    record = {"init_adapter": parent.pinned() if parent else None, "data": data.pinned(args.data),
              "parent": parent.record() if parent else None, "dataset": data.dataset}
    if held:
        record.update(eval_data=held.pinned(args.eval_data), eval_dataset=held.dataset)
    return record


def apply_device_defaults(config: ResolvedConfig) -> None:
    """Settings that depend on the machine, decided once and recorded with the rest."""
    import torch

    cuda = torch.cuda.is_available()
    config.training.setdefault("bf16", cuda and torch.cuda.is_bf16_supported())
    config.training.setdefault("gradient_checkpointing", cuda)  # on a CPU it only costs time
    config.training.setdefault("use_cpu", not cuda)


def training_arguments(config: ResolvedConfig, paths: RunPaths, has_eval: bool):
    """TRL's SFTConfig (DPOConfig, GRPOConfig for --objective dpo, grpo) from the resolved settings."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    training = dict(config.training)
    if not has_eval:
        training["eval_strategy"] = "no"
    if config.args.objective == "dpo":
        return DPOConfig(output_dir=str(paths.checkpoints), **training)
    if config.args.objective == "grpo":
        try:
            return GRPOConfig(output_dir=str(paths.checkpoints), **training)
        except ValueError as e:  # its batch arithmetic: the samples of a step split into whole groups
            raise LoradockError(f"--objective grpo: {e}",
                                "make --batch-size (times the processes and gradient accumulation) a multiple of "
                                "--training.num_generations; nothing was written") from None
    # The data check has tokenized the rows and built the response-only masks (from the chat
    # template's {% generation %} markers, or found by rendering), so TRL takes them as they are.
    return SFTConfig(output_dir=str(paths.checkpoints), assistant_only_loss=False, **training)


def base_revision(base_path: str, model) -> str | None:
    """The base model's revision: the Hub commit it was loaded at, or the built model's weights hash."""
    info = Path(base_path) / BUILD_INFO
    if info.exists():
        return json.loads(info.read_text()).get("weights_sha256")
    return getattr(model.config, "_commit_hash", None)


def check_base_supports(config: ResolvedConfig, base_path: str) -> None:
    """A method PEFT implements for some architectures only, or with settings the base cannot take."""
    from transformers import AutoConfig

    method, base = config.method, AutoConfig.from_pretrained(base_path).get_text_config()
    if method.model_types and base.model_type not in method.model_types:
        raise LoradockError(f"--peft {method.name} needs a base of type {' or '.join(method.model_types)} "
                            f"(PEFT's {method.config_class}); {config.args.base_model} is a {base.model_type} model",
                            "choose another method (`loradock methods`), e.g. --peft lora")
    layers = config.peft.get("adapter_layers")
    if isinstance(layers, int) and not 1 <= layers <= base.num_hidden_layers:
        raise LoradockError(f"--peft.adapter_layers {layers}: {config.args.base_model} has {base.num_hidden_layers} layers",
                            f"use --peft.adapter_layers between 1 and {base.num_hidden_layers}")


def peft_config(config: ResolvedConfig, base_path: str):
    """The method's PEFT config; a text-initialised soft prompt is tokenized with the base's tokenizer."""
    settings = config.peft_settings
    if str(settings.get("prompt_tuning_init", "")).upper().endswith("TEXT"):
        settings["tokenizer_name_or_path"] = base_path
    return config.method.peft_config(settings)


def peak_memory() -> dict:
    """The run's peak memory: CUDA memory allocated on a GPU, the process's resident set on a CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {"device": "cpu (process peak RSS)", "mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def check_trainable(model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise LoradockError("the adapter has no trainable parameter, so training would change nothing",
                            "check --peft.target_modules (it must name layers of the base model) and the method's "
                            "settings; nothing was written")


def build_trainer(config: ResolvedConfig, model, trainer_args, train_rows, eval_rows, tokenizer, held_out, graders,
                  fresh):
    """The objective's trainer. `fresh` is the PEFT config of a new adapter, or None when `model`
    already holds the parent adapter."""
    from sft.trainer import GraderReward, LoradockDPOTrainer, LoradockGRPOTrainer, LoradockSFTTrainer

    if config.args.objective == "grpo":
        return LoradockGRPOTrainer(
            model=model, reward_funcs=[GraderReward(g) for g in parse_all(config.args.rewards)], args=trainer_args,
            train_dataset=to_prompt_dataset(train_rows), eval_dataset=to_prompt_dataset(eval_rows) if eval_rows else None,
            processing_class=tokenizer, peft_config=fresh, held_out=held_out, graders=graders)
    if config.args.objective == "dpo":
        # The model holds the parent as its "default" adapter; TRL copies it into a frozen "ref"
        # adapter and scores the reference with that one, so the reference is the parent, not the base.
        return LoradockDPOTrainer(
            model=model, args=trainer_args, train_dataset=to_preference_dataset(train_rows),
            eval_dataset=to_preference_dataset(eval_rows) if eval_rows else None, processing_class=tokenizer,
            held_out=held_out, graders=graders)
    return LoradockSFTTrainer(
        model=model, args=trainer_args, train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows) if eval_rows else None, processing_class=tokenizer,
        peft_config=fresh, held_out=held_out, graders=graders)


def to_prompt_dataset(rows: list):
    """GRPO's rows: the conversation up to the answer (`prompt`), and the data's answer as the graders'
    `reference`."""
    from datasets import Dataset

    from sft.data import prompt_and_reference

    pairs = [prompt_and_reference(row.messages) for row in rows]
    return Dataset.from_list([{"prompt": prompt, "reference": reference} for prompt, reference in pairs])


def held_out_graders(args) -> list:
    """What scores the held-out answers: the graders named, else a GRPO run's rewards and the built-in ones."""
    return parse_all(args.graders or [*args.rewards, *BUILT_IN])


@dataclasses.dataclass
class Prepared:
    """What the main process decided and checked before training, handed to every process."""

    paths: RunPaths
    checkpoint: Path | None  # the one --resume continues from
    train_report: object  # sft.data_check.DataReport (or the preference check's)
    train_rows: list
    eval_rows: list
    eval_summary: dict | None
    eval_before: dict | None  # the untrained adapter's held-out figures, kept by an interrupted run


def prepare_run(config: ResolvedConfig, tokenizer, data: DataSource, held: DataSource | None,
                processes: int) -> Prepared:
    """On the main process only: where to write, what to resume, the data check (printed once), the work folder."""
    paths, checkpoint = prepare_output(config, processes)
    train_report, train_rows, eval_rows, eval_summary = check_datasets(config, tokenizer, data, held)
    if not config.args.resume and paths.work.exists():
        shutil.rmtree(paths.work)  # the leftovers of an interrupted run that is not being resumed
    paths.work.mkdir(parents=True, exist_ok=True)
    (paths.work / RUN_CONFIG).write_text(yaml.safe_dump(comparable(config, processes), sort_keys=True))
    saved = paths.work / EVAL_BEFORE
    before = json.loads(saved.read_text()) if saved.exists() else None
    return Prepared(paths, checkpoint, train_report, train_rows, eval_rows, eval_summary, before)


def run(config: ResolvedConfig) -> Path:
    """Train one adapter; returns the published folder. In a run of several processes (`sft.distributed`)
    every process runs this, and the one-off work is the main process's."""
    import torch
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    args = config.args
    apply_device_defaults(config)
    # First, on every process: TrainingArguments sets up the processes' group that the rest relies on.
    trainer_args = training_arguments(config, RunPaths.for_output(args.output),
                                      has_eval=bool(args.eval_data or args.eval_split))
    check_processes(trainer_args)
    with main_first():  # the base model built, the parent pulled, the data downloaded once
        base_path = resolve_base_model(args.base_model)
        check_base_supports(config, base_path)
        parent = check_parent(config, base_path) if args.init_adapter else None  # first: it settles config.peft
        data = resolve_data(args.data, "--data", args.registry, args.token)
        held = resolve_data(args.eval_data, "--eval-data", args.registry, args.token)
    tokenizer = load_tokenizer(base_path, args.chat_template)
    prepared = on_main(lambda: prepare_run(config, tokenizer, data, held, trainer_args.world_size))
    paths, checkpoint, eval_rows = prepared.paths, prepared.checkpoint, prepared.eval_rows

    dtype = torch.bfloat16 if trainer_args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if parent:
        model = PeftModel.from_pretrained(model, str(parent.folder), is_trainable=True)
    held_out = held_out_sample(eval_rows, args.eval_generations, config.training.get("seed", 42))
    graders = held_out_graders(args)
    trainer = build_trainer(config, model, trainer_args, prepared.train_rows, eval_rows, tokenizer, held_out, graders,
                            fresh=None if parent else peft_config(config, base_path))
    check_trainable(trainer.model)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    if "ref" in trainer.model.peft_config:
        total -= trainable  # DPO's frozen copy of the adapter is not part of the base
    if is_main() and not os.environ.get(LAUNCHED):
        print(global_batch_line(trainer_args.world_size, trainer_args.per_device_train_batch_size,
                                trainer_args.gradient_accumulation_steps, ""), flush=True)
    started = time.perf_counter()
    untrained = untrained_figures(trainer, paths.work, prepared.eval_before) if eval_rows else dict
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    before = untrained()
    after = final_evaluation(trainer) if eval_rows else {}
    check_in_step(trainer)
    state_dict = gathered_state_dict(trainer)  # a collective under FSDP/DeepSpeed; None otherwise
    if not is_main():
        wait_for_everyone()  # until the main process has published
        return paths.output
    # The forgetting guard on the trained weights; with several processes their shards are not whole here.
    general = forgetting(trainer.accelerator.unwrap_model(trainer.model), tokenizer) \
        if trainer_args.world_size == 1 else None

    record, report = lineage(config, parent, data, held), prepared.train_report
    names = [g.spec for g in graders]
    tokens = int(trainer._total_train_tokens or trainer.state.num_input_tokens_seen)  # GRPO counts the latter
    run_record = RunRecord(
        objective=args.objective, parent=record["parent"], dataset=record["dataset"],
        base_model=args.base_model, base_model_revision=base_revision(base_path, model),
        dataset_sha256=report.sha256, train_data=report.summary(), eval_data=prepared.eval_summary,
        method=config.method.name, trainable_parameters=trainable, base_parameters=total - trainable,
        train_loss=round(result.training_loss, 4), eval_loss_before=before.get("eval_loss"),
        eval_loss=after.get("eval_loss"), eval_metrics_before=generation_scores(before, names),
        eval_metrics=generation_scores(after, names), held_out_sha256=held_out_fingerprint(held_out),
        graders=[g.settings | {"name": g.spec} for g in graders] if held_out else [],
        steps=result.global_step, epochs=round(trainer.state.epoch or 0, 3), processes=trainer_args.world_size,
        global_batch=trainer_args.per_device_train_batch_size * trainer_args.world_size
        * trainer_args.gradient_accumulation_steps,
        train_runtime_s=round(result.metrics["train_runtime"], 2),
        total_runtime_s=round(time.perf_counter() - started, 2), train_tokens=tokens,
        tokens_per_second=round(tokens / max(result.metrics["train_runtime"], 1e-9), 1),
        rewards=[f.record() for f in getattr(trainer, "reward_funcs", ())], general=general,
        peak_memory=peak_memory(), resumed_from_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None,
        log_history=trainer.state.log_history)
    output = publish(trainer, config, paths, run_record, record, state_dict)
    wait_for_everyone()
    return output


def publish(trainer, config: ResolvedConfig, paths: RunPaths, run_record: RunRecord, record: dict | None = None,
            state_dict: dict | None = None) -> Path:
    """Assemble the adapter folder beside the checkpoints and rename it into place (on the main process).
    `state_dict` is the model's, gathered whole from the processes' shards (FSDP, DeepSpeed ZeRO-3)."""
    staging = paths.work / "adapter"
    if staging.exists():
        shutil.rmtree(staging)
    model = trainer.accelerator.unwrap_model(trainer.model)
    saved_config = model.peft_config["default"]
    saved_config.base_model_name_or_path = config.args.base_model  # the name, never this machine's path
    if getattr(saved_config, "tokenizer_name_or_path", None):
        saved_config.tokenizer_name_or_path = config.args.base_model
    # save_embedding_layers=False: no method here trains embeddings, and "auto" would look the base
    # model's name up on the Hub to find out.
    # selected_adapters: a DPO run's model also holds TRL's frozen "ref" copy of the parent.
    model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False,
                          selected_adapters=["default"], **({"state_dict": state_dict} if state_dict else {}))
    problems = saved_weight_problems(staging / WEIGHTS) if (staging / WEIGHTS).exists() else []
    if problems:
        raise LoradockError(f"the saved adapter is broken: {'; '.join(problems)}",
                            "nothing was published; with sharded training (FSDP/DeepSpeed) save on the main process "
                            "with the full state dict gathered, then train again")
    trainer.processing_class.save_pretrained(staging)
    (staging / RUN_CONFIG).write_text(run_config_yaml(config, record))
    (staging / METRICS).write_text(run_record.to_json())
    write_card(staging)
    missing = [name for name in REQUIRED_FILES if not (staging / name).exists()]
    if missing:
        raise LoradockError(f"the adapter folder is missing {', '.join(missing)} after saving", "report this as a bug")
    if paths.output.exists():
        trash = paths.work / "replaced"
        os.replace(paths.output, trash)
    os.replace(staging, paths.output)
    shutil.rmtree(paths.work, ignore_errors=True)
    return paths.output


def run_config_yaml(config: ResolvedConfig, record: dict | None = None) -> str:
    """The resolved configuration, loadable again with --config. Upstream fields that are not
    listed keep the defaults of the library versions named in its header. `record` (`lineage`)
    pins --init-adapter and --data to the commits read and adds `parent` and `dataset`."""
    import peft
    import transformers
    import trl

    body = config.to_yaml_dict()
    body["resume"] = body["overwrite"] = False
    body.update(record or {})
    versions = f"# versions: trl {trl.__version__}, peft {peft.__version__}, transformers {transformers.__version__}\n"
    header = "# The resolved configuration of this adapter's training run.\n"
    header += f"# Re-run it: loradock train --config {RUN_CONFIG} --output NEW_DIR\n"
    return header + versions + yaml.safe_dump(json.loads(json.dumps(body, default=str)), sort_keys=False)


def main(config: ResolvedConfig) -> int:
    with refusing_a_full_disk(RunPaths.for_output(config.args.output)):
        output = run(config)
    if not is_main():
        return 0  # the main process reports
    written = RunRecord.read(output)
    before, after = written.eval_loss_before, written.eval_loss
    summary = f"adapter written to {output}: train loss {written.train_loss}"
    if after is not None:
        summary += f", eval loss {before:.4f} -> {after:.4f}" if before is not None else f", eval loss {after:.4f}"
    summary += "".join(f", {name.replace('_', ' ')} {value:.1%}" for name, value in written.eval_metrics.items())
    if written.general:
        summary += f", general-ability perplexity {written.general['forgetting']:+.1%} against the base"
    print(summary + f", {written.tokens_per_second} tokens/s")
    return 0
