"""What a driver's error means to sagakit (storage/faults.py), told from real driver exceptions."""

from __future__ import annotations

import sqlite3
import uuid

import asyncmy.errors
import asyncpg.exceptions as pg
import pytest
from sqlalchemy import exc as sa_exc

from sagakit.exceptions import (
    SagaBusyError,
    SagaStorageError,
    SagaStorageRejectedError,
    SagaStorageUnavailableError,
)
from sagakit.storage.faults import Fault, PoolExhausted, classify, reconnectable, storage_error

UNAVAILABLE = [
    pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    pg.AdminShutdownError("terminating connection due to administrator command"),
    pg.CannotConnectNowError("the database system is starting up"),
    pg.TooManyConnectionsError("sorry, too many clients already"),
    pg.InterfaceError("connection is closed"),
    pg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    asyncmy.errors.OperationalError(2006, "MySQL server has gone away"),
    asyncmy.errors.OperationalError(2013, "Lost connection to MySQL server during query"),
    asyncmy.errors.OperationalError(2003, "Can't connect to MySQL server"),
    asyncmy.errors.OperationalError(1927, "Connection was killed"),
    asyncmy.errors.InterfaceError(0, "Not connected"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
    sqlite3.OperationalError("unable to open database file"),
]
REJECTED = [
    pg.CheckViolationError("new row violates check constraint"),
    pg.StringDataRightTruncationError("value too long for type character varying(16)"),
    pg.UntranslatableCharacterError("unsupported Unicode escape sequence"),
    asyncmy.errors.DataError(1406, "Data too long for column 'details'"),
    asyncmy.errors.IntegrityError(1062, "Duplicate entry"),
    asyncmy.errors.OperationalError(4025, "CONSTRAINT `no_poison` failed"),
    sqlite3.IntegrityError("poison refused"),
]
OTHER = [
    pg.DeadlockDetectedError("deadlock detected"),
    pg.UndefinedTableError('relation "saga_executions" does not exist'),
    asyncmy.errors.OperationalError(1213, "Deadlock found when trying to get lock"),
    asyncmy.errors.ProgrammingError(1146, "Table 'test.saga_executions' doesn't exist"),
    sqlite3.OperationalError("database is locked"),
    RuntimeError("a bug"),
]


@pytest.mark.parametrize("error", UNAVAILABLE, ids=repr)
def test_connection_faults_are_unavailable_and_worth_a_fresh_connection(error):
    assert classify(error) is Fault.UNAVAILABLE
    assert reconnectable(error)
    assert isinstance(storage_error(error, "x"), SagaStorageUnavailableError)


@pytest.mark.parametrize("error", REJECTED, ids=repr)
def test_data_the_database_refuses_is_rejected(error):
    assert classify(error) is Fault.REJECTED
    assert not reconnectable(error)
    assert isinstance(storage_error(error, "x"), SagaStorageRejectedError)


@pytest.mark.parametrize("error", OTHER, ids=repr)
def test_other_failures_are_plain_storage_errors(error):
    assert classify(error) is Fault.OTHER
    assert not reconnectable(error)
    assert type(storage_error(error, "x")) is SagaStorageError


def test_sqlalchemy_wrapped_errors_are_told_by_the_driver_error_inside():
    lost = asyncmy.errors.OperationalError(2013, "Lost connection")
    wrapped = sa_exc.OperationalError("SELECT 1", {}, lost)
    assert classify(wrapped) is Fault.UNAVAILABLE
    adapted = RuntimeError("adapted")  # as SQLAlchemy's asyncpg adapter chains the original
    adapted.__cause__ = pg.CheckViolationError("check")
    assert classify(sa_exc.IntegrityError("UPDATE", {}, adapted)) is Fault.REJECTED
    invalidated = sa_exc.DBAPIError("SELECT 1", {}, RuntimeError("?"),
                                    connection_invalidated=True)
    assert classify(invalidated) is Fault.UNAVAILABLE


def test_an_exhausted_pool_is_unavailable_but_no_reason_to_reconnect():
    for error in (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"),
                  PoolExhausted("no database connection came free")):
        assert classify(error) is Fault.UNAVAILABLE
        assert not reconnectable(error)
        assert isinstance(storage_error(error, "x"), SagaStorageUnavailableError)


def test_the_storage_error_says_what_was_done_and_keeps_the_cause_to_chain():
    saga_id = uuid.uuid4()
    error = storage_error(pg.AdminShutdownError("terminating connection"), "writing a checkpoint",
                          saga_id=saga_id, saga_name="Order", step_name="Ship")
    assert (error.saga_id, error.saga_name, error.step_name) == (saga_id, "Order", "Ship")
    assert str(error) == (f"saga {saga_id}: the database is unavailable while writing a "
                          "checkpoint (AdminShutdownError: terminating connection)")


def test_sagakits_own_errors_pass_through_unchanged():
    busy = SagaBusyError("busy")
    assert storage_error(busy, "x") is busy
