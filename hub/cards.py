"""Card metadata as the registry serves it (`cardData`, validate-yaml): the front matter of any
repo's README.md, and the tags a repo is listed under (the card's own, its library, and
`base_model:...` for filtering). An adapter's own card is `hub.adapter.card`'s."""


def front_matter(text: str) -> dict:
    """The YAML metadata block of a card, parsed by huggingface_hub's `RepoCard` as the Hub does;
    {} when there is none.

    Raises:
        ValueError: the block is not valid YAML or not a mapping.
    """
    import yaml
    from huggingface_hub import RepoCard

    try:
        return RepoCard(text).data.to_dict()
    except yaml.YAMLError as e:
        raise ValueError(f"the front matter is not valid YAML: {e}") from None


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
