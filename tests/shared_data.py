"""Access to ../shared/data for tests: skip with a reason when it is absent, fail under CI=true."""

from models.data.datasets import shared_data_dir
from tests.ci import missing


def require_shared_data():
    path = shared_data_dir()
    if path is None:
        missing("../shared/data is absent (set REID_SHARED_DATA to point at it)", "CI must run the real-data tests")
    return path
