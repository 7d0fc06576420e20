"""Which gallery images a search may return: cameras (allow/deny, the query's own), time window, person.

``cameras`` and ``exclude_cameras`` take comma-separated ids (each trimmed) or, for ids that hold a comma or
edge spaces, a JSON array of strings taken verbatim (``["door,left", "lobby"]``). A value naming no camera
(``,,,``, ``[]``) is refused: read as "no filter" it would silently widen the search. An empty field is an
absent one (what an HTML form sends for an empty input).

An image's time is its ``captured_at``, else its upload time (as for deletion, service/deletion.py).
``exclude_same_camera`` follows the evaluation protocol (index/metrics.py): with the query's camera it drops
that camera's images; given the query's person too, only that person's images from that camera go (the
protocol's "same identity and same camera" rule), so other people seen by the same camera stay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from index.store import StoredImage

from .deletion import FilterError, image_time, parse_time
from .labels import nesting_exceeds


def _ids(value: str | None, field: str) -> frozenset[str] | None:
    """A camera-list form value as a set (None when absent or empty); FilterError when it names no camera."""
    if not value:
        return None
    items = _json_ids(value, field) if value.lstrip().startswith("[") else [v.strip() for v in value.split(",")]
    items = [v for v in items if v]
    if not items:
        raise FilterError("invalid_camera_list", f"{field}={value!r} names no camera: give comma-separated "
                                                 "camera ids or a JSON array of them")
    return frozenset(items)


def _json_ids(value: str, field: str) -> list[str]:
    if nesting_exceeds(value, 1):  # a flat array; checked before parsing (a recursive parse of deep input crashes)
        raise FilterError("invalid_camera_list", f"{field} must be a flat JSON array of camera id strings")
    try:
        items = json.loads(value)
    except json.JSONDecodeError as e:
        raise FilterError("invalid_camera_list", f"{field} is not a valid JSON array: {e}") from None
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise FilterError("invalid_camera_list", f"{field} must be a JSON array of camera id strings")
    return items


@dataclass(frozen=True)
class SearchFilter:
    cameras: frozenset[str] | None = None  # only these cameras
    exclude_cameras: frozenset[str] = frozenset()
    same_person: str | None = None  # with exclude_same_camera and a query person: the protocol's rule
    same_camera: str | None = None
    after: datetime | None = None  # inclusive
    before: datetime | None = None  # exclusive
    person_id: str | None = None

    @classmethod
    def from_form(cls, exclude_camera_id: str | None = None, cameras: str | None = None,
                  exclude_cameras: str | None = None, exclude_same_camera: bool = False,
                  query_camera_id: str | None = None, query_person_id: str | None = None,
                  after: str | None = None, before: str | None = None,
                  person_id: str | None = None) -> "SearchFilter":
        deny = set(_ids(exclude_cameras, "exclude_cameras") or ())
        if exclude_camera_id:
            deny.add(exclude_camera_id)
        same_camera = same_person = None
        if exclude_same_camera:
            if not query_camera_id:
                raise FilterError("query_camera_required", "exclude_same_camera needs query_camera_id (the camera "
                                                           "that took the query)")
            same_camera, same_person = query_camera_id, query_person_id or None
        t_after = parse_time(after, "after") if after else None
        t_before = parse_time(before, "before") if before else None
        if t_after and t_before and t_before <= t_after:
            raise FilterError("invalid_time_range", "before must be later than after")
        return cls(_ids(cameras, "cameras"), frozenset(deny), same_person, same_camera, t_after, t_before,
                   person_id or None)

    @property
    def active(self) -> bool:
        return bool(self.cameras is not None or self.exclude_cameras or self.same_camera or self.after
                    or self.before or self.person_id)

    def keep(self, rec: StoredImage | None) -> bool:
        """The record still exists (not deleted meanwhile) and passes every condition."""
        if rec is None:
            return False
        if not self.active:
            return True
        m = rec.metadata
        cam = m.get("camera_id")
        if self.cameras is not None and cam not in self.cameras:
            return False
        if cam in self.exclude_cameras:
            return False
        if self.same_camera is not None and cam == self.same_camera and (
                self.same_person is None or m.get("person_id") == self.same_person):
            return False
        if self.person_id is not None and m.get("person_id") != self.person_id:
            return False
        if self.after or self.before:
            t = image_time(m)
            if t is None or (self.after and t < self.after) or (self.before and t >= self.before):
                return False
        return True
