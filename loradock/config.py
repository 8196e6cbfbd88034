"""One configuration story for every command (`loradock train`, `serve`, `ui`, `hub serve`).

Each command has one dataclass whose fields, each documented once in `metadata["help"]`, are its
flags, its `--help` and its YAML keys. Settings come from the dataclass defaults, then
`--config FILE.yaml`, then the command line; a command may also take sections that pass through
to an upstream library (`lora:` and `training:` to PEFT and TRL, `vllm:` to vLLM's engine
arguments), each checked by its own function. Every problem is collected and raised once,
naming the flag or key to change; `--print-config` prints the resolved settings as YAML that
`--config` loads again.

Values are checked and converted by pydantic against each field's type hint (command-line
strings in pydantic's lax mode: "8" is an int, "true" a bool, "1e-3" a float); flags are plain
argparse, generated from the fields here because argparse has no dataclass support of its own.

One name per thing: a flag is spelled with dashes, and its underscore spelling is accepted too (as
TRL's and vLLM's parsers accept both); a field renamed keeps its old names (`metadata["was"]`) as
flags and YAML keys for one release, each use warned about. The registry is `--registry` and
`--token` on every command that talks to it; an OpenAI-compatible endpoint is `--base-url` and
`--api-key`. A yes/no setting is `--flag [BOOL]` (`--packing`, `--packing false`), or, marked
`metadata["switch"]`, a switch that takes no value (`push --model DIR REPO`). A list whose flag
names one item (`metadata["one"]`) is repeated under that name: `--grader A --grader B`, `graders: [A, B]`.
"""

import argparse
import dataclasses
import difflib
import enum
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from loradock.errors import LoradockError


REGISTRY_HELP = ("the registry's URL (none: $LORADOCK_REGISTRY, else $HF_ENDPOINT, else the embedded registry "
                 "http://127.0.0.1:8090)")
TOKEN_HELP = ("the registry's token (none: $LORADOCK_TOKEN, else the one `loradock hub login` stored for it; "
              "$HF_TOKEN only for huggingface.co or the Hub $HF_ENDPOINT names)")
BASE_URL_HELP = "an OpenAI-compatible endpoint, e.g. `loradock serve`'s http://127.0.0.1:8000/v1"
API_KEY_HELP = "the endpoint's API key (none: $LORADOCK_API_KEY)"


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def warn_renamed(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated and goes in the next release; use {new}", file=sys.stderr, flush=True)


class Renamed(argparse.Action):
    """An old flag, still accepted for one release: stores into its new field, and warns."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        warn_renamed(option_string, self.new_flag)
        setattr(namespace, self.dest, values)


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def shown(value) -> str:
    """A default as `--help` shows it (and as the test of `--help` reads it back)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def documented_fields(cls) -> list[dataclasses.Field]:
    """The fields that are flags: every field but those marked `metadata={"flag": False}`."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def add_config_flags(parser: argparse.ArgumentParser, cls, example: str) -> None:
    """`--config`, `--print-config` and one flag per field of `cls`, its help ending with its default.

    Flags keep argparse's SUPPRESS default, so the parsed namespace holds only what was typed and
    YAML values are not overwritten by defaults.
    """
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help=f"settings from a YAML file (keys: the flags' names with _), e.g. {example}; "
                             "flags override it")
    parser.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                        help="print the resolved settings as YAML (loadable with --config) and exit")
    hints = typing.get_type_hints(cls)
    for f in documented_fields(cls):
        text = f"{f.metadata['help']} (default: {shown(default_of(f))})".replace("%", "%%")
        kind = kind_of(hints[f.name])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS,
                                metavar=f.metadata.get("metavar") or f.name.upper(), help=text)
            continue
        if kind is bool and f.metadata.get("switch"):  # `--force`, never `--force false`: takes no value
            how = {"action": "store_const", "const": "true"}
        elif kind is bool:
            how = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        elif kind is list:
            how, text = {"action": "extend", "nargs": "+", "metavar": f.metadata.get("metavar")}, text + "; repeatable"
        else:
            how = {"metavar": f.metadata.get("metavar")}
        spelled = f.metadata.get("one", f.name)  # a list's flag is named for one item: --grader, graders:
        parser.add_argument(flag_of(spelled), dest=f.name, default=argparse.SUPPRESS, help=text, **how)
        for hidden in {f"--{spelled}", flag_of(f.name), f"--{f.name}"} - {flag_of(spelled)}:  # other spellings
            parser.add_argument(hidden, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **how)
        for old in f.metadata.get("was", ()):
            parser.add_argument(flag_of(old), dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                                action=Renamed, new_flag=flag_of(f.name),
                                **{k: v for k, v in how.items() if k not in ("action", "const")})


def kind_of(tp) -> type | None:
    """bool, list or None (anything else): how a field is spelled on the command line."""
    members = [m for m in typing.get_args(tp) if m is not type(None)] if is_union(tp) else [tp]
    if members == [bool]:
        return bool
    if any(typing.get_origin(m) is list for m in members):
        return list
    return None


def is_union(tp) -> bool:
    import types

    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def given_flags(args: argparse.Namespace, cls) -> dict:
    """{field: value} for the fields of `cls` typed on the command line."""
    names = {f.name for f in documented_fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


# --- files ---------------------------------------------------------------------------------------

def load_yaml(path: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LoradockError(f"config file {path!r} does not exist", "pass --config with the path of a YAML file") from None
    except yaml.YAMLError as e:
        raise LoradockError(f"config file {path!r} is not valid YAML: {e}", "fix the YAML syntax") from None
    if not isinstance(loaded, dict):
        raise LoradockError(f"config file {path!r} must be a mapping of keys to values",
                            "write one `key: value` per line (see the examples in the repo)")
    return loaded


# --- checking values -----------------------------------------------------------------------------

def unknown(origin: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{origin}: unknown option {name!r}{hint}"


def type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "choice of " + ", ".join(map(repr, typing.get_args(tp)))
    if is_union(tp):
        return " or ".join(type_name(m) for m in typing.get_args(tp) if m is not type(None))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class Invalid(ValueError):
    pass


def check_value(tp, value, flag: str):
    """`value` converted to type `tp` by pydantic.

    Raises:
        Invalid: naming `flag`, the value and the type it does not fit.
    """
    from pydantic import TypeAdapter, ValidationError

    members = typing.get_args(tp) if is_union(tp) else (tp,)
    if value == "null" and type(None) in members:
        return None  # YAML's spelling of nothing, from the command line
    if isinstance(value, str) and "," in value and kind_of(tp) is list:
        value = [item.strip() for item in value.split(",")]  # "q_proj,v_proj" is a list, "all-linear" stays one
    elif isinstance(value, str) and any(typing.get_origin(m) is dict or m is dict for m in members):
        value = yaml.safe_load(value)
    try:
        converted = TypeAdapter(tp).validate_python(value)
    except ValidationError as e:
        raise Invalid(f"{flag} {value!r} is not a valid {type_name(tp)} ({e.errors()[0]['msg']})") from None
    return converted.value if isinstance(converted, enum.Enum) else converted


def check_fields(cls, values: dict, problems: list[str], flag: Callable[[str], str]) -> dict:
    """Each of `values` checked against the field of `cls` it names; unknown names get a did-you-mean.

    A field whose type hint cannot be resolved is refused, never accepted unchecked.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = resolved_hints(cls)
    out = {}
    for name, value in values.items():
        if name not in fields:
            problems.append(unknown(flag(name), name, fields))
        elif name not in hints:
            problems.append(f"{flag(name)}: its type in {cls.__name__} cannot be checked here, so it cannot be set "
                            "through loradock")
        else:
            try:
                out[name] = check_value(hints[name], value, flag(name))
            except Invalid as e:
                problems.append(str(e))
    return out


def resolved_hints(cls) -> dict:
    """{field: type} for every field whose annotation resolves (upstream classes may hide some
    types behind TYPE_CHECKING imports)."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        pass
    hints = {}
    for f in dataclasses.fields(cls):
        probe = type("Probe", (), {"__annotations__": {f.name: f.type}, "__module__": cls.__module__})
        try:
            hints.update(typing.get_type_hints(probe))
        except NameError:
            continue
    return hints


# --- resolving a command's settings --------------------------------------------------------------

@dataclass
class Section:
    """A YAML section (`lora:`) and its `--lora.KEY VALUE` flags, passed through to a library."""

    name: str
    check: Callable[[dict, list[str]], dict]  # (values, problems) -> the checked values
    defaults: dict = field(default_factory=dict)


@dataclass
class Resolved:
    args: Any  # the command's dataclass
    sections: dict[str, dict]  # name -> checked values, for each section


def resolve(cls, file_values: dict, cli_values: dict, sections: tuple[Section, ...] = (),
            aliases: dict[str, tuple[str, str]] | None = None,
            validate: Callable[[Resolved], list[str]] | None = None, what: str = "") -> Resolved:
    """Defaults < YAML < command line, every value checked, every problem raised at once.

    Args:
        cls: the command's dataclass.
        file_values: the YAML config: field names, plus one mapping per section.
        cli_values: {key: value} from the command line; keys are field names, alias names or
            `SECTION.KEY`; values may be strings to be converted.
        sections: the pass-through sections this command takes.
        aliases: short flag -> (section, key), e.g. lr -> (training, learning_rate).
        validate: cross-field checks on the result, returning problems.
        what: the settings' name in the error, e.g. "the training configuration".
    """
    problems: list[str] = []
    ours = {f.name for f in documented_fields(cls)}
    renamed = {old: f.name for f in documented_fields(cls) for old in f.metadata.get("was", ())}
    merged: dict[str, dict] = {"": {}, **{s.name: dict(s.defaults) for s in sections}}
    aliases = aliases or {}

    def place(key: str, value, origin: str) -> None:
        section, _, name = key.replace("-", "_").rpartition(".")
        if not section and name in renamed:
            warn_renamed(origin, f"{renamed[name]!r}" if origin.startswith("config") else flag_of(renamed[name]))
            name = renamed[name]
        if not section and name in aliases:
            section, name = aliases[name]
        if section not in merged:
            known = ", ".join(f"{s.name}.KEY" for s in sections) or "none"
            problems.append(f"{origin}: unknown section {section!r} (sections: {known})")
        elif not section and name not in ours:
            problems.append(unknown(origin, name, [*ours, *aliases]))
        else:
            merged[section][name] = value

    for key, value in file_values.items():
        if key in merged and key and isinstance(value, dict):
            for name, item in value.items():
                place(f"{key}.{name}", item, f"config {key}.{name}")
        else:
            place(key, value, f"config key {key!r}")
    for key, value in cli_values.items():
        place(key, value, f"--{key}" if "." in key else flag_of(key))

    args = check_fields(cls, merged.pop(""), problems, flag_of)
    problems += [f"no {f.metadata.get('metavar') or f.name.upper()}: pass it ({f.metadata['help']})"
                 for f in documented_fields(cls) if f.metadata.get("required") and args.get(f.name) is None]
    resolved = Resolved(cls(**args), {s.name: s.check(merged[s.name], problems) for s in sections})
    if validate:
        problems += [p for p in validate(resolved) if p not in problems]
    if problems:
        raise LoradockError(f"{what or 'the settings'} has problems:\n  - " + "\n  - ".join(problems),
                            "change the flags or config keys named above")
    return resolved


def section_overrides(tokens: list[str], command: str, spelled: str) -> dict:
    """`--lora.r 16 --training.warmup_ratio=0.1 --training.packing` (the command line's words that
    no flag took) as {key: value}.

    Raises:
        LoradockError: a word that is not a `--SECTION.KEY`, naming how the command spells them.
    """
    values, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            raise LoradockError(f"unrecognized argument {token!r}",
                                f"see `loradock {command} --help`; upstream fields go as {spelled}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            value = tokens[i + 1] if has_value else "true"
            i += has_value
        values[key] = value
        i += 1
    return values


def from_command_line(cls, args: argparse.Namespace, extra: dict | None = None, **kwargs) -> Resolved:
    """The settings of a command from its parsed flags: `--config` file, then the flags, then
    `extra` (free-form `SECTION.KEY` overrides)."""
    file_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    return resolve(cls, file_values, {**given_flags(args, cls), **(extra or {})}, **kwargs)


def configured(cls, run: Callable[[Any], int], what: str, validate: Callable[[Any], list[str]] | None = None):
    """The `func` of a command on the config story: its settings resolved from `cls` (`--config`,
    the flags, the defaults; every problem at once), printed with `--print-config`, else `run` with them."""
    def func(args: argparse.Namespace) -> int:
        config = from_command_line(cls, args, what=what,
                                   validate=(lambda r: validate(r.args)) if validate else None).args
        return print_config(config) if getattr(args, "print_config", False) else run(config)

    return func


def subcommand(subparsers, name: str, cls, run: Callable[[Any], int], example: str,
               validate: Callable[[Any], list[str]] | None = None, **kwargs) -> argparse.ArgumentParser:
    """A command on the config story: its flags from `cls` (`add_config_flags`), its description
    `cls`'s docstring unless given, its settings resolved and checked before `run` gets them."""
    p = subparsers.add_parser(name, **{"description": cls.__doc__, **kwargs})
    add_config_flags(p, cls, example=example)
    p.set_defaults(func=configured(cls, run, f"`{p.prog}`", validate))
    return p


def config_yaml(args, sections: dict[str, dict] | None = None) -> str:
    """The settings as YAML that `--config` loads again; secret fields (tokens, keys) are left out."""
    import json

    body = {f.name: getattr(args, f.name) for f in documented_fields(type(args)) if not f.metadata.get("secret")}
    body.update(sections or {})
    return yaml.safe_dump(json.loads(json.dumps(body, default=str)), sort_keys=False)


def print_config(args, sections: dict[str, dict] | None = None) -> int:
    print(config_yaml(args, sections), end="")
    return 0
