"""python bench/hub_bench.py [--sections transfer listing gc blobs] [--sizes 20 200] [--rounds 5]

Measures the embedded registry. It starts `loradock hub serve` in a subprocess on a free port
(--root in a temporary folder), creates a write token, and runs each section named, in one run:

transfer: for each size in MB (10**6 bytes) it builds an adapter-like folder (adapter_config.json
and an adapter_model.safetensors of that many random bytes), then times, one after the other:
- push: `hub.client.Registry.push` to bench/adapter-<size>mb (card, client hashing, LFS upload, server
  hashing and fsync, commit), through the unmodified huggingface_hub client over 127.0.0.1;
- pull: `hub.client.Registry.pull` into a fresh folder (download, hash check of every file, one pass);
- copy: `shutil.copyfile` of the weights to a new path, then `os.fsync` (the registry fsyncs too).
Pull and copy alternate for --rounds rounds and the medians are printed (this disk's speed varies
run to run); "serve" is the registry alone, a GET of the weights read into memory. Prints MB/s of
each and the ratios to the copy. Target: pull >= 0.5x the plain copy.

listing: `HfApi.list_models` latency (median, p90 and range over --calls calls), anonymous and
with one user's token, all repos and the first 20 (`limit=20`), with 100 repos and again with
1,000, across 20 users (every 4th repo of each private); the ratios show how a listing scales.
Visibility should be filtered in the query, not by looking at every repo per request.

gc: a commit of 1,000 small inline files (referenced blobs), then --rounds times 9,000 orphan
blobs written straight into blobs/ with an old mtime, and `hub.gc.collect` timed in this process
on those 10,000 blobs: a dry run, then the real one (page cache warm: the files are fresh).

blobs: `BlobStore.put_many` of 1,000 blobs of 1 KiB (one sync for the batch) against `put` of
each (an fsync per blob and per folder), --rounds times, in a folder of its own.
"""

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loradock.procs import create_token, free_port, start_registry  # noqa: E402 (after the path is set)

MB = 10**6
TARGET = 0.5
SECTIONS = ("transfer", "listing", "gc", "blobs")
USERS, REPO_COUNTS = 20, (100, 1000)
REFERENCED, ORPHANS = 1000, 9000
OLD = time.time() - 86400  # an mtime gc's grace period does not protect
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
    from hub.client import Registry

    weights = make_adapter(work / f"adapter-{size_mb}mb", size_mb)
    repo_id, door = f"bench/adapter-{size_mb}mb", Registry(endpoint, token)
    push_s = timed(door.push, str(weights.parent), repo_id)
    url = f"{endpoint}/{repo_id}/resolve/main/adapter_model.safetensors"
    pulls, copies, serves = [], [], []
    for i in range(rounds):
        pulls.append(timed(door.pull, repo_id, to=str(work / f"pulled-{size_mb}mb-{i}")))
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


def report_transfer(rows: list[dict]) -> None:
    header = ("size", "push MB/s", "pull MB/s", "copy MB/s", "serve MB/s", "pull/copy", "push/copy", "serve/copy")
    lines = [header] + [(f"{r['size']} MB", f"{r['push']:.1f}", f"{r['pull']:.1f}", f"{r['copy']:.1f}",
                         f"{r['serve']:.1f}", f"{r['pull'] / r['copy']:.2f}x", f"{r['push'] / r['copy']:.2f}x",
                         f"{r['serve'] / r['copy']:.2f}x") for r in rows]
    print_table(lines)
    print()
    for r in rows:
        ratio = r["pull"] / r["copy"]
        verdict = "PASS" if ratio >= TARGET else "MISS"
        print(f"{r['size']} MB: pull is {ratio:.2f}x copy (target >= {TARGET}x): {verdict}")


def print_table(lines: list[tuple]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def threaded(fn, items: list) -> list:
    """`fn` of each item on 8 threads (the registry serves requests concurrently); results in order."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, items))


def latencies(fn, calls: int) -> dict:
    """Milliseconds of `calls` calls of `fn`: median, p90, fastest, slowest."""
    ms = [timed(fn) * 1000 for _ in range(calls)]
    return {"median": statistics.median(ms), "p90": statistics.quantiles(ms, n=10)[-1], "min": min(ms), "max": max(ms)}


def bench_listing(root: Path, endpoint: str, calls: int) -> list[dict]:
    """Users with a token each; repos added up to each of REPO_COUNTS, and after each step the
    listing timed anonymously and as the first user."""
    from hub.client import hub_api

    users = [f"user{i:02d}" for i in range(USERS)]
    tokens = dict(zip(users, threaded(lambda user: create_token(root, user), users)))
    apis = {user: hub_api(endpoint, tokens[user]) for user in users}
    rows, made = [], 0
    for count in REPO_COUNTS:
        # Repo i belongs to user i % USERS; every 4th repo of each user is private.
        threaded(lambda i: apis[users[i % USERS]].create_repo(f"{users[i % USERS]}/model-{i:04d}",
                                                              private=(i // USERS) % 4 == 3), range(made, count))
        made = count
        for caller, api in (("anonymous", hub_api(endpoint, None)), (users[0], apis[users[0]])):
            rows.append({"repos": count, "caller": caller, "visible": len(list(api.list_models())),
                         "all": latencies(lambda: list(api.list_models()), calls),
                         "first 20": latencies(lambda: list(api.list_models(limit=20)), calls)})
    return rows


def latency_cell(t: dict) -> str:
    return f"{t['median']:.1f} / {t['p90']:.1f} ({t['min']:.1f}-{t['max']:.1f})"


def spread(seconds: list[float], scale: float = 1, unit: str = "s", digits: int = 2) -> str:
    """The median and the range of some timings: 0.41 s (0.39-0.47)."""
    median, low, high = (f"{v * scale:.{digits}f}" for v in (statistics.median(seconds), min(seconds), max(seconds)))
    return f"{median} {unit} ({low}-{high})"


def report_listing(rows: list[dict], calls: int) -> None:
    print(f"list_models, ms over {calls} calls: median / p90 (fastest-slowest)")
    print_table([("repos", "caller", "visible", "all", "first 20")] +
                [(str(r["repos"]), r["caller"], str(r["visible"]), latency_cell(r["all"]), latency_cell(r["first 20"]))
                 for r in rows])
    small, large = REPO_COUNTS
    for caller in dict.fromkeys(r["caller"] for r in rows):
        a, b = [next(r for r in rows if r["caller"] == caller and r["repos"] == n) for n in (small, large)]
        print(f"{caller}: {large} repos / {small} repos, median: all {b['all']['median'] / a['all']['median']:.1f}x, "
              f"first 20 {b['first 20']['median'] / a['first 20']['median']:.1f}x")


def make_orphans(blobs: Path, count: int) -> None:
    """`count` blobs of 1 KiB that no commit references, written in place, modified a day ago."""
    for _ in range(count):
        name = secrets.token_hex(32)
        path = blobs / name[:2] / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(1024))
        os.utime(path, (OLD, OLD))


def bench_gc(root: Path, endpoint: str, token: str, rounds: int) -> dict:
    from huggingface_hub import CommitOperationAdd

    from hub.client import hub_api
    from hub.gc import collect

    api = hub_api(endpoint, token)
    api.create_repo("bench/many-files")
    operations = [CommitOperationAdd(f"files/{i:05d}.txt", f"file {i}\n".encode()) for i in range(REFERENCED)]
    commit_s = timed(api.create_commit, "bench/many-files", operations, commit_message="many small files")
    dry, real = [], []
    for _ in range(rounds):
        make_orphans(root / "blobs", ORPHANS)
        for runs, dry_run in ((dry, True), (real, False)):
            start = time.perf_counter()
            done = collect(root, dry_run=dry_run)
            runs.append(time.perf_counter() - start)
            assert done.removed == ORPHANS, f"gc found {done.removed} orphans, not the {ORPHANS} written"
    return {"commit": commit_s, "dry": dry, "real": real, "blobs": done.referenced + ORPHANS}


def report_gc(result: dict) -> None:
    print(f"commit of {REFERENCED} inline files: {result['commit']:.2f} s")
    print(f"gc of {result['blobs']:,} blobs ({ORPHANS:,} orphans), median (range) over {len(result['real'])} rounds: "
          f"dry run {spread(result['dry'])}, real {spread(result['real'])}, "
          f"real / dry run {statistics.median(result['real']) / statistics.median(result['dry']):.1f}x")


def bench_blobs(folder: Path, rounds: int, count: int = 1000) -> dict:
    from hub.blobs import BlobStore

    batch, each = [], []
    for i in range(rounds):
        store = BlobStore(folder / f"batch-{i}", max_file_size=MB)
        batch.append(timed(store.put_many, [os.urandom(1024) for _ in range(count)]))
        store, datas = BlobStore(folder / f"each-{i}", max_file_size=MB), [os.urandom(1024) for _ in range(count)]
        each.append(timed(lambda: [store.put(data) for data in datas]))
    return {"count": count, "batch": batch, "each": each}


def report_blobs(result: dict) -> None:
    ms = {"scale": 1000, "unit": "ms", "digits": 0}
    print(f"{result['count']} blobs of 1 KiB, median (range) over {len(result['batch'])} rounds: put_many "
          f"{spread(result['batch'], **ms)}, put of each {spread(result['each'], **ms)}, "
          f"put of each / put_many {statistics.median(result['each']) / statistics.median(result['batch']):.1f}x")


def run(args, tmp: Path) -> dict:
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
    endpoint, results = f"http://127.0.0.1:{port}", {}
    with start_registry(root, port, tmp / "server.log"):
        token = create_token(root, "bench")
        if "transfer" in args.sections:
            results["transfer"] = [bench_size(size, work, endpoint, token, args.rounds) for size in args.sizes]
        if "listing" in args.sections:
            results["listing"] = bench_listing(root, endpoint, args.calls)
        if "gc" in args.sections:
            results["gc"] = bench_gc(root, endpoint, token, args.rounds)
    if "blobs" in args.sections:
        results["blobs"] = bench_blobs(tmp / "blob-stores", args.rounds)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200], help="transfer: adapter sizes in MB")
    parser.add_argument("--rounds", type=int, default=5, help="pulls and copies per size, gc and blob rounds")
    parser.add_argument("--calls", type=int, default=50, help="listing: calls per measurement")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="loradock-hub-bench-"))
    try:
        results = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for section, show in (("transfer", report_transfer), ("listing", lambda r: report_listing(r, args.calls)),
                          ("gc", report_gc), ("blobs", report_blobs)):
        if section in results:
            print(f"\n== {section}")
            show(results[section])
    return 0


if __name__ == "__main__":
    sys.exit(main())
