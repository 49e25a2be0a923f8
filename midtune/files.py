"""Files: the one way midtune writes them (atomically) and reads JSONL.

Every file or directory another process may read — a checkpoint, final/, run.json, an extraction shard, an eval
result, a report — is written into a temporary sibling, flushed to disk and renamed over its target, so a crash
or a full disk never leaves a half-written file where a complete one is expected: a reader sees the old version
or the new one. `fault_point` lets the reliability tests crash a real process in the middle of such a write.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write; on success it is flushed and renamed to `target`. On
    failure it is removed and an existing `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fault_point(f"atomic_file:{target.name}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    """`target` holds `text` (UTF-8), written atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, obj: Any, indent: int | None = 1, **dumps_kwargs) -> None:
    """`target` holds `obj` as JSON, written atomically."""
    write_text(target, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it becomes `target` by rename (an existing
    target is first renamed aside, then deleted). On failure the temporary directory is removed."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fault_point(f"atomic_dir:{target.name}")
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the complete directory `tmp` to `target`. An existing target is renamed aside first and deleted
    only after the new one is in place, so at every instant one complete copy exists under a known name."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk, so a rename never publishes data still in the page cache."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def copy_file(source: str | Path, target: str | Path) -> None:
    """`source`'s bytes copied to `target`, atomically."""
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)


def save_figure(fig, target: str | Path, **savefig_kwargs) -> None:
    """A matplotlib figure saved atomically (its format from `target`'s suffix)."""
    with atomic_file(target) as tmp:
        fig.savefig(tmp, format=Path(target).suffix.lstrip(".") or "png", **savefig_kwargs)


def cache_dir(*parts: str) -> Path:
    """Where midtune keeps what it can rebuild but would rather not, between runs: $MIDTUNE_CACHE/<parts>
    (default ~/.cache/midtune/<parts>): the canonical shapes world, data checks, the benchmarks' models."""
    root = os.environ.get("MIDTUNE_CACHE") or Path.home() / ".cache" / "midtune"
    return Path(root).joinpath(*parts)


# ---------------------------------------------------------------------------------------------------------
# Reading JSONL
# ---------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, *, error: type[Exception] = ValueError, first: int = 1, unit: str = "line",
               skip_invalid: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield (number, value) for each non-blank line of a JSONL file, streaming (a 665k-row file is never held
    as one string). Lines count from `first` and are called `unit` in errors, so each caller keeps the
    numbering its users know ("row 0" for training data, "line 1" elsewhere). A line that is not JSON raises
    `error` naming the file and the line — or, with `skip_invalid` (a log whose last line a crash cut short),
    is skipped."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, first):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                if skip_invalid:
                    continue
                raise error(f"{path}: {unit} {number}: not valid JSON ({e.msg} at column {e.colno})") from None


# ---------------------------------------------------------------------------------------------------------
# Fault injection (tests)
# ---------------------------------------------------------------------------------------------------------

FAULT_ENV = "MIDTUNE_FAULT"
_fault_visits: collections.Counter = collections.Counter()


def fault_point(name: str) -> None:
    """A place where the reliability tests inject a fault into a real process. `MIDTUNE_FAULT=NAME[@N]:ACTION`
    acts the N-th time (default: the first) execution reaches the point `NAME`: `kill` sends this process
    SIGKILL (a crash mid-write), `enospc` raises the OSError a full disk gives. Unset, it does nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, _, action = spec.rpartition(":")
    point, _, nth = where.partition("@")
    if point != name:
        return
    _fault_visits[name] += 1
    if _fault_visits[name] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    else:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown action {action!r} (kill or enospc)")
