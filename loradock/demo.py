"""python -m loradock.demo (what `make demo` runs after `make setup`)

The whole loop on the built-in tiny base model, offline, on a CPU:
base model -> registry -> task adapters trained and pushed with a tag -> one vLLM server that
hot-loads them by name -> `loradock eval` through its OpenAI endpoint for every model on every
task -> demo-report.md and a bar chart -> the comparison UI.

Everything lands under $LORADOCK_HOME (`.loradock/` by default): models/, adapters/, registry/,
logs/ (one log per service and per training run), demo/ (token, eval reports), demo-report.md,
demo-report.png. A second run reuses the base model, the trained adapters (same config, same
base) and the pushed commits (same weights), so it only starts the services and evaluates.

Environment: DEMO_UI=0 stops the services and exits after the report (default: start the UI and
keep everything running until Ctrl-C); DEMO_STEPS_SCALE=0.3 trains each adapter for that
fraction of its configured steps (the test uses it); DEMO_PORT / DEMO_REGISTRY_PORT / DEMO_UI_PORT
choose the ports (default: free ones).
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from loradock.errors import LoradockError
from loradock.home import DEFAULT_BASE_MODEL, default_base_dir, home

REPO = Path(__file__).resolve().parents[1]
TASKS = ("reverse", "commas")
NAMESPACE = "demo"
# What the report checks (issue 7): each adapter on its own task, the base, each adapter elsewhere.
OWN_TASK_MIN, BASE_MAX, OTHER_TASK_MAX = 0.8, 0.2, 0.2
STAGES = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_from_env(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        return free_port()
    if not value.isdigit():
        raise LoradockError(f"{name}={value!r} is not a port number", f"set {name} to a free port, e.g. {name}=8000")
    return int(value)


def stage(number: int, title: str):
    """Prints `[n/6] title ... detail (seconds)` when the stage's body returns its detail."""
    def run(body):
        started = time.monotonic()
        print(f"[{number}/{STAGES}] {title} ...", end=" ", flush=True)
        detail = body()
        print(f"{detail} ({time.monotonic() - started:.1f} s)", flush=True)
        return detail
    return run


def loradock(*args: str, log: Path) -> None:
    """Run `loradock ARGS` to completion, its output to `log` (this run only); a failure shows the log's end."""
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "loradock.cli", *args], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise LoradockError(f"`loradock {' '.join(args[:2])}` failed (exit {code}); its log ends:\n{tail}",
                            f"see {log}")


class Service:
    """A long-running `loradock` command in its own process group, stopped with SIGTERM."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name, self.log = name, log
        with log.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "loradock.cli", *args], cwd=REPO, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
                raise LoradockError(f"{self.name} exited with {self.process.returncode}; its log ends:\n{tail}",
                                    f"see {self.log}")
            if ready():
                return
            time.sleep(0.3)
        raise LoradockError(f"{self.name} was not ready after {timeout:.0f} s", f"see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # up, and asking for a token
    except OSError:
        return False
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def registry_token(root: Path, state: Path, log: Path) -> str:
    """The demo's write token, created once and kept (mode 600) next to the demo's other state."""
    path = state / "token"
    if path.exists():
        return path.read_text().strip()
    created = subprocess.run([sys.executable, "-m", "loradock.cli", "hub", "token", "create", "--root", str(root),
                              "--user", NAMESPACE, "--name", "demo"], cwd=REPO, capture_output=True, text=True)
    if created.returncode:
        log.write_text(created.stdout + created.stderr)
        raise LoradockError("could not create the demo's registry token", f"see {log}")
    path.touch(mode=0o600)
    path.write_text(created.stdout.strip() + "\n")
    return created.stdout.strip()


def remote_sha256(api, repo_id: str, revision: str, filename: str) -> str | None:
    """The sha256 the registry records for one file of a revision (None if it has no such file)."""
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    return next((s.lfs.sha256 for s in info.siblings or [] if s.rfilename == filename and s.lfs), None)


def publish(folder: Path, repo_id: str, endpoint: str, token: str, model: bool = False) -> tuple[str, str]:
    """Push the folder unless its weights are already the newest tag's (or, for a model, main's).
    Adapters get the next free tag v1, v2, ...; returns (revision to serve, what happened)."""
    from huggingface_hub.utils import disable_progress_bars

    from hub.client import hub_api, push

    disable_progress_bars()  # one line per stage
    api = hub_api(endpoint, token)
    weights = "model.safetensors" if model else "adapter_model.safetensors"
    local = sha256_file(folder / weights)
    exists = api.repo_exists(repo_id)
    tags = sorted((int(t.name[1:]) for t in api.list_repo_refs(repo_id).tags
                   if t.name.startswith("v") and t.name[1:].isdigit()), reverse=True) if exists else []
    current = "main" if model else (f"v{tags[0]}" if tags else None)
    if current and exists and remote_sha256(api, repo_id, current, weights) == local:
        return current, f"{repo_id}@{current} (already there)"
    tag = None if model else f"v{(tags[0] if tags else 0) + 1}"
    result = push(str(folder), repo_id, tag=tag, endpoint=endpoint, token=token, model=model,
                  message=f"demo: {folder.name}")
    return tag or "main", f"{repo_id}@{tag or 'main'} (commit {result.commit[:12]})"


def train(task: str, output: Path, scale: float, base_sha: str, log: Path) -> str:
    """Train the task's adapter from sft/configs/TASK.yaml unless the same config was trained on
    the same base already (the fingerprint is kept in the adapter folder's metrics.json)."""
    import yaml

    config_path = REPO / "sft" / "configs" / f"{task}.yaml"
    config = yaml.safe_load(config_path.read_text())
    steps = max(1, round(config["training"]["max_steps"] * scale))
    fingerprint = hashlib.sha256(f"{config_path.read_text()}|{steps}|{base_sha}".encode()).hexdigest()
    marker = output / "demo-fingerprint"
    if marker.exists() and marker.read_text().strip() == fingerprint and (output / "adapter_model.safetensors").exists():
        return f"{task}: reused"
    loradock("train", "--config", str(config_path), "--output", str(output), "--overwrite", "--max-steps", str(steps),
             "--training.disable_tqdm", "true", log=log)
    marker.write_text(fingerprint + "\n")
    metrics = json.loads((output / "metrics.json").read_text())
    return (f"{task}: {steps} steps, eval loss {metrics['eval_loss_before']:.2f} -> {metrics['eval_loss']:.2f}, "
            f"{metrics['train_runtime_s']:.0f} s")


def evaluate(endpoint: str, models: list[str], state: Path) -> dict[str, dict[str, float]]:
    """{model: {task: exact match}} through the served endpoint, one `loradock eval` per task."""
    table: dict[str, dict[str, float]] = {model: {} for model in models}
    for task in TASKS:
        report_path = state / f"eval-{task}.json"
        loradock("eval", "--endpoint", endpoint, *[a for m in models for a in ("--model", m)],
                 "--data", str(REPO / "sft" / "assets" / "tasks" / task / "heldout.jsonl"),
                 "--metrics", "exact_match", "--output", str(report_path), log=state / f"eval-{task}.log")
        report = json.loads(report_path.read_text())
        for model in models:
            table[model][task] = report["metrics"][model]["exact_match"]
    return table


def checks(table: dict, adapters: dict[str, str]) -> list[tuple[str, bool]]:
    """(what was checked, whether it holds) for each target of the demo."""
    results = [(f"base {DEFAULT_BASE_MODEL} <= {BASE_MAX:.0%} on {task}", table[DEFAULT_BASE_MODEL][task] <= BASE_MAX)
               for task in TASKS]
    for task, name in adapters.items():
        results.append((f"{name} >= {OWN_TASK_MIN:.0%} on {task}", table[name][task] >= OWN_TASK_MIN))
        results += [(f"{name} <= {OTHER_TASK_MAX:.0%} on {other}", table[name][other] <= OTHER_TASK_MAX)
                    for other in TASKS if other != task]
    return results


def markdown_table(table: dict) -> str:
    lines = ["| model | " + " | ".join(f"{task} exact match" for task in TASKS) + " |",
             "|---|" + "---:|" * len(TASKS)]
    lines += [f"| `{model}` | " + " | ".join(f"{scores[task]:.0%}" for task in TASKS) + " |"
              for model, scores in table.items()]
    return "\n".join(lines)


def write_report(table: dict, adapters: dict[str, str], results: list, path: Path, chart: Path, notes: list[str]) -> None:
    held_out = ", ".join(f"`sft/assets/tasks/{task}/heldout.jsonl`" for task in TASKS)
    path.write_text("\n".join([
        "# loradock demo report", "",
        f"Greedy answers (temperature 0) through `loradock serve`'s OpenAI endpoint, scored by exact match on "
        f"the held-out sets {held_out} (100 prompts each, none seen in training). Base model: "
        f"`{DEFAULT_BASE_MODEL}`; adapters hot-loaded by name on their first request.", "",
        markdown_table(table), "",
        f"![exact match per model and task]({chart.name})", "",
        "## Targets", "",
        *[f"- {'PASS' if ok else 'MISS'}: {what}" for what, ok in results], "",
        "## Runs", "",
        *[f"- {note}" for note in notes], "",
    ]))


def draw_chart(table: dict, path: Path) -> None:
    """Grouped bars: one group per task, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    width = 0.8 / len(table)
    for i, (model, scores) in enumerate(table.items()):
        xs = [t + (i - (len(table) - 1) / 2) * width for t in range(len(TASKS))]
        bars = ax.bar(xs, [scores[task] for task in TASKS], width, label=model)
        ax.bar_label(bars, labels=[f"{scores[task]:.0%}" for task in TASKS], fontsize=8)
    ax.set_xticks(range(len(TASKS)), [f"{task} (held-out)" for task in TASKS])
    ax.set_ylim(0, 1.35)
    ax.set_ylabel("exact match")
    ax.set_title("Held-out exact match, base vs task adapters (one vLLM server)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncols=len(table))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run() -> int:
    ui = os.environ.get("DEMO_UI", "1") != "0"
    scale = float(os.environ.get("DEMO_STEPS_SCALE", "1"))
    root, state, logs = home(), home() / "demo", home() / "logs"
    for folder in (state, logs):
        folder.mkdir(parents=True, exist_ok=True)
    registry_port, serve_port = port_from_env("DEMO_REGISTRY_PORT"), port_from_env("DEMO_PORT")
    ui_port = port_from_env("DEMO_UI_PORT") if ui else None
    registry_url, serve_url = f"http://127.0.0.1:{registry_port}", f"http://127.0.0.1:{serve_port}"
    print(f"[1/{STAGES}] set-up ... ok (python {sys.version.split()[0]}, everything under {root}/)", flush=True)
    with ExitStack() as services:
        def start(name: str, args: list[str], log: Path) -> Service:
            service = Service(name, args, log)
            services.callback(service.stop)
            return service

        def base_and_registry() -> str:
            from sft.base_model import BUILD_INFO, resolve_base_model

            base_dir = Path(resolve_base_model(DEFAULT_BASE_MODEL))
            registry = start("the registry", ["hub", "serve", "--root", str(root / "registry"), "--port", str(registry_port)],
                             logs / "demo-registry.log")
            registry.wait_until(lambda: answers(f"{registry_url}/api/whoami-v2"), 60)
            token = registry_token(root / "registry", state, logs / "demo-token.log")
            _, pushed = publish(base_dir, DEFAULT_BASE_MODEL, registry_url, token, model=True)
            base_sha = json.loads((base_dir / BUILD_INFO).read_text())["weights_sha256"]
            context.update(token=token, base_sha=base_sha)
            return f"{base_dir}; registry {registry_url}; base pushed as {pushed}"

        context: dict = {}
        stage(2, "base model, registry")(base_and_registry)

        def adapters() -> str:
            lines = []
            for task in TASKS:
                folder = root / "adapters" / task
                trained = train(task, folder, scale, context["base_sha"], logs / f"demo-train-{task}.log")
                revision, pushed = publish(folder, f"{NAMESPACE}/{task}", registry_url, context["token"])
                context.setdefault("adapters", {})[task] = f"{NAMESPACE}/{task}@{revision}"
                lines.append(f"{trained}; pushed {pushed}")
            context["notes"] = lines
            return " | ".join(lines)

        stage(3, f"train and push {len(TASKS)} task adapters")(adapters)

        def serve() -> str:
            log = logs / "demo-serve.log"
            server = start("loradock serve", ["serve", "--port", str(serve_port), "--registry", registry_url, "--token",
                                              context["token"], "--max-lora-rank", "16", "--max-model-len", "256"], log)
            server.wait_until(lambda: "serving " in log.read_text(errors="replace"), 600)
            return f"{serve_url}/v1 (base only; adapters load on their first request)"

        stage(4, "serve")(serve)

        def report() -> str:
            adapters = context["adapters"]
            table = evaluate(f"{serve_url}/v1", [DEFAULT_BASE_MODEL, *adapters.values()], state)
            results = checks(table, adapters)
            chart = root / "demo-report.png"
            draw_chart(table, chart)
            write_report(table, adapters, results, root / "demo-report.md", chart, context["notes"])
            (state / "report.json").write_text(json.dumps({"exact_match": table, "adapters": adapters,
                                                           "checks": [{"check": w, "ok": ok} for w, ok in results]},
                                                          indent=2) + "\n")
            context["table"], context["results"] = table, results
            return f"{root / 'demo-report.md'}, {chart.name}"

        stage(5, "evaluate every model on every task through the endpoint")(report)
        print("\n" + markdown_table(context["table"]) + "\n")
        for what, ok in context["results"]:
            print(f"  {'PASS' if ok else 'MISS'}  {what}")
        print()
        if not ui:
            print(f"[6/{STAGES}] UI ... skipped (DEMO_UI=0); stopping the services", flush=True)
            return 0

        def start_ui() -> str:
            log = logs / "demo-ui.log"
            app = start("loradock ui", ["ui", "--endpoint", f"{serve_url}/v1", "--registry", registry_url,
                                        "--port", str(ui_port)], log)
            app.wait_until(lambda: answers(f"http://127.0.0.1:{ui_port}/_stcore/health"), 120)
            return f"http://127.0.0.1:{ui_port}"

        url = stage(6, "comparison UI")(start_ui)
        print(f"\nOpen {url} (OpenAI endpoint {serve_url}/v1, registry {registry_url}). Ctrl-C stops everything.",
              flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        print("stopping the services", flush=True)
    return 0


def main() -> int:
    try:
        return run()
    except LoradockError as e:
        print(f"\n{e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
