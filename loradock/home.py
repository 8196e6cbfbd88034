"""Where loradock keeps what it builds: `$LORADOCK_HOME`, `.loradock/` in the working folder by default."""

import os
from pathlib import Path

# The embedded default base model's name everywhere (flags, adapter configs, model cards). It is
# built locally on first use; the same name is its repo id when the base is pushed to a registry.
DEFAULT_BASE_MODEL = "loradock/tiny-chat"
# Written last into a built base model's folder: a folder without it is not a finished build.
BASE_BUILD_INFO = "loradock_base.json"


def home() -> Path:
    return Path(os.environ.get("LORADOCK_HOME", ".loradock"))


def default_base_dir() -> Path:
    return home() / "models" / DEFAULT_BASE_MODEL.split("/")[-1]


def built_base_model(name: str) -> str:
    """What to load for base model `name`: the built-in one's folder, or `name` itself (a local
    folder or a Hub id). Builds nothing: `loradock base build` does.

    Raises:
        LoradockError: the built-in base model is not built yet.
    """
    from loradock.errors import LoradockError

    if name != DEFAULT_BASE_MODEL:
        return name
    path = default_base_dir()
    if not (path / BASE_BUILD_INFO).exists():
        raise LoradockError(f"the built-in base model {DEFAULT_BASE_MODEL} is not built in {path}",
                            "build it once with `loradock base build` (a few minutes on a CPU), or pass --base-model")
    return str(path)
