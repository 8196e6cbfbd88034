"""The adapter contract every stage shares: what an adapter folder holds, which PEFT methods exist
and how each is served, the ranks vLLM serves, the `org/name[@revision]` grammar, the model
card (built and parsed here only, on huggingface_hub's `ModelCard`), and the checks an adapter
passes before it is published (`check_publishable`) or goes live on a server (`check_folder`).

`sft` writes adapters through this module; `hub`, `serve` and `ui` read them through it.
"""

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from loradock.errors import AdapterRefused, LoradockError

# --- the folder ---------------------------------------------------------------------------------

CONFIG, WEIGHTS, CARD = "adapter_config.json", "adapter_model.safetensors", "README.md"
METRICS, RUN_CONFIG, CHAT_TEMPLATE, TOKENIZER_CONFIG = ("metrics.json", "run_config.yaml", "chat_template.jinja",
                                                        "tokenizer_config.json")
REQUIRED_FILES = (WEIGHTS, CONFIG)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PULL_MARKER = ".loradock-pull.json"  # written by a pull: the repo, revision and commit the folder holds

# Ranks vLLM can serve (`vllm.config.lora.MaxLoRARanks`, 0.32); a test keeps this in step with vLLM.
SERVABLE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def nearest_servable_rank(rank: int) -> int:
    """The servable rank closest on a log scale (ranks are compared by ratio: 4 -> 8, 12 -> 16)."""
    return min(SERVABLE_RANKS, key=lambda r: (abs(math.log2(r) - math.log2(max(rank, 1))), -r))


def read_json(path: Path) -> dict:
    """A JSON object from a file of the folder; {} when it is missing or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def chat_template(folder: Path) -> str | None:
    """The chat template the adapter was trained with (saved beside its tokenizer)."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE).exists():
        return (folder / CHAT_TEMPLATE).read_text(encoding="utf-8")
    return read_json(folder / TOKENIZER_CONFIG).get("chat_template")


# --- the methods --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One PEFT method: how it is trained, how its card describes it, how it is served."""

    name: str  # what users write (`peft: {method: NAME}`), and its section of the card
    peft_type: str  # `peft_type` in adapter_config.json
    config_class: str  # the `peft` config class that trains it
    defaults: dict  # loradock's defaults where they differ from PEFT's
    card_fields: dict  # card key -> adapter_config.json key
    served_by: str | None  # how `loradock serve` serves it: "vllm-lora" = hot-swapped vLLM LoRA slots
    not_served_because: str = ""  # when served_by is None: why, and what to do instead
    identity: dict = field(default_factory=dict)  # adapter_config values that tell it apart from its peft_type's others

    def matches(self, config: dict) -> bool:
        return config.get("peft_type", "LORA") == self.peft_type and all(
            bool(config.get(k)) == bool(v) for k, v in self.identity.items())

    def peft_config(self, settings: dict):
        """The PEFT config object that trains this method, from its checked settings."""
        import peft

        return getattr(peft, self.config_class)(**settings)

    def card_settings(self, config: dict) -> dict:
        return {key: _plain(config.get(source)) for key, source in self.card_fields.items()}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LORA", "LoraConfig",
           defaults={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear",
                     "task_type": "CAUSAL_LM"},
           card_fields={"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"},
           served_by="vllm-lora", identity={"use_dora": False}),
)}


def method_of(config: dict) -> Method | None:
    """The method an adapter_config.json describes; None for one loradock does not know."""
    return next((m for m in METHODS.values() if m.matches(config)), None)


def _plain(value):
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


# --- names --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterRef:
    """`org/name[@revision]`: a registry adapter, at a branch, a tag or a full commit sha (default main)."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"

    @classmethod
    def parse(cls, spec: str) -> "AdapterRef":
        """Raises LoradockError naming what is wrong with the id or the revision."""
        repo_id, _, revision = spec.partition("@")
        revision = revision or "main"
        check_repo_id(repo_id)
        if re.fullmatch(r"[0-9a-fA-F]{7,39}|[0-9a-fA-F]{41,}", revision):
            raise LoradockError(f"{revision!r} looks like a short or malformed commit sha",
                                "pin a commit with its full 40-character sha (or use a branch or tag)")
        if not re.fullmatch(r"[\w.\-/]{1,200}", revision):
            raise LoradockError(f"{revision!r} is not a valid revision", "use a branch, a tag or a 40-character commit sha")
        return cls(repo_id, revision)

    @classmethod
    def of(cls, name: str) -> "AdapterRef":
        """The parts of a name already accepted elsewhere (a served model name), unchecked."""
        repo_id, _, revision = name.partition("@")
        return cls(repo_id, revision or "main")

    @staticmethod
    def looks_like(name: str) -> bool:
        """Whether a served model name could be a registry adapter (`org/name`, any revision)."""
        repo_id = name.partition("@")[0]
        return repo_id.count("/") == 1 and all(repo_id.split("/"))


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LoradockError(f"invalid repo id {repo_id!r}: {e}", "use namespace/name, e.g. alice/reverse") from None
    if repo_id.count("/") != 1:
        raise LoradockError(f"invalid repo id {repo_id!r}: it needs a namespace", "use namespace/name, e.g. alice/reverse")


# --- the card -----------------------------------------------------------------------------------

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

    @property
    def rank(self) -> int | None:
        return self.settings.get("r")

    @property
    def headline(self) -> Metric | None:
        return self.metrics[0] if self.metrics else None

    @classmethod
    def from_folder(cls, folder: Path) -> "CardInfo":
        """Built from the folder's own files (adapter_config, metrics, run_config, template)."""
        import yaml

        folder = Path(folder)
        adapter, metrics = read_json(folder / CONFIG), read_json(folder / METRICS)
        try:
            run_config = yaml.safe_load((folder / RUN_CONFIG).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            run_config = {}
        method = method_of(adapter)
        figures = []
        if metrics.get("eval_loss") is not None:
            figures.append(Metric("loss", "eval loss", round(metrics["eval_loss"], 4)))
        figures += [Metric(k, k.replace("_", " "), v) for k, v in (metrics.get("eval_metrics") or {}).items()]
        return cls(
            base_model=adapter.get("base_model_name_or_path") or run_config.get("base_model"),
            method=method.name if method else None, settings=method.card_settings(adapter) if method else {},
            datasets=[Path(run_config["data"]).name] if run_config.get("data") else [], metrics=figures,
            held_out=Path(run_config.get("eval_data") or run_config.get("data") or "held-out").name,
            base_model_revision=metrics.get("base_model_revision"), dataset_sha256=metrics.get("dataset_sha256"),
            training=run_config.get("training"), chat_template=chat_template(folder))

    @classmethod
    def from_card_data(cls, data) -> "CardInfo":
        """Parsed from a card's metadata: a `ModelCardData` or the dict of its front matter."""
        from huggingface_hub import ModelCardData

        if isinstance(data, dict):
            data = ModelCardData(**data)
        ours = getattr(data, "loradock", None) or {}
        method = ours.get("method") or next((name for name in METHODS if name in ours), None)
        results = data.eval_results or []
        datasets = data.datasets or []
        return cls(
            base_model=data.base_model, method=method, settings=dict(ours.get(method) or {}),
            datasets=[datasets] if isinstance(datasets, str) else list(datasets),
            metrics=[Metric(r.metric_type, r.metric_name or r.metric_type, r.metric_value) for r in results],
            held_out=results[0].dataset_name if results else None,
            base_model_revision=ours.get("base_model_revision"), dataset_sha256=ours.get("dataset_sha256"),
            training=ours.get("training"), chat_template=ours.get("chat_template"))

    def card_data(self, name: str):
        """The Hub's `ModelCardData` for this adapter (with `model-index` from the metrics)."""
        from huggingface_hub import EvalResult, ModelCardData

        results = [EvalResult(task_type="text-generation", dataset_type="json", dataset_name=self.held_out or "held-out",
                              metric_type=m.type, metric_name=m.name, metric_value=m.value) for m in self.metrics]
        ours = {"method": self.method, "base_model_revision": self.base_model_revision,
                "dataset_sha256": self.dataset_sha256, **({self.method: self.settings} if self.method else {}),
                "training": self.training, "chat_template": self.chat_template}
        return ModelCardData(base_model=self.base_model, library_name="peft",
                             tags=["loradock", *([self.method] if self.method else []), "sft", "trl"],
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


def write_card(folder: Path) -> None:
    (Path(folder) / CARD).write_text(str(build_card(folder)), encoding="utf-8")


def card_body(name: str, info: CardInfo) -> str:
    loss = next((m.value for m in info.metrics if m.type == "loss"), None)
    settings = ", ".join(f"{k} {v}" for k, v in info.settings.items() if k in ("r", "alpha"))
    trained_on = f" on `{info.datasets[0]}`" if info.datasets else ""
    return f"""
# {name}

A {info.method or 'PEFT'} adapter ({settings.replace('r ', 'rank ', 1)}) for `{info.base_model}`, instruction-tuned with
loradock (TRL `SFTTrainer` + PEFT){trained_on}.
{f"Held-out loss after training: {loss}." if loss is not None else ""}

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


# --- before publishing --------------------------------------------------------------------------

def folder_files(folder: Path, max_file_size: int) -> list[tuple[str, Path]]:
    """(path in repo, file) for every file to publish; refuses what must not be published."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # .cache/, .git/, editor files: never part of an adapter
        if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
            raise LoradockError(f"{rel} in {folder} links outside the folder ({path.resolve()})",
                                "copy the file into the folder instead of linking to it")
        if not path.is_file():
            continue
        if path.suffix in PICKLE_SUFFIXES:
            raise LoradockError(f"{rel} is a pickle-based weights file: loading it can run arbitrary code",
                                "save the weights as safetensors (`save_pretrained(..., safe_serialization=True)`)")
        if path.stat().st_size > max_file_size:
            raise LoradockError(f"{rel} is {path.stat().st_size} bytes, over the {max_file_size} byte limit",
                                "raise --max-file-size, or leave the file out")
        files.append((rel, path))
    return files


def check_publishable(folder: Path, max_file_size: int) -> list[tuple[str, Path]]:
    """The files of an adapter folder that may be pushed, or the reason it may not be."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoradockError(f"{folder} is not a folder", "pass the --output folder of `loradock train`")
    config_path = folder / CONFIG
    if not config_path.exists():
        raise LoradockError(f"{folder} is not a PEFT adapter folder: there is no {CONFIG}",
                            "pass the --output folder of `loradock train` (or push a base model with --model)")
    files = folder_files(folder, max_file_size)
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise LoradockError(f"{config_path} is not valid JSON: {e}", "re-save the adapter with PEFT") from None
    if not config.get("base_model_name_or_path"):
        raise LoradockError(f"{config_path} does not record its base model (base_model_name_or_path)",
                            "set base_model_name_or_path to the base model's Hub id")
    if not (folder / WEIGHTS).exists():
        raise LoradockError(f"{folder} has no {WEIGHTS}", "save the adapter with safetensors (loradock train always does)")
    return files


# --- before serving -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ServedBase:
    """The base model a server runs, as an adapter is checked against it."""

    name: str  # the name clients use (and adapters record), e.g. loradock/tiny-chat
    path: str  # what vLLM loaded: a local folder or a Hub id
    max_lora_rank: int


def check_folder(folder: str | Path, base: ServedBase) -> dict:
    """The adapter's config when a server of `base` can serve it. Reads only JSON and safetensors
    headers (and builds the base on the `meta` device for its module shapes): milliseconds.

    Raises:
        AdapterRefused: with every reason found, each with what to do about it.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.exists():
        raise AdapterRefused(folder.name, [f"no {CONFIG}, so this is not a PEFT adapter folder"])
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise AdapterRefused(folder.name, [f"{CONFIG} is not valid JSON ({e})"]) from None
    if not weights_path.exists():
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise AdapterRefused(folder.name, [f"no {WEIGHTS}" + (
            f"; {', '.join(pickled)} would be unpickled, which can run code, so it is not served; "
            "re-save the adapter with safetensors" if pickled else "")])
    reasons = config_problems(config, base)
    if not reasons:
        reasons = weight_problems(weight_shapes(weights_path), base)
    if reasons:
        raise AdapterRefused(folder.name, reasons)
    return config


def config_problems(config: dict, base: ServedBase) -> list[str]:
    problems = []
    recorded = config.get("base_model_name_or_path")
    if recorded not in (base.name, base.path):
        problems.append(f"it was trained on base model {recorded!r}, this server serves {base.name!r} "
                        f"(serve it with `loradock serve --base-model {recorded}`)")
    method = method_of(config)
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter, which vLLM does not serve")
    elif method is None:
        served = ", ".join(m.name for m in METHODS.values() if m.served_by)
        problems.append(f"it is a {config.get('peft_type')} adapter; only these methods are served: {served}")
    elif method.served_by is None:
        problems.append(f"it is a {method.name} adapter, which is not served: {method.not_served_because}")
    rank = config.get("r")
    if isinstance(rank, int) and rank > base.max_lora_rank:
        fits = min(r for r in SERVABLE_RANKS if r >= rank) if rank <= max(SERVABLE_RANKS) else None
        fix = f"restart with --max-lora-rank {fits}" if fits else "retrain it with a rank vLLM serves"
        problems.append(f"its rank {rank} is above --max-lora-rank {base.max_lora_rank} ({fix})")
    if config.get("modules_to_save"):
        problems.append(f"it saves whole modules {config['modules_to_save']} (modules_to_save), which vLLM "
                        "cannot serve; retrain without modules_to_save")
    if config.get("trainable_token_indices"):
        problems.append("it changes token embeddings (trainable_token_indices), which vLLM cannot serve")
    if config.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias={config['bias']!r}), which vLLM does not serve")
    return problems


@lru_cache(maxsize=4)
def base_modules(path: str) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every linear layer of the base model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the weights."""
    with Path(path).open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def lora_targets(weights: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module name in the base model: {"A": shape, "B": shape}} from PEFT's weight names
    (`base_model.model.<module>.lora_A.weight`)."""
    targets: dict[str, dict] = {}
    for name, shape in weights.items():
        for part in ("A", "B"):
            marker = f".lora_{part}."
            if marker in name:
                module = name.split(marker)[0].removeprefix("base_model.model.")
                targets.setdefault(module, {})[part] = shape
    return targets


def weight_problems(weights: dict[str, tuple[int, ...]], base: ServedBase) -> list[str]:
    modules, problems = base_modules(base.path), []
    targets = lora_targets(weights)
    if not targets:
        return [f"{WEIGHTS} holds no LoRA weights (no lora_A/lora_B tensors)"]
    for module, parts in sorted(targets.items()):
        if "embed_tokens" in module or "lm_head" in module:
            problems.append(f"it changes {module} (embedding/lm_head LoRA), which vLLM does not serve")
        elif module not in modules:
            problems.append(f"it adapts {module}, which the base model does not have")
        elif "A" in parts and "B" in parts:
            in_features, out_features = modules[module]
            if parts["A"][-1] != in_features or parts["B"][0] != out_features:
                problems.append(f"{module} has LoRA shapes {parts['A']}/{parts['B']} but the base layer is "
                                f"{in_features}->{out_features}: it was trained on a model of another size")
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
