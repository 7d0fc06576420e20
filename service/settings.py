"""Service settings (environment variables with the ``REID_`` prefix, or a ``.env`` file).

    REID_DATA_DIR=./data/reid          where embedded Redis keeps its AOF and index snapshots live
    REID_REDIS_URL=redis://host:6379/0 external Redis; unset = start an embedded redis-server
    REID_MODEL_DIR=path/to/bundle      model bundle (model.json + encoder.onnx); default: bundled one
    REID_API_KEY=secret                optional: /v1/* then requires the X-API-Key header
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    api_key: str | None = Field(None, description="If set, /v1/* requires header X-API-Key with this value")

    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def redis_data_dir(self) -> Path:
        return Path(self.data_dir) / "redis"
