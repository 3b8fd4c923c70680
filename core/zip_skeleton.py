"""The zip skeleton of a checkpoint file: every byte torch.save would write except the storages'.

torch's own zip writer lays a skeleton out: the pickle, the small records, space reserved for
every storage at 4096-byte aligned offsets, the manifest's placeholder, `version`,
`.data/serialization_id` and the central directory. It writes into an anonymous memory file
reached through a symlink with an ASCII name as long as the archive's; a C++ stream that failed
on a full disk would abort the process, so every write to disk stays Python's. The archive
folder is named as torch.save names it (`archive_name`).

Laying a skeleton out costs more of the writer's CPU than writing a small state's bytes, and a
training job saves the same shapes again and again: the layout depends only on the length of the
archive's name, the pickle's length, the storages' sizes and the manifest's length. So each
layout is read back once into a template (its pieces: every byte between the storages' reserved
spans, and where the archive's name, the pickle, the manifest and the CRC-32 fields that name
them sit) and each later save of that layout fills the template in: the archive's name (which
only the records' names hold: files whose names, "epoch=0-step=12", name each step share one
template), the pickle, its CRC-32, the filled manifest, its CRC-32, and the serialization id,
which torch derives from the records' names without the archive's and their CRC-32s (checked
against torch's own when the template is made; a template whose id does not match keeps torch's
id and is not reused).
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from . import torch_internals
from .fsutil import PAGE_SIZE, write_all
from .manifest import MANIFEST_RECORD

STORAGE_ALIGNMENT = PAGE_SIZE
SERIALIZATION_ID = ".data/serialization_id"
_CENTRAL_ENTRY = b"PK\x01\x02"
_DATA_DESCRIPTOR = b"PK\x07\x08"
_KEPT_TEMPLATES = 8
_KEPT_TEMPLATE_BYTES = 64 << 20


def archive_name(path: str) -> str:
    """The folder torch.save puts a file's records in: the file's name up to its last dot, or
    "archive" where torch.save writes through Python (a name that is not ASCII). torch.save
    refuses a name with nothing before its last dot (".hidden"); it is "archive" here too."""
    name = os.path.basename(path)
    stem = name[: name.rfind(".")] if "." in name else name
    return stem if stem and stem.isascii() else "archive"


@dataclass(frozen=True)
class _Record:
    """A small record's place in the file: its data, its CRC-32 and every field that holds it."""

    offset: int
    nbytes: int
    crc: int
    crc_places: tuple[int, ...]


@dataclass(frozen=True)
class _Template:
    """One layout, as torch's writer laid it out."""

    size: int
    pieces: tuple[tuple[int, bytes], ...]  # (offset, bytes) between the storages' spans, in order
    offsets: dict[str, int]  # each storage's data ("0", "1", ...) and the manifest's
    pickle: _Record
    manifest: _Record
    serialization_id: _Record | None  # None: torch's id is kept as it laid it out
    crcs: tuple[int, ...]  # the CRC-32 of every data descriptor before the id's, in the order written
    manifest_index: int  # the manifest's among them (the pickle's is 0: torch.save writes it first)
    names_hash: bytes  # the id's first half, from the records' names
    records_in: dict[int, tuple[_Record, ...]]  # by piece: the records filled in per save that it holds a part of
    archive: bytes  # the archive's name the template was laid out with
    archive_in: dict[int, tuple[int, ...]]  # by piece: where a record's name holds the archive's (file offsets)

    @property
    def nbytes(self) -> int:
        return sum(len(piece) for _, piece in self.pieces)


class Skeleton:
    """One file's skeleton: written before its storages, finished with its manifest."""

    def __init__(self, template: _Template, archive: bytes, data_pkl: bytes) -> None:
        self._template = template
        self._archive = archive
        self._data_pkl = data_pkl
        self._pickle_crc = zlib.crc32(data_pkl)

    @property
    def offsets(self) -> dict[str, int]:
        """Where each storage's bytes ("0", "1", ...) and the manifest's start in the file."""
        return self._template.offsets

    def write(self, fd: int) -> None:
        """Size the file and write every piece before the manifest's, the pickle in place."""
        template = self._template
        os.ftruncate(fd, template.size)
        for index, (offset, _) in enumerate(template.pieces[:-1]):
            write_all(fd, self._filled(index, {}), offset)

    def finish(self, fd: int, manifest: bytes) -> None:
        """Write the last piece (the manifest, `version`, the serialization id and the central
        directory) with the filled `manifest`, which is as long as the placeholder laid out."""
        last = len(self._template.pieces) - 1
        write_all(fd, self._filled(last, self._finished(manifest)), self._template.pieces[last][0])

    def whole(self, storages: Sequence[memoryview], manifest: bytes) -> list[memoryview | bytes]:
        """The whole file as buffers back to back: every piece, each storage's bytes between them
        (`storages[i]` is storage "i"'s), and the filled `manifest` in the last piece."""
        template = self._template
        changes = self._finished(manifest)
        if len(template.pieces) != len(storages) + 1:
            raise AssertionError("the storages do not match the skeleton's reserved records")
        buffers: list[memoryview | bytes] = []
        for index, storage in enumerate(storages):
            buffers += [self._filled(index, changes), storage]
        buffers.append(self._filled(len(storages), changes))
        return buffers

    def _finished(self, manifest: bytes) -> dict[_Record, tuple[bytes, int]]:
        """The records that the filled `manifest` changes: its own and the serialization id."""
        template = self._template
        if len(manifest) != template.manifest.nbytes:
            raise AssertionError("the manifest's length differs from its placeholder's")
        manifest_crc = zlib.crc32(manifest)
        changes = {template.manifest: (manifest, manifest_crc)}
        if template.serialization_id is not None:
            crcs = list(template.crcs)
            crcs[0], crcs[template.manifest_index] = self._pickle_crc, manifest_crc
            changes[template.serialization_id] = _serialization_id(template.names_hash, crcs)
        return changes

    def _filled(self, index: int, changes: dict[_Record, tuple[bytes, int]]) -> bytes:
        """Piece `index` with the archive's name, the pickle and `changes` (a record's new data
        and CRC) in it."""
        template = self._template
        offset, piece = template.pieces[index]
        records = template.records_in.get(index, ())
        names = template.archive_in.get(index, ()) if self._archive != template.archive else ()
        if not records and not names:
            return piece
        changes = {template.pickle: (self._data_pkl, self._pickle_crc), **changes}
        filled = bytearray(piece)
        for place in names:
            filled[place - offset : place - offset + len(self._archive)] = self._archive
        for record in records:
            if record not in changes:
                continue
            data, crc = changes[record]
            if offset <= record.offset < offset + len(piece):
                filled[record.offset - offset : record.offset - offset + len(data)] = data
            for place in record.crc_places:
                if offset <= place < offset + len(piece):
                    filled[place - offset : place - offset + 4] = struct.pack("<I", crc)
        return bytes(filled)


def _serialization_id(names_hash: bytes, crcs: Sequence[int]) -> tuple[bytes, int]:
    """torch's serialization id (the names' hash, then every record's CRC-32 combined as c10's
    hash_combine combines them, 20 digits each) and its own CRC-32."""
    combined = 0
    for crc in crcs:
        combined = _hash_combine(combined, crc)
    value = names_hash + b"%020d" % combined
    return value, zlib.crc32(value)


def _hash_combine(seed: int, value: int) -> int:
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & mask) + (seed >> 2)) & mask)) & mask


class _Templates:
    """The writer process's recent layouts, the newest last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[object, ...], _Template] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> _Template | None:
        with self._lock:
            template = self._kept.get(key)
            if template is not None:
                self._kept.move_to_end(key)
            return template

    def keep(self, key: tuple[object, ...], template: _Template) -> None:
        with self._lock:
            self._kept[key] = template
            while len(self._kept) > _KEPT_TEMPLATES or (
                len(self._kept) > 1 and sum(t.nbytes for t in self._kept.values()) > _KEPT_TEMPLATE_BYTES
            ):
                self._kept.popitem(last=False)


_templates = _Templates()


def skeleton_for(path: str, data_pkl: bytes, storage_sizes: Sequence[int], manifest: bytes) -> Skeleton:
    """The skeleton of the checkpoint file `path` will be: its pickle `data_pkl`, storages of
    `storage_sizes` bytes, and the manifest's placeholder `manifest`."""
    archive = archive_name(path).encode()
    key = (len(archive), len(data_pkl), tuple(storage_sizes), len(manifest))
    template = _templates.get(key)
    if template is None:
        template = _lay_out(os.path.dirname(path), len(archive), data_pkl, storage_sizes, manifest)
        if template.serialization_id is not None:
            _templates.keep(key, template)
    return Skeleton(template, archive, data_pkl)


def _lay_out(
    directory: str, archive_length: int, data_pkl: bytes, storage_sizes: Sequence[int], manifest: bytes
) -> _Template:
    memory = os.memfd_create("async-ckpt-skeleton", os.MFD_CLOEXEC)
    try:
        _write_with_torch(memory, directory, archive_length, data_pkl, storage_sizes, manifest)
        with os.fdopen(os.dup(memory), "rb") as laid_out:
            return _read_template(laid_out, memory, len(storage_sizes))
    finally:
        os.close(memory)


def _write_with_torch(
    memory: int, directory: str, archive_length: int, data_pkl: bytes, storage_sizes: Sequence[int], manifest: bytes
) -> None:
    """Have torch's writer lay the skeleton out in `memory`, its archive named "aaa..." (as long
    as the real name, which is filled in per save), through an ASCII path: torch's writer takes
    only those (a name it cannot encode made it abort the process), whatever `directory` is."""
    alias_folder = os.path.join(directory, ".skeleton")
    os.mkdir(alias_folder, 0o700)
    folder = os.open(alias_folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        alias = "a" * archive_length + ".pt"
        os.symlink(f"/proc/{os.getpid()}/fd/{memory}", alias, dir_fd=folder)
        writer = torch_internals.FileWriter(f"/proc/{os.getpid()}/fd/{folder}/{alias}", True, STORAGE_ALIGNMENT)
        writer.write_record("data.pkl", data_pkl, len(data_pkl))
        for name, value in (
            (".format_version", "1"),
            (".storage_alignment", str(STORAGE_ALIGNMENT)),
            ("byteorder", sys.byteorder),
        ):
            writer.write_record(name, value, len(value))  # str records, as torch.save writes
        for key, nbytes in enumerate(storage_sizes):
            torch_internals.reserve_record(writer, f"data/{key}", nbytes)
        writer.write_record(MANIFEST_RECORD, manifest, len(manifest))
        writer.write_end_of_file()
        del writer
    finally:
        os.close(folder)
        shutil.rmtree(alias_folder, ignore_errors=True)


def _read_template(laid_out: BinaryIO, memory: int, storages: int) -> _Template:
    """The template of the skeleton torch laid out in `memory` (`laid_out` reads it)."""
    with zipfile.ZipFile(laid_out) as laid_out_zip:
        infos = laid_out_zip.infolist()
        central = laid_out_zip.start_dir
    if not infos or not infos[0].filename.endswith("/data.pkl"):
        raise AssertionError("torch's zip writer did not write data.pkl first")
    prefix = infos[0].filename.removesuffix("data.pkl")  # the archive's folder, as torch named it
    archive = prefix.removesuffix("/").encode()
    entries = _central_entries(memory, central)
    crc_places = _crc_places(memory, infos, entries)
    records: dict[str, _Record] = {}
    reserved: list[tuple[int, int]] = []
    for info in infos:
        name = info.filename.removeprefix(prefix)
        offset = _data_offset(memory, info)
        if name.startswith("data/") and name[5:].isdigit() and int(name[5:]) < storages:
            reserved.append((offset, info.file_size))
        records[name] = _Record(offset, info.file_size, info.CRC, crc_places[info.filename])
    pieces = _pieces_between(memory, os.fstat(memory).st_size, reserved)
    # torch combines the CRC-32 of each data descriptor it writes (an empty record has none)
    described = [info for info in infos if info.flag_bits & 0x08 and info.filename != prefix + SERIALIZATION_ID]
    names = [info.filename.removeprefix(prefix) for info in described]
    crcs = tuple(records[name].crc for name in names)
    identity = records.get(SERIALIZATION_ID)
    laid_id = b"" if identity is None else os.pread(memory, identity.nbytes, identity.offset)
    if identity is None or _serialization_id(laid_id[:20], crcs)[0] != laid_id:
        identity = None  # this torch derives its id otherwise: keep the one it wrote
    manifest = records[MANIFEST_RECORD]
    if manifest.offset < pieces[-1][0]:
        raise AssertionError("torch's writer put the manifest before a storage")
    filled = [records["data.pkl"], manifest] + ([identity] if identity is not None else [])
    records_in = {
        index: tuple(r for r in filled if any(start <= at < start + len(piece) for at in (r.offset, *r.crc_places)))
        for index, (start, piece) in enumerate(pieces)
    }
    archive_places = _archive_places(memory, infos, entries, archive)
    archive_in = {
        index: tuple(at for at in archive_places if start <= at < start + len(piece))
        for index, (start, piece) in enumerate(pieces)
    }
    return _Template(
        size=os.fstat(memory).st_size,
        pieces=pieces,
        offsets={**{str(k): records[f"data/{k}"].offset for k in range(storages)}, MANIFEST_RECORD: manifest.offset},
        pickle=records["data.pkl"],
        manifest=manifest,
        serialization_id=identity,
        crcs=crcs,
        manifest_index=names.index(MANIFEST_RECORD),
        names_hash=laid_id[:20],
        records_in={index: records for index, records in records_in.items() if records},
        archive=archive,
        archive_in={index: places for index, places in archive_in.items() if places},
    )


def _data_offset(memory: int, info: zipfile.ZipInfo) -> int:
    """Where a record's data starts: after its local header, whose name and extra field (torch's
    alignment padding) the central directory does not give the length of."""
    name_length, extra_length = struct.unpack("<HH", os.pread(memory, 4, info.header_offset + 26))
    return int(info.header_offset + 30 + name_length + extra_length)


def _central_entries(memory: int, central: int) -> list[tuple[int, str]]:
    """Each central directory entry's offset and record name."""
    entries = []
    entry = central
    while os.pread(memory, 4, entry) == _CENTRAL_ENTRY:
        name_length, extra_length, comment_length = struct.unpack("<HHH", os.pread(memory, 6, entry + 28))
        entries.append((entry, os.pread(memory, name_length, entry + 46).decode()))
        entry += 46 + name_length + extra_length + comment_length
    return entries


def _archive_places(
    memory: int, infos: Sequence[zipfile.ZipInfo], entries: Sequence[tuple[int, str]], archive: bytes
) -> tuple[int, ...]:
    """Where the archive's name starts in every record's name: its local header's and its central
    directory entry's (torch puts every record in the archive's folder)."""
    local = [info.header_offset + 30 for info in infos]
    places = local + [entry + 46 for entry, _ in entries]
    if any(os.pread(memory, len(archive) + 1, place) != archive + b"/" for place in places):
        raise AssertionError("torch's zip writer put a record outside the archive's folder")
    return tuple(places)


def _crc_places(
    memory: int, infos: Sequence[zipfile.ZipInfo], entries: Sequence[tuple[int, str]]
) -> dict[str, tuple[int, ...]]:
    """Per record, every field that holds its CRC-32: its local header's (unless a data descriptor
    holds it instead), its data descriptor's and its central directory entry's."""
    candidates: dict[str, list[int]] = {}
    for info in infos:
        candidates[info.filename] = [info.header_offset + 14]
        if info.flag_bits & 0x08:
            descriptor = _data_offset(memory, info) + info.compress_size
            signed = os.pread(memory, 4, descriptor) == _DATA_DESCRIPTOR
            candidates[info.filename].append(descriptor + 4 if signed else descriptor)
    for entry, name in entries:
        candidates.setdefault(name, []).append(entry + 16)
    by_crc = {info.filename: struct.pack("<I", info.CRC) for info in infos}
    return {
        name: tuple(place for place in places if os.pread(memory, 4, place) == by_crc.get(name))
        for name, places in candidates.items()
    }


def _pieces_between(memory: int, size: int, reserved: list[tuple[int, int]]) -> tuple[tuple[int, bytes], ...]:
    """The laid-out bytes between the reserved spans (offset, nbytes), as (offset, bytes) pieces."""
    pieces = []
    start = 0
    for offset, nbytes in sorted(reserved):
        if offset > start:
            pieces.append((start, os.pread(memory, offset - start, start)))
        start = max(start, offset + nbytes)
    pieces.append((start, os.pread(memory, size - start, start)))
    return tuple(pieces)
