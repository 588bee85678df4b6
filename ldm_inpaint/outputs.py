"""The shared point for everything written to disk: output paths are checked before a run (folder exists and is
writable, no file overwritten unless asked), files are written atomically (a temporary name in the same folder,
renamed into place when complete), with the user's umask, and SIGTERM unwinds like Ctrl-C so no temporary is
left behind.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from contextlib import contextmanager
from typing import Iterator

from .checks import InputError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so `finally` blocks remove temporaries as for Ctrl-C."""


def handle_sigterm() -> None:
    """Make SIGTERM (kill, a job scheduler's stop) unwind the stack like SIGINT instead of ending the process
    on the spot. Command lines call it first thing in main()."""
    def raise_terminated(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, raise_terminated)


def check_writable(paths: list[str], overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse, before any work is done, outputs that could not be written or would replace a file."""
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"{flag} {path!r}: folder {folder} does not exist; create it first")
        try:  # a real file, not os.access: that says yes to root on a read-only file system
            tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-").close()
        except OSError as e:
            raise InputError(f"{flag} {path!r}: cannot write in {folder} ({e.strerror}); choose another output") from e
        if os.path.isdir(path):
            raise InputError(f"{flag} {path!r} is a folder; give a file name")
        if os.path.exists(path) and not overwrite:
            raise InputError(f"{flag} {path!r} already exists; choose a new name or pass --overwrite")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator:
    """A binary file object whose content appears at `path` only when the block completes: it is written to a
    temporary in the same folder and renamed over `path` (also replacing an existing file atomically). The
    file gets the mode a plain open() would give (0666 less the umask), not mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
        os.replace(tmp, path)
    except BaseException:  # including Ctrl-C and SIGTERM (handle_sigterm)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(image, path: str | os.PathLike, parameters: dict | None = None) -> None:
    """Write a PIL image as a PNG atomically; `parameters` go into its text chunks (and as JSON under
    "parameters")."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", json.dumps(parameters))
        for key, value in parameters.items():
            info.add_text(key, str(value))
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
