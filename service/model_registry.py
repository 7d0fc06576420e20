"""Which model bundles the service can serve, and which one is active.

Bundles are named by a plain slug (their *bundle id*): ``default`` is the configured
``REID_MODEL_DIR``; any other id is a directory ``{data_dir}/bundles/<id>`` (where ``reid adapt``
writes). Request parameters only ever carry ids, never paths. The active id is kept in Redis
(:meth:`index.store.RedisStore.active_bundle`) so restarts and other replicas serve the same model.
"""

from __future__ import annotations

import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from index.bundle import Bundle, BundleError, load_bundle
from index.store import RedisStore

from .settings import Settings

log = logging.getLogger("reid.service")

DEFAULT_BUNDLE_ID = "default"
BUNDLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def valid_bundle_id(bundle_id: str) -> bool:
    return bool(BUNDLE_ID_RE.match(bundle_id or "")) and ".." not in bundle_id


def bundle_dir(settings: Settings, bundle_id: str) -> Path:
    """The directory of ``bundle_id`` (ValueError for anything but a plain slug)."""
    if not valid_bundle_id(bundle_id):
        raise ValueError(f"invalid bundle id {bundle_id!r}: use 1-128 characters from A-Z a-z 0-9 _ . - "
                         "(starting with a letter or digit, no '..')")
    if bundle_id == DEFAULT_BUNDLE_ID:
        return Path(settings.model_dir)
    return settings.bundles_dir / bundle_id


def summary(bundle_id: str, bundle: Bundle) -> dict[str, Any]:
    return {"bundle_id": bundle_id, "name": bundle.name, "version": bundle.version,
            "embedding_dim": bundle.embedding_dim, "parent": bundle.card.get("parent")}


def list_bundles(settings: Settings) -> list[tuple[str, Bundle]]:
    """``default`` plus every bundle under ``bundles_dir`` whose card is valid and whose files exist.

    Hashes are not checked here (listing must stay cheap); activation verifies them."""
    found: list[tuple[str, Bundle]] = []
    try:
        found.append((DEFAULT_BUNDLE_ID, load_bundle(settings.model_dir, verify=False)))
    except BundleError as e:
        log.warning("default bundle: %s", e)
    root = settings.bundles_dir
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if d.name == DEFAULT_BUNDLE_ID or not valid_bundle_id(d.name) or not d.is_dir():
            continue
        try:
            found.append((d.name, load_bundle(d, verify=False)))
        except BundleError as e:
            log.debug("skipping %s: %s", d, e)
    return found


def resolve_active(store: RedisStore, settings: Settings) -> tuple[str, Bundle]:
    """The bundle to serve: the one recorded in Redis, else (absent, missing or broken) the default."""
    bundle_id = store.active_bundle()
    if bundle_id and bundle_id != DEFAULT_BUNDLE_ID:
        try:
            return bundle_id, load_bundle(bundle_dir(settings, bundle_id))
        except (BundleError, ValueError) as e:
            # Serving on beats refusing to start, but the stored vectors came from the missing model.
            log.error("active model bundle %r (recorded in Redis) cannot be loaded: %s; serving the default "
                      "bundle %s instead: searches compare its features with vectors of another model until "
                      "that bundle is restored or another one is activated", bundle_id, e, settings.model_dir)
    return DEFAULT_BUNDLE_ID, load_bundle(settings.model_dir)


def new_bundle_id(settings: Settings, stem: str, kind: str = "adapted") -> str:
    """A fresh id ``<stem>-<kind>-<UTC time>`` (suffixed if taken)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{re.sub(r'[.]{2,}', '.', stem)}-{kind}-{stamp}"[:120]  # gallery names may hold '..'
    bundle_id, n = base, 1
    while (settings.bundles_dir / bundle_id).exists():
        n += 1
        bundle_id = f"{base}-{n}"
    return bundle_id


def copy_for_reembedding(settings: Settings, bundle_id: str) -> str:
    """Copy the bundle ``bundle_id`` to a fresh id under ``bundles_dir`` and return that id.

    Re-embedding galleries with the model already served (after an upgrade replaced the default bundle under
    them) is an activation like any other, but of a new id: every replica then sees a model change to follow,
    and no snapshot of the old vectors passes for the new ones."""
    new_id = new_bundle_id(settings, bundle_id, "reembed")
    settings.bundles_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle_dir(settings, bundle_id), settings.bundles_dir / new_id)
    return new_id
