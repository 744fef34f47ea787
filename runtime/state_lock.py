"""One process at a time writes a state directory: an OS lock on ``<state_dir>/agent.lock``.

The model store's own lock (runtime/store.py) is a thread lock, so it orders one
process's writers only. Two agents on one state dir would each run the store's
crash recovery at start-up and delete the other's half-built versions and temp
files; a `models fetch` or `demo build` beside a running agent would do the same.
So the agent holds an exclusive ``flock`` on the lock file for its whole life,
and each CLI command that writes the store holds it while it writes. The kernel
drops the lock when its holder exits, however it exits, so a crash never leaves
a stale lock; the file stays behind and its text (PID and command) is only read
to name the holder in the refusal.

Taking the lock is also the first thing that touches the state dir, so this is
where "the state dir cannot be used" is found and said in one line, naming the
path and the permission that is missing, before anything listens or loads.
What runs under the lock, and what a refusal means to the caller, is left to the
caller (agent/cli/main.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
from pathlib import Path
from types import TracebackType

from runtime.errors import RuntimeLayerError

LOCK_NAME = "agent.lock"
#: Directories the agent writes below the state dir; each, when present, needs the same access.
SUBDIRS = ("models", "store", "staging", "tuf", "sync")


class StateDirError(RuntimeLayerError):
    """The state directory cannot be used (not a directory, or a permission is missing)."""


class StateDirBusy(StateDirError):
    """Another process holds the state directory's lock."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def _who() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _missing(path: Path) -> str:
    """The permissions this process lacks on directory `path` ("" when it has rwx)."""
    wanted = ((os.R_OK, "read"), (os.W_OK, "write"), (os.X_OK, "enter (x)"))
    return ", ".join(word for bit, word in wanted if not os.access(path, bit, effective_ids=True))


def check_state_dir(state_dir: Path) -> None:
    """Raise StateDirError unless this process can read, write and enter `state_dir` and the
    directories the agent keeps in it. A state dir that does not exist yet is fine when its
    parent lets us make it (the agent makes it at first start)."""
    state_dir = Path(state_dir)
    fix = (f"give it to the user the agent runs as (the package's service: chown -R edgefleet: {state_dir}), "
           f"or set state_dir")
    if not state_dir.exists() and not state_dir.is_symlink():
        parent = next((p for p in state_dir.parents if p.exists()), Path("/"))
        if not parent.is_dir():
            raise StateDirError(f"state dir {state_dir}: {parent} is not a directory; set state_dir to a directory")
        missing = _missing(parent)
        if "write" in missing or "enter" in missing:
            raise StateDirError(f"state dir {state_dir} does not exist and {_who()} cannot create it: no {missing} "
                                f"permission on {parent}; create it for the agent's user, or set state_dir")
        return
    if not state_dir.is_dir():
        raise StateDirError(f"state dir {state_dir} is not a directory; move it aside or set state_dir")
    for path in (state_dir, *(state_dir / sub for sub in SUBDIRS)):
        if path is not state_dir and not path.is_dir():
            continue
        missing = _missing(path)
        if missing:
            raise StateDirError(f"state dir {path}: {_who()} has no {missing} permission; {fix}")


def read_holder(state_dir: Path) -> tuple[int | None, str]:
    """(PID, command) written by whoever holds or last held the lock; (None, "") if unknown."""
    try:
        text = (Path(state_dir) / LOCK_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None, ""
    pid, _, command = text.strip().partition(" ")
    if not pid.isdigit() or not _alive(int(pid)):  # empty (being written), or left by an earlier holder
        return None, ""
    return int(pid), command


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def holder(state_dir: Path) -> tuple[int | None, str] | None:
    """Who holds `state_dir`'s lock now ((PID, command)), or None when nobody does. Takes nothing."""
    try:
        fd = os.open(Path(state_dir) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return read_holder(state_dir)
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class StateDirLock:
    """An exclusive lock on a state dir, held by this process from `acquire` to `release` (or exit).

    `command` is what this process is doing ("serve", "models fetch"), written beside its PID
    so a refused process can say who holds the state dir.
    """

    def __init__(self, state_dir: Path | str, command: str) -> None:
        self.state_dir = Path(state_dir)
        self.command = command
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.state_dir / LOCK_NAME

    def acquire(self) -> None:
        check_state_dir(self.state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateDirError(f"state dir {self.state_dir}: cannot create {LOCK_NAME}: "
                                f"{exc.strerror}; check its owner and free space, or set state_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirError(f"state dir {self.state_dir}: cannot lock {LOCK_NAME}: {exc.strerror}") from None
            pid, command = read_holder(self.state_dir)
            who = f"pid {pid}" if pid is not None else "a process that has not written its PID yet"
            doing = f" (`edgefleet {command}`)" if command else ""
            raise StateDirBusy(
                f"state dir {self.state_dir} is in use by another edgefleet process, {who}{doing}: "
                f"stop it first (systemctl stop edgefleet), or give this one its own --state-dir", pid) from None
        with contextlib.suppress(OSError):  # only the refusal message reads it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
