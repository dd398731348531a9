"""Find tokenward tokens in bytes, files, trees and git history; no false positives.

One compiled bytes regex, derived from :data:`tokenward.tokens.format.TOKEN_PATTERN` (the
format is defined there only), runs over each file's whole buffer; every candidate is then
confirmed by its checksum (:func:`~tokenward.tokens.format.parse_token`), so a string of the
right shape with a wrong check is never reported. Line numbers are counted for hits only.

Where the files come from:

* a directory inside a git work tree: ``git ls-files --cached --others --exclude-standard``
  (exactly git's idea of what is ignored: every ``.gitignore``, ``info/exclude``, the global
  excludes; a tracked file is never ignored);
* a directory elsewhere: a walk that reads each ``.gitignore`` it meets, with ``pathspec``'s
  gitignore semantics (a deeper file decides before a shallower one);
* ``include_ignored``: every file (``.git`` folders excepted: ``--git`` reads history);
* a file named on the command line is always scanned.

Binary files (a NUL byte in their first 8 KiB, as git and grep decide) are skipped unless
asked for, and counted, so a summary can say so.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from tokenward.tokens.format import TOKEN_PATTERN, TokenFormatError, parse_token, token_hint

if TYPE_CHECKING:  # imported when a .gitignore is met outside git (it takes a while)
    import pathspec

#: :data:`TOKEN_PATTERN` over bytes, less its leading ``\b``: a pattern that starts with a
#: literal (``tw_``) is searched for at memchr speed, one that starts with ``\b`` is tried at
#: every position (ten times slower). The boundary is checked by hand for each match
#: (:func:`_starts_a_word`); no true match can hide inside a refused one (a token has ``_``
#: only at its 3rd and 8th characters, so ``tw_`` cannot start within one).
_BOUNDARY = "\\b"
assert TOKEN_PATTERN.pattern.startswith(_BOUNDARY)
TOKEN_BYTES = re.compile(TOKEN_PATTERN.pattern.removeprefix(_BOUNDARY).encode("ascii"))
_WORD = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
#: every token starts with it: a buffer without it is skipped at memchr speed
_PREFIX = b"tw_"
#: how much of a file decides whether it is binary
BINARY_SNIFF = 8192
#: files at least this large are mapped rather than read
MMAP_THRESHOLD = 1 << 20
_READ = os.O_RDONLY | getattr(os, "O_BINARY", 0)  # Windows would translate newlines


@dataclass(frozen=True, slots=True)
class Finding:
    """One confirmed token at one place. ``token`` is the secret: never print it."""

    path: str
    line: int
    column: int
    token: str = field(repr=False)
    #: the git object it was found in (``--git``), else ``None``
    blob: str | None = None

    @property
    def hint(self) -> str:
        return token_hint(self.token)

    @property
    def location(self) -> str:
        where = f"{self.path}:{self.line}:{self.column}"
        return f"{where} (git {self.blob[:12]})" if self.blob else where


@dataclass(slots=True)
class ScanStats:
    files: int = 0
    bytes: int = 0
    binary_skipped: int = 0
    unreadable: int = 0
    git_objects: int = 0


def find_in_bytes(data: bytes | mmap.mmap, path: str, blob: str | None = None) -> list[Finding]:
    """Every confirmed token in ``data``, with its line and column (1-based)."""
    if data.find(_PREFIX) < 0:
        return []
    found: list[Finding] = []
    line, counted_to = 1, 0
    for match in TOKEN_BYTES.finditer(data):
        start = match.start()
        if start > 0 and data[start - 1] in _WORD:  # the pattern's leading \b
            continue
        candidate = match.group(0).decode("ascii")
        try:
            parse_token(candidate)
        except TokenFormatError:
            continue
        if isinstance(data, bytes):
            line += data.count(b"\n", counted_to, start)
        else:  # an mmap has no count(): its slice is a copy of the part up to this hit only
            line += data[counted_to:start].count(b"\n")
        counted_to = start
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        found.append(Finding(path, line, column, candidate, blob))
    return found


def is_binary(data: bytes | mmap.mmap) -> bool:
    return data.find(b"\0", 0, BINARY_SNIFF) >= 0


def scan_file(path: str, display: str, stats: ScanStats, *, binary: bool = False) -> list[Finding]:
    """The findings of one file (an unreadable file is counted, not raised)."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        stats.unreadable += 1
        return []
    try:
        size = os.fstat(fd).st_size
        stats.files += 1
        stats.bytes += size
        if size == 0:
            return []
        if size >= MMAP_THRESHOLD:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                if not binary and is_binary(mapped):
                    stats.binary_skipped += 1
                    return []
                return find_in_bytes(mapped, display)
        data = _read_all(fd, size)
    except OSError:
        stats.unreadable += 1
        return []
    finally:
        os.close(fd)
    if not binary and is_binary(data):
        stats.binary_skipped += 1
        return []
    return find_in_bytes(data, display)


def _read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size + 1)
    if len(data) <= size:  # the common case: one read (a file that grew is read on)
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def scan_stream(stream: BinaryIO, display: str, stats: ScanStats) -> list[Finding]:
    """Standard input (or any stream), read whole."""
    data = stream.read()
    stats.files += 1
    stats.bytes += len(data)
    return find_in_bytes(data, display)


# -- which files --------------------------------------------------------------------------
def _git_program() -> str | None:
    return shutil.which("git")


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes] | None:
    """Run git (our own arguments only, never a shell); ``None`` when git is missing."""
    program = _git_program()
    if program is None:
        return None
    try:
        return subprocess.run(  # noqa: S603 - a fixed program and arguments of ours
            [program, *args], cwd=cwd, capture_output=True, check=False, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_work_tree(directory: Path) -> bool:
    done = _git(["rev-parse", "--is-inside-work-tree"], directory)
    return done is not None and done.returncode == 0 and done.stdout.strip() == b"true"


def git_listed_files(directory: Path) -> list[str] | None:
    """The files git does not ignore under ``directory`` (``None``: git cannot tell)."""
    done = _git(["ls-files", "-z", "--cached", "--others", "--exclude-standard"], directory)
    if done is None or done.returncode != 0:
        return None
    names = dict.fromkeys(done.stdout.split(b"\0"))  # a conflicted file is listed thrice
    return [os.path.join(directory, os.fsdecode(name)) for name in names if name]


def walked_files(directory: Path, *, include_ignored: bool) -> Iterator[str]:
    """Files under ``directory`` (symbolic links not followed), ``.gitignore`` respected
    unless ``include_ignored``."""
    # (folder, its spec) for each folder on the way down that has a .gitignore
    stack: list[tuple[str, list[tuple[str, pathspec.GitIgnoreSpec]]]] = [(str(directory), [])]
    while stack:
        folder, specs = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue
        if not include_ignored and any(e.name == ".gitignore" for e in entries):
            try:
                with open(
                    os.path.join(folder, ".gitignore"), encoding="utf-8", errors="replace"
                ) as f:
                    lines = f.read().splitlines()
            except OSError:
                lines = []
            import pathspec

            specs = [*specs, (folder, pathspec.GitIgnoreSpec.from_lines(lines))]
        subfolders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name == ".git" or (specs and _ignored(entry.path, True, specs)):
                    continue
                subfolders.append((entry.path, specs))
            elif entry.is_file(follow_symlinks=False):
                if specs and _ignored(entry.path, False, specs):
                    continue
                yield entry.path
        stack.extend(reversed(subfolders))


def _ignored(path: str, is_dir: bool, specs: list[tuple[str, pathspec.GitIgnoreSpec]]) -> bool:
    """Git's rule: the deepest ``.gitignore`` with a pattern for ``path`` decides."""
    for base, spec in reversed(specs):
        relative = os.path.relpath(path, base).replace(os.sep, "/")
        result = spec.check_file(relative + "/" if is_dir else relative)
        if result.include is not None:
            return bool(result.include)
    return False


def files_under(directory: Path, *, include_ignored: bool = False) -> list[str]:
    """Every file to scan under ``directory``, in a stable order."""
    if not include_ignored and git_work_tree(directory):
        listed = git_listed_files(directory)
        if listed is not None:
            return [p for p in listed if os.path.isfile(p) and not os.path.islink(p)]
    return list(walked_files(directory, include_ignored=include_ignored))


# -- git history --------------------------------------------------------------------------
def reachable_objects(repository: Path) -> list[tuple[str, str]]:
    """(object id, path or "") of every object reachable from any ref, each once."""
    done = _git(["rev-list", "--objects", "--all"], repository)
    if done is None or done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip() if done else "git not found"
        raise GitError(message or "git rev-list failed")
    seen: dict[str, str] = {}
    for raw in done.stdout.splitlines():
        oid, _, name = raw.decode("utf-8", "replace").partition(" ")
        if oid and oid not in seen:
            seen[oid] = name
    return list(seen.items())


class GitError(RuntimeError):
    """``--git`` on a folder that is not a git repository (or git missing)."""


def scan_git_history(
    repository: Path,
    stats: ScanStats,
    progress: Callable[[int], None] | None = None,
) -> list[Finding]:
    """Every reachable blob (and commit message) once: ``git rev-list --objects --all``
    piped into one ``git cat-file --batch``."""
    objects = reachable_objects(repository)
    names = dict(objects)
    program = _git_program()
    if program is None:
        raise GitError("git not found")
    proc = subprocess.Popen(  # noqa: S603 - a fixed program and arguments of ours
        [program, "cat-file", "--batch"],
        cwd=repository,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin

    def feed() -> None:  # in its own thread: cat-file's output is read meanwhile
        try:
            for oid, _ in objects:
                stdin.write(oid.encode() + b"\n")
        except OSError:
            pass
        finally:
            stdin.close()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    found: list[Finding] = []
    out = proc.stdout
    try:
        for _ in objects:
            header = out.readline()
            if not header:
                break
            parts = header.split()
            if len(parts) < 3:  # "<oid> missing"
                continue
            oid, kind, size = parts[0].decode(), parts[1], int(parts[2])
            data = out.read(size)
            out.read(1)  # the newline after the content
            stats.git_objects += 1
            stats.bytes += size
            if progress is not None:
                progress(size)
            if kind == b"blob":
                found.extend(find_in_bytes(data, names.get(oid) or oid, blob=oid))
            elif kind in (b"commit", b"tag"):
                found.extend(find_in_bytes(data, f"{kind.decode()} message", blob=oid))
    finally:
        writer.join()
        out.close()
        proc.wait()
    return found


def scan_paths(
    files: Iterable[tuple[str, str]],
    stats: ScanStats,
    *,
    binary: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[Finding]:
    """Scan ``(path, display name)`` pairs in order."""
    found: list[Finding] = []
    for path, display in files:
        before = stats.bytes
        found.extend(scan_file(path, display, stats, binary=binary))
        if progress is not None:
            progress(stats.bytes - before)
    return found
