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


def test_looks_back_off_while_nothing_is_in_flight_and_a_poke_brings_them_back() -> None:
    from sagakit.storage.liveness import BUSY, ORPHANS, QUIET

    woken: list[bool] = []
    live = Liveness(every=2.0, max_quiet=15.0, on_orphans=lambda: woken.append(True))
    assert 1.6 <= live._next_look() <= 2.4
    for _ in range(20):
        live._found(QUIET)  # an idle fleet: nothing in flight anywhere
    assert 12.0 <= live._next_look() <= 18.0
    live.poke()  # woken for new work
    assert 1.6 <= live._next_look() <= 2.4
    for _ in range(20):
        live._found(QUIET)
    live._found(BUSY)  # others have sagas in flight: watch them closely
    assert 1.6 <= live._next_look() <= 2.4
    assert woken == []
    live._found(ORPHANS)
    assert woken == [True]
    without_push = Liveness(every=2.0)  # no wake-ups: it never backs off
    for _ in range(20):
        without_push._found(QUIET)
    assert 1.6 <= without_push._next_look() <= 2.4
