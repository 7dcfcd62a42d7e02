"""Shared fixtures: the SDK is configured only by E2B_API_URL, E2B_SANDBOX_URL
and E2B_API_KEY, which the Rust harness (tests/api/e2b.rs) sets."""

import os

import pytest
from e2b import Sandbox


@pytest.fixture
def sandbox():
    sbx = Sandbox.create(timeout=120)
    try:
        yield sbx
    finally:
        try:
            sbx.kill()
        except Exception:
            pass


def env(name):
    value = os.environ.get(name)
    assert value, f"{name} is not set"
    return value
