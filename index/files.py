"""Replace a file so that a reader, or a crash, sees the old file or the new one, never half of one.

:func:`atomic_write` hands out a temporary path beside the target (the same directory, so the final rename
stays on one filesystem and is atomic); once the caller has written it, the file is fsynced (its bytes are
on disk before the name points at them) and renamed over the target with ``os.replace``. If the caller
raises, the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write"]


@contextmanager
def atomic_write(path: str | os.PathLike, mode: int = 0o666) -> Iterator[Path]:
    """Yield a fresh temporary path to write ``path``'s new content to (any writer: ``torch.save``,
    ``faiss.write_index``, ``Path.write_bytes`` ...); on a clean exit it becomes ``path``.

    ``mode`` is the new file's permission bits before the umask: the default is what ``open`` gives;
    0o600 keeps a file private to its owner (as ``tempfile.mkstemp`` does)."""
    path = Path(path)
    tmp = _create_beside(path, mode)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_beside(path: Path, mode: int) -> Path:
    """An empty new file ``<name>.<random>.tmp`` in ``path``'s directory (O_EXCL: never someone else's)."""
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            return tmp
        except FileExistsError:
            continue
