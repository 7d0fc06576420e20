"""Service settings (environment variables with the ``REID_`` prefix, or a ``.env`` file).

    REID_DATA_DIR=./data/reid          where embedded Redis keeps its AOF and index snapshots live
    REID_REDIS_URL=redis://host:6379/0 external Redis; unset = start an embedded redis-server
    REID_MODEL_DIR=path/to/bundle      model bundle (model.json + encoder.onnx); default: bundled one
    REID_API_KEY=secret                optional: /v1/* then requires the X-API-Key header
    REID_REFINE_DEFAULT=none           search-time refinement when a request names none (none/local/joint/kreciprocal)
    REID_KEEP_IMAGES=true              keep each accepted image's bytes in Redis (needed to adapt and re-embed)
    REID_ADAPT_MIN_IMAGES=64           POST /v1/galleries/{g}/adapt needs at least this many kept images
    REID_ADAPT_EXTRA_ARGS='["--threads","4"]'  extra arguments for the `reid adapt` it runs

The active model is REID_MODEL_DIR until a bundle under ``{data_dir}/bundles/`` is activated
(``POST /v1/models/{id}/activate``); the choice is kept in Redis and survives restarts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.refine import MODES

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default_bundle"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REID_", env_file=".env", extra="ignore",
                                      protected_namespaces=())

    data_dir: Path = Field(Path("./data/reid"), description="Data directory (embedded Redis AOF, snapshots)")
    redis_url: str | None = Field(None, description="External Redis URL; None starts an embedded redis-server "
                                                    "under data_dir/redis")
    model_dir: Path = Field(DEFAULT_BUNDLE_DIR, description="Model bundle directory")

    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Max request body size (bytes)")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Max decoded pixels per image")
    max_files_per_request: int = Field(256, gt=0)
    max_top_k: int = Field(1000, gt=0)
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = ORT default)")
    embed_batch_size: int = Field(32, gt=0)

    # Search-time refinement (index/refine.py). The default stays "none": it becomes "local" only once local
    # is measured better than none on the shared protocols (the model owner decides, not the service).
    refine_default: str = Field("none", description=f"refine mode when a request names none; one of {MODES}")
    refine_candidates: int = Field(200, ge=1, le=2000, description="K: FAISS candidates that local/kreciprocal "
                                                                  "refine (a request may override it)")
    refine_expand: int = Field(0, ge=0, le=100, description="local: also refine each candidate's own nearest "
                                                          "gallery neighbours (0 = off)")
    joint_max_gallery: int = Field(20000, gt=0, description="joint refuses galleries larger than this (its cost "
                                                            "grows with the gallery; use local)")
    max_batch_queries: int = Field(32, gt=0, description="max query images per search:batch request")

    api_key: str | None = Field(None, description="If set, /v1/* requires header X-API-Key with this value")

    # Model adaptation and activation (service/adapt.py, service/activation.py).
    keep_images: bool = Field(True, description="keep each accepted image's original bytes in Redis; adapting a "
                                                "model to a gallery and activating another model need them")
    adapt_min_images: int = Field(64, ge=1, description="adapting refuses galleries with fewer kept images")
    adapt_extra_args: list[str] = Field(default_factory=list, description="extra arguments for `reid adapt` "
                                        "(JSON list, e.g. [\"--threads\", \"4\"]); see `reid adapt --help`")

    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("refine_default")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"refine_default must be one of {', '.join(MODES)}, got {v!r}")
        return v

    @property
    def redis_data_dir(self) -> Path:
        return Path(self.data_dir) / "redis"

    @property
    def bundles_dir(self) -> Path:
        """Where adapted model bundles are written and from where they can be activated."""
        return Path(self.data_dir) / "bundles"
