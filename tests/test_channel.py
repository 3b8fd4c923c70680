"""Channel: whole pickled messages with descriptors over a socket pair."""

import os
import socket

import pytest

from core.channel import Channel


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ends = Channel(a), Channel(b)
    yield ends
    for end in ends:
        end.close()


def test_a_message_and_its_descriptors_arrive_together(pair, tmp_path):
    sender, receiver = pair
    (tmp_path / "f").write_text("payload")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        sender.send({"n": 1, "name": "x"}, [fd])
    finally:
        os.close(fd)  # a descriptor in flight keeps its file open
    message, fds = receiver.recv()
    assert message == {"n": 1, "name": "x"} and len(fds) == 1
    with os.fdopen(fds[0]) as received:
        assert received.read() == "payload"


def test_large_messages_and_many_descriptors(pair):
    sender, receiver = pair
    big = b"x" * (1 << 20)  # beyond the socket buffer: travels in a memory file
    fds = [os.dup(0) for _ in range(300)]  # more than one sendmsg carries
    try:
        sender.send(big, fds)
    finally:
        for fd in fds:
            os.close(fd)
    message, received = receiver.recv()
    assert message == big and len(received) == 300
    for fd in received:
        os.close(fd)


def test_the_raw_pickle_can_be_taken_and_the_end_of_the_peer_is_eof(pair):
    sender, receiver = pair
    sender.send([1, 2])
    data, fds = receiver.recv_pickle()
    assert isinstance(data, bytes) and fds == []
    sender.shutdown()
    with pytest.raises(EOFError):
        receiver.recv()
