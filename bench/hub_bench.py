"""python bench/hub_bench.py [--sizes 20 200] [--rounds 5]

Measures the embedded registry's transfer speed against a plain copy on the same disk. It starts
`loradock hub serve` in a subprocess on a free port (--root in a temporary folder), creates a write
token, and for each size in MB (10**6 bytes) builds an adapter-like folder (adapter_config.json and
an adapter_model.safetensors of that many random bytes), then times, one after the other:

- push: `hub.client.push` to bench/adapter-<size>mb (card, client hashing, LFS upload, server
  hashing and fsync, commit), through the unmodified huggingface_hub client over 127.0.0.1;
- pull: `hub.client.pull` into a fresh folder (download, hash check of every file, one pass);
- copy: `shutil.copyfile` of the weights to a new path, then `os.fsync` (the registry fsyncs too).

Pull and copy alternate for --rounds rounds and the medians are printed (this disk's speed varies
run to run); "serve" is the registry alone, a GET of the weights read into memory. Prints MB/s of
each and the ratios to the copy. Target: pull >= 0.5x the plain copy.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loradock.procs import create_token, free_port, start_registry  # noqa: E402 (after the path is set)

MB = 10**6
TARGET = 0.5
ADAPTER_CONFIG = '{"base_model_name_or_path": "loradock/tiny-chat", "peft_type": "LORA", "r": 8}'


def make_adapter(folder: Path, size_mb: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(ADAPTER_CONFIG)
    weights = folder / "adapter_model.safetensors"
    with weights.open("wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(MB))
    return weights


def copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with dst.open("rb+") as f:
        os.fsync(f.fileno())


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def bench_size(size_mb: int, work: Path, endpoint: str, token: str, rounds: int) -> dict:
    """Push once; then `rounds` times a pull and a copy, alternating so that both meet the same disk."""
    import huggingface_hub.hf_api  # noqa: F401  (imports before the clock starts; hub.client imports the card code)
    from hub.client import pull, push

    weights = make_adapter(work / f"adapter-{size_mb}mb", size_mb)
    repo_id = f"bench/adapter-{size_mb}mb"
    push_s = timed(push, str(weights.parent), repo_id, endpoint=endpoint, token=token)
    url = f"{endpoint}/{repo_id}/resolve/main/adapter_model.safetensors"
    pulls, copies, serves = [], [], []
    for i in range(rounds):
        pulls.append(timed(pull, repo_id, to=str(work / f"pulled-{size_mb}mb-{i}"), endpoint=endpoint, token=token))
        copies.append(timed(copy_fsync, weights, work / f"copy-{size_mb}mb-{i}.safetensors"))
        serves.append(timed(read_into_memory, url))
    return {"size": size_mb, "push": size_mb / push_s, "pull": size_mb / statistics.median(pulls),
            "copy": size_mb / statistics.median(copies), "serve": size_mb / statistics.median(serves)}


def read_into_memory(url: str) -> None:
    """The registry alone: one GET of the weights, read into a buffer (no hashing, no disk)."""
    buffer = memoryview(bytearray(8 << 20))
    with urllib.request.urlopen(url) as response:
        while response.readinto(buffer):
            pass


def report(rows: list[dict]) -> None:
    header = ("size", "push MB/s", "pull MB/s", "copy MB/s", "serve MB/s", "pull/copy", "push/copy", "serve/copy")
    lines = [header] + [(f"{r['size']} MB", f"{r['push']:.1f}", f"{r['pull']:.1f}", f"{r['copy']:.1f}",
                         f"{r['serve']:.1f}", f"{r['pull'] / r['copy']:.2f}x", f"{r['push'] / r['copy']:.2f}x",
                         f"{r['serve'] / r['copy']:.2f}x") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    print()
    for r in rows:
        ratio = r["pull"] / r["copy"]
        verdict = "PASS" if ratio >= TARGET else "MISS"
        print(f"{r['size']} MB: pull is {ratio:.2f}x copy (target >= {TARGET}x): {verdict}")


def run(sizes: list[int], tmp: Path, rounds: int) -> list[dict]:
    """Everything inside `tmp`: the registry, the adapters, the copies, and the client's state."""
    for name, var in (("home", "LORADOCK_HOME"), ("config", "LORADOCK_CONFIG_DIR"), ("hf", "HF_HOME")):
        (tmp / name).mkdir()
        os.environ[var] = str(tmp / name)
    # PYTHONPATH: the registry's process imports this checkout too, wherever this is run from.
    os.environ.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for var in ("HF_TOKEN", "HF_ENDPOINT"):
        os.environ.pop(var, None)
    root, work, port = tmp / "registry", tmp / "work", free_port()
    with start_registry(root, port, tmp / "server.log"):
        token = create_token(root, "bench")
        return [bench_size(size, work, f"http://127.0.0.1:{port}", token, rounds) for size in sizes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200], help="adapter sizes in MB")
    parser.add_argument("--rounds", type=int, default=5, help="pulls and copies per size (medians are printed)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="loradock-hub-bench-"))
    try:
        rows = run(args.sizes, tmp, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
