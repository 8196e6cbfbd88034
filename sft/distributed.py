"""loradock train --nproc N | --accelerate-config FILE: one training job in several processes.

`loradock train` with `--nproc` above 1 or an `--accelerate-config` does not train itself: it
writes the resolved configuration to a YAML file and starts the processes with torchrun
(`python -m torch.distributed.run --standalone`) or, given an accelerate config (multi-node,
FSDP, DeepSpeed, as `accelerate config` writes it), with accelerate's own launcher. Each process
runs `loradock train --config THAT_FILE` with `LORADOCK_TRAIN_LAUNCHED=1`, so none launches again.

Inside the processes (`sft.train.run`), the helpers here keep the one-off work on the main
process: the base model build, the parent pull and the data downloads happen there first
(`main_first`), the data check runs there only and its rows reach the others (`on_main`), and
the publish is the main process's while the others wait (`wait_for_everyone`). In a
one-process run every helper is a no-op.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, TypeVar

import yaml

from loradock.errors import LoradockError

LAUNCHED = "LORADOCK_TRAIN_LAUNCHED"  # set in the launched processes: they train, never launch again
PROCESSES = "LORADOCK_TRAIN_PROCESSES"  # how many processes the launcher started, checked by each of them
FAILURE = "LORADOCK_TRAIN_FAILURE"  # a file a launched process writes its refusal to, for the launcher to raise
T = TypeVar("T")


# --- the launching process ---------------------------------------------------------------------

def wants_launch(args) -> bool:
    """True in the `loradock train` a user typed when it asks for more than one process."""
    return (args.nproc > 1 or bool(args.accelerate_config)) and os.environ.get(LAUNCHED) != "1"


def read_accelerate_config(path: str) -> tuple[dict | None, str | None]:
    """(the accelerate config file as a mapping, None) when `accelerate launch` would read it, else
    (None, the problem, naming what to do)."""
    file = Path(path)
    if not file.is_file():
        return None, (f"--accelerate-config {path}: no such file; pass a config written by `accelerate config`, "
                      "or one of sft/configs/accelerate/*.yaml")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return None, (f"--accelerate-config {path} is not valid YAML ({' '.join(str(e).split())}); fix it, or write "
                      "the file again with `accelerate config --config_file FILE`")
    if not isinstance(values, dict) or "distributed_type" not in values:
        return None, (f"--accelerate-config {path} is not an accelerate config (it has no distributed_type); write "
                      "one with `accelerate config --config_file FILE`, or start from sft/configs/accelerate/*.yaml")
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(str(file))
    except (ValueError, TypeError) as e:
        return None, f"--accelerate-config {path}: accelerate refuses it ({e}); fix the keys it names"
    return values, None


def processes_of(args, accelerate_values: dict | None) -> int:
    """How many processes the launch starts in all: --nproc, else the accelerate config's num_processes."""
    if args.nproc > 1 or not accelerate_values:
        return args.nproc
    return max(1, int(accelerate_values.get("num_processes") or 1))


def launch_problems(args) -> list[str]:
    """What is wrong with --nproc / --accelerate-config, each naming the flag to change."""
    problems = []
    if args.nproc < 1:
        problems.append(f"--nproc {args.nproc} must be at least 1 (the number of training processes on this machine)")
    if not args.accelerate_config:
        return problems
    values, problem = read_accelerate_config(args.accelerate_config)
    if problem:
        return [*problems, problem]
    processes, kind = processes_of(args, values), values["distributed_type"]
    if processes > 1 and not cuda_available() and not values.get("mpirun_config") and not runs_as_torchrun(values):
        problems.append(f"--accelerate-config {args.accelerate_config} starts {processes} processes ({kind}"
                        f"{', on ' + str(values.get('num_machines')) + ' machines' if kind not in GPU_ONLY else ''}), "
                        "which `accelerate launch` does on GPUs (or under mpirun), and this machine has no CUDA GPU; "
                        "on a CPU use --nproc N without --accelerate-config (torchrun, gloo)")
    return problems


# What needs GPUs: sharding (FSDP, DeepSpeed, Megatron-LM) and TPUs.
GPU_ONLY = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA", "TPU")


def runs_as_torchrun(values: dict | None) -> bool:
    """On a machine without CUDA, an accelerate config of plain data parallel on this one machine runs its
    processes through torchrun: `accelerate launch` would start one process there (its CPU launcher
    starts several only under mpirun), and the same processes with the same settings are what it asks for."""
    return (values is not None and not cuda_available() and not values.get("mpirun_config")
            and values.get("distributed_type") not in GPU_ONLY and int(values.get("num_machines") or 1) == 1)


def global_batch_line(processes: int, per_device: int, accumulation: int, launcher: str) -> str:
    """`training in 2 processes (torchrun); global batch 16 = 8 per device x 2 processes x 1 accumulation`."""
    plural = "process" if processes == 1 else "processes"
    how = f" ({launcher})" if launcher else ""
    return (f"training in {processes} {plural}{how}; global batch {per_device * processes * accumulation} = "
            f"{per_device} per device x {processes} {plural} x {accumulation} accumulation")


def launch_command(nproc: int, accelerate_config: str | None, config_file: str, torchrun: bool = False) -> list[str]:
    """The launcher's command line: accelerate's with a config (unless `torchrun`), else torchrun on this machine."""
    train = ["-m", "loradock.cli", "train", "--config", config_file]
    if accelerate_config and not torchrun:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
        if nproc > 1:
            command += ["--num_processes", str(nproc)]
        if not cuda_available():
            command.append("--cpu")  # accelerate sets ACCELERATE_USE_CPU from this flag, over ours
        return command + train
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *train]


def child_environment(processes: int, local_processes: int, on_cuda: bool, base: dict | None = None) -> dict:
    """The launched processes' environment: marked as launched, the CPU's threads split between them,
    and on a machine without CUDA gloo on the loopback device and accelerate told to use the CPU
    (without ACCELERATE_USE_CPU, accelerate and the Trainer would each see one process of its own)."""
    env = dict(os.environ if base is None else base)
    env[LAUNCHED], env[PROCESSES] = "1", str(processes)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, local_processes))))
    if not on_cuda:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def write_launch_config(body: dict, output: str) -> Path:
    """The resolved settings every process reads, beside --output (a temp folder if that cannot be written).
    They keep --nproc and --accelerate-config, so the published run_config.yaml says how the run was made;
    LORADOCK_TRAIN_LAUNCHED stops the processes from launching again."""
    text = "# written by `loradock train` for the processes it launched\n" + yaml.safe_dump(body, sort_keys=False)
    parent = Path(output).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f".{Path(output).name}.launch-",
                                             dir=parent, delete=False)
    except OSError:
        handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="loradock-launch-", delete=False)
    with handle:
        handle.write(text)
    return Path(handle.name)


def registry_environment(args) -> dict:
    """--registry and --token for the launched processes, which read their settings from a file that
    leaves them out (it is the run's recipe, not where this machine reaches the registry)."""
    from hub.client import REGISTRY_ENV, TOKEN_ENV

    return {name: value for name, value in ((REGISTRY_ENV, args.registry), (TOKEN_ENV, args.token)) if value}


def launch_processes(args, body: dict, training: dict) -> int:
    """Start the processes and wait for them; returns the launcher's exit status.

    Args:
        args: the resolved TrainArgs (nproc, accelerate_config, output).
        body: the resolved configuration as `--config` YAML (`ResolvedConfig.to_yaml_dict`, JSON-clean).
        training: the resolved `training:` section (for the global batch line).
    """
    accelerate_values = read_accelerate_config(args.accelerate_config)[0] if args.accelerate_config else None
    processes, on_cuda = processes_of(args, accelerate_values), cuda_available()
    machines = int((accelerate_values or {}).get("num_machines") or 1)
    cores = os.cpu_count() or 1
    if not on_cuda and processes // machines > cores:
        print(f"warning: {processes // machines} processes on {cores} CPU cores: each gets less than one core",
              file=sys.stderr, flush=True)
    torchrun = not args.accelerate_config or (processes > 1 and runs_as_torchrun(accelerate_values))
    launcher = "torchrun" if torchrun else "accelerate launch"
    if torchrun and args.accelerate_config:
        launcher = f"torchrun: --accelerate-config {args.accelerate_config}'s processes on a machine without CUDA"
    print(global_batch_line(processes, training.get("per_device_train_batch_size", 8),
                            training.get("gradient_accumulation_steps", 1), launcher), flush=True)
    config_file = write_launch_config(body, args.output)
    failure = config_file.with_suffix(".failure.json")
    try:
        command = launch_command(processes if torchrun else args.nproc, args.accelerate_config, str(config_file),
                                 torchrun)
        env = {**child_environment(processes, max(1, processes // machines), on_cuda), FAILURE: str(failure),
               **registry_environment(args)}
        launcher_process = subprocess.Popen(command, env=env)  # output passes through as it comes
        try:
            code = launcher_process.wait()
        except KeyboardInterrupt:
            # torchrun and accelerate stop their workers (each in a session of its own, out of reach of
            # the terminal's Ctrl-C) on SIGTERM; a SIGKILL would leave them training unattended.
            launcher_process.send_signal(signal.SIGTERM)
            launcher_process.wait()
            raise
        if code and failure.exists():
            # A process refused the run (bad data, a bad parent, ...): raised here too, so the command exits
            # 2 as a one-process run does, and the problem and its fix come last, after the launcher's report.
            raise LoradockError(**json.loads(failure.read_text()))
        return code
    finally:
        config_file.unlink(missing_ok=True)
        failure.unlink(missing_ok=True)


def record_failure(error: LoradockError) -> None:
    """In a launched process: keep `error` for the launcher (the first process to refuse is the one kept)."""
    path = os.environ.get(FAILURE)
    if not path:
        return
    try:
        with open(path, "x") as out:
            json.dump({"problem": error.problem, "fix": error.fix, "details": error.details}, out)
    except OSError:
        pass  # another process refused first, or the folder is gone: its own output still says why


# --- inside the launched processes -------------------------------------------------------------

def world_size() -> int:
    """The number of processes in this run (torchrun, accelerate and DeepSpeed all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def state():
    """accelerate's PartialState of this process (the Trainer's TrainingArguments set it up first)."""
    from accelerate import PartialState

    return PartialState(cpu=not cuda_available())


def is_main() -> bool:
    return world_size() == 1 or state().is_main_process


def main_first():
    """A block the main process runs first and the others after it (they then find its work done)."""
    return state().main_process_first() if world_size() > 1 else nullcontext()


def wait_for_everyone() -> None:
    if world_size() > 1:
        state().wait_for_everyone()


class FailedOnMain(SystemExit):
    """The main process refused the run (its error is printed there); the others exit with its status."""

    def __init__(self):
        super().__init__(2)


def on_main(work: Callable[[], T]) -> T:
    """`work()` on the main process only; its result, pickled, reaches every process.

    A LoradockError on the main process is raised there (and printed once); the other processes
    exit with status 2 instead of waiting for a result that never comes.
    """
    if world_size() == 1:
        return work()
    import torch.distributed as dist

    payload: list = [None]
    if state().is_main_process:
        try:
            payload = [("ok", work())]
        except LoradockError as error:
            dist.broadcast_object_list([("failed", None)], src=0, device=state().device)
            raise error
    dist.broadcast_object_list(payload, src=0, device=state().device)
    kind, value = payload[0]
    if kind == "failed":
        raise FailedOnMain()
    return value


def check_processes(trainer_args) -> None:
    """The launcher's process count against what the Trainer sees (a CPU run without ACCELERATE_USE_CPU
    would train N separate single-process copies)."""
    expected = int(os.environ.get(PROCESSES, trainer_args.world_size))
    if trainer_args.world_size != expected:
        raise LoradockError(f"{expected} processes were launched but the Trainer sees {trainer_args.world_size}",
                            "launch through `loradock train --nproc N`, which sets up the processes' environment "
                            "(on a CPU ACCELERATE_USE_CPU=true; under accelerate, a config whose processes run on GPUs)")


def check_in_step(trainer) -> None:
    """Every process holds the same trained weights (none sharded): the processes trained one adapter,
    not each its own copy. A collective; a no-op in a one-process or sharded run."""
    sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
    if world_size() == 1 or sharded:
        return
    import torch
    import torch.distributed as dist

    model = trainer.accelerator.unwrap_model(trainer.model)
    total = sum(float(p.detach().double().abs().sum()) for p in model.parameters() if p.requires_grad)
    totals: list = [None] * world_size()
    dist.all_gather_object(totals, total)
    if not torch.allclose(torch.tensor(totals), torch.tensor(totals[0]).expand(len(totals)), rtol=1e-6):
        if not state().is_main_process:
            raise FailedOnMain()  # the main process says why
        raise LoradockError(f"the {world_size()} processes ended with different adapter weights (sums of |w|: "
                            f"{', '.join(f'{t:.6g}' for t in totals)}): they trained separate copies",
                            "report this as a bug (the Trainer did not wrap the model for its processes); nothing "
                            "was published")


def gathered_state_dict(trainer) -> dict | None:
    """On every process (it is a collective): the full state dict of a sharded model; None when each
    process holds the whole model and the main process can save its own."""
    deepspeed = getattr(trainer, "is_deepspeed_enabled", False)
    if not (deepspeed or getattr(trainer, "is_fsdp_enabled", False)):
        return None
    model = trainer.model_wrapped if deepspeed else trainer.model  # the engine / the FSDP-wrapped model
    return trainer.accelerator.get_state_dict(model)

