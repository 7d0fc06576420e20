"""A content-addressed store of byte strings (kept image bytes) in a directory.

A blob's key is the sha256 of its bytes (64 lowercase hex digits); it lives at ``ROOT/ab/cd/<key>`` (the
first two and next two hex digits as folders: 65,536 leaf folders, so none holds millions of files).

* :meth:`BlobStore.put` writes to a temporary file in the blob's own folder, fsyncs it, renames it onto its
  name (atomic: a reader sees the whole blob or none) and fsyncs the folder, so the blob survives a power
  cut once ``put`` returns. Putting bytes that are already there (intact) writes nothing.
* :meth:`BlobStore.get` checks the sha256 of what it read: a missing or damaged blob raises
  :class:`BlobMissing` / :class:`BlobCorrupt` rather than handing back wrong bytes.
* Removal goes through a trash name (:meth:`BlobStore.move_to_trash`, then :meth:`BlobStore.discard` or
  :meth:`BlobStore.restore`) so that a remover can take its decision back: see :mod:`index.store` for the
  rule that decides when a blob may go.

Leftovers of a crash (``.tmp-*`` files of an unfinished put, ``.trash-*`` files of an unfinished removal)
sit beside the blobs and are listed by :meth:`BlobStore.leftovers` for the sweep (:mod:`index.blob_gc`).

The root folder of all galleries' blob folders carries an identity file (:func:`claim_identity`): the store
records it in Redis, so that a replica whose REID_BLOB_DIR is not the shared folder is found at start.

Nothing here knows Redis: which blobs are referenced is the store's business.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["BlobCorrupt", "BlobError", "BlobMissing", "BlobStore", "Leftover", "blob_key", "claim_identity",
           "read_identity", "valid_key"]

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
IDENTITY_FILE = ".reid-blob-store"


class BlobError(RuntimeError):
    """A blob that should be there cannot be read back as it was written."""


class BlobMissing(BlobError):
    pass


class BlobCorrupt(BlobError):
    pass


def blob_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def valid_key(key: str) -> bool:
    return isinstance(key, str) and KEY_RE.match(key) is not None


@dataclass(frozen=True)
class Leftover:
    """A ``.tmp-*`` or ``.trash-*`` file; ``key`` is the blob a trash file was (None for a tmp file)."""

    path: Path
    key: str | None
    mtime: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_identity(root: str | os.PathLike) -> str | None:
    """The identity written in a blob directory by :func:`claim_identity`, or None."""
    try:
        return (Path(root) / IDENTITY_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def claim_identity(root: str | os.PathLike, identity: str) -> str:
    """Give the blob directory ``identity`` unless it has one already; returns the one it has (a link of a fsynced
    temp file: of two processes claiming at once, exactly one wins)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(tmp, "w") as f:
            f.write(identity + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, root / IDENTITY_FILE)
            _fsync_dir(root)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return read_identity(root)


class BlobStore:
    def __init__(self, root: str | os.PathLike, fsync: bool = True):
        self.root = Path(root)
        #: fsync files and folders (tests of crash behaviour keep it; nothing else should turn it off)
        self.fsync = fsync

    def path(self, key: str) -> Path:
        if not valid_key(key):  # the key names a path: never let one climb out of the root
            raise ValueError(f"invalid blob key {key!r} (64 lowercase hex digits)")
        return self.root / key[:2] / key[2:4] / key

    # ------------------------------------------------------------------ write
    def put(self, data: bytes) -> str:
        """Store ``data``; returns its key. Durable (fsynced) when it returns; idempotent."""
        data = bytes(data)
        key = blob_key(data)
        path = self.path(key)
        if self._intact(path, key, len(data)):
            return key
        self._make_dirs(path.parent)
        tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)  # atomic: the name holds the whole blob or nothing
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(path.parent)  # the rename itself survives a power cut
        return key

    def _intact(self, path: Path, key: str, size: int) -> bool:
        """The blob is there with the right bytes (a damaged one is rewritten by ``put``)."""
        try:
            if path.stat().st_size != size:
                return False
            return blob_key(path.read_bytes()) == key
        except FileNotFoundError:
            return False

    def _make_dirs(self, folder: Path) -> None:
        """Create the fan-out folders, fsyncing each new one's parent (a new folder's entry is data too)."""
        missing = []
        p = folder
        while not p.is_dir():
            missing.append(p)
            if p == p.parent:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            if self.fsync:
                _fsync_dir(d.parent)

    # ------------------------------------------------------------------ read
    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"blob {key} is missing from {self.root}") from None
        if blob_key(data) != key:
            raise BlobCorrupt(f"blob {key} in {self.root} is damaged: its bytes hash to {blob_key(data)}")
        return data

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def keys(self) -> Iterator[str]:
        """Every blob's key (a walk of the fan-out folders; leftovers are not blobs)."""
        for path in self._leaf_files():
            if valid_key(path.name) and path.parent.name == path.name[2:4] and path.parent.parent.name == path.name[:2]:
                yield path.name

    def mtime(self, key: str) -> float | None:
        try:
            return self.path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def _leaf_files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for a in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not (a.is_dir(follow_symlinks=False) and len(a.name) == 2):
                continue
            for b in sorted(os.scandir(a.path), key=lambda e: e.name):
                if not (b.is_dir(follow_symlinks=False) and len(b.name) == 2):
                    continue
                for f in os.scandir(b.path):
                    if f.is_file(follow_symlinks=False):
                        yield Path(f.path)

    # ------------------------------------------------------------------ removal
    def delete(self, key: str) -> bool:
        """Remove the blob at once. Returns False if it was not there. (The store removes blobs through the
        trash, :meth:`move_to_trash`, so that a removal can be taken back.)"""
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def move_to_trash(self, key: str, token: str) -> Path | None:
        """Rename the blob to a trash name of ``token``'s (atomic). None if it was not there."""
        path = self.path(key)
        trash = path.parent / f"{TRASH_PREFIX}{token}-{key}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        return trash

    def restore(self, trash: Path, key: str) -> None:
        """Put a trashed blob back under its name (a blob written there meanwhile has the same bytes)."""
        os.replace(trash, self.path(key))
        if self.fsync:
            _fsync_dir(trash.parent)

    @staticmethod
    def discard(trash: Path) -> None:
        trash.unlink(missing_ok=True)

    def leftovers(self) -> Iterator[Leftover]:
        """``.tmp-*`` files of puts that never finished and ``.trash-*`` files of removals that never did."""
        for path in self._leaf_files():
            name = path.name
            if not name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                continue
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            key = name.rsplit("-", 1)[-1] if name.startswith(TRASH_PREFIX) else None
            yield Leftover(path, key if key is not None and valid_key(key) else None, mtime)

    def prune_empty_dirs(self) -> None:
        """Remove empty fan-out folders (and the root if it ends up empty)."""
        if not self.root.is_dir():
            return
        for a in os.scandir(self.root):
            if a.is_dir(follow_symlinks=False):
                for b in os.scandir(a.path):
                    if b.is_dir(follow_symlinks=False):
                        try:
                            os.rmdir(b.path)
                        except OSError:
                            pass
                try:
                    os.rmdir(a.path)
                except OSError:
                    pass
        try:
            self.root.rmdir()
        except OSError:
            pass
