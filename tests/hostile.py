"""Hostile and damaged checkpoint files, made the way an attacker or a bad disk would make them."""

import json
import os
import struct
import zipfile
import zlib
from collections import OrderedDict

import torch

MANIFEST = "async_ckpt_manifest.json"


class RebuiltTensor:
    """Pickles as torch.save's call that rebuilds a tensor, with any storage offset, size and
    stride: what a damaged or forged data.pkl can ask the loader for."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, OrderedDict()),
        )


def forged_tensor_file(path, offset, size, stride, elements=4):
    """A torch.save file holding {"x": a tensor viewing `elements` floats as offset/size/stride say}."""
    storage = torch.arange(float(elements)).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    torch.save({"x": RebuiltTensor(typed, offset, size, stride), "ok": torch.ones(2)}, path)


def shared_reference_bomb(path, levels=60):
    """A few KiB whose structure is a tree of 2**levels paths: one list shared at every level."""
    nested = [torch.ones(1)]
    for _ in range(levels):
        nested = [nested, nested]
    torch.save({"x": nested, "w": torch.ones(3)}, path)


def deep_nesting(path, depth=100_000):
    """A torch.save-shaped file whose structure nests `depth` lists (pickled by hand: Python's
    pickler cannot write that deep)."""
    torch.save({"x": []}, path)
    body = b"\x80\x02}X\x01\x00\x00\x00x" + b"]" * depth + b"a" * (depth - 1) + b"s."
    replace_record(path, "data.pkl", body)


def replace_record(path, record, data):
    """Rewrite the zip file at `path` with `record`'s bytes replaced (records keep their order)."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in records:
            archive.writestr(name, data if name.split("/", 1)[1] == record else value)


def edit_manifest(path, edit, keep_crc_valid=True):
    """Apply `edit` (dict -> None) to the manifest in place; the record keeps its length (padded
    with spaces), and its zip CRC-32 is updated unless `keep_crc_valid` is False."""
    reader = torch._C.PyTorchFileReader(str(path))
    offset = reader.get_record_offset(MANIFEST)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/" + MANIFEST))
    with open(path, "r+b") as f:
        f.seek(offset)
        raw = f.read(info.file_size)
        manifest = json.loads(raw)
        edit(manifest)
        new = json.dumps(manifest).encode()
        assert len(new) <= len(raw), "the edit must not lengthen the manifest"
        new = new + b" " * (len(raw) - len(new))
        f.seek(offset)
        f.write(new)
    if keep_crc_valid:
        set_crc(path, MANIFEST, zlib.crc32(new))


def set_crc(path, record, crc):
    """Write `crc` into a record's local header and central directory entry."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.split("/", 1)[1] == record)
        central = archive.start_dir
    packed = struct.pack("<I", crc)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 14)
        f.write(packed)
        f.seek(central)
        entry = central + f.read().find(info.filename.encode()) - 46  # the name follows a 46-byte header
        f.seek(entry + 16)
        f.write(packed)


def flip(path, offset, mask=0xFF):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def size(path):
    return os.path.getsize(path)
