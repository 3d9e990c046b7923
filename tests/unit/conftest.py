"""Fixtures shared by the unit tests: a fresh memory storage and a fresh step script."""

from __future__ import annotations

import pytest

from sagakit import MemorySagaStorage
from tests.unit.support import Script


@pytest.fixture
def storage() -> MemorySagaStorage:
    return MemorySagaStorage()


@pytest.fixture
def script() -> Script:
    return Script()
