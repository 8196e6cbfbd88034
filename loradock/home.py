"""Where loradock keeps what it builds: `$LORADOCK_HOME`, `.loradock/` in the working folder by default."""

import os
from pathlib import Path

# The embedded default base model's name everywhere (flags, adapter configs, model cards). It is
# built locally on first use; the same name is its repo id when the base is pushed to a registry.
DEFAULT_BASE_MODEL = "loradock/tiny-chat"


def home() -> Path:
    return Path(os.environ.get("LORADOCK_HOME", ".loradock"))


def default_base_dir() -> Path:
    return home() / "models" / DEFAULT_BASE_MODEL.split("/")[-1]
