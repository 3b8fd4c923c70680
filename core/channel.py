"""The socket between the trainer and its writer process: whole pickled messages plus descriptors.

A message is an 8-byte length and a descriptor count, then the pickle, sent with one
`sendmsg` that also carries up to 250 descriptors (SCM_RIGHTS); further descriptors follow in
messages of their own. A descriptor in flight keeps its file alive even if the sender dies, so a
request that reached the socket is complete for the writer whatever happens to the trainer.
Large pickles travel in an anonymous memory file instead of the socket buffer, and so does a
small one when the buffer is nearly full (a writer still importing torch, or behind): the socket
then carries only its header and descriptor, and a sender waits for the reader only once even
those no longer fit.
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import pickle
import socket
import struct
import termios
from typing import Any

_HEADER = struct.Struct("<QII")  # pickle length, descriptors, flags
_FDS_PER_MESSAGE = 250
_IN_MEMFD = 1
_INLINE_LIMIT = 64 << 10
_SKB_OVERHEAD = 4096  # what the kernel counts per message beyond its bytes, and then some


class ChannelClosedError(OSError):
    """The other end is gone (or this end was closed)."""


class Channel:
    """One end of the trainer-writer socket. Not thread-safe: one sender and one receiver."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) <= _INLINE_LIMIT and self._has_room(len(data)):
            self._send_parts(data, list(fds), 0)
            return
        memfd = os.memfd_create("async-ckpt-message", os.MFD_CLOEXEC)
        try:
            _write_all(memfd, data)
            self._send_parts(struct.pack("<Q", len(data)), [memfd, *fds], _IN_MEMFD)
        finally:
            os.close(memfd)

    def _has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit in the first half of the socket buffer now (the kernel counts
        more than the bytes); True where it does not say how much it holds."""
        try:
            queued = struct.unpack("i", fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            limit = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            return True
        return bool(queued + 2 * nbytes + _SKB_OVERHEAD <= limit // 2)  # (the rest: messages in memory files)

    def _send_parts(self, data: bytes, fds: list[int], flags: int) -> None:
        """The message, its descriptors beyond the first sendmsg's in messages of their own."""
        first, rest = fds[:_FDS_PER_MESSAGE], fds[_FDS_PER_MESSAGE:]
        self._sendmsg(_HEADER.pack(len(data), len(fds), flags) + data, first)
        for start in range(0, len(rest), _FDS_PER_MESSAGE):
            self._sendmsg(b"\0", rest[start : start + _FDS_PER_MESSAGE])

    def _sendmsg(self, data: bytes, fds: list[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        view = memoryview(data)
        try:
            sent = self._sock.sendmsg([view], ancillary)
            while sent < len(view):
                sent += self._sock.send(view[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosedError(exc.errno, "the other end of the checkpoint writer channel is gone") from None
        except OSError as exc:
            if self.closed:
                raise ChannelClosedError(exc.errno, "the checkpoint writer channel is closed") from None
            raise

    def recv(self) -> tuple[Any, list[int]]:
        """The next message and its descriptors (the caller owns them); EOFError when the peer is gone."""
        data, fds = self.recv_pickle()
        return pickle.loads(data), fds

    def recv_pickle(self) -> tuple[bytes, list[int]]:
        """The next message's pickle, not yet unpickled, and its descriptors (the caller owns them)."""
        header, fds = self._recv_exactly(_HEADER.size, want_fds=True)
        length, count, flags = _HEADER.unpack(header)
        data, more = self._recv_exactly(length, want_fds=len(fds) < count)
        fds += more
        while len(fds) < count:
            _, more = self._recv_exactly(1, want_fds=True)
            fds += more
        if flags & _IN_MEMFD:
            memfd, fds = fds[0], fds[1:]
            try:
                (size,) = struct.unpack("<Q", data)
                with mmap.mmap(memfd, size, prot=mmap.PROT_READ) as mapped:
                    data = bytes(mapped)
            finally:
                os.close(memfd)
        return data, fds

    def _recv_exactly(self, nbytes: int, want_fds: bool) -> tuple[bytes, list[int]]:
        chunks: list[bytes] = []
        fds: list[int] = []
        got = 0
        while got < nbytes:
            space = socket.CMSG_SPACE(_FDS_PER_MESSAGE * 4) if want_fds and not fds else 0
            try:
                data, ancillary, flags, _addr = self._sock.recvmsg(nbytes - got, space)
            except ConnectionResetError:
                data, ancillary, flags = b"", [], 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds += list(received)
            if flags & socket.MSG_CTRUNC:  # the kernel dropped descriptors: this message cannot be whole
                for fd in fds:
                    os.close(fd)
                raise ChannelClosedError(
                    errno.EMFILE,
                    "descriptors sent over the checkpoint writer channel were dropped on arrival (this process "
                    "may have reached its open-file limit, `ulimit -n`); the channel cannot go on",
                )
            if not data:
                for fd in fds:
                    os.close(fd)
                raise EOFError("the checkpoint writer channel was closed by the other end")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks), fds

    def shutdown(self, both: bool = False) -> None:
        """Tell the other end that nothing more will be sent (it reads end-of-file); with `both`,
        also stop receiving, which fails a send blocked on this socket at once."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR if both else socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()

    def detach(self) -> socket.socket:
        """The socket, no longer this channel's (for a writer kept in the pool)."""
        sock, self._sock = self._sock, socket.socket()
        self._sock.close()
        return sock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
