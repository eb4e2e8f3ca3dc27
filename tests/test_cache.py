"""Response stores and cacheability rules: LRU, TTL, byte limits, keys, Vary, replay headers."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrails.fallback import (
    CachedResponse,
    MemoryCache,
    ResponseStore,
    age_header,
    lookup,
    make_key,
    remember,
    request_cacheable,
    response_cacheable,
    stale_headers,
    vary_names,
)

Headers = list[tuple[bytes, bytes]]


class FakeClock:
    """Monotonic time that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def response(body: bytes = b"ok", *, headers: Headers | None = None) -> CachedResponse:
    return CachedResponse.build(200, headers or [], body, stored_at=1_000_000.0)


def cost(key: str, resp: CachedResponse) -> int:
    return len(key) + resp.size


# --- CachedResponse --------------------------------------------------------------------


def test_size_counts_body_and_header_bytes() -> None:
    resp = CachedResponse(200, ((b"content-type", b"text/plain"), (b"etag", b"x")), b"hello", 0.0)
    assert resp.size == 5 + len(b"content-type") + len(b"text/plain") + 4 + 1


def test_build_reads_vary_names_lowercased_in_order() -> None:
    resp = CachedResponse.build(
        200,
        [(b"vary", b"Accept-Encoding, X-Tenant"), (b"Vary", b"accept-encoding,Accept")],
        b"",
        stored_at=5.0,
    )
    assert resp.vary == (b"accept-encoding", b"x-tenant", b"accept")
    assert resp.stored_at == 5.0
    assert vary_names([]) == ()


# --- MemoryCache: construction -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_entries": 0}, "max_entries must be a whole number >= 1"),
        ({"max_entries": True}, "max_entries must be a whole number >= 1"),
        ({"max_bytes": 2.5}, "max_bytes must be a whole number >= 1"),
        ({"max_entry_bytes": -1}, "max_entry_bytes must be a whole number >= 1"),
        (
            {"max_bytes": 100, "max_entry_bytes": 101},
            "max_entry_bytes (101) must be <= max_bytes (100): lower max_entry_bytes",
        ),
    ],
)
def test_bad_limits_say_what_to_change(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        MemoryCache(**kwargs)  # type: ignore[arg-type]


def test_clock_must_be_callable() -> None:
    with pytest.raises(TypeError, match="clock must be a callable"):
        MemoryCache(clock=3.0)  # type: ignore[arg-type]


def test_defaults_and_protocol() -> None:
    cache = MemoryCache()
    assert (cache.max_entries, cache.max_bytes, cache.max_entry_bytes) == (
        10_000,
        64 * 2**20,
        2**20,
    )
    store: ResponseStore = cache
    assert store.snapshot() == {
        "kind": "memory",
        "entries": 0,
        "protected": 0,
        "bytes": 0,
        "max_entries": 10_000,
        "max_bytes": 64 * 2**20,
        "hits": 0,
        "misses": 0,
        "evictions": 0,
        "expired": 0,
        "too_large": 0,
    }


# --- MemoryCache: LRU, TTL, sizes -----------------------------------------------------------


@pytest.mark.anyio
async def test_lru_evicts_least_recently_used_entry() -> None:
    cache = MemoryCache(max_entries=3)
    a, b, c, d = (response(x) for x in (b"a", b"b", b"c", b"d"))
    await cache.set("a", a, 60)
    await cache.set("b", b, 60)
    await cache.set("c", c, 60)
    assert await cache.get("a") is a  # a is now the most recent; b the oldest
    await cache.set("d", d, 60)
    assert await cache.get("b") is None
    assert [await cache.get(k) for k in "acd"] == [a, c, d]
    snap = cache.snapshot()
    assert (snap["entries"], snap["evictions"], snap["hits"], snap["misses"]) == (3, 1, 4, 1)


@pytest.mark.anyio
async def test_a_flood_of_one_off_urls_does_not_push_out_a_page_in_use() -> None:
    cache = MemoryCache(max_entries=1000)
    page = response(b"the dashboard")
    await cache.set("/dashboard", page, 600)
    await cache.set("/dashboard", page, 600)  # stored again by the next visitor: in use
    for n in range(1100):  # one request each, every one with its own query string
        await cache.set(f"/dashboard?junk={n}", response(b"junk"), 600)
    assert await cache.get("/dashboard") is page
    snap = cache.snapshot()
    assert (snap["entries"], snap["protected"], snap["evictions"]) == (1000, 1, 101)


@pytest.mark.anyio
async def test_setting_an_existing_key_refreshes_it_and_replaces_its_size() -> None:
    cache = MemoryCache(max_entries=2)
    await cache.set("a", response(b"1"), 60)
    await cache.set("b", response(b"2"), 60)
    new = response(b"12345")
    await cache.set("a", new, 60)  # a becomes the most recent
    await cache.set("c", response(b"3"), 60)
    assert await cache.get("b") is None
    assert await cache.get("a") is new
    assert cache.snapshot()["bytes"] == cost("a", new) + cost("c", response(b"3"))


@pytest.mark.anyio
async def test_byte_limit_evicts_oldest_until_the_new_entry_fits() -> None:
    one = response(b"x" * 90)  # 1 + 90 + no headers = 91 bytes with a 1-char key
    cache = MemoryCache(max_bytes=300, max_entry_bytes=200)
    for key in "abc":
        await cache.set(key, one, 60)
    assert cache.snapshot()["bytes"] == 273
    big = response(b"y" * 150)  # 151: a and b must go (273 - 91 - 91 + 151 = 242)
    await cache.set("d", big, 60)
    snap = cache.snapshot()
    assert (snap["bytes"], snap["entries"], snap["evictions"]) == (242, 2, 2)
    assert await cache.get("a") is None
    assert await cache.get("b") is None
    assert await cache.get("c") is one
    assert await cache.get("d") is big


@pytest.mark.anyio
async def test_too_large_entries_are_refused_and_leave_the_old_one() -> None:
    cache = MemoryCache(max_bytes=1000, max_entry_bytes=100)
    old = response(b"old")
    await cache.set("k", old, 60)
    await cache.set("k", response(b"z" * 99), 60)  # 1 + 99 = 100: fits exactly
    await cache.set("k", old, 60)
    await cache.set("k", response(b"z" * 100), 60)  # 101: refused
    assert await cache.get("k") is old
    snap = cache.snapshot()
    assert (snap["too_large"], snap["entries"], snap["bytes"]) == (1, 1, cost("k", old))


@pytest.mark.anyio
async def test_entry_expires_exactly_at_its_ttl_and_is_removed() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    resp = response()
    await cache.set("k", resp, 10)
    clock.now += 9.999
    assert await cache.get("k") is resp
    clock.now += 0.001
    assert await cache.get("k") is None
    snap = cache.snapshot()
    assert (snap["entries"], snap["bytes"], snap["expired"], snap["misses"]) == (0, 0, 1, 1)


@pytest.mark.anyio
async def test_timedelta_ttl_and_non_positive_ttl_deletes() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    await cache.set("k", response(), timedelta(seconds=2))
    clock.now += 1.5
    assert await cache.get("k") is not None
    await cache.set("k", response(), 0)
    assert await cache.get("k") is None
    assert cache.snapshot()["bytes"] == 0


@pytest.mark.anyio
async def test_expired_entries_are_dropped_first_when_making_room() -> None:
    clock = FakeClock()
    cache = MemoryCache(max_entries=2, clock=clock)
    await cache.set("short", response(), 1)
    await cache.set("long", response(), 100)
    clock.now += 5
    await cache.set("new", response(), 100)
    snap = cache.snapshot()
    assert (snap["entries"], snap["expired"], snap["evictions"]) == (2, 1, 0)
    assert await cache.get("long") is not None


@pytest.mark.anyio
async def test_delete_and_clear() -> None:
    cache = MemoryCache()
    await cache.set("a", response(), 60)
    await cache.set("b", response(), 60)
    await cache.delete("a")
    await cache.delete("missing")
    assert await cache.get("a") is None
    assert len(cache) == 1
    cache.clear()
    assert (len(cache), cache.snapshot()["bytes"]) == (0, 0)


@pytest.mark.anyio
async def test_set_get_and_delete_one_entry() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    resp = response()
    await cache.set("k", resp, 5)
    assert await cache.get("k") is resp
    await cache.delete("k")
    assert await cache.get("k") is None


_KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"])
_OPS = st.one_of(
    st.tuples(
        st.just("set"),
        _KEYS,
        st.integers(min_value=0, max_value=450),
        st.floats(min_value=-1, max_value=30, allow_nan=False),
    ),
    st.tuples(st.just("get"), _KEYS),
    st.tuples(st.just("delete"), _KEYS),
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=10)),
)


@pytest.mark.anyio
@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_OPS, max_size=80))
async def test_random_workloads_respect_every_limit(ops: list[tuple[object, ...]]) -> None:
    clock = FakeClock()
    cache = MemoryCache(max_entries=5, max_bytes=1000, max_entry_bytes=400, clock=clock)
    # What each key was last set to, and until when: a get may forget it, never invent it.
    last: dict[str, tuple[CachedResponse, float]] = {}
    for op in ops:
        if op[0] == "set":
            _, key, size, ttl = op
            assert isinstance(key, str)
            assert isinstance(size, int)
            assert isinstance(ttl, float)
            resp = response(key.encode() * size)
            await cache.set(key, resp, ttl)
            if cost(key, resp) > 400:
                continue  # refused: the previous entry, if any, stays
            if ttl > 0:
                last[key] = (resp, clock.now + ttl)
                if clock.now + ttl > clock.now:  # not a ttl lost in float rounding
                    assert await cache.get(key) is resp  # it survives its own set
            else:
                last.pop(key, None)
        elif op[0] == "get":
            key = op[1]
            assert isinstance(key, str)
            got = await cache.get(key)
            if got is not None:
                assert key in last
                expected, expires_at = last[key]
                assert got is expected
                assert clock.now < expires_at
        elif op[0] == "delete":
            key = op[1]
            assert isinstance(key, str)
            await cache.delete(key)
            last.pop(key, None)
        else:
            step = op[1]
            assert isinstance(step, float)
            clock.now += step
        snap = cache.snapshot()
        assert snap["bytes"] <= 1000
        assert snap["entries"] <= 5
        kept = {**cache._entries, **cache._protected}
        assert len(kept) == len(cache._entries) + len(cache._protected)  # in one segment only
        assert snap["bytes"] == sum(cost(k, v[0]) for k, v in kept.items())


# --- cacheability rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "has_cache_key", "expected"),
    [
        ("GET", [], False, True),
        ("HEAD", [(b"accept", b"*/*")], False, True),
        ("POST", [], False, False),
        ("PUT", [], True, False),
        ("OPTIONS", [], False, False),
        ("get", [], False, False),  # methods are case-sensitive
        ("GET", [(b"authorization", b"Bearer t")], False, False),
        ("GET", [(b"Authorization", b"Bearer t")], False, False),
        ("GET", [(b"cookie", b"session=1")], False, False),
        ("GET", [(b"cookie", b"")], False, False),
        ("GET", [(b"authorization", b"Bearer t")], True, True),
        ("HEAD", [(b"cookie", b"session=1")], True, True),
        ("POST", [(b"cookie", b"session=1")], True, False),
    ],
)
def test_request_cacheable(
    method: str, headers: Headers, has_cache_key: bool, expected: bool
) -> None:
    assert request_cacheable(method, headers, has_cache_key) is expected


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [], True),
        (200, [(b"cache-control", b"public, max-age=60")], True),
        (200, [(b"cache-control", b"max-age=0")], True),
        (200, [(b"cache-control", b"max-age=0, must-revalidate")], True),
        (200, [(b"cache-control", b'public, community="private, no-store"')], True),
        (200, [(b"cache-control", b"privateer")], True),
        (200, [(b"cache-control", b'public, community="x, private, no-cache"')], True),
        (200, [(b"vary", b"Accept-Encoding")], True),
        (200, [(b"set-cookie", b"a=1")], False),
        (200, [(b"Set-Cookie", b"a=1")], False),
        (200, [(b"cache-control", b"private")], False),
        (200, [(b"cache-control", b"PRIVATE")], False),
        (200, [(b"Cache-Control", b"Private, max-age=60")], False),
        (200, [(b"cache-control", b'private="set-cookie"')], False),
        (200, [(b"cache-control", b'private="set-cookie, x-id", max-age=5')], False),
        (200, [(b"cache-control", b'max-age=5, community="a,b", no-store')], False),
        (200, [(b"cache-control", b"no-store")], False),
        (200, [(b"cache-control", b"public,max-age=60,no-store")], False),
        (200, [(b"cache-control", b"  No-Store  ")], False),
        (200, [(b"cache-control", b"public"), (b"cache-control", b"no-store")], False),
        (200, [(b"cache-control", b"no-cache")], False),
        (200, [(b"cache-control", b'no-cache="set-cookie"')], False),
        (200, [(b"vary", b"*")], False),
        (200, [(b"vary", b"accept, *")], False),
        (200, [(b"vary", b"accept"), (b"Vary", b" * ")], False),
        (201, [], False),
        (203, [], False),
        (204, [], False),
        (301, [], False),
        (404, [], False),
        (500, [], False),
    ],
)
def test_response_cacheable(status: int, headers: Headers, expected: bool) -> None:
    assert response_cacheable(status, headers) is expected


# --- keys and Vary ---------------------------------------------------------------------------


def test_key_is_a_stable_sha256_hex_digest() -> None:
    key = make_key("GET", "/a", b"x=1", [], (), None)
    assert re.fullmatch("[0-9a-f]{64}", key), key
    # The same key in every process and release: a shared store outlives restarts.
    # Fields: scheme, no Host, method, path, query, no user key, none of the three
    # forwarding headers, no Vary names.
    assert (
        key
        == hashlib.sha256(
            b"gr3,4:http,1:-,3:GET,2:/a,3:x=1,1:-,"
            b"9:forwarded,0,16:x-forwarded-host,0,17:x-forwarded-proto,0,0,"
        ).hexdigest()
    )
    # Headers outside Vary leave it alone; every input that is part of it changes it.
    assert key == make_key("GET", "/a", b"x=1", [(b"accept", b"*/*")], (), None)
    others = {
        make_key("HEAD", "/a", b"x=1", [], (), None),
        make_key("GET", "/b", b"x=1", [], (), None),
        make_key("GET", "/a", b"x=2", [], (), None),
        make_key("GET", "/a", b"x=1", [(b"host", b"a.example")], (), None),
        make_key("GET", "/a", b"x=1", [], (b"accept",), None),
        make_key("GET", "/a", b"x=1", [], (), "user-1"),
        make_key("GET", "/a", b"x=1", [], (), None, scheme="https"),
        make_key("GET", "/a", b"x=1", [(b"x-forwarded-host", b"evil.example")], (), None),
        make_key("GET", "/a", b"x=1", [(b"x-forwarded-proto", b"https")], (), None),
        make_key("GET", "/a", b"x=1", [(b"forwarded", b"host=evil.example")], (), None),
    }
    assert len(others) == 10
    assert key not in others


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("GET", "/a", b"", None), ("HEAD", "/a", b"", None)),
        (("GET", "/a", b"", None), ("GET", "/a", b"", "")),
        (("GET", "/a,1:b", b"", None), ("GET", "/a", b"1:b", None)),
        (("GET", "/a", b"b", None), ("GET", "/ab", b"", None)),
        (("GET", "/a,", b"", None), ("GET", "/a", b",", None)),
        (("GET", "/1:a,", b"", None), ("GET", "/", b"", "1:a,")),
        (("GET", "/", b"", "u-1"), ("GET", "/", b"", "u-2")),
    ],
)
def test_keys_of_neighbouring_requests_differ(
    one: tuple[str, str, bytes, str | None], other: tuple[str, str, bytes, str | None]
) -> None:
    m1, p1, q1, u1 = one
    m2, p2, q2, u2 = other
    assert make_key(m1, p1, q1, [], (), u1) != make_key(m2, p2, q2, [], (), u2)


def test_vary_names_are_case_and_order_insensitive_but_values_are_not() -> None:
    headers = [(b"accept", b"a"), (b"x-tenant", b"t")]
    key = make_key("GET", "/", b"", headers, (b"Accept", b"X-Tenant"), None)
    assert key == make_key("GET", "/", b"", headers, (b"accept", b"X-Tenant", b"ACCEPT"), None)
    assert key == make_key("GET", "/", b"", headers, (b"x-tenant", b"accept"), None)
    assert key == make_key("GET", "/", b"", [(b"X-Tenant", b"t"), (b"Accept", b"a")],
                           (b"accept", b"x-tenant"), None)  # fmt: skip
    assert key != make_key("GET", "/", b"", [(b"accept", b"A"), (b"x-tenant", b"t")],
                           (b"accept", b"x-tenant"), None)  # fmt: skip
    # No Vary, a Vary'd header absent, and present but empty: three different keys.
    keys = {
        make_key("GET", "/", b"", [], (), None),
        make_key("GET", "/", b"", [], (b"accept",), None),
        make_key("GET", "/", b"", [(b"accept", b"")], (b"accept",), None),
    }
    assert len(keys) == 3
    # A value that looks like the next header's name cannot shift into it.
    both = (b"accept", b"x-tenant")
    assert make_key("GET", "/", b"", [(b"accept", b"x-tenant")], both, None) != (
        make_key("GET", "/", b"", [(b"x-tenant", b"x-tenant")], both, None)
    )
    # Values count in order and are not joined.
    assert make_key(
        "GET", "/", b"", [(b"accept", b"a"), (b"accept", b"b")], (b"accept",), None
    ) != (make_key("GET", "/", b"", [(b"accept", b"b"), (b"accept", b"a")], (b"accept",), None))
    assert make_key(
        "GET", "/", b"", [(b"accept", b"a"), (b"accept", b"b")], (b"accept",), None
    ) != (make_key("GET", "/", b"", [(b"accept", b"a,b")], (b"accept",), None))


_TEXT = st.text(alphabet=":,-0123/ab\x00é", max_size=6)
_BYTES = st.binary(max_size=4) | st.sampled_from([b":", b",", b"1:", b"0,", b"-,", b"x-tenant"])
_VARIED = (b"accept", b"x-tenant")
_REQUEST = st.tuples(
    st.sampled_from(["GET", "HEAD"]),
    _TEXT,
    _BYTES,
    st.lists(st.tuples(st.sampled_from([*_VARIED, b"other"]), _BYTES), max_size=4),
    st.none() | _TEXT,
)
Request = tuple[str, str, bytes, Headers, "str | None"]


def _identity(request: Request) -> tuple[object, ...]:
    method, path, query, headers, user_key = request
    values = tuple(tuple(v for n, v in headers if n == name) for name in _VARIED)
    return method, path, query, values, user_key


@settings(max_examples=500)
@given(one=_REQUEST, other=_REQUEST)
def test_keys_are_equal_only_for_equal_requests(one: Request, other: Request) -> None:
    def key(r: Request) -> str:
        return make_key(r[0], r[1], r[2], r[3], _VARIED, r[4])

    assert (key(one) == key(other)) is (_identity(one) == _identity(other))


_VALUES = st.lists(st.sampled_from([b"gzip", b"br", b"", b"gzip, br"]), max_size=2)


@pytest.mark.anyio
@settings(max_examples=300)
@given(stored=_VALUES, asked=_VALUES)
async def test_a_varied_header_never_gets_the_other_variant(
    stored: list[bytes], asked: list[bytes]
) -> None:
    cache = MemoryCache()
    resp = response(headers=[(b"vary", b"Accept-Encoding")])
    stored_headers = [(b"accept-encoding", v) for v in stored]
    asked_headers = [(b"accept-encoding", v) for v in asked]
    await remember(cache, "GET", "/d", b"", stored_headers, None, resp, 60)
    got = await lookup(cache, "GET", "/d", b"", asked_headers, None)
    assert (got is resp) is (stored == asked)
    assert got is None or got is resp


@pytest.mark.anyio
async def test_variants_live_side_by_side_and_follow_the_latest_vary() -> None:
    cache = MemoryCache()
    vary = [(b"vary", b"accept-encoding")]
    gzip = response(b"gz", headers=vary)
    plain = response(b"plain", headers=vary)
    gz_req = [(b"accept-encoding", b"gzip")]
    await remember(cache, "GET", "/d", b"", gz_req, None, gzip, 60)
    await remember(cache, "GET", "/d", b"", [], None, plain, 60)
    assert await lookup(cache, "GET", "/d", b"", gz_req, None) is gzip
    assert await lookup(cache, "GET", "/d", b"", [], None) is plain
    assert await lookup(cache, "GET", "/d", b"", [(b"accept-encoding", b"br")], None) is None
    assert await lookup(cache, "HEAD", "/d", b"", gz_req, None) is None
    # The app stops varying: the latest response answers everyone.
    flat = response(b"flat")
    await remember(cache, "GET", "/d", b"", gz_req, None, flat, 60)
    assert await lookup(cache, "GET", "/d", b"", gz_req, None) is flat
    assert await lookup(cache, "GET", "/d", b"", [(b"accept-encoding", b"br")], None) is flat
    # It varies on another header now: old variants are unreachable, not mixed up.
    by_tenant = response(b"t1", headers=[(b"vary", b"X-Tenant")])
    await remember(cache, "GET", "/d", b"", [(b"x-tenant", b"1")], None, by_tenant, 60)
    assert await lookup(cache, "GET", "/d", b"", [(b"x-tenant", b"1")], None) is by_tenant
    assert await lookup(cache, "GET", "/d", b"", [(b"x-tenant", b"2")], None) is None
    assert await lookup(cache, "GET", "/d", b"", gz_req, None) is None


@pytest.mark.anyio
async def test_user_keys_separate_users() -> None:
    cache = MemoryCache()
    alice, bob = response(b"alice"), response(b"bob")
    auth = [(b"authorization", b"Bearer x")]
    assert not request_cacheable("GET", auth, has_cache_key=False)
    await remember(cache, "GET", "/me", b"", auth, "user:alice", alice, 60)
    await remember(cache, "GET", "/me", b"", auth, "user:bob", bob, 60)
    assert await lookup(cache, "GET", "/me", b"", auth, "user:alice") is alice
    assert await lookup(cache, "GET", "/me", b"", auth, "user:bob") is bob
    assert await lookup(cache, "GET", "/me", b"", auth, None) is None


@pytest.mark.anyio
async def test_hosts_never_share_an_entry() -> None:
    cache = MemoryCache()
    page_a, page_b = response(b"tenant a"), response(b"tenant b")
    host_a, host_b = [(b"host", b"a.example")], [(b"host", b"b.example")]
    await remember(cache, "GET", "/dash", b"", host_a, None, page_a, 60)
    assert await lookup(cache, "GET", "/dash", b"", host_b, None) is None
    assert await lookup(cache, "GET", "/dash", b"", [], None) is None
    assert await lookup(cache, "GET", "/dash", b"", [(b"Host", b"A.example")], None) is page_a
    await remember(cache, "GET", "/dash", b"", host_b, None, page_b, 60)
    assert await lookup(cache, "GET", "/dash", b"", host_a, None) is page_a
    assert await lookup(cache, "GET", "/dash", b"", host_b, None) is page_b


@pytest.mark.anyio
async def test_status_zero_is_reserved() -> None:
    with pytest.raises(ValueError, match="status 0 is reserved"):
        await remember(MemoryCache(), "GET", "/", b"", [], None, CachedResponse(0, (), b"", 0), 1)


@pytest.mark.anyio
async def test_async_lookup_and_remember_through_the_protocol() -> None:
    clock = FakeClock()
    store: ResponseStore = MemoryCache(clock=clock)
    resp = response(headers=[(b"vary", b"accept")])
    req = [(b"accept", b"text/html")]
    await remember(store, "GET", "/p", b"q=1", req, None, resp, timedelta(seconds=30))
    assert await lookup(store, "GET", "/p", b"q=1", req, None) is resp
    assert await lookup(store, "GET", "/p", b"q=1", [(b"accept", b"*/*")], None) is None
    assert await lookup(store, "GET", "/p", b"q=2", req, None) is None
    clock.now += 30
    assert await lookup(store, "GET", "/p", b"q=1", req, None) is None
    # Plain responses take one store lookup, Vary'd ones two.
    await remember(store, "GET", "/plain", b"", [], None, response(), 30)
    before = store.snapshot()["hits"]
    assert await lookup(store, "GET", "/plain", b"", [], None) is not None
    assert store.snapshot()["hits"] == before + 1


# --- replay headers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored_at", "now", "expected"),
    [
        (100.0, 100.0, b"0"),
        (100.0, 100.999, b"0"),
        (100.0, 101.0, b"1"),
        (100.0, 159.9, b"59"),
        (100.0, 100.0 + 86_400 * 3, b"259200"),
        (100.0, 42.0, b"0"),  # wall clock stepped back: never negative
    ],
)
def test_age_header(stored_at: float, now: float, expected: bytes) -> None:
    resp = CachedResponse(200, (), b"", stored_at)
    assert age_header(resp, now) == expected


def test_stale_headers_drop_hop_by_hop_and_mark_the_replay() -> None:
    stored = [
        (b"content-type", b"application/json"),
        (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"connection", b"keep-alive, X-Trace"),
        (b"x-trace", b"abc"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"age", b"3"),
        (b"x-guardrails", b"fresh"),
        (b"content-length", b"2"),
        (b"etag", b'"v1"'),
        (b"vary", b"accept"),
    ]
    resp = CachedResponse.build(200, stored, b"{}", stored_at=1000.0)
    assert stale_headers(resp, 1042.5) == [
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"etag", b'"v1"'),
        (b"vary", b"accept"),
        (b"age", b"42"),
        (b"x-guardrails", b"stale"),
    ]
    # The stored response is untouched.
    assert resp.headers == tuple(stored)


def test_stale_headers_of_a_bare_response() -> None:
    resp = CachedResponse(200, (), b"", 10.0)
    assert stale_headers(resp, 5.0) == [(b"age", b"0"), (b"x-guardrails", b"stale")]


def test_header_sequences_are_accepted_as_any_sequence() -> None:
    pairs: Sequence[tuple[bytes, bytes]] = ((b"vary", b"a"),)
    assert response_cacheable(200, pairs)
    assert CachedResponse.build(200, pairs, b"").vary == (b"a",)
