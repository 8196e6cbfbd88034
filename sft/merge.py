"""loradock merge ADAPTER_DIR|REPO_ID[@REVISION] [--output DIR] [--push REPO_ID]

Merges an adapter into its base model with PEFT's `merge_and_unload`, for the methods vLLM cannot
hot-swap (DoRA, IA3; LoRA and rsLoRA merge too). Before anything is written, the merged model must
give the adapter's greedy answers, token for token, on held-out prompts (float32). The folder it
writes is an ordinary transformers model with the adapter's tokenizer and chat template, and a card
recording the adapter it came from: `loradock serve --base-model DIR` serves it.
"""

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hub.adapter import CARD, CONFIG, PULL_MARKER, TOKENIZER_CONFIG, WEIGHTS, AdapterRef, Method, chat_template, \
    check_repo_id, method_of, read_json
from loradock.config import REGISTRY_HELP, TOKEN_HELP
from loradock.errors import LoradockError
from loradock.home import home

ASSETS = Path(__file__).resolve().parent / "assets"
MERGEABLE = ("LoraConfig", "IA3Config")  # the PEFT config classes whose weights merge_and_unload folds in


@dataclass
class MergeArgs:
    """Merge an adapter into its base model, check the merge on held-out prompts, write (and push) the model."""

    adapter: str | None = field(default=None, metadata={
        "help": "adapter folder (`loradock train --output`) or registry adapter REPO_ID[@REVISION] (required)",
        "positional": True})
    output: str | None = field(default=None, metadata={
        "help": "folder to write the merged model to (none: $LORADOCK_HOME/merged/REPO_ID/COMMIT for a registry "
                "adapter, $LORADOCK_HOME/merged/FOLDER_NAME for a local one)"})
    push: str | None = field(default=None, metadata={
        "help": "also push the merged model to the registry as this model repo (namespace/name)", "metavar": "REPO_ID"})
    data: str | None = field(default=None, metadata={
        "help": "held-out prompts for the merge check (none: the adapter's eval data recorded in its run_config.yaml "
                "when that file exists here, else the shipped tasks' held-out prompts)"})
    limit: int = field(default=16, metadata={"help": "check this many held-out prompts"})
    max_new_tokens: int = field(default=32, metadata={"help": "greedy tokens generated per prompt in the check"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output folder"})
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP, "was": ("endpoint",)})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})


def check_merge(args: MergeArgs) -> list[str]:
    problems = [] if args.adapter else ["no adapter: pass it as `loradock merge ADAPTER_DIR` or `loradock merge "
                                        "REPO_ID[@REVISION]`"]
    if args.limit < 1:
        problems.append(f"--limit {args.limit} must be at least 1")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.push:
        try:
            check_repo_id(args.push)
        except LoradockError as e:
            problems.append(f"--push: {e.problem}; {e.fix}")
    return problems


# --- the adapter --------------------------------------------------------------------------------

@dataclass
class Source:
    """The adapter being merged: its local folder, and where it came from (what the card records)."""

    folder: Path
    config: dict  # its adapter_config.json
    method: Method
    merged_from: dict  # repo_id, revision, commit; or folder and weights_sha256 for an unpublished one
    label: str  # how the user named it


def locate(spec: str, registry_url: str | None, token: str | None) -> tuple[Path, dict]:
    """The adapter's folder, pulled first when `spec` names a registry adapter, and its provenance."""
    folder = Path(spec)
    if folder.exists():
        if not folder.is_dir():
            raise LoradockError(f"ADAPTER {spec} is a file, not an adapter folder",
                                "pass the --output folder of `loradock train`, or a registry adapter REPO_ID[@REVISION]")
        pulled = read_json(folder / PULL_MARKER)
        if pulled.get("commit"):  # a folder `loradock pull` wrote: the registry's name for it is known
            return folder, {k: pulled.get(k) for k in ("repo_id", "revision", "commit")}
        weights = folder / WEIGHTS
        sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None
        return folder, {"folder": folder.resolve().name, "weights_sha256": sha}
    if not AdapterRef.looks_like(spec):
        raise LoradockError(f"ADAPTER {spec} is neither a folder nor a registry adapter",
                            "pass an adapter folder that exists, or REPO_ID[@REVISION] of a registry adapter")
    from hub.client import registry

    result = registry(registry_url, token).pull(spec)
    print(f"{result.repo_id}@{result.revision} is commit {result.commit} (in {result.path})", flush=True)
    return result.path, {"repo_id": result.repo_id, "revision": result.revision, "commit": result.commit}


def load_source(spec: str, registry_url: str | None = None, token: str | None = None) -> Source:
    """The adapter, checked to be one PEFT can merge.

    Raises:
        LoradockError: not an adapter folder, no base model recorded, or a method that does not merge.
    """
    folder, merged_from = locate(spec, registry_url, token)
    if not (folder / CONFIG).exists():
        raise LoradockError(f"{spec} is not a PEFT adapter folder: there is no {CONFIG}",
                            "pass the --output folder of `loradock train` (or a registry adapter REPO_ID[@REVISION])")
    config = read_json(folder / CONFIG)
    if not config.get("base_model_name_or_path"):
        raise LoradockError(f"{folder / CONFIG} does not record its base model (base_model_name_or_path)",
                            "set base_model_name_or_path to the base model's name or Hub id")
    if not (folder / WEIGHTS).exists():
        raise LoradockError(f"{spec} has no {WEIGHTS}", "save the adapter with safetensors (loradock train always does)")
    method = method_of(config)
    if method is None:
        raise LoradockError(f"{spec} is a {config.get('peft_type')!r} adapter, a PEFT method loradock does not know",
                            "merge it with PEFT directly (`PeftModel.from_pretrained(...).merge_and_unload()`)")
    refuse_unmergeable(spec, method)
    return Source(folder, config, method, {**merged_from, "method": method.name}, spec)


def refuse_unmergeable(spec: str, method: Method) -> None:
    if method.config_class in MERGEABLE:
        return
    if method.served_by == "prompt-embeds":
        fix = (f"serve it as it is: `loradock serve` hot-swaps {method.name} adapters through soft-prompt embeddings "
               f"(e.g. `loradock serve --adapter REPO_ID` after `loradock push {spec} REPO_ID`)")
    else:
        fix = (f"evaluate it with `loradock eval --adapter {spec} --data HELDOUT.jsonl`; to serve the skill, train a "
               "lora or dora adapter instead")
    raise LoradockError(f"{spec} is a {method.name} adapter, which does not merge into the base model: "
                        f"it trains {method.trains}, not a weight update ({method.why})", fix)


# --- the held-out prompts -----------------------------------------------------------------------

def heldout_conversations(source: Source, data: str | None, limit: int) -> tuple[list[list[dict]], str]:
    """(conversations to answer, the data set's name for the card)."""
    from hub.adapter.records import read_run_config
    from sft.data import parse_columns
    from sft.evaluate import load_heldout

    if data:
        return [c for c, _ in load_heldout(data, limit=limit)[0]], Path(data).name
    recorded = read_run_config(source.folder)
    eval_data = recorded.get("eval_data")
    if eval_data and Path(eval_data).exists():
        items, _ = load_heldout(eval_data, parse_columns(recorded.get("columns")), limit)
        return [c for c, _ in items], Path(eval_data).name
    shipped = [load_heldout(str(path), limit=limit)[0] for path in sorted(ASSETS.glob("tasks/*/heldout.jsonl"))]
    interleaved = [items[i][0] for i in range(limit) for items in shipped if i < len(items)]
    return interleaved[:limit], "loradock's shipped held-out prompts"


# --- the merge ----------------------------------------------------------------------------------

def adapter_tokenizer(source: Source, base_path: str):
    """The tokenizer saved with the adapter (its chat template is the one it was trained with); the
    base model's, with the adapter's template if it has one, when the adapter saved none."""
    from transformers import AutoTokenizer

    if (source.folder / TOKENIZER_CONFIG).exists():
        return AutoTokenizer.from_pretrained(source.folder)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tokenizer.chat_template = chat_template(source.folder) or tokenizer.chat_template
    return tokenizer


def load_base(name: str, spec: str):
    """(the base model in float32, the path it was loaded from) for the name the adapter records."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft.base_model import resolve_base_model

    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise LoradockError(f"the base model folder {name!r} that {spec} records (base_model_name_or_path) does not "
                            "exist", "set base_model_name_or_path in its adapter_config.json to the base model's "
                            "name or Hub id, or put the base model there")
    path = resolve_base_model(name)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), path
    except (OSError, ValueError) as e:
        raise LoradockError(f"the base model {name!r} that {spec} records (base_model_name_or_path) cannot be loaded: "
                            f"{str(e).splitlines()[0]}",
                            "set base_model_name_or_path in its adapter_config.json to a local model folder or a "
                            "Hub id this machine can load") from None


@dataclass
class Merged:
    model: object  # the merged transformers model
    tokenizer: object
    base_model: str  # the base model's name, as the adapter records it
    check: dict  # what the card records of the held-out check


def merge(source: Source, data: str | None = None, limit: int = 16, max_new_tokens: int = 32) -> Merged:
    """The adapter merged into its base, its greedy answers checked against the unmerged adapter's.

    Raises:
        LoradockError: the base does not load, or a merged answer differs from the adapter's.
    """
    from peft import PeftModel

    from sft.evaluate import greedy_token_ids

    base_name = source.config["base_model_name_or_path"]
    conversations, data_name = heldout_conversations(source, data, limit)
    model, base_path = load_base(base_name, source.label)
    tokenizer = adapter_tokenizer(source, base_path)
    peft_model = PeftModel.from_pretrained(model, source.folder).eval()
    adapter = greedy_token_ids(peft_model, tokenizer, conversations, max_new_tokens, 8)
    with peft_model.disable_adapter():
        base = greedy_token_ids(peft_model, tokenizer, conversations, max_new_tokens, 8)
    merged = peft_model.merge_and_unload()
    after = greedy_token_ids(merged, tokenizer, conversations, max_new_tokens, 8)
    differing = next((i for i, (a, b) in enumerate(zip(adapter, after)) if a != b), None)
    if differing is not None:
        prompt = conversations[differing][-1]["content"]
        raise LoradockError(
            f"after merging {source.label}, the greedy answer to held-out prompt {differing + 1} ({prompt!r}) "
            f"differs: the adapter says {tokenizer.decode(adapter[differing])!r}, the merged model "
            f"{tokenizer.decode(after[differing])!r}; nothing was written",
            "serve the adapter unmerged if its method allows it, or check it with `loradock eval --adapter DIR`; "
            "a float32 merge should not change greedy answers, so report this with the adapter")
    check = {"data": data_name, "prompts": len(conversations), "max_new_tokens": max_new_tokens, "dtype": "float32",
             "identical_greedy_tokens": True, "answers_differing_from_base": sum(a != b for a, b in zip(adapter, base))}
    return Merged(merged, tokenizer, base_name, check)


# --- the folder ---------------------------------------------------------------------------------

def default_output(source: Source) -> Path:
    where = source.merged_from
    if where.get("commit"):
        return home() / "merged" / where["repo_id"] / where["commit"]
    return home() / "merged" / where["folder"]


def check_output(output: Path, source: Source, overwrite: bool) -> None:
    """Raises LoradockError when writing `output` would replace something it must not."""
    if output.exists() and output.resolve() == source.folder.resolve():
        raise LoradockError(f"--output {output} is the adapter's own folder", "pass another --output folder")
    if output.exists() and not output.is_dir():
        raise LoradockError(f"--output {output} is a file", "pass a folder that does not exist yet")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LoradockError(f"--output {output} already exists and is not empty",
                            "pass another --output folder, or --overwrite to replace it")


def model_card(merged: Merged, source: Source, name: str) -> str:
    """The merged model's README.md: base model, tags, and where it came from. Never a path or a token."""
    import peft
    import torch
    import transformers
    from hub.adapter.card import model_card as card_of

    ours = {"merged_from": source.merged_from, "check": merged.check,
            "versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__.split("+")[0]}}
    where = source.merged_from
    origin = (f"`{where['repo_id']}` at commit `{where['commit']}` (revision `{where['revision']}`)"
              if where.get("commit") else f"the local adapter folder `{where['folder']}`")
    body = f"""
# {name}

`{merged.base_model}` with the {source.method.name} adapter {origin} merged into its weights
(PEFT `merge_and_unload`). On {merged.check['prompts']} held-out prompts ({merged.check['data']}) its greedy
answers are token for token the adapter's (float32, {merged.check['max_new_tokens']} new tokens); the adapter
changes {merged.check['answers_differing_from_base']} of them from the base model's.

The tokenizer and chat template are the adapter's, the ones it was trained with.

## Serve it (OpenAI API)

```bash
loradock serve --base-model {name}
```
"""
    return card_of(body, base_model=merged.base_model, library_name="transformers", pipeline_tag="text-generation",
                   tags=["loradock", "merged", source.method.name], loradock=ours)


def save(merged: Merged, source: Source, output: Path, overwrite: bool) -> Path:
    """Write the model, tokenizer and card into a hidden sibling of `output`, then rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.merging-"))
    try:
        merged.model.config._name_or_path = merged.base_model  # the name, never this machine's path
        merged.model.save_pretrained(staging, safe_serialization=True)
        merged.tokenizer.save_pretrained(staging)
        (staging / CARD).write_text(model_card(merged, source, output.name), encoding="utf-8")
        for path in [staging, *staging.iterdir()]:  # mkdtemp's owner-only mode would stick
            path.chmod(0o755 if path.is_dir() else 0o644)
        check_output(output, source, overwrite)  # again: something may have appeared meanwhile
        replaced = None
        if output.is_dir() and any(output.iterdir()):
            replaced = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.replaced-"))
            os.replace(output, replaced / "old")
        os.replace(staging, output)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def run(args: MergeArgs) -> tuple[Path, dict]:
    """Merge, check, write and (with --push) publish; returns the folder and the merge's provenance."""
    source = load_source(args.adapter, args.registry, args.token)
    output = Path(args.output) if args.output else default_output(source)
    check_output(output, source, args.overwrite)
    merged = merge(source, args.data, args.limit, args.max_new_tokens)
    return save(merged, source, output, args.overwrite), merged.check


# --- the command --------------------------------------------------------------------------------

def add_merge(subparsers) -> None:
    from loradock.config import add_config_flags

    p = subparsers.add_parser(
        "merge", help="merge an adapter (DoRA, IA3, LoRA) into a full model that `loradock serve --base-model` serves",
        description="Merge an adapter into its base model (PEFT merge_and_unload), check that the merged model's "
                    "greedy answers equal the adapter's on held-out prompts (float32), and write the model folder "
                    "with the adapter's tokenizer and chat template and a card recording the adapter and its commit. "
                    "For methods vLLM cannot hot-swap: DoRA and IA3.",
        epilog="example: loradock merge alice/reverse-dora@v1 --output merged/reverse && "
               "loradock serve --base-model merged/reverse",
    )
    add_config_flags(p, MergeArgs, example="merge.yaml")
    p.set_defaults(func=run_merge)


def run_merge(args) -> int:
    from loradock.config import from_command_line, print_config

    config = from_command_line(MergeArgs, args, what="the merge", validate=lambda r: check_merge(r.args)).args
    if getattr(args, "print_config", False):
        return print_config(config)
    output, check = run(config)
    print(f"merged {config.adapter} into {output}: greedy answers identical on {check['prompts']} held-out prompts "
          f"({check['answers_differing_from_base']} differ from the base model's)")
    if config.push:
        from hub.client import registry

        result = registry(config.registry, config.token).push(output, config.push, model=True,
                                                              message=f"Merge {config.adapter}")
        print(f"pushed {output} to {result.url}")
        print(f"commit {result.commit}")
    print(f"serve it: loradock serve --base-model {output}")
    return 0
