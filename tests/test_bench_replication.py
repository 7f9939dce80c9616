"""The replication benchmark's end-to-end phase on a small backlog (not a timed test): the
listener, pg_recvlogical and the ceiling (the listener's own stream and hashing, nothing
written) each read the same transactions, and the ceiling computes the tree the listener commits."""

from __future__ import annotations

import pytest

from listener import registry
from listener.bench import replication
from listener.embedded import bin_dir
from tests.helpers import check_log, slots


def test_end_to_end_phase_reads_one_backlog_three_ways(rconn, dsn):
    if not (bin_dir() / "pg_recvlogical").is_file():
        pytest.skip("this PostgreSQL installation has no pg_recvlogical")
    replication._setup(dsn)
    registry.create_log(rconn, "bench_r")
    registry.add_source(rconn, "bench_r", "repl", mode="replication")

    result = replication.bench_end_to_end(dsn, 3_000)

    size, root = rconn.execute("SELECT tree_size, root FROM merkle.logs WHERE name = 'bench_r'").fetchone()
    assert size == 3_000 == result["rows"]
    ceiling = result["ceiling"]
    assert ceiling["tree_size"] == 3_000 and ceiling["tree_root"] == root.hex()
    assert ceiling["ratio"] == pytest.approx(ceiling["rows_per_s"] / result["pg_recvlogical_rows_per_s"], rel=0.01)
    assert result["listener_rows_per_s_acked"] > 0 and result["pg_recvlogical_rows_per_s"] > 0
    assert result["wal_bytes_per_leaf"] > 0 and result["wal_bytes_per_source_row"] > 0
    # Only the log's own slot is left: the two the phase made for itself are gone.
    assert set(slots(rconn)) == {"merkle_bench_r"}


def test_paced_writers_phase_keeps_its_rate_and_the_log_gets_every_row(rconn, dsn):
    replication._setup(dsn)
    registry.create_log(rconn, "bench_r")
    registry.add_source(rconn, "bench_r", "repl", mode="replication")

    result = replication.bench_paced_writers(dsn, 20_000, 0.5)

    for phase in ("slot_not_read", "listener_streaming"):
        assert 0 < result[phase]["achieved_rows_per_s"] <= 20_000 * 1.05
        assert 0 < result[phase]["statement_ms_p50"] <= result[phase]["statement_ms_p99"]
    assert result["ratio_achieved"] == pytest.approx(
        result["listener_streaming"]["achieved_rows_per_s"] / result["slot_not_read"]["achieved_rows_per_s"], rel=0.01)
    # Both rounds' rows are leaves: the listener took the unread round's first, then streamed.
    assert rconn.execute("SELECT tree_size FROM merkle.logs WHERE name = 'bench_r'").fetchone()[0] == 20_000
    check_log(rconn, "bench_r")
