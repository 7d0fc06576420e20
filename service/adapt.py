"""Adapt the active model to a gallery's cameras (GRACL), as a job running ``reid adapt`` in a subprocess.

The service never imports torch: it exports the gallery's kept images to ``DIR/<camera>/<id>.<ext>``
and runs ``python -m scripts.cli adapt --bundle ACTIVE --images DIR --out OUT --progress-jsonl ...`` with
the service's own interpreter, from the directory that holds the installed ``scripts`` package (the
repository root for an editable install). The command prints JSON lines on stdout::

    {"event": "progress", "stage": "...", "fraction": 0.0-1.0, "message": "..."}   (fraction: of the job)
    {"event": "done", "bundle": OUT, "name": "...", "version": "..."}
    {"event": "error", "message": "..."}                                         (then a non-zero exit)

The new bundle lands in ``{data_dir}/bundles/<bundle id>``; it is not activated.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from index.bundle import WEIGHTS_FILE, Bundle, load_bundle
from index.store import RedisStore

from .images import sniff_format
from .jobs import JobContext, JobFailed

log = logging.getLogger("reid.service")

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
SAFE_DIR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STDERR_TAIL_LINES = 15


def cli_root() -> Path | None:
    """The directory from which ``python -m scripts.cli`` imports the installed package (no import here)."""
    spec = importlib.util.find_spec("scripts")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "cli.py").is_file():
            return Path(loc).resolve().parent
    return None


def unavailable_reason(bundle: Bundle) -> str | None:
    """Why adaptation cannot run here, or None."""
    if importlib.util.find_spec("torch") is None:  # find, never import: serving stays torch-free
        return "adaptation needs torch, which is not installed here (install reid-service[train])"
    if bundle.file(WEIGHTS_FILE) is None:
        return (f"the active model {bundle.model_id} has no {WEIGHTS_FILE} (torch weights) to fine-tune; "
                "export it with its weights")
    if cli_root() is None:
        return "the reid command-line package (scripts.cli) is not installed"
    return None


def camera_dir(camera: str | None) -> str:
    """A folder name for a camera id (user text): kept if it is a plain slug, else hashed."""
    if camera is None or camera == "":
        return "_unknown"
    if SAFE_DIR_RE.match(camera) and ".." not in camera:
        return camera
    return "_cam-" + hashlib.sha256(camera.encode("utf-8")).hexdigest()[:16]


def export_images(store: RedisStore, gallery: str, out: Path, ctx: JobContext | None = None) -> int:
    """Write the gallery's kept images to ``out/<camera>/<id>.<ext>``; returns how many."""
    n = 0
    for batch in store.iter_images(gallery):
        for id_, data, camera in batch:
            fmt = sniff_format(data)
            if fmt is None:  # cannot happen for accepted images; skip rather than feed junk to training
                continue
            folder = out / camera_dir(camera)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{id_}.{EXTENSIONS[fmt]}").write_bytes(data)
            n += 1
        if ctx is not None:
            ctx.check()
    return n


def adapt_command(bundle_dir: Path, images: Path, out: Path, gallery: str, epochs: int | None, name: str | None,
                  extra: list[str] = ()) -> list[str]:
    """The command line; ``extra`` comes from settings (REID_ADAPT_EXTRA_ARGS), never from a request."""
    cmd = [sys.executable, "-m", "scripts.cli", "adapt", "--bundle", str(bundle_dir), "--images", str(images),
           "--out", str(out), "--source", f"gallery:{gallery}", "--progress-jsonl"]
    if epochs is not None:  # else the command's own default
        cmd += ["--epochs", str(int(epochs))]
    if name:
        cmd += ["--name", name]
    return cmd + list(extra)


def _tail(path: Path, lines: int = STDERR_TAIL_LINES, limit: int = 4000) -> str:
    """The last non-empty lines of a log file."""
    text = path.read_bytes()[-64 * 1024:].decode("utf-8", "replace")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])[-limit:]


def _events(proc: subprocess.Popen):
    """The JSON objects the command prints on stdout (other lines are logged and skipped)."""
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            ev = None
        if isinstance(ev, dict):
            yield ev
        else:
            log.info("reid adapt: %s", line)


def run_adapt(ctx: JobContext, store: RedisStore, gallery: str, bundle_dir: Path, out: Path, tmp_root: Path,
              epochs: int | None, name: str | None, extra_args: list[str] = ()) -> dict[str, Any]:
    """The adapt job: export, run the command, map its events onto the job. Returns the job's result."""
    root = cli_root()
    if root is None:
        raise JobFailed("the reid command-line package (scripts.cli) is not installed")
    tmp_root.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"adapt-{ctx.id[:8]}-", dir=tmp_root))
    ok = False
    try:
        ctx.progress(0.0, "images", f"exporting the images of gallery {gallery!r}")
        n = export_images(store, gallery, tmp / "images", ctx)
        ctx.progress(0.0, "images", f"exported {n} images")
        cmd = adapt_command(bundle_dir, tmp / "images", out, gallery, epochs, name, extra_args)
        log.info("job %s: %s (cwd %s)", ctx.id, " ".join(cmd), root)
        done, error = None, None
        with open(tmp / "stderr.log", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            ctx.attach(proc)
            try:
                for ev in _events(proc):
                    kind = ev.get("event")
                    if kind == "progress":
                        ctx.progress(ev.get("fraction"), ev.get("stage"), ev.get("message"))
                    elif kind == "done":
                        done = ev
                    elif kind == "error":
                        error = str(ev.get("message") or "")
            except BaseException:
                ctx.kill()  # cancelled, or we cannot follow it any more: never leave it running
                raise
            finally:
                rc = proc.wait()
                proc.stdout.close()
        ctx.check()
        if rc != 0 or done is None:
            detail = _tail(tmp / "stderr.log")
            why = f"reid adapt exited with code {rc}" if rc != 0 else "reid adapt finished without a 'done' event"
            raise JobFailed("; ".join(x for x in (why, error, detail) if x))
        ctx.progress(1.0, "check", "checking the new bundle")
        try:
            bundle = load_bundle(out)
        except Exception as e:  # BundleError, or a missing directory
            raise JobFailed(f"reid adapt wrote an invalid bundle: {e}") from e
        ok = True
        return {"bundle_id": out.name, "name": bundle.name, "version": bundle.version}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            shutil.rmtree(out, ignore_errors=True)  # a fresh id of ours: nothing else lives there
