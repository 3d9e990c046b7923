"""Shared test configuration: server DSNs and the rule that CI never skips a server test."""

from __future__ import annotations

import os

import pytest

POSTGRES_DSN = os.environ.get(
    "SAGAKIT_POSTGRES_DSN", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
MYSQL_DSN = os.environ.get("SAGAKIT_MYSQL_DSN", "mysql+asyncmy://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("SAGAKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def server_unavailable(what: str, error: BaseException) -> None:
    """Skip a test whose server is down — except under CI=true, where that is a failure."""
    message = f"{what} is not reachable: {error!r}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure, not a skip)")
    pytest.skip(message)
