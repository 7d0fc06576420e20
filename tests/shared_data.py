"""Access to ../shared/data for tests: skip with a reason when it is absent, fail under CI=true."""

import os

import pytest

from models.data.datasets import shared_data_dir


def require_shared_data():
    path = shared_data_dir()
    if path is None:
        message = "../shared/data is absent (set REID_SHARED_DATA to point at it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: CI must run the real-data tests")
        pytest.skip(message)
    return path
