"""Fixtures of the device tests (``make test-device``; marked ``device``, so ``make test`` skips them):
the wheel and sdist built once per session, and the environments installed from the wheel."""

from __future__ import annotations

import pytest

from device_env import dists


@pytest.fixture(scope="session")
def wheel_and_sdist():
    """edgeopt's wheel (built from its sdist, so the sdist is proven to build a working wheel) and sdist."""
    return dists()
