"""What a test needs from its machine: where it is missing the test skips with the reason, except under
CI=true, where it fails: a CI machine is set up to run everything, so a skip there is a test that never ran."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str, ci_reason: str = "CI must run this test") -> NoReturn:
    __tracebackhide__ = True  # pytest reports the caller's line, not this one
    if running_in_ci():
        pytest.fail(f"{reason}: {ci_reason}")
    pytest.skip(reason)
