"""The adapter contract every stage shares: what an adapter folder holds, which PEFT methods exist
and how each is served, the ranks vLLM serves and the `org/name[@revision]` grammar (here); the
model card, built and parsed only there on huggingface_hub's `ModelCard` (`hub.adapter.card`);
the type of each field of the folder's files that loradock reads (`hub.adapter.records`); and the
checks an adapter passes before it is published or goes live on a server (`hub.adapter.checks`).

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

# The HTTP header loradock's own clients (the comparison screen, `loradock eval --base-url`) set on
# every request to the model it names: a load balancer in front of several `loradock serve` replicas
# can hash on it to keep an adapter on one replica (`loradock balance --affinity`).
MODEL_HEADER = "X-Loradock-Model"
COMMIT_HEADER = "X-Loradock-Commit"  # on an adapter's answer from `loradock serve`: the commit that answered

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
    """The chat template the adapter was trained with (saved beside its tokenizer); None without one,
    or when it is not text (`hub.adapter.checks.template_problems` refuses such an adapter)."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE).exists():
        try:
            return (folder / CHAT_TEMPLATE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    template = read_json(folder / TOKENIZER_CONFIG).get("chat_template")
    return template if isinstance(template, str) else None


# --- the methods --------------------------------------------------------------------------------

# How `loradock serve` serves a method (`Method.served_by`).
SERVED_AS = {
    "vllm-lora": "hot-swapped by vLLM (LoRA slots, per request)",
    "prompt-embeds": "hot-swapped through soft-prompt embeddings (vLLM's prompt-embeddings input)",
    "merge": "served after merging into a full model (`loradock merge`, then `loradock serve --base-model`)",
    "eval": "evaluation only (`loradock eval`)",
}


@dataclass(frozen=True)
class Method:
    """One PEFT method: how it is trained, how its card describes it, how it is served."""

    name: str  # what users write (`--peft NAME`, `peft: {method: NAME}`), and its section of the card
    peft_type: str  # `peft_type` in adapter_config.json
    config_class: str  # the `peft` config class that trains it
    trains: str  # what is trained, in a phrase
    defaults: dict  # loradock's defaults where they differ from PEFT's
    card_fields: dict  # card key -> adapter_config.json key
    served_by: str  # a key of SERVED_AS
    why: str  # why it is served that way (and what to do for the others)
    identity: dict = field(default_factory=dict)  # adapter_config values that tell it apart from its peft_type's others
    model_types: tuple[str, ...] = ()  # the base architectures (config.model_type) PEFT supports it on; () = all

    @property
    def prompt_learning(self) -> bool:
        """Trains virtual tokens (`num_virtual_tokens` of them) in front of every input."""
        return "num_virtual_tokens" in self.defaults

    @property
    def soft_prompt(self) -> bool:
        """Its virtual tokens are input embeddings: they take positions of the sequence."""
        return self.config_class in ("PromptTuningConfig", "PromptEncoderConfig")

    @property
    def low_rank(self) -> bool:
        """A LoRA variant: a rank `r` that vLLM's slots (or a merge) take."""
        return self.config_class == "LoraConfig"

    def matches(self, config: dict) -> bool:
        return config.get("peft_type", "LORA") == self.peft_type and all(
            bool(config.get(k)) == bool(v) for k, v in self.identity.items())

    def peft_config(self, settings: dict):
        """The PEFT config object that trains this method, from its checked settings."""
        import peft

        return getattr(peft, self.config_class)(**{"task_type": self.defaults.get("task_type"), **settings})

    def card_settings(self, config: dict) -> dict:
        return {key: _plain(config.get(source)) for key, source in self.card_fields.items()}


_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
_LORA_CARD = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}
_PROMPT_CARD = {"num_virtual_tokens": "num_virtual_tokens"}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LORA", "LoraConfig", "a low-rank update (A, B) of each target linear layer",
           defaults=_LORA_DEFAULTS, card_fields=_LORA_CARD, served_by="vllm-lora",
           why="vLLM keeps LoRA A/B pairs in slots and picks one per request",
           identity={"use_dora": False, "use_rslora": False}),
    Method("rslora", "LORA", "LoraConfig", "LoRA with the rank-stabilised scale alpha/sqrt(r)",
           defaults={**_LORA_DEFAULTS, "use_rslora": True}, card_fields=_LORA_CARD, served_by="vllm-lora",
           why="vLLM reads use_rslora and applies the same scale",
           identity={"use_dora": False, "use_rslora": True}),
    Method("dora", "LORA", "LoraConfig", "LoRA plus a learned magnitude per output feature (weight-decomposed)",
           defaults={**_LORA_DEFAULTS, "use_dora": True}, card_fields=_LORA_CARD, served_by="merge",
           why="vLLM's LoRA slots have no magnitude vector; merged, it is an ordinary model",
           identity={"use_dora": True}),
    Method("ia3", "IA3", "IA3Config", "a learned rescaling of the keys, values and feed-forward activations",
           defaults={"task_type": "CAUSAL_LM"},
           card_fields={"target_modules": "target_modules", "feedforward_modules": "feedforward_modules"},
           served_by="merge", why="vLLM has no IA3 kernels; the scales merge into the weights exactly"),
    Method("prompt-tuning", "PROMPT_TUNING", "PromptTuningConfig", "a soft prompt of virtual-token embeddings at the input",
           defaults={"task_type": "CAUSAL_LM", "num_virtual_tokens": 16}, card_fields=_PROMPT_CARD,
           served_by="prompt-embeds", why="the soft prompt is prepended to the token embeddings sent to vLLM"),
    Method("p-tuning", "P_TUNING", "PromptEncoderConfig", "a soft prompt produced by a small prompt encoder (MLP)",
           defaults={"task_type": "CAUSAL_LM", "num_virtual_tokens": 16},
           card_fields={**_PROMPT_CARD, "encoder_hidden_size": "encoder_hidden_size"}, served_by="prompt-embeds",
           why="the encoder's output is saved as a soft prompt, served like prompt tuning"),
    Method("prefix-tuning", "PREFIX_TUNING", "PrefixTuningConfig", "a trainable key/value prefix in every attention layer",
           defaults={"task_type": "CAUSAL_LM", "num_virtual_tokens": 16}, card_fields=_PROMPT_CARD, served_by="eval",
           why="the prefix enters each layer's KV cache, which vLLM cannot take per request, and it does not merge"),
    Method("llama-adapter", "ADAPTION_PROMPT", "AdaptionPromptConfig",
           "gated adaption prompts in the top attention layers (LLaMA-Adapter)",
           defaults={"task_type": "CAUSAL_LM", "adapter_len": 10, "adapter_layers": 2},
           card_fields={"adapter_len": "adapter_len", "adapter_layers": "adapter_layers"}, served_by="eval",
           why="its gated attention over the prompts is not in vLLM, and it does not merge",
           model_types=("llama", "mistral")),
)}

# Methods asked for that no maintained library trains on this stack: named in `loradock methods`.
UNSUPPORTED = {
    "bottleneck": "bottleneck adapters (Houlsby et al.): AdapterHub's `adapters` 1.3, the maintained library for "
                  "them, requires transformers ~=4.57 and this stack runs transformers 5; loradock does not hand-write "
                  "one. The closest maintained methods here: lora, ia3, llama-adapter",
}


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
