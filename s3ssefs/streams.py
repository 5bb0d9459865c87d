"""How many streaming GETs run at once: few when the server is near, more when it is far.

A streaming GET (a readahead run of up to 8 MiB, see :mod:`s3ssefs.blocks`) costs the daemon
CPU for every byte: its worker thread takes the GIL back for each 16 KiB TLS record, and a
block bound for the disk cache is sealed and written.  Against a server near enough to answer
in a millisecond or two, as RGW on a test machine's loopback, the cores are the limit and
more streams only spend them on lock hand-offs: 2 streams read as fast as 4 or 8, on less
CPU.  Blocks that skip the cache (a first pass, or a file over ``cache_stream_max``) leave
the cores to the GETs, and 2 streams then leave some idle, so those get 4.  Against a server
far away one connection is bound by its round trips and by the server's rate per connection
(AWS documents one well below a fast link's), and 2 streams leave the link idle: through a
proxy adding latency and capping each connection's rate (``tests/bench/farproxy.py``), 8
streams read about twice as fast as 2, and 16 no faster than 8.  The measurements are in
docs/benchmarks.md.

The endpoint's name does not say which case a mount is in; the time the server takes to
answer does.  The fastest answer among the last few small requests sent at quiet moments
(:meth:`s3ssefs.http1.Pool.fastest_answer`) is the round trip plus the server's least work,
and CPU contention on our side can only make answers slower, never faster, so one quick answer
proves the server near.  Over :data:`FAR` the mount gets :data:`FAR_STREAMS` streams for both
kinds of blocks.  The two mistakes do not cost the same: a near server taken for far costs
a little more CPU and reads as fast, a far one taken for near reads at half speed; so the
line is low, though above what a server on the same machine answers a small request in when
idle, even on a new connection.
``get_streams`` fixes the count instead.  With ``boto3_only`` no answer is timed (the lean
path's client times them) and the near counts hold.
"""

from __future__ import annotations

BULK_GETS = 2  # streams at once whose blocks go to the disk cache, from a near server...
BULK_GETS_UNCACHED = 4  # ...and whose blocks do not (a file over cache_stream_max)
FAR = 0.005  # s: a server whose fastest recent answer took longer is far
FAR_STREAMS = 8  # streams of each kind from a far server (a readahead window of 64 MiB)


def stream_counts(fastest_answer: float | None, fixed: int | None,
                  max_requests: int) -> tuple[int, int]:
    """(cached, uncached) streaming GETs allowed at once, never more than ``max_requests``."""
    if fixed is not None:
        cached = uncached = fixed
    elif fastest_answer is not None and fastest_answer > FAR:
        cached = uncached = FAR_STREAMS
    else:
        cached, uncached = BULK_GETS, BULK_GETS_UNCACHED
    return min(cached, max_requests), min(uncached, max_requests)
