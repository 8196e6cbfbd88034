"""Card metadata as the registry serves it (`cardData`, validate-yaml): the front matter of any
repo's README.md, the type each field the Hub defines must have (`HUB_FIELDS`), and the tags a repo
is listed under (the card's own, its library, and `base_model:...` for filtering). An adapter's own
card is `hub.adapter.card`'s.

Anyone who can push writes a README that every listing parses and renders as JSON, so the parser
reads plain data only and its cost is bounded by the size of the block: no anchors or aliases (a
few hundred bytes of them expand to megabytes), no tags, limited nesting."""

import json
import math

import yaml
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

MAX_FRONT_MATTER = 64 << 10  # bytes of YAML between the `---` fences that the registry reads
MAX_DEPTH = 32  # the deepest nesting of mappings and sequences in it


def front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a card, found as huggingface_hub's `RepoCard` finds
    it, as JSON-ready plain data; {} when there is none.

    What comes back is what `RepoCard(text).data.to_dict()` gives for plain data (top-level nulls
    dropped), made fit for JSON: timestamps stay the text written, NaN and the infinities become
    null (as JSON.stringify writes them), and keys that are numbers, booleans or null become the
    strings JSON makes of them.

    Raises:
        ValueError: the block is over MAX_FRONT_MATTER bytes, uses an anchor, alias or explicit
            tag, nests deeper than MAX_DEPTH, is not valid YAML, or is not a mapping.
    """
    match = REGEX_YAML_BLOCK.search(text)
    if not match:
        return {}
    block = match.group(2)
    size = len(block.encode("utf-8", "surrogatepass"))
    if size > MAX_FRONT_MATTER:
        raise ValueError(f"the front matter is {size} bytes, over the {MAX_FRONT_MATTER} byte limit: "
                         "keep long text in the card's body, below the closing ---")
    loader = PlainDataLoader(block)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ValueError(f"the front matter is not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"the front matter must be a mapping of fields (`key: value` lines), "
                         f"not a {type(data).__name__}")
    return {key: value for key, value in data.items() if value is not None}


try:  # libyaml's scanner and parser where PyYAML has them: several times faster than its Python ones
    from yaml.cyaml import CParser as EventParser
except ImportError:
    class EventParser(Reader, Scanner, Parser):
        def __init__(self, stream):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class PlainDataLoader(EventParser, Composer, SafeConstructor, Resolver):
    """PyYAML's safe loader, refusing what is not plain data before it is built (see front_matter)."""

    # libyaml composes nodes itself, unseen: the Python composer does it here, one checked node at a time
    get_single_node, check_node, get_node = Composer.get_single_node, Composer.check_node, Composer.get_node
    depth = 0  # mappings and sequences open around the node being composed

    def __init__(self, stream: str):
        EventParser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    def compose_node(self, parent, index):
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1} of the front matter"
        if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
            raise ValueError(f"anchors and aliases are not allowed in a card ({where}): write the value out")
        if event.tag is not None:
            raise ValueError(f"tags are not allowed in a card ({event.tag!r} at {where}): write a plain value")
        nested = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if nested and self.depth >= MAX_DEPTH:
            raise ValueError(f"the front matter nests deeper than {MAX_DEPTH} levels ({where}): flatten it")
        self.depth += nested
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= nested

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # `<<` merge keys, as the safe loader reads them
        mapping = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise ValueError(f"a key at line {key_node.start_mark.line + 1} of the front matter is a "
                                 f"{type(key).__name__}: keys must be plain values")
            mapping[key if isinstance(key, str) else json.dumps(key)] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # over Python's limit on the digits of an int read from text
            raise ValueError(f"the number at line {node.start_mark.line + 1} of the front matter is too long "
                             "to read: quote it to keep it as text") from None

    def construct_yaml_float(self, node):
        value = super().construct_yaml_float(node)
        return value if math.isfinite(value) else None


PlainDataLoader.add_constructor("tag:yaml.org,2002:int", PlainDataLoader.construct_yaml_int)
PlainDataLoader.add_constructor("tag:yaml.org,2002:float", PlainDataLoader.construct_yaml_float)
PlainDataLoader.add_constructor("tag:yaml.org,2002:timestamp", SafeConstructor.construct_scalar)


def _texts(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


# The fields the Hub defines that its clients parse (huggingface_hub's ModelCardData and
# DatasetCardData, built for every repo of a listing), with what each must hold. `tags: 7` makes
# that parse raise, and with it the whole listing: validate-yaml refuses such a card, as the Hub
# does, and a README stored before (or by a client that skips the check) is served without the field.
HUB_FIELDS = {
    **dict.fromkeys(("tags", "datasets", "base_model", "language", "metrics", "license"),
                    ("a string or an array of strings", _texts)),
    **dict.fromkeys(("library_name", "pipeline_tag", "license_name", "license_link"),
                    ("a string", lambda value: isinstance(value, str))),
    "model-index": ("an array of objects", lambda value: isinstance(value, list) and all(
        isinstance(v, dict) for v in value)),
}
RESERVED = ("self", "ignore_metadata_errors")  # names of huggingface_hub's card classes' own parameters


def field_problems(card: dict) -> list[str]:
    """The Hub's way of naming each field its clients cannot read: `"tags" must be an array of ...`."""
    problems = [f'"{name}" must be {kind}' for name, (kind, fits) in HUB_FIELDS.items()
                if card.get(name) is not None and not fits(card[name])]
    return problems + [f'"{name}" is a name huggingface_hub\'s card classes keep for themselves: rename the field'
                       for name in RESERVED if name in card]


def readable(card: dict) -> dict:
    """The card without the fields `field_problems` names."""
    return {name: value for name, value in card.items() if name not in RESERVED
            and (name not in HUB_FIELDS or value is None or HUB_FIELDS[name][1](value))}


def repo_tags(card: dict) -> list[str]:
    """Tags in the Hub's style: the card's tags, its library, and the base model (for an adapter
    `base_model:adapter:ID` too), so `list_models(filter="base_model:ID")` finds it. A field may be
    one value or a list of them; anything else a README holds there is read as text."""
    tags = [str(t) for t in as_list(card.get("tags"))]
    if card.get("library_name"):
        tags.append(str(card["library_name"]))
    for base in as_list(card.get("base_model")):
        tags.append(f"base_model:{base}")
        if card.get("library_name") == "peft":
            tags.append(f"base_model:adapter:{base}")
    return list(dict.fromkeys(tags))


def as_list(value) -> list:
    """A card field that may be one value or a list of them, as a list ([] for none)."""
    if value is None or value == "":
        return []
    return value if isinstance(value, list) else [value]
