"""Can this server serve this adapter? Checked before an adapter goes live.

vLLM itself loads an adapter whose recorded base model is another one, and answers a rank above
--max-lora-rank, a `modules_to_save` or a missing weights file with a 500 from inside its worker.
This check names each problem, with the fix, before vLLM sees the adapter; every problem is
collected, so one answer lists them all. It reads only JSON and safetensors headers (and builds
the base model on the `meta` device to learn its module shapes), so it takes milliseconds.
"""

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sft.config import SERVABLE_RANKS


class AdapterRefused(ValueError):
    """A ValueError so that vLLM's resolver path answers it with a 400 carrying this message."""


@dataclass(frozen=True)
class ServedBase:
    name: str  # the name clients use (and adapters record), e.g. loradock/tiny-chat
    path: str  # what vLLM loaded: a local folder or a Hub id
    max_lora_rank: int


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
    with path.open("rb") as f:
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


def check_adapter(folder: str | Path, base: ServedBase) -> dict:
    """The adapter's config when this server can serve it.

    Raises:
        AdapterRefused: with every problem found and what to do about each.
    """
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.exists():
        raise AdapterRefused(f"{folder.name}: no adapter_config.json, so this is not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise AdapterRefused(f"{folder.name}: adapter_config.json is not valid JSON ({e})") from None
    if not weights_path.exists():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        raise AdapterRefused(f"{folder.name}: no adapter_model.safetensors"
                             + (f"; {', '.join(pickled)} would be unpickled, which can run code, so it is not served; "
                                "re-save the adapter with safetensors" if pickled else ""))
    problems = config_problems(config, base)
    if not problems:
        problems = weight_problems(weight_shapes(weights_path), base)
    if problems:
        raise AdapterRefused(f"adapter {folder.name} cannot be served here: " + "; ".join(problems))
    return config


def config_problems(config: dict, base: ServedBase) -> list[str]:
    problems = []
    recorded = config.get("base_model_name_or_path")
    if recorded not in (base.name, base.path):
        problems.append(f"it was trained on base model {recorded!r}, this server serves {base.name!r} "
                        f"(serve it with `loradock serve --base-model {recorded}`)")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"it is a {config['peft_type']} adapter; only LoRA adapters are served")
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
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter, which vLLM does not serve")
    if config.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias={config['bias']!r}), which vLLM does not serve")
    return problems


def weight_problems(weights: dict[str, tuple[int, ...]], base: ServedBase) -> list[str]:
    modules, problems = base_modules(base.path), []
    targets = lora_targets(weights)
    if not targets:
        return ["adapter_model.safetensors holds no LoRA weights (no lora_A/lora_B tensors)"]
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

