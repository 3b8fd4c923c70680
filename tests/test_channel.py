"""Channel: whole pickled messages with descriptors over a socket pair."""

import os
import resource
import socket
import threading

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


def test_small_messages_a_reader_has_not_taken_yet_do_not_make_the_sender_wait(pair):
    # A writer still importing torch reads nothing: once the socket buffer is full, messages go
    # in memory files (the socket then carries only their descriptors), in order.
    sender, receiver = pair
    messages = [{"n": n, "pickle": bytes([n % 251]) * 4096} for n in range(120)]  # ~2.5x the default buffer
    sending = threading.Thread(target=lambda: [sender.send(m) for m in messages], daemon=True)
    sending.start()
    sending.join(timeout=120)
    sent_without_a_reader = not sending.is_alive()
    received = [receiver.recv()[0] for _ in messages]  # (also unblocks a sender that waits)
    sending.join()
    assert sent_without_a_reader, "the sender waited for the reader"
    assert received == messages


def test_descriptors_the_kernel_drops_on_arrival_fail_the_channel_instead_of_hanging_it(pair, tmp_path):
    """At its open-file limit a receiver gets the bytes of a message but not its descriptors
    (MSG_CTRUNC): waiting for them would wait for ever, so the channel fails at once."""
    from core.channel import ChannelClosedError

    sender, receiver = pair
    fd = os.open(tmp_path, os.O_RDONLY)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        sender.send({"n": 1}, [fd])
        lowest_free = os.dup(0)  # (the kernel hands out the lowest free number)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no room for one more
        with pytest.raises(ChannelClosedError, match="open-file limit"):
            receiver.recv()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
