"""The checks an adapter folder passes before it is published (`check_publishable`) and before it
goes live on a server of a given base model (`check_folder`). Each names the problem and the fix;
`check_folder` collects every reason an adapter cannot be served.

Both read the weights' safetensors header (names, dtypes, shapes) and, once per version of the
file, every tensor for NaN and Inf (`nonfinite_tensors`, streamed tensor by tensor)."""

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hub.adapter import (CHAT_TEMPLATE, CONFIG, METHODS, METRICS, PICKLE_SUFFIXES, RUN_CONFIG, SERVABLE_RANKS,
                         TOKENIZER_CONFIG, WEIGHTS, Method, method_of, read_json)
from hub.adapter.records import config_field_problems, record_problems, shown
from loradock.errors import AdapterRefused, LoradockError


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
    if not isinstance(config, dict):
        raise LoradockError(f"{config_path} holds a JSON {json_kind(config)}, not an object",
                            "re-save the adapter with PEFT (save_pretrained writes adapter_config.json); nothing was pushed")
    if not config.get("base_model_name_or_path"):
        raise LoradockError(f"{config_path} does not record its base model (base_model_name_or_path)",
                            "set base_model_name_or_path to the base model's Hub id")
    if not (folder / WEIGHTS).exists():
        raise LoradockError(f"{folder} has no {WEIGHTS}", "save the adapter with safetensors (loradock train always does)")
    problems = config_field_problems(config) + template_problems(folder) + publish_problems(config, folder / WEIGHTS)
    if problems:
        raise LoradockError(f"{folder} is not a sound adapter: " + "; ".join(problems),
                            "retrain it, or re-save it from a good checkpoint with PEFT's save_pretrained; "
                            "nothing was pushed")
    damaged = record_problems(folder)
    if damaged:
        raise LoradockError(f"{folder} holds damaged records of its run: " + "; ".join(damaged),
                            f"correct each field named as `loradock train` writes it, or delete the file ({METRICS} "
                            f"and {RUN_CONFIG} are optional: the card then shows no figures or training "
                            "configuration); nothing was pushed")
    return files


def template_problems(folder: Path) -> list[str]:
    """The chat template, where the folder has one, is text: chat_template.jinja in UTF-8, else a
    string `chat_template` in tokenizer_config.json (the server renders the adapter's requests with it)."""
    fix = "save the tokenizer again with save_pretrained (it writes chat_template.jinja)"
    if (folder / CHAT_TEMPLATE).exists():
        try:
            (folder / CHAT_TEMPLATE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return [f"{CHAT_TEMPLATE} is not readable UTF-8 text ({e}); {fix}"]
        return []
    template = read_json(folder / TOKENIZER_CONFIG).get("chat_template")
    if template is not None and not isinstance(template, str):
        return [f"{TOKENIZER_CONFIG}: chat_template is {shown(template)}, not text; {fix}"]
    return []


def publish_problems(config: dict, weights_path: Path) -> list[str]:
    """What makes an adapter unsound whatever the server: a LoRA rank that is not one, LoRA pairs whose
    ranks disagree, dtypes vLLM cannot serve, NaN or Inf. A weights file that is not safetensors at
    all is left to the serving check (publishing has never parsed it; the registry stores bytes)."""
    try:
        header = weight_header(weights_path)
    except AdapterRefused:
        header = None
    method = method_of(config)
    problems = lora_rank_problems(config) if method and method.low_rank else []
    if header is None:
        return problems
    if method and method.low_rank and not problems:
        problems += lora_pair_problems({name: shape for name, (_, shape) in header.items()}, config)
    return problems + tensor_problems(weights_path, header)


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
    if not isinstance(config, dict):
        raise AdapterRefused(folder.name, [f"{CONFIG} holds a JSON {json_kind(config)}, not an object; "
                                           "re-save the adapter with PEFT's save_pretrained"])
    if not weights_path.exists():
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise AdapterRefused(folder.name, [f"no {WEIGHTS}" + (
            f"; {', '.join(pickled)} would be unpickled, which can run code, so it is not served; "
            "re-save the adapter with safetensors" if pickled else "")])
    method = method_of(config)
    reasons = config_field_problems(config) + template_problems(folder) + config_problems(config, base, method)
    if not reasons:
        header = weight_header(weights_path, folder.name)
        shapes = {name: shape for name, (_, shape) in header.items()}
        reasons = soft_prompt_problems(shapes, config, base) if method.served_by == "prompt-embeds" else \
            lora_pair_problems(shapes, config) or weight_problems(shapes, base)
        reasons = capped(reasons + tensor_problems(weights_path, header))
    if reasons:
        raise AdapterRefused(folder.name, reasons)
    return config


def json_kind(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def capped(problems: list[str], most: int = 5) -> list[str]:
    return problems[:most] + ([f"... and {len(problems) - most} more"] if len(problems) > most else [])


def config_problems(config: dict, base: ServedBase, method: Method | None) -> list[str]:
    problems = []
    recorded = config.get("base_model_name_or_path")
    if recorded not in (base.name, base.path):
        problems.append(f"it was trained on base model {recorded!r}, this server serves {base.name!r} "
                        f"(serve it with `loradock serve --base-model {recorded}`)")
    if method is None:
        known = ", ".join(METHODS)
        return problems + [f"it is a {config.get('peft_type')} adapter of a kind loradock does not know (it knows {known})"]
    if method.served_by == "merge":
        return problems + [f"it is a {method.name} adapter, which vLLM cannot hot-swap ({method.why}): merge it into a "
                           "full model with `loradock merge ADAPTER --output DIR` and serve that with "
                           "`loradock serve --base-model DIR`"]
    if method.served_by == "eval":
        return problems + [f"it is a {method.name} adapter, which cannot be served ({method.why}); evaluate it with "
                           "`loradock eval --adapter ADAPTER --data HELDOUT.jsonl`"]
    if method.served_by == "prompt-embeds":
        return problems
    return problems + lora_config_problems(config, base)


def is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def lora_rank_problems(config: dict) -> list[str]:
    """`r`, and each rank of `rank_pattern`, must be a positive integer (vLLM's worker refuses
    anything else, after the adapter has been accepted)."""
    fix = "set it to the rank the adapter was trained with (the first dimension of its lora_A tensors)"
    problems = [] if is_rank(config.get("r")) else [
        f"r {config.get('r')!r} in {CONFIG} is not a LoRA rank: it must be a positive integer; {fix}"]
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        return problems + [f"rank_pattern in {CONFIG} is a {json_kind(pattern)}, not an object of module -> rank"]
    return problems + [f"rank_pattern[{key!r}] {rank!r} in {CONFIG} is not a LoRA rank: it must be a positive "
                       f"integer; {fix}" for key, rank in pattern.items() if not is_rank(rank)]


def lora_config_problems(config: dict, base: ServedBase) -> list[str]:
    problems = lora_rank_problems(config)
    rank = 0 if problems else max([config["r"], *(config.get("rank_pattern") or {}).values()])
    if rank > base.max_lora_rank:
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


# safetensors dtypes of weights vLLM serves as they are; anything else is a damaged or foreign file.
SERVABLE_DTYPES = ("F32", "F16", "BF16")


def weight_header(path: Path, adapter: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} from the file's header, without reading the weights.

    Raises:
        AdapterRefused: the file is not one safetensors can read.
    """
    import safetensors

    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise AdapterRefused(adapter or path.parent.name, [f"{path.name} is not a readable safetensors file ({e}); "
                                                           "re-save the adapter with PEFT's save_pretrained"]) from None


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the weights."""
    return {name: shape for name, (_, shape) in weight_header(path).items()}


def lora_targets(weights: dict[str, tuple[int, ...]]) -> dict[str, dict[str, str]]:
    """{module name in the base model: {"A": tensor name, "B": tensor name}} from PEFT's weight names
    (`base_model.model.<module>.lora_A.weight`)."""
    targets: dict[str, dict] = {}
    for name in weights:
        for part in ("A", "B"):
            marker = f".lora_{part}."
            if marker in name:
                module = name.split(marker)[0].removeprefix("base_model.model.")
                targets.setdefault(module, {})[part] = name
    return targets


def module_rank(config: dict, module: str) -> tuple[int, str]:
    """The rank PEFT (and vLLM) give `module`: its `rank_pattern` entry if one matches (PEFT's rule: a
    key matches a suffix of the name at a "." boundary, first match wins), else `r`."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return rank, f"rank_pattern[{key!r}]"
    return config["r"], "r"


def lora_pair_problems(weights: dict[str, tuple[int, ...]], config: dict) -> list[str]:
    """Each LoRA pair is 2-D, complete, and of one rank, the one the config gives its module: vLLM
    sizes its slots from the config and copies the tensors in (a mismatch is a worker error, or
    garbage answers)."""
    fix = "re-save the adapter with PEFT's save_pretrained"
    problems = []
    for module, parts in sorted(lora_targets(weights).items()):
        flat = [name for name in parts.values() if len(weights[name]) != 2]
        if flat:
            problems += [f"{name} has shape {list(weights[name])}: a LoRA matrix is 2-D; {fix}" for name in flat]
            continue
        if len(parts) == 1:
            (part, name), = parts.items()
            problems.append(f"{name} has no lora_{'B' if part == 'A' else 'A'} partner; {fix}")
            continue
        a, b = parts["A"], parts["B"]
        a_rank, b_rank = weights[a][0], weights[b][1]  # A: rank x in_features, B: out_features x rank
        expected, source = module_rank(config, module)
        if a_rank != b_rank:
            problems.append(f"{a} has rank {a_rank} but {b} has rank {b_rank}: a LoRA pair shares one rank; {fix}")
        elif a_rank != expected:
            problems.append(f"{a} has rank {a_rank} but {CONFIG} says {source} {expected}: set {source} to "
                            f"{a_rank} if that is the rank it was trained with, else {fix}")
    return capped(problems)


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
            a, b = weights[parts["A"]], weights[parts["B"]]
            if a[-1] != in_features or b[0] != out_features:
                problems.append(f"{module} has LoRA shapes {a}/{b} but the base layer is "
                                f"{in_features}->{out_features}: it was trained on a model of another size")
    return capped(problems)


def tensor_problems(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Tensors of a dtype vLLM does not serve, and tensors holding NaN or Inf (the whole file read
    once per version of it: `nonfinite_tensors`)."""
    foreign = [f"{name} is {dtype}; vLLM serves adapter weights in {', '.join(SERVABLE_DTYPES)}: re-save them "
               "in one of those (e.g. tensor.to(torch.float32))" for name, (dtype, _) in header.items()
               if dtype not in SERVABLE_DTYPES]
    stat = os.stat(path)
    # A file's version: where it lives and when it was last written. A pulled commit's folder never
    # changes, so each pulled commit is read once; a local folder rewritten in place is read again.
    nonfinite = nonfinite_tensors(str(Path(path).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return capped(foreign + [f"{name} holds {what}: the training diverged or the file is damaged; retrain it "
                             "(a lower --lr), or re-save it from a good checkpoint" for name, what in nonfinite])


@lru_cache(maxsize=256)
def nonfinite_tensors(path: str, *version) -> tuple[tuple[str, str], ...]:
    """((tensor name, "3 NaN values" / "2 infinite values"), ...) for every floating-point tensor of
    the file that is not finite. One tensor in memory at a time (safetensors maps the file); cached
    by `version` (device, inode, size, modification time). Tensors of other dtypes are not read."""
    import safetensors
    import torch

    found = []
    with safetensors.safe_open(path, framework="pt") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() not in SERVABLE_DTYPES:
                continue
            tensor = f.get_tensor(name)
            if bool(torch.isfinite(tensor).all()):
                continue
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            found.append((name, " and ".join(f"{n} {kind} value{'s' if n > 1 else ''}"
                                             for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)))
    return tuple(found)


@lru_cache(maxsize=4)
def base_embedding_width(path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return getattr(config.get_text_config(), "hidden_size")


def soft_prompt_problems(weights: dict[str, tuple[int, ...]], config: dict, base: ServedBase) -> list[str]:
    """A prompt-tuning or p-tuning adapter: one `prompt_embeddings` tensor of the base's embedding width."""
    shape = weights.get("prompt_embeddings")
    if shape is None:
        return [f"{WEIGHTS} holds no soft prompt (no prompt_embeddings tensor); re-save it with PEFT's save_pretrained"]
    width = base_embedding_width(base.path)
    if len(shape) != 2 or shape[1] != width:
        return [f"its soft prompt has shape {list(shape)}, but {base.name}'s embeddings are {width} wide: "
                f"it was trained on a model of another size (serve it with the base it was trained on)"]
    n = config.get("num_virtual_tokens")
    if isinstance(n, int) and shape[0] != n * config.get("num_transformer_submodules", 1):
        return [f"its soft prompt has {shape[0]} vectors but adapter_config.json says num_virtual_tokens {n}"]
    return []


def saved_weight_problems(path: Path) -> list[str]:
    """What is wrong with freshly saved adapter weights: none at all, or nothing but zeros (sharded
    training that saved before gathering writes such files), or a LoRA A matrix of zeros (B may
    start at zero; A never does). Reads every tensor: adapters are small."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        if not names:
            return [f"{path.name} holds no tensor ({path.stat().st_size} bytes)"]
        zero = [name for name in names if not f.get_tensor(name).any()]
    if len(zero) == len(names):
        return [f"every tensor in {path.name} is all zeros ({len(names)} tensors)"]
    zero_a = [name for name in zero if ".lora_A." in name]
    if zero_a:
        return [f"{len(zero_a)} LoRA A matrices are all zeros, e.g. {zero_a[0]}"]
    return []
