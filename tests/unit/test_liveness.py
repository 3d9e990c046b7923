"""The liveness test of SQLite and the memory storage, and a worker's runs stopping on a loss."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from sagakit.storage.liveness import Liveness, held_by, live_owner_id, owner_is_dead
from sagakit.storage.run import new_owner_id

HOST = socket.gethostname()


def test_plain_foreign_and_malformed_owner_ids_are_never_judged() -> None:
    assert not owner_is_dead(None)
    assert not owner_is_dead(new_owner_id())  # no ~: its lease alone rules
    assert not owner_is_dead("~another-host:1:abcd-1")  # a pid there means nothing here
    assert not owner_is_dead(f"~{HOST}:notapid:abcd-1")
    assert not owner_is_dead("~")


def test_an_owner_of_a_process_gone_is_dead_and_of_a_live_one_not() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    gone = int(child.stdout)
    assert owner_is_dead(f"~{HOST}:{gone}:abcd1234-1")
    assert not owner_is_dead(f"~{HOST}:1:abcd1234-1")  # init: alive (not ours to signal)


async def test_an_owner_of_this_process_lives_while_its_session_is_open() -> None:
    async with Liveness() as live:
        owner = live.owner
        assert owner.startswith(f"~{HOST}:{os.getpid()}:")
        assert not owner_is_dead(owner)
        assert held_by(owner) is live.held
    assert owner_is_dead(owner)
    assert held_by(owner) is None
    assert owner_is_dead(live_owner_id())  # never opened


async def test_losing_a_session_stops_the_keepers_under_it() -> None:
    class Keeper:
        lost: object = None

        def lose(self, reason: object) -> None:
            self.lost = reason

    async with Liveness() as live:
        held = live.held
        assert held is not None
        keeper = Keeper()
        held.keepers.add(keeper)
        held.lose("the test")
        assert held.lost is not None
        assert keeper.lost is held.lost
        assert "the test" in str(held.lost)
        assert held_by(held.owner) is None
