"""Output and input plumbing of the CLIs: checks before work starts, atomic writes, output locks,
signal deferral during cleanup, and the exceptions a user's bad file can raise while loading.

Nothing here imports torch at module level; every function is host-side file handling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path


def _load_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError]
    try:
        import pickle

        types.append(pickle.UnpicklingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency, but stay importable
        pass
    return tuple(types)


#: What loading a user's (truncated, wrong, hostile) file can raise: the CLIs turn these into one
#: message and exit code 2. (UnicodeDecodeError and json.JSONDecodeError are ValueErrors.)
LOAD_ERRORS = _load_error_types()


def describe(e: BaseException) -> str:
    """One line for an exception: its message, or its type when the message is empty."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


# ------------------------------------------------------------------------------- input checks
def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of ``path``; ValueError naming ``what`` when it is missing, a directory,
    unreadable or binary (not UTF-8, or holding NUL bytes)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a directory, not a text file")
    if not p.exists():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {str(p)!r} cannot be read: {describe(e)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise ValueError(f"{what} {str(p)!r} is not a UTF-8 text file (it looks binary)")
    return text


# ------------------------------------------------------------------------------ output checks
def _probe_dir(folder: Path, what: str) -> None:
    """Create ``folder`` (and parents) if needed and check a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{what}: {str(folder)!r} exists and is not a directory") from None
    except OSError as e:
        raise ValueError(f"{what}: cannot create the folder {str(folder)!r}: {describe(e)}") from None
    if not folder.is_dir():
        raise ValueError(f"{what}: {str(folder)!r} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tokentrim-write-check-", dir=folder)
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {str(folder)!r}: {describe(e)}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Check that ``path`` can be written as a file (its folder exists or can be created and is
    writable; ``path`` is not a directory nor a read-only file). Returns it as a Path."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a directory; give a file name")
    _probe_dir(p.parent if str(p.parent) else Path("."), f"{what} {str(p)!r}")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{what} {str(p)!r} exists and is not writable")
    return p


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Check that ``path`` is (or can be created as) a writable directory. Returns it as a Path."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} exists and is not a directory")
    _probe_dir(p, f"{what} {str(p)!r}")
    return p


# ------------------------------------------------------------------------------ atomic writes
def temp_path(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A fresh, unique, empty file beside ``path`` named ``<stem>.<random>.<tag><suffix>``; two
    processes never get the same name."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{p.stem}.", suffix=f".{tag}{p.suffix}", dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a unique temporary file beside ``path``, then rename it onto
    ``path``: readers see the old file or the new one, never a half-written one."""
    p = Path(path)
    tmp = temp_path(p)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda t: Path(t).write_text(text, encoding="utf-8"))


def claim(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool) -> Path:
    """Move the finished temporary file ``tmp`` to its final name and return that name.

    ``replace=True`` (a complete result): atomically onto ``path``, replacing what was there.
    ``replace=False`` (a partial result): onto ``path`` only if nothing is there, else onto the
    first free ``<stem>.interrupted[-N]<suffix>`` -- a partial file never replaces an existing one
    (no-clobber hard links, so this holds against concurrent runs too)."""
    tmp, p = Path(tmp), Path(path)
    if replace:
        os.replace(tmp, p)
        return p
    candidates = [p] + [p.with_name(f"{p.stem}.interrupted{'' if i == 0 else f'-{i}'}{p.suffix}") for i in range(1000)]
    for c in candidates:
        try:
            os.link(tmp, c)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this filesystem: check, then rename (not race-free)
            if c.exists():
                continue
            os.replace(tmp, c)
            return c
        tmp.unlink()
        return c
    raise FileExistsError(f"no free name for the partial output beside {str(p)!r}")


# ------------------------------------------------------------------------------------- locks
class OutputLock:
    """An exclusive, non-blocking lock on an output path (``.<name>.lock`` beside it, flock).

    Held for the whole run so two runs to the same output cannot both write and claim it; the OS
    releases it if the process dies. ``acquire`` raises ValueError naming the path when another
    process holds it. Without ``fcntl`` (Windows) this is a no-op.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(os.path.abspath(path))  # "." and "out/" have a usable name once absolute
        self.path = Path(path)
        self.lock_path = p.with_name(f".{p.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return self
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ValueError(
                    f"another tokentrim run is writing {str(self.path)!r} (lock {str(self.lock_path)!r}); "
                    "wait for it to finish or choose another --out"
                ) from None
            # the holder before us may have unlinked the lock file after we opened it: retry on the new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock_path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------- signals
class deferred_signals:
    """Context manager: SIGINT and SIGTERM received inside are held back until it exits, so a
    cleanup (closing files, renaming them into place, writing telemetry) cannot be cut in half by
    a second Ctrl-C. ``self.received`` is the first signal number held back, or None; the caller
    decides what to do with it (nothing is re-raised). Main thread only; elsewhere a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> deferred_signals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (e.g. a job scheduler) -> KeyboardInterrupt, so it finalises like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
