"""The client processes' pipes: frames come out whole however the bytes arrive, and reads reuse one buffer."""

import os

import pytest

from server_app.client_processes import READ_CHUNK, Frames, Reader, framed


def test_frames_come_out_whole_however_the_bytes_are_cut():
    frames = [b"", b"a", bytes(range(256)) * 4, b"xyz"]
    stream = b"".join(framed(f) for f in frames)
    for cut in range(len(stream) + 1):
        inbox = Frames()
        view = memoryview(stream)
        assert inbox.feed(view[:cut]) + inbox.feed(view[cut:]) == frames
        assert not inbox.buffer
    inbox = Frames()
    assert [f for i in range(len(stream)) for f in inbox.feed(stream[i:i + 1])] == frames  # a byte at a time


def test_a_reader_reads_into_its_own_buffer_and_sees_the_end():
    r, w = os.pipe()
    try:
        reader = Reader()
        os.write(w, b"abc")
        first = reader.read(r)
        assert bytes(first) == b"abc" and first.obj is reader.buffer  # no new allocation per read
        os.write(w, b"x" * 10)
        assert bytes(reader.read(r)) == b"x" * 10 and len(reader.buffer) == READ_CHUNK
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            reader.read(r)
        os.close(w)
        w = -1
        assert len(reader.read(r)) == 0  # the writer is gone: end of file
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
