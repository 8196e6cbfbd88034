"""Where a training run starts from and what it reads: `--init-adapter` (a parent adapter) and
`--data datasets/ORG/NAME@REVISION/FILE` (a file of a registry dataset repo), each resolved to a
pinned commit before any work, and what training records of them (`parent`, `dataset`).

    loradock train --init-adapter alice/reverse@v1 --data datasets/alice/votes@main/prefs.jsonl ...

A parent is a registry adapter `REPO@REVISION` (pulled with `hub.client.Registry.pull`, pinned to the commit
the revision names) or a local adapter folder (its commit read from the `.loradock-pull.json` a
pull leaves, when there is one). It must be of the run's base model, PEFT method and shapes.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from hub.adapter import CONFIG, PULL_MARKER, AdapterRef, method_of, read_json
from loradock.errors import LoradockError

DATASET_PREFIX = "datasets/"
# adapter_config.json fields that fix an adapter's tensors' shapes, per method family (card key -> config key)
SHAPE_FIELDS = ("r", "target_modules", "num_virtual_tokens", "encoder_hidden_size", "adapter_len", "adapter_layers",
                "feedforward_modules")


@dataclass
class Parent:
    folder: Path  # the adapter folder the weights are loaded from
    repo_id: str | None  # None: a local folder that was not pulled from a registry
    revision: str | None
    commit: str | None
    config: dict  # its adapter_config.json

    def record(self) -> dict:
        """What run_config.yaml and the card say of the parent."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "base_model": self.config.get("base_model_name_or_path")}

    def pinned(self) -> str:
        """--init-adapter as a re-run should pass it: the commit, not a branch that moves."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id and self.commit else str(self.folder)


def resolve_parent(spec: str, registry_url: str | None = None, token: str | None = None) -> Parent:
    """The parent adapter `--init-adapter` names, downloaded when it is a registry adapter.

    Raises:
        LoradockError: not a folder holding adapter_config.json, nor a valid `org/name[@revision]`,
            or the registry cannot give it.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise LoradockError(f"--init-adapter {spec}: the folder has no {CONFIG}, so it is not an adapter",
                                "pass the folder `loradock train` or `loradock pull` wrote, or REPO@REVISION")
        marker = read_json(path / PULL_MARKER)
        return Parent(path, marker.get("repo_id"), marker.get("revision"), marker.get("commit"),
                      read_json(path / CONFIG))
    if not AdapterRef.looks_like(spec):
        raise LoradockError(f"--init-adapter {spec!r} is neither an adapter folder nor a registry adapter",
                            "pass an existing adapter folder, or ORG/NAME@REVISION (a branch, tag or commit sha)")
    from hub.client import registry

    pulled = registry(registry_url, token).pull(spec)
    return Parent(pulled.path, pulled.repo_id, pulled.revision, pulled.commit, read_json(pulled.path / CONFIG))


def parent_problems(parent: Parent, method, peft_settings: dict, base_model: str, linear_names) -> list[str]:
    """Why the parent cannot be continued by this run, each naming the flag to change.

    Args:
        method: the run's `hub.adapter.Method`; peft_settings: its resolved PEFT settings.
        linear_names: a callable giving the base's linear layer names, for `target_modules: all-linear`.
    """
    config, problems, name = parent.config, [], parent.repo_id or str(parent.folder)
    theirs = config.get("base_model_name_or_path")
    if theirs != base_model:
        problems.append(f"--init-adapter {name} is an adapter of base model {theirs!r}, and this run trains on "
                        f"{base_model!r}: pass --base-model {theirs}, or a parent of {base_model}")
    parent_method = method_of(config)
    if parent_method is None:
        problems.append(f"--init-adapter {name} is an adapter of a method loradock does not train "
                        f"(peft_type {config.get('peft_type')!r}): continue one of `loradock methods`")
        return problems
    if parent_method.name != method.name:
        problems.append(f"--init-adapter {name} is a {parent_method.name} adapter and this run trains {method.name}: "
                        f"pass --peft {parent_method.name}")
        return problems
    for key in SHAPE_FIELDS:
        ours = peft_settings.get(key)
        if ours is None or key not in config:
            continue
        if key == "target_modules" and isinstance(ours, str) and ours.lower() == "all-linear":
            ours = linear_names()
        if _comparable(ours) != _comparable(config[key]):
            flag = {"r": "--lora-r"}.get(key, f"--peft.{key}")
            value = ",".join(_comparable(config[key])) if isinstance(_comparable(config[key]), list) else config[key]
            problems.append(f"--init-adapter {name} has {key} {_shown(config[key])} and this run {_shown(ours)}: "
                            f"pass {flag} {value} (a continued adapter keeps its parent's shapes)")
    return problems


def adopt_parent_settings(parent: Parent, method, peft: dict) -> list[str]:
    """Take the parent's values of the method's other card settings (LoRA's alpha and dropout) into
    the run's `peft` settings, so run_config.yaml says what the loaded adapter is; returns a note
    for each value of the run's that is not used."""
    notes = []
    for source in method.card_fields.values():
        if source in SHAPE_FIELDS or source not in parent.config or source not in peft:
            continue
        if peft[source] != parent.config[source]:
            notes.append(f"{source} {parent.config[source]} is the parent's (this run's {peft[source]} is not used)")
            peft[source] = parent.config[source]
    return notes


def _comparable(value):
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def _shown(value) -> str:
    return ",".join(sorted(value)) if isinstance(value, (list, tuple, set)) else json.dumps(value)


def base_linear_names(base_path: str) -> set[str]:
    """The last name of each linear layer of the base but the output head: what PEFT's
    `target_modules="all-linear"` expands to (built on the meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
    head = model.get_output_embeddings()
    return {name.split(".")[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


# --- data from a registry dataset repo ------------------------------------------------------------

@dataclass
class DataSource:
    path: str  # the local file read
    dataset: dict | None  # {repo_id, revision, commit, file} for a registry dataset file; None: a local file

    def pinned(self, given: str) -> str:
        """--data as a re-run should pass it."""
        if not self.dataset:
            return given
        return f"{DATASET_PREFIX}{self.dataset['repo_id']}@{self.dataset['commit']}/{self.dataset['file']}"


def parse_dataset_spec(spec: str) -> tuple[str, str, str] | None:
    """`datasets/ORG/NAME@REVISION/FILE` (REVISION optional: main) as (repo_id, revision, file); None
    for anything else (a local path). A revision holding `/` cannot be written this way: pin a tag or sha.

    Raises:
        LoradockError: it starts with datasets/ but is not of that form.
    """
    if not spec.startswith(DATASET_PREFIX) or Path(spec).exists():
        return None
    rest = spec[len(DATASET_PREFIX):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise LoradockError(f"--data {spec!r} is not a local file, and not a registry dataset file either",
                            "write a registry dataset file as datasets/ORG/NAME@REVISION/FILE "
                            "(e.g. datasets/alice/votes@main/prefs.jsonl), or pass an existing local path")
    org, name_rev, file = parts
    name, _, revision = name_rev.partition("@")
    return f"{org}/{name}", revision or "main", file


def resolve_data(spec: str | None, flag: str = "--data", registry_url: str | None = None,
                 token: str | None = None) -> DataSource | None:
    """The local file `--data` names: itself, or a registry dataset file downloaded at a pinned commit."""
    if not spec:
        return None
    parsed = parse_dataset_spec(spec)
    if parsed is None:
        return DataSource(spec, None)
    from hub.client import registry

    repo_id, revision, file = parsed
    try:
        path, commit = registry(registry_url, token).dataset_file(repo_id, revision, file)
    except LoradockError as e:
        raise type(e)(f"{flag} {spec}: {e.problem}", e.fix) from None
    return DataSource(str(path), {"repo_id": repo_id, "revision": revision, "commit": commit, "file": file})
