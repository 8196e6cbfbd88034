"""Model card metadata, as the Hub reads it: the YAML front matter of README.md, and the tags a
repo is listed under (the card's own, its library, and `base_model:...` for filtering)."""

import yaml


def front_matter(text: str) -> dict:
    """The YAML between the leading `---` lines; {} when there is none.

    Raises:
        ValueError: the front matter is not valid YAML or not a mapping.
    """
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end == -1:
        raise ValueError("the front matter opened by '---' is never closed")
    try:
        data = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"the front matter is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("the front matter must be a YAML mapping")
    return data


def repo_tags(card: dict) -> list[str]:
    """Tags in the Hub's style: the card's tags, its library, and the base model (for an adapter
    `base_model:adapter:ID` too), so `list_models(filter="base_model:ID")` finds it."""
    tags = [str(t) for t in card.get("tags") or []]
    if card.get("library_name"):
        tags.append(str(card["library_name"]))
    bases = card.get("base_model") or []
    for base in [bases] if isinstance(bases, str) else bases:
        tags.append(f"base_model:{base}")
        if card.get("library_name") == "peft":
            tags.append(f"base_model:adapter:{base}")
    return list(dict.fromkeys(tags))
