"""Writing a file or directory in place of another with no moment where neither is there.

Everything is built in a staging directory beside the destination, named
``.NAME.tmp-PID-XXXX`` after the writing process, and moved into place at the end. A process
killed mid-write leaves its staging directory behind; the next writer of the same NAME
removes those whose process is gone (or that are older than ``STALE_AFTER``) before it starts.

A directory is replaced with one ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+): the new one
takes the old one's name atomically and the old one is then removed. Where the file system
cannot exchange, the old one is first renamed to ``.NAME.old-PID-XXXX`` and the new one
renamed into place; a kill between the two renames leaves no NAME, and the next writer (or
``recover``) renames the old one back before anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import time

STALE_AFTER = 24 * 3600      # seconds; a leftover this old is stale even if its pid is reused
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _leftovers(dest: str):
    """(path, kind, pid) of every staging or old directory of ``dest``."""
    parent, base = os.path.split(os.path.abspath(dest))
    pattern = re.compile(r"\." + re.escape(base) + r"\.(tmp|old)-(\d+)-[0-9a-f]+")
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            yield os.path.join(parent, name), m.group(1), int(m.group(2))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(path: str, pid: int) -> bool:
    if pid == os.getpid():
        return False
    if not _alive(pid):
        return True
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_AFTER
    except FileNotFoundError:
        return False


def recover(dest: str) -> None:
    """Remove the leftovers of dead writers of ``dest``; where ``dest`` is missing because a
    replace was killed between its two renames, put the old one back first."""
    for path, kind, pid in sorted(_leftovers(dest), key=lambda x: x[1] == "tmp"):
        if not _stale(path, pid):
            continue
        try:             # another writer may be sweeping the same leftovers
            if kind == "old" and not os.path.lexists(dest):
                os.rename(path, dest)
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass


def _sibling(dest: str, kind: str) -> str:
    parent, base = os.path.split(os.path.abspath(dest))
    return os.path.join(parent, f".{base}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def staging_dir(dest: str) -> str:
    """A new, empty staging directory beside ``dest`` (created with the usual permissions),
    after sweeping what dead writers of ``dest`` left."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    recover(dest)
    path = _sibling(dest, "tmp")
    os.mkdir(path)
    return path


def check_output_file(path: str, inputs: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a file output that is a directory, one of ``inputs``, or in a
    directory that does not exist."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; the output is a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: no directory {parent}")
    for src in inputs:
        if os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise ValueError(f"{path} is the input; not overwriting it")


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a new empty file's path beside ``path`` to write; it takes ``path``'s name when
    the block ends, and is removed if the block raises, so ``path`` is never half-written
    (a killed writer's is swept by the next, as ``staging_dir`` sweeps)."""
    path = os.path.abspath(path)
    check_output_file(path)
    recover(path)
    tmp = _sibling(path, "tmp")
    open(tmp, "x").close()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically; False where this system or file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):      # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(new: str, dest: str) -> None:
    """Move the directory ``new`` to ``dest``, replacing a directory there (see the module
    docstring for how no moment passes without one)."""
    if not os.path.lexists(dest):
        os.rename(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)       # now the old one
    else:
        old = _sibling(dest, "old")
        os.rename(dest, old)
        os.rename(new, dest)
        shutil.rmtree(old, ignore_errors=True)
