"""python -m loradock.demo (what `make demo` runs after `make setup`)

The whole loop on a real instruct model, SmolLM2-135M-Instruct (from its PyPI wheel), on a CPU, with no
model hub: base model -> registry -> task adapters trained and pushed with a tag -> one vLLM server that
hot-loads them by name -> `loradock eval` through its OpenAI endpoint for every model on every
task -> demo-report.md and a bar chart -> the comparison UI.

Everything lands under $LORADOCK_HOME (`.loradock/` by default): models/, adapters/, registry/,
logs/ (one log per service and per run of a command), demo/ (token, eval reports), demo-report.md,
demo-report.png. A second run reuses the base model, the trained adapters (same config, same
base) and the pushed commits (same weights), so it only starts the services and evaluates.

The terminal gets one line per stage, naming its log files; on a terminal a progress bar with
steps and ETA stands in the line while the base model is built and while adapters train. What
the libraries print (progress bars, warnings, vLLM's output) goes to the logs.

Environment: DEMO_UI=0 stops the services and exits after the report (default: start the UI and
keep everything running until Ctrl-C); DEMO_STEPS_SCALE=0.3 trains each adapter for that
fraction of its configured steps (the test uses it); DEMO_PORT / DEMO_REGISTRY_PORT / DEMO_UI_PORT
choose the ports (default: free ones).
"""

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from loradock.errors import LoradockError
from loradock.home import BASE_BUILD_INFO, SMOLLM2, embedded_dir, home
from loradock.procs import Service, StepsInLog, add_org_member, create_token, free_port, loradock_command, run_loradock, start_registry

REPO = Path(__file__).resolve().parents[1]
TASKS = ("commas", "json")
BASE_MODEL = SMOLLM2
NAMESPACE = "demo"
# What the report checks: each adapter on its own task, the base, each adapter elsewhere.
OWN_TASK_MIN, BASE_MAX, OTHER_TASK_MAX = 0.9, 0.2, 0.2
STAGES = 6


@dataclass(frozen=True)
class Demo:
    """Where this run keeps things, and the URLs of its services."""

    root: Path  # $LORADOCK_HOME
    registry_port: int
    serve_port: int
    ui_port: int | None  # None: DEMO_UI=0
    scale: float  # DEMO_STEPS_SCALE
    library_log: TextIO  # what the libraries print in this process (huggingface_hub, matplotlib)

    @property
    def state(self) -> Path:
        return self.root / "demo"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def shown(self, path: Path) -> str:
        """A path as the stage lines show it: relative to $LORADOCK_HOME (named in the first line)."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)


def port_from_env(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        return free_port()
    if not value.isdigit():
        raise LoradockError(f"{name}={value!r} is not a port number", f"set {name} to a free port, e.g. {name}=8000")
    return int(value)


class Line:
    """One stage's line, `[n/6] title ... detail (seconds)`. On a terminal a progress bar stands in
    its place while a long step runs, and the finished line is drawn over it; elsewhere (a pipe, a
    CI log) the title is printed first and the detail appended, with no bar."""

    def __init__(self, number: int, title: str):
        self.number = f"[{number}/{STAGES}]"
        self.head, self.terminal = f"{self.number} {title}", sys.stdout.isatty()

    def bar(self, total: int, what: str):
        """A tqdm bar of `total` steps (nothing off a terminal, or with nothing to do)."""
        from tqdm import tqdm  # huggingface_hub's dependency

        # The size from shutil, which falls back to 80x24 where the terminal reports none (a pty without
        # a size, as under `script`): tqdm would take 0x0 and draw nothing.
        size = shutil.get_terminal_size()
        return tqdm(total=total, desc=f"{self.number} {what}", unit="step", leave=False, file=sys.stdout,
                    ncols=size.columns, nrows=size.lines, disable=not (self.terminal and total))

    def follow(self, bar, log: Path, total: int | None = None):
        """A callback for `run_loradock(every=...)` that moves `bar` with the Trainer's steps in `log`
        (None for a bar that draws nothing)."""
        if bar.disable:
            return None
        steps, start = StepsInLog(log, total), bar.n

        def update() -> None:
            bar.update(max(0, start + steps.read() - bar.n))
        return update


def stage(number: int, title: str, body, *args):
    """Run `body(line, *args) -> (value, detail)` as stage `number`; prints its line, returns the value."""
    line, started = Line(number, title), time.monotonic()
    print(f"{line.head} ...", end=" ", flush=True)
    value, detail = body(line, *args)
    redraw = f"\r\x1b[K{line.head} ... " if line.terminal else ""
    print(f"{redraw}{detail} ({time.monotonic() - started:.1f} s)", flush=True)
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def registry_token(demo: Demo) -> str:
    """The demo's write token, created once and kept (mode 600) next to the demo's other state."""
    path = demo.state / "token"
    if path.exists():
        return path.read_text().strip()
    token = create_token(demo.root / "registry", NAMESPACE, name="demo")
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def publish(demo: Demo, folder: Path, repo_id: str, token: str, model: bool = False) -> tuple[str, str]:
    """Push the folder unless its weights are already the newest tag's (or, for a model, main's).
    Adapters get the next free tag v1, v2, ...; returns (revision to serve, what happened)."""
    with redirect_stdout(demo.library_log), redirect_stderr(demo.library_log):
        from hub.client import quiet_progress_bars, registry

        quiet_progress_bars()
        door = registry(demo.registry_url, token)
        weights = "model.safetensors" if model else "adapter_model.safetensors"
        local = sha256_file(folder / weights)
        exists = door.exists(repo_id)
        tags = sorted((int(name[1:]) for name in door.tags(repo_id) if name.startswith("v") and name[1:].isdigit()),
                      reverse=True) if exists else []
        current = "main" if model else (f"v{tags[0]}" if tags else None)
        if current and exists and door.file_sha256(repo_id, current, weights) == local:
            return current, f"{repo_id}@{current} (already there)"
        tag = None if model else f"v{(tags[0] if tags else 0) + 1}"
        result = door.push(folder, repo_id, tag=tag, model=model, message=f"demo: {folder.name}")
    return tag or "main", f"{repo_id}@{tag or 'main'} (commit {result.commit[:12]})"


def base_and_registry(line: Line, demo: Demo, services: ExitStack) -> tuple[tuple[str, str], str]:
    """Install the base model unless it is there, start the registry, push the base; returns (token, base sha)."""
    made = "reused"
    base_dir = embedded_dir(BASE_MODEL)
    if not (base_dir / BASE_BUILD_INFO).exists():
        log = demo.logs / "demo-base-install.log"
        run_loradock("base", "install", log=log)
        made = f"installed from PyPI and converted, log {demo.shown(log)}"
    registry_log = demo.logs / "demo-registry.log"
    services.enter_context(start_registry(demo.root / "registry", demo.registry_port, registry_log))
    token = registry_token(demo)
    # The base model's namespace is an organisation; the demo's user pushes there as a member.
    add_org_member(demo.root / "registry", BASE_MODEL.split("/")[0], NAMESPACE)
    _, pushed = publish(demo, base_dir, BASE_MODEL, token, model=True)
    base_sha = json.loads((base_dir / BASE_BUILD_INFO).read_text())["weights_sha256"]
    return (token, base_sha), (f"{demo.shown(base_dir)} ({made}); registry {demo.registry_url}, log "
                               f"{demo.shown(registry_log)}; base pushed as {pushed}")


@dataclass(frozen=True)
class Training:
    """One task adapter's training run: from sft/configs/TASK.yaml, for a fraction of its steps."""

    task: str
    config: Path
    output: Path
    steps: int
    fingerprint: str  # the config, the steps and the base: the same three make the same adapter

    @property
    def done(self) -> bool:
        marker = self.output / "demo-fingerprint"
        return (marker.exists() and marker.read_text().strip() == self.fingerprint
                and (self.output / "adapter_model.safetensors").exists())


def plan_training(task: str, demo: Demo, base_sha: str) -> Training:
    import yaml

    config = REPO / "sft" / "configs" / f"{task}.yaml"
    steps = max(1, round(yaml.safe_load(config.read_text())["training"]["max_steps"] * demo.scale))
    fingerprint = hashlib.sha256(f"{config.read_text()}|{steps}|{base_sha}".encode()).hexdigest()
    return Training(task, config, demo.root / "adapters" / task, steps, fingerprint)


def train(run: Training, log: Path, follow) -> str:
    """Train the adapter unless the same run is done already; `follow` is `run_loradock`'s progress callback."""
    if run.done:
        return f"{run.task}: reused"
    run_loradock("train", "--config", run.config, "--output", run.output, "--overwrite", "--max-steps", run.steps,
                 log=log, every=follow)
    (run.output / "demo-fingerprint").write_text(run.fingerprint + "\n")
    metrics = json.loads((run.output / "metrics.json").read_text())
    return (f"{run.task}: {run.steps} steps, eval loss {metrics['eval_loss_before']:.2f} -> {metrics['eval_loss']:.2f}, "
            f"{metrics['train_runtime_s']:.0f} s, log {log.name}")


def train_and_push(line: Line, demo: Demo, token: str, base_sha: str) -> tuple[tuple[dict, list], str]:
    """Each task's adapter trained (or reused) and pushed; returns ({task: served name}, one note per task)."""
    runs = [plan_training(task, demo, base_sha) for task in TASKS]
    adapters, notes = {}, []
    with line.bar(sum(run.steps for run in runs if not run.done), "training") as bar:
        for run in runs:
            log = demo.logs / f"demo-train-{run.task}.log"
            bar.set_description(f"{line.number} training {run.task}")
            trained = train(run, log, line.follow(bar, log, total=run.steps))
            revision, pushed = publish(demo, run.output, f"{NAMESPACE}/{run.task}", token)
            adapters[run.task] = f"{NAMESPACE}/{run.task}@{revision}"
            notes.append(f"{trained}; pushed {pushed}")
    return (adapters, notes), " | ".join(notes) + f" (logs in {demo.shown(demo.logs)}/)"


def serve(line: Line, demo: Demo, services: ExitStack, token: str) -> tuple[None, str]:
    log = demo.logs / "demo-serve.log"
    server = services.enter_context(Service("loradock serve", loradock_command(
        "serve", "--port", demo.serve_port, "--registry", demo.registry_url, "--token", token,
        "--base-model", BASE_MODEL, "--max-lora-rank", "16", "--max-model-len", "512"), log))
    server.wait_healthy(f"{demo.serve_url}/health", 600)
    vllm_log = demo.logs / f"serve-{demo.serve_port}.log"  # `loradock serve` keeps vLLM's own output there
    return None, (f"{demo.serve_url}/v1 (base only; adapters load on their first request), logs {demo.shown(log)}, "
                  f"{demo.shown(vllm_log)}")


EVAL_MAX_TOKENS = 32  # the longest reference is 25 tokens; the base's long answers are cut there, as wrong as whole


def evaluate(demo: Demo, models: list[str], base_sha: str) -> tuple[dict[str, dict[str, float]], bool]:
    """({model: {task: exact match}} through the served endpoint, one `loradock eval` per task;
    whether every report was reused). A task's report is reused while the models (adapters by
    immutable tag), the base's weights and the held-out file are those it was made with."""
    table: dict[str, dict[str, float]] = {model: {} for model in models}
    reused = True
    for task in TASKS:
        heldout = REPO / "sft" / "assets" / "tasks" / task / "heldout.jsonl"
        report_path, marker = demo.state / f"eval-{task}.json", demo.state / f"eval-{task}.fingerprint"
        fingerprint = hashlib.sha256(json.dumps([models, base_sha, sha256_file(heldout), EVAL_MAX_TOKENS]).encode()).hexdigest()
        if not (report_path.exists() and marker.exists() and marker.read_text().strip() == fingerprint):
            reused = False
            run_loradock("eval", "--base-url", f"{demo.serve_url}/v1", *[a for m in models for a in ("--model", m)],
                         "--data", heldout, "--metrics", "exact_match", "--max-new-tokens", EVAL_MAX_TOKENS,
                         "--output", report_path, log=demo.logs / f"demo-eval-{task}.log")
            marker.write_text(fingerprint + "\n")
        report = json.loads(report_path.read_text())
        for model in models:
            table[model][task] = report["metrics"][model]["exact_match"]
    return table, reused


def checks(table: dict, adapters: dict[str, str]) -> list[tuple[str, bool]]:
    """(what was checked, whether it holds) for each target of the demo."""
    results = [(f"base {BASE_MODEL} <= {BASE_MAX:.0%} on {task}", table[BASE_MODEL][task] <= BASE_MAX)
               for task in TASKS]
    for task, name in adapters.items():
        results.append((f"{name} >= {OWN_TASK_MIN:.0%} on {task}", table[name][task] >= OWN_TASK_MIN))
        results += [(f"{name} <= {OTHER_TASK_MAX:.0%} on {other}", table[name][other] <= OTHER_TASK_MAX)
                    for other in TASKS if other != task]
    return results


def report(line: Line, demo: Demo, adapters: dict[str, str], notes: list[str],
           base_sha: str) -> tuple[tuple[dict, list], str]:
    """Evaluate, check the targets, write the report, the chart and report.json; returns (table, checks)."""
    table, reused = evaluate(demo, [BASE_MODEL, *adapters.values()], base_sha)
    results = checks(table, adapters)
    chart = demo.root / "demo-report.png"
    draw_chart(demo, table, chart)
    write_report(table, adapters, results, demo.root / "demo-report.md", chart, notes)
    (demo.state / "report.json").write_text(json.dumps({"exact_match": table, "adapters": adapters,
                                                        "checks": [{"check": w, "ok": ok} for w, ok in results]},
                                                       indent=2) + "\n")
    return (table, results), (f"{demo.shown(demo.root / 'demo-report.md')}, {chart.name}; "
                              + ("the same models as last time: their reports reused, " if reused else "")
                              + f"logs {demo.shown(demo.logs)}/demo-eval-*.log")


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
        f"`{BASE_MODEL}`; adapters hot-loaded by name on their first request.", "",
        markdown_table(table), "",
        f"![exact match per model and task]({chart.name})", "",
        "## Targets", "",
        *[f"- {'PASS' if ok else 'MISS'}: {what}" for what, ok in results], "",
        "## Runs", "",
        *[f"- {note}" for note in notes], "",
    ]))


def draw_chart(demo: Demo, table: dict, path: Path) -> None:
    """Grouped bars: one group per task, one bar per model."""
    with redirect_stdout(demo.library_log), redirect_stderr(demo.library_log):  # "building the font cache"
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


def start_ui(line: Line, demo: Demo, services: ExitStack) -> tuple[str, str]:
    log, url = demo.logs / "demo-ui.log", f"http://127.0.0.1:{demo.ui_port}"
    app = services.enter_context(Service("loradock ui", loradock_command(
        "ui", "--base-url", f"{demo.serve_url}/v1", "--registry", demo.registry_url, "--port", demo.ui_port), log))
    app.wait_healthy(f"{url}/_stcore/health", 120)
    return url, f"{url}, log {demo.shown(log)}"


def run() -> int:
    ui = os.environ.get("DEMO_UI", "1") != "0"
    root = home().resolve()
    os.environ["LORADOCK_HOME"] = str(root)  # the commands started here use the same home, wherever they run
    for folder in (root / "demo", root / "logs"):
        folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as services:
        demo = Demo(root, port_from_env("DEMO_REGISTRY_PORT"), port_from_env("DEMO_PORT"),
                    port_from_env("DEMO_UI_PORT") if ui else None, float(os.environ.get("DEMO_STEPS_SCALE", "1")),
                    services.enter_context((root / "logs" / "demo.log").open("w")))
        print(f"[1/{STAGES}] set-up ... ok (python {sys.version.split()[0]}, everything under {root}/, "
              f"logs in {demo.shown(demo.logs)}/)", flush=True)
        token, base_sha = stage(2, "base model, registry", base_and_registry, demo, services)
        adapters, notes = stage(3, f"train and push {len(TASKS)} task adapters", train_and_push, demo, token, base_sha)
        stage(4, "serve", serve, demo, services, token)
        table, results = stage(5, "evaluate every model on every task through the endpoint", report, demo, adapters,
                               notes, base_sha)
        print("\n" + markdown_table(table) + "\n")
        for what, ok in results:
            print(f"  {'PASS' if ok else 'MISS'}  {what}")
        print()
        if not ui:
            print(f"[6/{STAGES}] UI ... skipped (DEMO_UI=0); stopping the services", flush=True)
            return 0
        url = stage(6, "comparison UI", start_ui, demo, services)
        print(f"\nOpen {url} (OpenAI endpoint {demo.serve_url}/v1, registry {demo.registry_url}). Ctrl-C stops "
              "everything.", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        print("stopping the services", flush=True)
    return 0


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the demo as Ctrl-C does: every service it started is stopped


def main() -> int:
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run()
    except LoradockError as e:
        print(f"\n{e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: what the demo started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
