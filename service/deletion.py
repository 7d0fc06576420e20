"""Deleting many images at once: by camera, by time range, everything, or what a gallery's retention expired.

An image's time is its ``captured_at`` when it was given at upload (when the person was seen), else its
``created_at`` (when it was uploaded). Selection scans the gallery's metadata; deletion goes in batches of
``delete_batch_size``: each batch is one Redis transaction (vectors, metadata, kept image bytes and one
``delete`` change-log entry per image, so other replicas follow), then this process's index.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .state import ServiceState

TIME_FIELDS = ("captured_at", "created_at")


class FilterError(ValueError):
    """A bulk-delete filter that cannot be applied; ``code`` is the API error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_time(value: str, name: str) -> datetime:
    """An ISO 8601 date or date-time as an aware UTC datetime (no zone given: UTC)."""
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise FilterError("invalid_time", f"{name}={value!r} is not an ISO 8601 date-time "
                                          "(e.g. 2024-05-01T12:00:00Z)") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _stored_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value, "stored time")
    except FilterError:
        return None


def image_time(meta: dict[str, str | None]) -> datetime | None:
    """``captured_at`` if it parses, else ``created_at``; None if neither does (never matched by time)."""
    return _stored_time(meta.get("captured_at")) or _stored_time(meta.get("created_at"))


@dataclass(frozen=True)
class ImageFilter:
    """Images to delete: all conditions given must hold; ``everything`` matches every image."""

    camera_id: str | None = None
    after: datetime | None = None  # inclusive
    before: datetime | None = None  # exclusive
    everything: bool = False

    @classmethod
    def from_query(cls, camera_id: str | None, before: str | None, after: str | None,
                   everything: bool) -> "ImageFilter":
        """Validate the query of ``DELETE /v1/galleries/{g}/images`` (FilterError names what is wrong)."""
        if camera_id is not None and not camera_id.strip():
            raise FilterError("invalid_filter", "camera_id is empty")
        given = [n for n, v in (("camera_id", camera_id), ("before", before), ("after", after)) if v is not None]
        if everything and given:
            raise FilterError("conflicting_filters", f"all=true deletes every image; it cannot be combined with "
                                                     f"{', '.join(given)}")
        if not everything and not given:
            raise FilterError("filter_required", "give camera_id, before and/or after (ISO 8601), or all=true to "
                                                 "delete every image of the gallery")
        b = parse_time(before, "before") if before is not None else None
        a = parse_time(after, "after") if after is not None else None
        if a is not None and b is not None and b <= a:
            raise FilterError("invalid_time_range", f"before ({before}) must be later than after ({after})")
        return cls(camera_id=camera_id, after=a, before=b, everything=everything)

    @property
    def fields(self) -> tuple[str, ...]:
        return (("camera_id",) if self.camera_id is not None else ()) + (
            TIME_FIELDS if self.after is not None or self.before is not None else ())

    def matches(self, meta: dict[str, str | None]) -> bool:
        if self.everything:
            return True
        if self.camera_id is not None and meta.get("camera_id") != self.camera_id:
            return False
        if self.after is None and self.before is None:
            return True
        t = image_time(meta)
        if t is None:
            return False
        return (self.after is None or t >= self.after) and (self.before is None or t < self.before)

    def describe(self) -> dict[str, Any]:
        iso = (lambda t: t.isoformat().replace("+00:00", "Z") if t is not None else None)
        return {"camera_id": self.camera_id, "after": iso(self.after), "before": iso(self.before),
                "all": self.everything}


def select_ids(state: ServiceState, gallery: str, flt: ImageFilter) -> list[int]:
    """Ids of the gallery's images that match ``flt`` (a scan of their metadata)."""
    store, batch = state.store, state.settings.delete_batch_size
    if flt.everything:
        return [i for ids in store.iter_image_ids(gallery, batch) for i in ids]
    return [i for chunk in store.iter_image_meta(gallery, flt.fields, batch) for i, meta in chunk
            if flt.matches(meta)]


def delete_images(state: ServiceState, gallery: str, ids: list[int]) -> int:
    """Delete ``ids`` from the store and this process's index, a batch at a time. Returns how many existed."""
    n, batch = 0, state.settings.delete_batch_size
    for start in range(0, len(ids), batch):
        part = ids[start:start + batch]
        with state.model_lock.shared():  # per batch: a model switch waits for one batch, not the whole delete
            n += state.store.delete_many(gallery, part)
            state.index_refresh(gallery, part)  # reads the store: they are gone there
    return n


def delete_matching(state: ServiceState, gallery: str, flt: ImageFilter) -> int:
    return delete_images(state, gallery, select_ids(state, gallery, flt))
