"""Large values between the local engine's driver and its worker processes, through shared
memory instead of the pipe.

A value with at least ``SHM_MIN_BYTES`` of out-of-band buffers (numpy arrays: a round's
parameters and optimizer state, a worker's round result) is pickled with protocol 5, its
buffers copied into the sender's shared-memory segment (``multiprocessing.shared_memory``),
and only the pickle's head and the segment's name go through the pipe; the receiver copies
the buffers out, so what it gets owns its memory. Through the pipe, a value was pickled once
per worker and pushed through a 64 KB pipe buffer by both sides.

Each sender keeps one segment and reuses it (grown when a value does not fit): a new
segment for every value cost more than the copy itself (a fresh 13.7 MB segment: ~10 ms of
page faults, against ~2 ms to copy into a mapped one). Reuse is safe because of the local
engine's protocol: a worker's next result is written only after the driver sent it the
next task, which the driver does only after copying the previous result out; the driver's
next job's value is written only after every worker that received the previous one has
answered (or was restarted). A sender that is busy (``Sender.busy``: a job started while
another one's iterator is still open) sends through the pipe instead.

Segments are unlinked by their sender (``Sender.close``, and on growth); the driver unlinks
the segment of a worker that died (``unlink``), and the worker processes share the driver's
resource tracker (multiprocessing's spawn passes it on), which removes anything left.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

#: values with fewer out-of-band bytes go through the pipe as before (not worth a copy
#: through shared memory: a probe task's result, a featurize chunk's counts). The
#: environment variable (inherited by the workers) moves it: a huge value turns shared
#: memory off, as ``benchmarks/rounds.py --engines local-pipe`` does to compare.
SHM_MIN_BYTES = int(os.environ.get("DEEPTRANSFER_SHM_MIN_BYTES", 1 << 20))


@dataclass
class Packed:
    """A value whose buffers lie in a shared-memory segment: small to pickle."""

    head: bytes  # the protocol-5 pickle without its buffers
    name: str  # the segment
    spans: list[tuple[int, int]]  # (offset, nbytes) of each buffer in the segment


class Sender:
    """One side's reusable segment for the values it sends (see the module docstring)."""

    def __init__(self) -> None:
        self._seg: shared_memory.SharedMemory | None = None
        self.busy = False  # set while a value packed into the segment may still be read

    def pack(self, value: Any) -> Any:
        """``value`` itself when it is small (or does not pickle with protocol 5), else a
        ``Packed`` whose buffers were copied into this sender's segment."""
        buffers: list[pickle.PickleBuffer] = []
        try:
            head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        except Exception:  # noqa: BLE001 - what the pipe's pickler handles is its business
            return value
        views = [b.raw() for b in buffers]
        total = sum(v.nbytes for v in views)
        if total < SHM_MIN_BYTES:
            return value
        if self.busy:  # a reader may still need the segment: through the pipe instead
            return value
        if self._seg is None or self._seg.size < total:
            self.close()
            self._seg = shared_memory.SharedMemory(create=True, size=total)
        seg = self._seg
        spans, pos = [], 0
        for v in views:
            seg.buf[pos:pos + v.nbytes] = v
            spans.append((pos, v.nbytes))
            pos += v.nbytes
        return Packed(head, seg.name, spans)

    def close(self) -> None:
        """Unlink the segment (no reader will attach it again)."""
        if self._seg is not None:
            _drop(self._seg, unlink=True)
            self._seg = None


def unpack(value: Any) -> Any:
    """The value that was packed, its buffers copied out of the segment (the result owns its
    memory and is writable)."""
    if not isinstance(value, Packed):
        return value
    seg = shared_memory.SharedMemory(name=value.name)
    try:
        buffers = [bytearray(seg.buf[a:a + n]) for a, n in value.spans]
    finally:
        seg.close()
    return pickle.loads(value.head, buffers=buffers)


def unlink(name: str) -> None:
    """Remove segment ``name`` (left by a worker that died; a no-op when it is gone)."""
    try:
        _drop(shared_memory.SharedMemory(name=name), unlink=True)
    except FileNotFoundError:
        pass


def _drop(seg: shared_memory.SharedMemory, *, unlink: bool) -> None:
    seg.close()
    if unlink:
        try:
            seg.unlink()
        except FileNotFoundError:
            pass
