"""One raygpt process at a time in a run directory: ``with run_lock(run_dir, "pretrain"):``.

Two processes writing into one run dir (a resubmitted job beside the one still running) would delete each other's
Ray Train experiment folder, interleave metrics and replace each other's exports. Every command that writes into
``run.dir`` (``run``, ``tokenize``, ``tokenize-finetune``, ``pretrain``, ``finetune``, ``export``, and
``init-export`` / ``import-hf`` to their default targets) holds the run dir's lock, ``<run.dir>/raygpt.lock``, a
small JSON record of its holder (host, pid, command, since). A second process is refused with
:class:`RunDirBusy`, whose message names the holder. The lock is released when the block ends: normally, on an
error, on Ctrl-C, and on SIGTERM (turned into ``SystemExit`` while the lock is held in the main thread). Within one
process the lock is re-entrant, so the stages of ``raygpt run`` take it again under the run's own hold.

Local disk (:class:`LocalLock`): the record is written to a temporary file and hard-linked to the lock's name;
``link`` fails if the name exists, atomically, on local filesystems and NFS alike, so exactly one process gets it
and a reader never sees a partial record. A process killed outright (SIGKILL, the OOM killer) leaves its lock
behind: a lock whose holder ran on this host and is gone (its pid is not alive, or now belongs to a process
started at another time) is stale and taken over, under an ``flock`` on a file in this host's temp dir so that two
processes never both take over the same stale lock. A holder on another host cannot be judged from here: its lock
is left alone, and the message says which file to delete once that process is known to be gone.

Object stores (:class:`RemoteLock`): S3 through pyarrow offers no conditional write (no create-if-absent, no
compare-and-swap), so the lock is a lease. The record carries an expiry (``ttl`` seconds ahead) that the holder
renews every ``ttl / 4`` from a background thread; a lock past its expiry is free. To take it, a process reads the
record (refusing a live one), writes its own, waits ``settle`` seconds and reads it back: the last writer wins and
every other contender sees the winner's record on its read-back and is refused. What this guarantees, on a store
with strong read-after-write consistency (S3, GCS, MinIO):

* two contenders are never both admitted, provided neither takes longer than ``settle`` (2 s) between reading the
  lock and writing it, and the hosts' clocks agree to well within ``ttl`` (60 s);
* a holder that cannot renew for longer than ``ttl`` (stalled, partitioned) may lose the lock to another process.
  It finds out at its next renewal (a warning on stderr) and at the next stage it enters (:class:`RunDirBusy`),
  and its release never deletes the new holder's record;
* a holder killed outright blocks the run dir until its lease expires (at most ``ttl``).

Nothing stronger is possible without a conditional write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline import storage

DEFAULT_TTL_S = 60.0
DEFAULT_SETTLE_S = 2.0


class RunDirBusy(RuntimeError):
    """Another raygpt process holds the run directory; the message names it and what to do."""


def _now_iso(seconds: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), to tell it from a later process that
    reuses its pid; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    if started is None:
        return True
    now = _start_ticks(pid)
    return now is None or now == started


class _Lock:
    """What both kinds share: the holder's record and the refusal message."""

    def __init__(self, location: str, run_dir: str, command: str) -> None:
        self.location = location
        self.run_dir = run_dir
        self.command = command
        self.owner = uuid.uuid4().hex
        self.lost: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": pid,
            "started": _start_ticks(pid),
            "command": self.command,
            "since": _now_iso(),
            "run_dir": self.run_dir,
        }

    def busy(self, holder: dict[str, Any], advice: str) -> RunDirBusy:
        return RunDirBusy(
            f"run dir {self.run_dir} is in use by `raygpt {holder.get('command', '?')}` on host "
            f"{holder.get('host', '?')} (pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); wait for "
            f"it to finish or stop it. {advice}"
        )

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def verify(self) -> None:
        """Raise :class:`RunDirBusy` when the lock is no longer this process's."""
        raise NotImplementedError


class LocalLock(_Lock):
    """The lock on a local (or NFS) run dir: a hard-linked record, stale once its holder on this host is gone."""

    def __init__(self, location: str, run_dir: str, command: str) -> None:
        super().__init__(location, run_dir, command)
        self.path = storage.local_path(location)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # not a record this module wrote: held by something unknown
            return {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        return not _alive(holder["pid"], holder.get("started"))

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{self.owner}")
        temporary.write_text(json.dumps(self.record()))
        try:
            for _attempt in range(5):
                try:
                    os.link(temporary, self.path)
                    return
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:  # released in between
                    continue
                if not self._stale(holder):
                    raise self.busy(holder, self._advice(holder))
                self._remove_stale(holder)
            raise RunDirBusy(f"run dir {self.run_dir}: could not take its lock {self.path} (it keeps changing)")
        finally:
            temporary.unlink(missing_ok=True)

    def _advice(self, holder: dict[str, Any]) -> str:
        if holder.get("host") == socket.gethostname():
            return f"(The lock is {self.path}.)"
        return (
            f"That process runs on another host, so this one cannot tell whether it is gone; once it is, delete "
            f"{self.path}."
        )

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        """Delete the lock if it still holds ``holder``'s record, under a host-wide guard: two processes that both
        found the same stale lock must not both take over (the second would delete the first's new lock)."""
        guard = Path(tempfile.gettempdir()) / f"raygpt-lock-{hashlib.sha256(str(self.path).encode()).hexdigest()[:16]}"
        with open(guard, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if self._read() == holder:
                self.path.unlink(missing_ok=True)

    def verify(self) -> None:
        holder = self._read()
        if holder is None or holder.get("owner") != self.owner:
            raise self.busy(holder or {}, f"This process's lock {self.path} was removed or replaced.")

    def release(self) -> None:
        holder = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            self.path.unlink(missing_ok=True)


class RemoteLock(_Lock):
    """The lock on an object-store run dir: a lease renewed from a background thread (see the module docstring
    for what it guarantees)."""

    def __init__(self, location: str, run_dir: str, command: str, ttl: float, settle: float) -> None:
        super().__init__(location, run_dir, command)
        self.ttl = ttl
        self.settle = settle
        self._since = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.location))
        except storage.StorageError:
            if not storage.exists(self.location):
                return None
            raise
        except ValueError:
            return {}

    def _write(self) -> None:
        record = {**self.record(), "since": self._since, "expires": time.time() + self.ttl}
        storage.write_bytes(self.location, json.dumps(record).encode())

    def _advice(self, holder: dict[str, Any]) -> str:
        expires = holder.get("expires")
        until = _now_iso(expires) if isinstance(expires, int | float) else "?"
        return (
            f"Its lock {self.location} expires at {until} unless renewed; if that process is gone, wait until "
            "then or delete the lock."
        )

    def _live_holder(self) -> dict[str, Any] | None:
        holder = self._read()
        if holder is None or holder.get("owner") == self.owner:
            return None
        expires = holder.get("expires")
        if isinstance(expires, int | float) and expires < time.time():
            return None
        return holder

    def acquire(self) -> None:
        holder = self._live_holder()
        if holder is not None:
            raise self.busy(holder, self._advice(holder))
        self._since = _now_iso()
        self._write()
        time.sleep(self.settle)  # a contender that read before our write has written by now: last writer wins
        holder = self._read()
        if holder is None or holder.get("owner") != self.owner:
            raise self.busy(holder or {}, "(It took the lock at the same time as this one.)")
        self._renewer = threading.Thread(target=self._renew, name="raygpt-run-lock", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                holder = self._read()
                if holder is None or holder.get("owner") != self.owner:
                    self.lost = holder or {}
                    taker = f"{self.lost.get('host', '?')} pid {self.lost.get('pid', '?')}"
                    print(
                        f"raygpt: warning: lost the lock of run dir {self.run_dir} to {taker} (a renewal came later "
                        f"than its {self.ttl:g} s lease)",
                        file=sys.stderr,
                    )
                    return
                self._write()
            except OSError as exc:  # a store hiccup: the lease lasts ttl, so the next renewal may still make it
                print(f"raygpt: warning: could not renew the lock of run dir {self.run_dir}: {exc}", file=sys.stderr)

    def verify(self) -> None:
        holder = self._read()
        if self.lost is not None or holder is None or holder.get("owner") != self.owner:
            raise self.busy(holder or self.lost or {}, f"This process lost its lock {self.location}.")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        holder = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            fs, path = storage.filesystem(self.location)
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(path)


_held: dict[str, tuple[_Lock, int]] = {}  # lock location -> (lock, depth): re-entrant within this process
_held_guard = threading.Lock()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def run_lock(
    run_dir: str, command: str, ttl: float = DEFAULT_TTL_S, settle: float = DEFAULT_SETTLE_S
) -> Iterator[None]:
    """Hold ``run_dir``'s lock for ``raygpt <command>`` while the block runs; :class:`RunDirBusy` naming the holder
    when another process has it. ``ttl`` and ``settle`` apply to object stores (see the module docstring)."""
    from pipeline.layout import RunLayout

    location = RunLayout(run_dir).lock_file
    key = storage.absolute(location)
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            _held[key] = (held[0], held[1] + 1)
    if held is not None:
        try:
            held[0].verify()
            yield
        finally:
            with _held_guard:
                outer, depth = _held[key]
                _held[key] = (outer, depth - 1)
        return
    lock: _Lock = (
        RemoteLock(location, run_dir, command, ttl, settle)
        if storage.is_remote(location)
        else LocalLock(location, run_dir, command)
    )
    previous_handler = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM releases the lock like Ctrl-C does
        previous_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            lock.acquire()
        except BaseException:
            lock.release()  # Ctrl-C in the middle of taking it: drop what was written
            raise
        with _held_guard:
            _held[key] = (lock, 1)
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            lock.release()
    finally:
        # unless something installed its own handler meanwhile (ray.init does, with the same effect)
        if previous_handler is not None and signal.getsignal(signal.SIGTERM) is _terminate:
            signal.signal(signal.SIGTERM, previous_handler)
