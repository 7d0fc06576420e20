"""The tests use the benchmark's process runner (production code must not import from ``tests/``)."""

from models.bench.process import (ApiProcess, gallery_count, noise_images, pid_alive, top1,  # noqa: F401
                                  upload)
