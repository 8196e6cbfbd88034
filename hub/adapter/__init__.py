"""The adapter contract every stage shares: what an adapter folder holds, which PEFT methods exist
and how each is served, the ranks vLLM serves and the `org/name[@revision]` grammar (here); the
model card, built and parsed only there on huggingface_hub's `ModelCard` (`hub.adapter.card`);
and the checks an adapter passes before it is published or goes live on a server
(`hub.adapter.checks`).

`sft` writes adapters through this package; `hub`, `serve` and `ui` read them through it.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from loradock.errors import LoradockError

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
