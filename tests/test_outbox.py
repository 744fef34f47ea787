"""The telemetry outbox on disk: ordered, bounded with counted drops, surviving a restart."""

from __future__ import annotations

from sync.telemetry import Outbox


def test_the_outbox_keeps_order_counts_what_falls_off_and_survives_a_restart(tmp_path):
    outbox = Outbox(tmp_path / "outbox", max_records=3)
    for _ in range(5):
        seq = outbox.next_seq()
        outbox.append(seq, f"record {seq}".encode())
    assert [seq for seq, _ in outbox.peek(10)] == [3, 4, 5]  # the oldest fell off
    stats = outbox.stats()
    assert (stats.queued, stats.dropped, stats.last_seq) == (3, 2, 5)
    assert [seq for seq, _ in outbox.peek(10, after=3)] == [4, 5]  # past what was acknowledged
    outbox.remove_through(3)
    outbox.refuse(4)
    outbox.add_lost(2)  # records the disk refused while the broker was away
    outbox.close()

    reopened = Outbox(tmp_path / "outbox", max_records=3)  # the agent restarted
    assert reopened.peek(10) == [(5, b"record 5")]
    stats = reopened.stats()
    assert (stats.dropped, stats.refused, stats.lost) == (2, 1, 2)
    reopened.remove_through(5)
    assert reopened.next_seq() == 6  # numbering goes on even with the outbox empty
    reopened.close()
