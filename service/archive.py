"""Reading uploaded archives (tar, tar.gz/.bz2/.xz, zip) safely, in memory.

Nothing is ever extracted to disk by name. Before a job starts, :func:`scan` checks the whole archive
(member count, total uncompressed size from the headers) and refuses it if any member has an unsafe name
(absolute, ``..``, drive letters, backslashes) or is a link or device: such an archive is a mistake or an
attack, so none of it is imported. :func:`iter_members` then yields ``(name, bytes)`` of the regular files,
each read with a byte cap, so a header that lies about its size cannot blow up memory.

A member's labels come from its name by the rule of every ingestion path (service/labels.py).
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator


class ArchiveError(ValueError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_total_bytes: int
    max_member_bytes: int


def kind(data: bytes) -> str | None:
    """'zip', 'tar' or None (not an archive), from the bytes."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:2] == b"\x1f\x8b" or data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00" or data[257:262] == b"ustar":
        return "tar"
    return None


def unsafe_name(name: str) -> bool:
    """Absolute, with a ``..`` component, a drive letter, a backslash or a NUL: refused, never read as a path."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in PurePosixPath(name).parts)


def _skipped(name: str) -> bool:
    """Folders' bookkeeping files that are not images (macOS forks, hidden files)."""
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _entries(data: bytes, k: str):
    """(name, is_file, is_dir, size, opener) per member, in archive order."""
    if k == "zip":
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ArchiveError(422, "invalid_archive", f"corrupt zip archive: {e}") from None
        for info in zf.infolist():
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            is_dir = info.is_dir()
            yield info.filename, not (is_dir or is_link), is_dir, info.file_size, (lambda i=info: zf.open(i))
        return
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(422, "invalid_archive", f"corrupt tar archive: {e}") from None
    try:
        for m in tf:
            yield m.name, m.isreg(), m.isdir(), m.size, (lambda m=m: tf.extractfile(m))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(422, "invalid_archive", f"corrupt tar archive: {e}") from None


def scan(data: bytes, limits: Limits) -> int:
    """Check the archive; the number of files to import. Raises :class:`ArchiveError`."""
    k = kind(data)
    if k is None:
        raise ArchiveError(415, "unsupported_archive", "not a tar, tar.gz or zip archive")
    count = total = 0
    for name, is_file, is_dir, size, _ in _entries(data, k):
        if unsafe_name(name):
            raise ArchiveError(422, "unsafe_archive", f"member {name!r} has an absolute or parent ('..') path; "
                                                      "nothing was imported")
        if not is_file and not is_dir:
            raise ArchiveError(422, "unsafe_archive", f"member {name!r} is a link or special file; "
                                                      "nothing was imported")
        if not is_file or _skipped(name):
            continue
        count += 1
        total += max(0, size)
        if count > limits.max_members:
            raise ArchiveError(413, "too_many_members", f"the archive has more than {limits.max_members} files "
                                                        "(REID_IMPORT_MAX_MEMBERS)")
        if total > limits.max_total_bytes:
            raise ArchiveError(413, "archive_too_large", f"the archive's files hold more than "
                                                         f"{limits.max_total_bytes} bytes uncompressed "
                                                         "(REID_IMPORT_MAX_UNCOMPRESSED_BYTES)")
    return count


def iter_members(data: bytes, limits: Limits) -> Iterator[tuple[str, bytes | None, str | None]]:
    """``(name, bytes, error)`` per file of an archive that passed :func:`scan`; bytes are None (and error
    says why) for a member over ``max_member_bytes`` or unreadable. The total stays capped too."""
    total = 0
    for name, is_file, _, size, opener in _entries(data, kind(data) or "tar"):
        if not is_file or _skipped(name) or unsafe_name(name):
            continue
        budget = min(limits.max_member_bytes, limits.max_total_bytes - total)
        try:
            with opener() as f:
                blob = f.read(budget + 1)
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, RuntimeError) as e:
            yield name, None, f"cannot read the member: {e}"
            continue
        if len(blob) > budget:
            yield name, None, f"the member is larger than {budget} bytes"
            if total + len(blob) > limits.max_total_bytes:
                return  # the archive lied about its sizes: stop reading it
            continue
        total += len(blob)
        yield name, blob, None
