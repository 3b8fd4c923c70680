"""SlabPool: reuse across saves, holds by writes, room, replacement, and closing."""

import time

import pytest

from core import CheckpointerClosedError
from core.slab import SlabPool


def test_a_staged_slab_is_reused_for_the_next_save_of_its_size():
    pool = SlabPool(1)
    try:
        first = pool.try_acquire(10_000)
        assert first is not None
        assert pool.try_acquire(10_000) is None, "one slab, being staged: no room"
        pool.staged(first)
        second = pool.try_acquire(10_000)
        assert second is not None and second.slab is first.slab
        assert not first.hold(), "a later snapshot took the slab: the first one's write cannot hold it"
    finally:
        pool.close()


def test_a_held_slab_is_not_handed_out_until_its_write_releases_it():
    pool = SlabPool(2)
    try:
        lease = pool.try_acquire(4096)
        pool.staged(lease)
        assert lease.hold()
        other = pool.try_acquire(4096)
        assert other is not None and other.slab is not lease.slab, "the held slab was reused"
        pool.staged(other)
        assert other.hold()
        assert pool.try_acquire(4096) is None, "both slabs are held by writes"
        lease.release()
        again = pool.try_acquire(4096)
        assert again is not None and again.slab is lease.slab
    finally:
        pool.close()


def test_a_free_slab_too_small_is_replaced_and_its_snapshot_kept_valid():
    pool = SlabPool(1)
    kept = []
    try:
        small = pool.try_acquire(4096)
        small.before_reuse = lambda: kept.append("copied out")
        pool.staged(small)
        large = pool.try_acquire(1 << 20)
        assert large is not None and large.slab.nbytes >= 1 << 20 and small.slab.closed
        assert kept == ["copied out"]
    finally:
        pool.close()


def test_a_free_slab_too_small_is_replaced_before_another_is_lent_beyond_max_slabs():
    # Two small slabs from earlier saves; then saves of a larger state, each written before the
    # next. They must reuse one slab, not fault in a new one lent by the byte budget every time.
    pool = SlabPool(2, budget_bytes=64 << 20)
    try:
        small = [pool.try_acquire(4096), pool.try_acquire(4096)]
        for lease in small:
            pool.staged(lease)
        used = set()
        for _ in range(4):
            lease = pool.try_acquire(1 << 20)
            assert lease is not None
            pool.staged(lease)
            assert lease.hold()
            lease.release()
            used.add(lease.slab.slab_id)
            assert len(pool.slabs) <= 2
        assert len(used) == 1, "every save of the larger state faulted in a slab of its own"
    finally:
        pool.close()


def _staged_and_held(pool, count):
    """A burst: `count` saves of 64 KiB staged into the pool, each held by its write."""
    leases = [pool.try_acquire(64 << 10) for _ in range(count)]
    for lease in leases:
        assert lease is not None
        pool.staged(lease)
        assert lease.hold()
    return leases


def test_slabs_lent_for_a_burst_go_back_once_written():
    pool = SlabPool(1, budget_bytes=1 << 20, linger_seconds=0)
    try:
        leases = _staged_and_held(pool, 3)  # one slab, two lent
        for lease in leases:
            lease.release()
        assert len(pool.slabs) == 1
    finally:
        pool.close()


def test_slabs_lent_for_bursts_close_together_are_reused_then_trimmed():
    # Saves every step with a writer that falls behind and catches up again and again: each burst
    # must take the slabs the previous one was lent, not close them and fault in new ones.
    pool = SlabPool(1, budget_bytes=1 << 20, linger_seconds=3600)
    try:
        lent: list[set[str]] = []
        for _ in range(3):
            leases = _staged_and_held(pool, 3)
            for lease in leases:
                lease.release()  # caught up
            lent.append({lease.slab.slab_id for lease in leases})
        assert lent[0] == lent[1] == lent[2], "a burst faulted in new slabs instead of reusing the lent ones"
        held = pool.try_acquire(64 << 10)
        assert held is not None
        pool.staged(held)
        assert held.hold()
        pool.trim()
        assert len(pool.slabs) == 3, "trim() closed slabs while a write still held one"
        held.release()
        pool.trim()
        assert len(pool.slabs) == 1
    finally:
        pool.close()


def test_slabs_lent_for_a_burst_go_back_at_the_first_save_after_the_linger():
    # A burst, then saves spaced further apart than the linger: the lent slabs must go back, not
    # be kept lent by every later save.
    pool = SlabPool(1, budget_bytes=1 << 20, linger_seconds=0.05)
    try:
        leases = _staged_and_held(pool, 3)
        for lease in leases:
            lease.release()  # caught up within the linger: kept
        assert len(pool.slabs) == 3
        time.sleep(0.1)  # (longer than the linger: what is asserted needs it passed, not a deadline)
        lease = pool.try_acquire(64 << 10)
        assert lease is not None
        assert len(pool.slabs) == 1
        pool.staged(lease)
    finally:
        pool.close()


def test_the_latest_snapshot_keeps_its_slab_when_a_burst_is_trimmed():
    # A save repeated after its writes finished (ModelCheckpoint's last.ckpt after its top-k file)
    # writes the same snapshot again: its slab must not be the one closed, whatever order the
    # writes finished in.
    pool = SlabPool(1, budget_bytes=1 << 20, linger_seconds=0)
    try:
        leases = _staged_and_held(pool, 3)
        for lease in reversed(leases):
            lease.release()
        assert pool.slabs == (leases[-1].slab.slab_id,) and leases[-1].hold()
        leases[-1].release()
    finally:
        pool.close()


def test_a_spare_is_made_only_when_no_free_slab_fits_and_there_is_room():
    pool = SlabPool(2)
    try:
        lease = pool.try_acquire(8192)
        pool.staged(lease)
        assert pool.new_spare(8192) is None, "a free slab of that size exists"
        spare = pool.new_spare(8192, besides=lease.slab)
        assert spare is not None and spare.slab is not lease.slab
        pool.abandon(spare)
        assert pool.new_spare(8192, besides=lease.slab) is None, "the spare exists now"
        assert len(pool.slabs) == 2
    finally:
        pool.close()


def test_a_closed_pool_refuses_and_frees_every_slab():
    pool = SlabPool(1)
    lease = pool.try_acquire(4096)
    pool.close()
    assert lease.slab.closed and pool.slabs == ()
    with pytest.raises(CheckpointerClosedError):
        pool.try_acquire(4096)
    with pytest.raises(ValueError):
        SlabPool(0)
