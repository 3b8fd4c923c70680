"""Manifest: a fixed-length record filled in place, and chunk digests."""

from concurrent.futures import ThreadPoolExecutor

import torch

from core.manifest import CHECKSUM, Manifest, chunk_digests, chunk_ranges, digest


def test_the_filled_manifest_has_the_placeholder_s_length():
    manifest = Manifest(b"pickle", [10_000, 0, 5], chunk_bytes=4096, checksums=True, extra={"write_id": "w"})
    for chunk in range(3):
        manifest.set_digest("0", chunk, digest(bytes([chunk])))
    manifest.set_digest("2", 0, digest(b"abc"))
    final = manifest.final()
    assert len(final) == len(manifest.placeholder)
    content = manifest.content
    assert content["checksum"] == CHECKSUM and len(content["storages"]["0"]["digests"]) == 3
    assert content["storages"]["1"] == {"nbytes": 0, "digests": []} and content["write_id"] == "w"


def test_without_checksums_no_digest_is_kept():
    manifest = Manifest(b"p", [4096], chunk_bytes=4096, checksums=False, extra={})
    manifest.set_digest("0", 0, digest(b"x"))
    assert manifest.content["checksum"] is None and manifest.content["storages"]["0"]["digests"] == []


def test_chunk_ranges_and_parallel_digests_match_one_by_one():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 4), (8, 2)] and chunk_ranges(0, 4) == []
    tensors = [torch.arange(10_000, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)]
    with ThreadPoolExecutor(2) as pool:
        parallel = chunk_digests(tensors, 4096, pool)
    serial = chunk_digests(tensors, 4096)
    assert parallel == serial and len(parallel[0]) == 3 and len(parallel[1]) == 1
    assert parallel[1][0] == digest(bytes(3)) and len(digest(b"")) == 16
