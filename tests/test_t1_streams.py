"""Layer 1 units: how many streaming GETs a mount runs at once, from the server's distance.

What a user cares about: a server that answers slower never gets fewer streams than one that
answers faster (a far server's per-connection rate needs more of them), a server far enough
gets more than a near one, ``-o get_streams=`` wins whatever the distance, and no count ever
exceeds ``max_requests``.  The counts themselves are tuning, so no figure is pinned here.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from s3ssefs.streams import stream_counts

answers = st.one_of(st.none(), st.floats(min_value=0.0, max_value=10.0))
limits = st.integers(min_value=1, max_value=1 << 10)


@given(st.floats(min_value=0.0, max_value=10.0), st.floats(min_value=0.0, max_value=10.0),
       limits)
def test_a_slower_answer_never_gets_fewer_streams(a: float, b: float, max_requests: int
                                                  ) -> None:
    fast, slow = sorted((a, b))
    near, far = stream_counts(fast, None, max_requests), stream_counts(slow, None, max_requests)
    assert near[0] <= far[0] and near[1] <= far[1]


def test_a_far_server_gets_more_streams_than_a_near_one() -> None:
    near = stream_counts(0.0, None, 1 << 20)
    far = stream_counts(1.0, None, 1 << 20)  # a second for the quickest answer: far away
    assert far[0] > near[0] and far[1] > near[1]
    assert stream_counts(None, None, 1 << 20) == near  # nothing timed yet: taken as near


@given(answers, st.integers(min_value=1, max_value=64), limits)
def test_the_option_wins_and_the_request_limit_caps(answer: float | None, fixed: int,
                                                    max_requests: int) -> None:
    assert stream_counts(answer, fixed, max_requests) == (min(fixed, max_requests),) * 2
    for n in stream_counts(answer, None, max_requests):
        assert 1 <= n <= max_requests
