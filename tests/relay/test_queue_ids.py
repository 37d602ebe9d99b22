"""Queue ids: unique and time-ordered, even many in one millisecond."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay import queue
from relay.queue import new_queue_id

ID = re.compile(r"[0-9A-F]{17}")


def test_a_burst_of_ids_never_repeats_and_sorts_in_order_made() -> None:
    # 200,000 ids in a tight loop: hundreds per millisecond, where a random
    # 24-bit suffix alone would collide several times.
    ids = [new_queue_id() for _ in range(200_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(ID.fullmatch(qid) for qid in ids[:1000])


def test_ids_from_many_threads_never_repeat() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(
            pool.map(lambda _: [new_queue_id() for _ in range(20_000)], range(8))
        )
    ids = [qid for batch in batches for qid in batch]
    assert len(set(ids)) == len(ids)


def test_a_clock_stepping_back_keeps_ids_unique_and_ordered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make = queue._QueueIds()
    now = [1_700_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    first = [make() for _ in range(1000)]
    now[0] -= 5.0  # NTP steps the clock back five seconds
    after = [make() for _ in range(1000)]
    ids = first + after
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert ids[0][:11] == f"{1_700_000_000_000:011X}"


def test_a_full_millisecond_moves_on_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make = queue._QueueIds()
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    make()
    make._sequence = 0xFFFFFE
    ids = [make(), make(), make()]
    assert ids[0].endswith("FFFFFF")
    assert ids[1][:11] == f"{1_700_000_000_001:011X}"
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_ids_carry_the_time_they_were_made() -> None:
    before = int(time.time() * 1000)
    qid = new_queue_id()
    after = int(time.time() * 1000)
    assert before <= int(qid[:11], 16) <= after
