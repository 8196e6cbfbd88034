"""python bench/data_check_bench.py [--rows 100000 1000000] [--long-line-mb 50] [--loradock-home DIR]

Runs `loradock data check` in a subprocess on files it writes into a temp folder and prints, per
file, the wall time, rows/s and the peak RSS of that process (its own `wait4` rusage, so each run
is measured alone): short rows at each --rows count side by side, so memory growth with the file
shows, and one file whose single line is --long-line-mb MB long among 99 short rows (the check
must report it as over max length, without tokenizing it). Target: 1M short rows under 2 GB.

The base model's tokenizer comes from $LORADOCK_HOME (or --loradock-home): build it once with
`loradock base build`.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "cat dog sun red blue tree car one two three fish bird moon star rain".split()


def short_rows(path: Path, n: int, seed: int = 0) -> Path:
    """n rows of 2 to 6 words to repeat (about 20 tokens each), written in blocks."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for start in range(0, n, 10_000):
            lines = []
            for _ in range(min(10_000, n - start)):
                words = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
                lines.append(json.dumps({"prompt": f"Repeat the words: {words}", "response": words}))
            f.write("\n".join(lines) + "\n")
    return path


def long_line(path: Path, megabytes: int) -> Path:
    short_rows(path, 99)
    with path.open("a") as f:
        f.write(json.dumps({"prompt": "Repeat the words: " + "cat " * (megabytes * 2**20 // 4), "response": "cat"}) + "\n")
    return path


def measure(data: Path, env: dict) -> dict:
    """One `loradock data check` run: exit code, wall seconds, peak RSS (bytes) and its output."""
    command = [sys.executable, "-m", "loradock.cli", "data", "check", str(data)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"code": process.returncode, "seconds": time.perf_counter() - start,
            "peak_rss": usage.ru_maxrss * 1024, "output": output}  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--long-line-mb", type=int, default=50, help="0: skip the long-line file")
    parser.add_argument("--loradock-home", help="where the base model is built (default: $LORADOCK_HOME)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.loradock_home:
        env["LORADOCK_HOME"] = str(Path(args.loradock_home).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'file':<22} {'exit':>4} {'seconds':>8} {'rows/s':>9} {'peak RSS':>10}")
        for n in args.rows:
            result = measure(short_rows(Path(tmp) / f"rows-{n}.jsonl", n), env)
            print(f"{f'{n:,} short rows':<22} {result['code']:>4} {result['seconds']:>8.1f} "
                  f"{n / result['seconds']:>9,.0f} {result['peak_rss'] / 2**20:>7,.0f} MiB", flush=True)
            if result["code"] != 0:
                print(result["output"][-2000:])
        if args.long_line_mb:
            result = measure(long_line(Path(tmp) / "long-line.jsonl", args.long_line_mb), env)
            reported = "over max length" in result["output"]
            print(f"{f'one {args.long_line_mb} MB line':<22} {result['code']:>4} {result['seconds']:>8.1f} "
                  f"{'':>9} {result['peak_rss'] / 2**20:>7,.0f} MiB  "
                  f"{'reported as over max length' if reported else 'NOT reported as over max length'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
