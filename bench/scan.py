"""``tokenward scan`` against ``grep -rE`` with the same regex, on one generated tree.

Generates (in a temporary folder) a tree of about 100 MB in 20,000 text files with real
tokens and look-alikes (right shape, wrong checksum) planted here and there, warms the page
cache, then times each tool end to end (process start included), alternating, best of
``--rounds``. Prints MB/s for both and the ratio (the target: tokenward within 2x of grep).

    .venv/bin/python bench/scan.py [--mb 100] [--files 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenward.tokens.format import TOKEN_PATTERN, generate_token

WORDS = [
    "".join(random.Random(i).choices(string.ascii_lowercase, k=random.Random(i).randint(2, 10)))
    for i in range(2000)
] + ["tw_", "token", "=", "{", "}", "(", ")", "tw_live", "tw_test_", "import", "return"]


def generate(root: Path, megabytes: int, files: int, seed: int = 7) -> tuple[int, int]:
    """Write the tree; return (bytes written, tokens planted)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(20_000):
        lines.append(" ".join(rng.choices(WORDS, k=rng.randint(3, 16))))
    text = ("\n".join(lines) + "\n").encode()
    per_file = megabytes * 1_000_000 // files
    written = planted = 0
    for index in range(files):
        folder = root / f"d{index % 97:02d}" / f"s{index % 13}"
        folder.mkdir(parents=True, exist_ok=True)
        size = max(64, int(per_file * rng.uniform(0.2, 1.8)))
        start = rng.randrange(0, len(text) - size - 1)
        body = bytearray(text[start : start + size])
        if index % 400 == 0:  # a real token now and then, and a look-alike
            token = generate_token("live").encode()
            fake = token[:-1] + (b"A" if token[-1:] != b"A" else b"B")
            body += b"\nAPI_KEY=" + token + b"\nOTHER=" + fake + b"\n"
            planted += 1
        (folder / f"f{index}.txt").write_bytes(body)
        written += len(body)
    return written, planted


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{command[0]} failed: {done.stderr.decode()[-400:]}")
    return elapsed, cpu, done.stdout.decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("grep") is None:
        raise SystemExit("grep is needed")
    ere = TOKEN_PATTERN.pattern.replace("(?:", "(")  # the same regex, as POSIX ERE
    root = Path(tempfile.mkdtemp(prefix="tokenward-scan-bench-"))
    try:
        size, planted = generate(root, args.mb, args.files)
        scan = [sys.executable, "-m", "tokenward", "scan", "--json", str(root)]
        startup = [sys.executable, "-m", "tokenward", "scan", "--help"]
        grep = ["grep", "-rEoh", ere, str(root)]
        timed(grep)  # warm the page cache
        found = len(json.loads(timed(scan)[2])["findings"])
        best: dict[str, list[float]] = {}
        matches = 0
        for _ in range(args.rounds):
            for name, command in (("grep", grep), ("tokenward", scan), ("startup", startup)):
                wall, cpu, out = timed(command)
                if name == "grep":
                    matches = len(out.split())
                old = best.get(name, [float("inf"), float("inf")])
                best[name] = [min(old[0], wall), min(old[1], cpu)]
        mb = size / 1e6
        g, t, s = best["grep"], best["tokenward"], best["startup"]
        work = [max(t[0] - s[0], 1e-9), max(t[1] - s[1], 1e-9)]
        print(f"tree: {mb:.1f} MB in {args.files} files, {planted} tokens planted")
        print("                     wall s   MB/s (wall)   CPU s   MB/s (CPU)")
        for label, (wall, cpu) in (
            ("grep -rE", g),
            ("tokenward scan", t),
            ("  start-up only", s),
            ("  scan work", work),
        ):
            print(f"{label:<18} {wall:8.3f} {mb / wall:10.1f} {cpu:9.3f} {mb / cpu:10.1f}")
        print(
            f"grep: {matches} shape matches (look-alikes included); "
            f"tokenward: {found} confirmed by checksum"
        )
        print(f"ratio tokenward/grep, end to end: wall {t[0] / g[0]:.2f}, CPU {t[1] / g[1]:.2f}")
        print(
            f"ratio tokenward/grep, scan work:  wall {work[0] / g[0]:.2f}, CPU {work[1] / g[1]:.2f}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
