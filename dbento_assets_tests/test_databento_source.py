"""DatabentoSource through the real databento client and the fake gateway (issue 3, core level).

Every test drives the unpatched ``databento.Historical`` client over HTTPS against
:mod:`dbento_assets_tests.gateway` and checks what was requested (by counting the gateway's
requests), what landed in the DBN cache, and what the user is told. Waits between retries go
through an injected ``sleep`` that records instead of sleeping, so the retry policy is checked
exactly and the tests stay fast.
"""

from __future__ import annotations

import logging
import random
import tracemalloc
from hashlib import sha256
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zstandard

from dbento_assets.core.catalog import Instrument, load_catalog
from dbento_assets.core.databento_api import (
    DatabentoSource,
    RetryPolicy,
    dbn_cache_path,
)
from dbento_assets.core.dbn import (
    OHLCV_RECORD_DTYPE,
    DbnError,
    TruncatedDbn,
    check_dbn_file,
    decode_month,
    encode_month,
    ohlcv_records,
)
from dbento_assets.core.demo import generate_month_records
from dbento_assets.core.months import Month
from dbento_assets.core.source import FetchRequest, SourceError
from dbento_assets_tests.gateway import (
    GET_RANGE,
    RECORD_BYTES,
    TEST_KEY,
    FakeGateway,
    Query,
)

CATALOG = load_catalog()
ES = CATALOG.instrument("ES")
QQQ = CATALOG.instrument("QQQ")
JAN = Month(2024, 1)
FAST = RetryPolicy(max_attempts=3, backoff_base_seconds=0.0, backoff_max_seconds=0.0)


class Sleeps(list):
    """A ``sleep`` that records the requested waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_source(gw: FakeGateway, root: Path, **kwargs) -> DatabentoSource:
    kwargs.setdefault("retry", FAST)
    kwargs.setdefault("sleep", Sleeps())
    return DatabentoSource(kwargs.pop("key", TEST_KEY), root, gateway=gw.url, **kwargs)


def fetch(source: DatabentoSource, inst: Instrument = ES, month: Month = JAN, force=False):
    logs: list[str] = []
    fetched = source.fetch(FetchRequest(inst, month, force=force), logs.append)
    return fetched, logs


def files_under(root: Path) -> list[Path]:
    """The files under ``root`` but the cache's lock files (``dbn/.locks``: an OS file lock
    needs a file, which stays empty and harmless after the lock is released)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts)


def expected_records(gw: FakeGateway, inst: Instrument, month: Month) -> np.ndarray:
    return generate_month_records(inst, month, gw.activity)


# --------------------------------------------------------------------------- download


def test_download_asks_for_the_catalog_symbol_and_the_exact_month(gateway, tmp_path):
    source = make_source(gateway, tmp_path)
    fetched, _ = fetch(source)

    (call,) = gateway.calls(GET_RANGE)
    assert call.method == "POST"
    assert call.auth_user == TEST_KEY  # Basic auth, key as user name
    assert call.fields["dataset"] == "GLBX.MDP3"
    assert call.fields["symbols"] == "ES.v.0"
    assert call.fields["stype_in"] == "continuous"
    assert call.fields["schema"] == "ohlcv-1s"
    assert pd.Timestamp(call.fields["start"]) == pd.Timestamp("2024-01-01T00:00:00Z")
    assert pd.Timestamp(call.fields["end"]) == pd.Timestamp("2024-02-01T00:00:00Z")
    assert call.fields["compression"] == "zstd"

    cache = tmp_path / "dbn" / "ES" / "ES_2024_01.ohlcv-1s.dbn.zst"
    assert fetched.payloads == [cache]
    assert files_under(tmp_path) == [cache, cache.with_name(cache.name + ".json")]
    decoded = decode_month(fetched.payloads, "ES", JAN, fetched.instrument_ids)
    truth = expected_records(gateway, ES, JAN)
    assert len(decoded.bars) == len(truth) > 0
    assert np.array_equal(decoded.bars["ts_event"].array.asi8, truth["ts_event"].astype("int64"))
    assert np.array_equal(decoded.bars["close"].to_numpy(), truth["close"] / 1e9)


def test_metadata_records_cost_size_count_and_availability(gateway, tmp_path):
    fetched, _ = fetch(make_source(gateway, tmp_path))
    n = len(expected_records(gateway, ES, JAN))
    meta = fetched.metadata
    assert meta["record_count"] == meta["records_downloaded"] == n
    assert meta["billable_size_bytes"] == n * RECORD_BYTES
    assert meta["cost_usd"] == pytest.approx(n * RECORD_BYTES / 2**30 * gateway.price_per_gb)
    assert meta["dbn_cache"] == "miss"
    assert meta["download_attempts"] == 1
    assert meta["partial_month"] is False
    assert pd.Timestamp(meta["available_start"]) == pd.Timestamp("2010-06-06T00:00:00Z")
    assert meta["dbn_file_bytes"] == Path(meta["dbn_file"]).stat().st_size
    # Exactly the free calls, then one paid download.
    assert [r.endpoint for r in gateway.requests] == [
        "metadata.get_dataset_range",
        "metadata.get_cost",
        "metadata.get_billable_size",
        "metadata.get_record_count",
        GET_RANGE,
    ]


def test_equity_uses_raw_symbol_on_its_own_dataset(gateway, tmp_path):
    fetched, _ = fetch(make_source(gateway, tmp_path), QQQ, Month(2024, 2))
    (call,) = gateway.calls(GET_RANGE)
    assert (call.fields["dataset"], call.fields["symbols"], call.fields["stype_in"]) == (
        "EQUS.MINI",
        "QQQ",
        "raw_symbol",
    )
    assert fetched.payloads == [tmp_path / "dbn" / "QQQ" / "QQQ_2024_02.ohlcv-1s.dbn.zst"]


def test_cache_path_is_spelled_once(tmp_path):
    path = dbn_cache_path(tmp_path, "NQ", Month(2023, 12))
    assert path == tmp_path / "dbn" / "NQ" / "NQ_2023_12.ohlcv-1s.dbn.zst"


def test_download_streams_to_disk_in_bounded_memory(gateway, tmp_path):
    gateway.activity = 1.0  # a full-size ES month: about a million bars
    warm = make_source(gateway, tmp_path / "warm")
    fetch(warm)  # lets the gateway build and cache its answer outside the measurement
    raw_bytes = len(expected_records(gateway, ES, JAN)) * RECORD_BYTES
    source = make_source(gateway, tmp_path / "measured")
    tracemalloc.start()
    try:
        fetched, _ = fetch(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fetched.metadata["records_downloaded"] * RECORD_BYTES == raw_bytes > 50_000_000
    assert peak < raw_bytes / 10, f"peak {peak:,} bytes for a {raw_bytes:,}-byte month"


# --------------------------------------------------------------------------- resume and force


def test_cached_month_makes_no_request_at_all(gateway, tmp_path):
    first, _ = fetch(make_source(gateway, tmp_path))
    before = gateway.count()
    cached_bytes = first.payloads[0].read_bytes()

    again, logs = fetch(make_source(gateway, tmp_path))  # a fresh source, as in a new run

    assert gateway.count() == before  # neither a cost call nor get_range
    assert again.payloads == first.payloads
    assert again.payloads[0].read_bytes() == cached_bytes
    assert again.metadata["dbn_cache"] == "hit"
    assert again.metadata["cost_usd"] == 0.0
    assert again.metadata["original_cost_usd"] == first.metadata["cost_usd"]
    assert again.metadata["record_count"] == first.metadata["record_count"]
    assert any("cache hit" in line for line in logs)
    decoded = decode_month(again.payloads, "ES", JAN)
    assert len(decoded.bars) == first.metadata["record_count"]


def test_force_downloads_again_and_replaces_the_cached_file(gateway, tmp_path):
    first, _ = fetch(make_source(gateway, tmp_path))
    old_bytes = first.payloads[0].read_bytes()
    gateway.activity = 0.03  # the vendor now answers with different data
    gateway.reset_data()

    forced, logs = fetch(make_source(gateway, tmp_path), force=True)

    assert gateway.count(GET_RANGE) == 2
    assert gateway.count("metadata.get_cost") == 2
    assert forced.metadata["dbn_cache"] == "forced"
    assert forced.payloads == first.payloads
    new_bytes = forced.payloads[0].read_bytes()
    assert new_bytes != old_bytes
    assert len(decode_month(forced.payloads, "ES", JAN).bars) == len(
        expected_records(gateway, ES, JAN)
    )
    assert any("kept until" in line for line in logs)
    assert [p.name for p in files_under(tmp_path)] == [
        "ES_2024_01.ohlcv-1s.dbn.zst",
        "ES_2024_01.ohlcv-1s.dbn.zst.json",
    ]


@pytest.mark.parametrize("kind", ["cut", "truncate", "short", "503"])
def test_failed_forced_download_leaves_the_old_file_byte_identical(gateway, tmp_path, kind):
    first, _ = fetch(make_source(gateway, tmp_path))
    cache = first.payloads[0]
    old_bytes = cache.read_bytes()
    old_sidecar = cache.with_name(cache.name + ".json").read_bytes()
    gateway.fail(kind, endpoint=GET_RANGE, times=FAST.max_attempts)

    with pytest.raises(SourceError, match="failed 3 times"):
        fetch(make_source(gateway, tmp_path), force=True)

    assert gateway.count(GET_RANGE) == 1 + FAST.max_attempts
    assert cache.read_bytes() == old_bytes
    assert cache.with_name(cache.name + ".json").read_bytes() == old_sidecar
    assert len(files_under(tmp_path)) == 2  # no temporary file left behind


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "kind", ["429", "500", "502", "503", "504", "cut", "truncate", "short", "reset", "empty"]
)
def test_transient_download_fault_is_retried_and_never_cached(gateway, tmp_path, kind):
    gateway.fail(kind, endpoint=GET_RANGE)
    fetched, logs = fetch(make_source(gateway, tmp_path))

    assert gateway.count(GET_RANGE) == 2
    assert fetched.metadata["download_attempts"] == 2
    n = len(expected_records(gateway, ES, JAN))
    assert fetched.metadata["records_downloaded"] == n
    assert len(decode_month(fetched.payloads, "ES", JAN).bars) == n
    assert any("retrying" in line for line in logs)
    assert len(files_under(tmp_path)) == 2


@pytest.mark.parametrize(
    ("kind", "endpoint"),
    [
        ("503", "metadata.get_dataset_range"),
        ("reset", "metadata.get_cost"),
        ("429", "metadata.get_billable_size"),
        ("502", "metadata.get_record_count"),
    ],
)
def test_transient_metadata_fault_is_retried(gateway, tmp_path, kind, endpoint):
    gateway.fail(kind, endpoint=endpoint)
    fetched, logs = fetch(make_source(gateway, tmp_path))
    assert any(line.startswith(f"{endpoint} failed") for line in logs)
    assert gateway.count(endpoint) == 2
    assert gateway.count(GET_RANGE) == 1
    assert fetched.metadata["records_downloaded"] > 0


def test_bounded_attempts_then_a_clear_failure_and_nothing_cached(gateway, tmp_path):
    gateway.fail("500", endpoint=GET_RANGE, times=10)
    sleeps = Sleeps()
    source = make_source(
        gateway,
        tmp_path,
        sleep=sleeps,
        retry=RetryPolicy(max_attempts=4, backoff_base_seconds=0.5, jitter=0.0),
    )
    with pytest.raises(SourceError) as info:
        fetch(source)
    message = str(info.value)
    assert "timeseries.get_range" in message and "failed 4 times" in message
    assert "500" in message and "Nothing was cached" in message
    assert gateway.count(GET_RANGE) == 4
    assert sleeps == [0.5, 1.0, 2.0]  # exponential, no wait after the last attempt
    assert not (tmp_path / "dbn" / "ES" / "ES_2024_01.ohlcv-1s.dbn.zst").exists()
    assert [p for p in files_under(tmp_path)] == []


def test_backoff_is_exponential_with_jitter_and_capped(gateway, tmp_path):
    gateway.fail("503", endpoint=GET_RANGE, times=5)
    sleeps = Sleeps()
    policy = RetryPolicy(
        max_attempts=6, backoff_base_seconds=1.0, backoff_max_seconds=5.0, jitter=0.5
    )
    source = make_source(gateway, tmp_path, sleep=sleeps, retry=policy, rng=random.Random(7))
    fetch(source)
    assert len(sleeps) == 5
    for attempt, waited in enumerate(sleeps, start=1):
        ceiling = min(5.0, 2 ** (attempt - 1))
        assert ceiling * 0.5 <= waited <= ceiling
    assert len(set(sleeps)) == 5  # jitter: no two waits alike


def test_429_waits_for_retry_after(gateway, tmp_path):
    gateway.fail("429", endpoint=GET_RANGE, retry_after="7")
    gateway.fail("429", endpoint=GET_RANGE, retry_after="900")
    later = pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)
    gateway.fail("429", endpoint=GET_RANGE, retry_after=later.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    gateway.fail("429", endpoint=GET_RANGE, retry_after=None)  # no header: the backoff
    sleeps = Sleeps()
    policy = RetryPolicy(
        max_attempts=5, backoff_base_seconds=3.0, jitter=0.0, retry_after_max_seconds=60
    )
    fetch(make_source(gateway, tmp_path, sleep=sleeps, retry=policy))
    # The header (seconds or an HTTP date), capped at the maximum; the 4th is the backoff.
    assert sleeps == [7.0, 60.0, 60.0, 3.0 * 2**3]
    assert gateway.count(GET_RANGE) == 5


def test_a_stalled_gateway_hits_the_timeout_and_is_retried(gateway, tmp_path):
    gateway.fail("stall", endpoint="metadata.get_cost", stall_seconds=10.0)
    # Well under the stall, and long enough for the retry's own new TLS connection and the
    # gateway making the month's answer on a loaded machine (at 0.3 s and at 1 s the retry
    # timed out too, now and then).
    fetched, logs = fetch(make_source(gateway, tmp_path, timeout_seconds=3.0))
    assert gateway.count("metadata.get_cost") == 2
    assert any("metadata.get_cost failed (ReadTimeout" in line for line in logs)
    assert fetched.metadata["records_downloaded"] > 0


@pytest.mark.parametrize("status", ["401", "403"])
def test_rejected_key_fails_fast_without_retry_or_showing_it(gateway, tmp_path, status):
    gateway.fail(status, endpoint=GET_RANGE, times=5)
    with pytest.raises(SourceError) as info:
        fetch(make_source(gateway, tmp_path))
    message = str(info.value)
    assert f"HTTP {status}" in message and "rejected the API key" in message
    assert "DATABENTO_API_KEY" in message and "Not retried" in message
    assert TEST_KEY not in message
    assert gateway.count(GET_RANGE) == 1
    assert files_under(tmp_path) == []


def test_a_wrong_key_is_rejected_by_the_first_call(gateway, tmp_path):
    wrong = "db-WRONGKEY00000000000000000000000"
    with pytest.raises(SourceError, match="rejected the API key") as info:
        fetch(make_source(gateway, tmp_path, key=wrong))
    assert wrong not in str(info.value)
    assert gateway.count() == 1 and gateway.requests[0].auth_user == wrong


def test_unresolvable_symbol_422_fails_fast_naming_symbol_dataset_stype_and_catalog(
    gateway, tmp_path
):
    bad = Instrument("ES", "GLBX.MDP3", "ES", "raw_symbol", 0.25, "future")
    with pytest.raises(SourceError) as info:
        fetch(make_source(gateway, tmp_path), bad)
    message = str(info.value)
    assert "HTTP 422" in message and "symbology_invalid_symbol" in message
    assert "'ES'" in message and "'GLBX.MDP3'" in message and "'raw_symbol'" in message
    assert str(CATALOG.path) in message and "[instruments.ES]" in message
    assert gateway.count("metadata.get_cost") == 1  # not retried
    assert gateway.count(GET_RANGE) == 0


def test_422_from_get_range_is_not_retried(gateway, tmp_path):
    gateway.fail(
        "422",
        endpoint=GET_RANGE,
        times=3,
        case="data_end_after_available_end",
        message="The dataset GLBX.MDP3 has data available up to 2024-01-20.",
    )
    with pytest.raises(SourceError, match="data_end_after_available_end") as info:
        fetch(make_source(gateway, tmp_path))
    assert "ES.v.0" in str(info.value) and "continuous" in str(info.value)
    assert gateway.count(GET_RANGE) == 1
    assert files_under(tmp_path) == []


def test_empty_month_fails_clearly_and_caches_nothing(gateway, tmp_path):
    gateway.provider = lambda query: (np.empty(0, dtype=OHLCV_RECORD_DTYPE), {})
    with pytest.raises(SourceError) as info:
        fetch(make_source(gateway, tmp_path))
    message = str(info.value)
    assert "no ohlcv-1s records" in message and "ES.v.0" in message and "2024-01" in message
    assert gateway.count(GET_RANGE) == 0  # nothing to pay for
    assert files_under(tmp_path) == []


def test_announced_records_that_never_arrive_are_not_stored(gateway, tmp_path):
    gateway.fail("empty", endpoint=GET_RANGE, times=FAST.max_attempts)
    with pytest.raises(SourceError, match="0 records received"):
        fetch(make_source(gateway, tmp_path))
    assert files_under(tmp_path) == []


def test_the_key_never_appears_in_messages_logs_or_files(gateway, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # the client's, requests' and urllib3's own logs too
    texts: list[str] = []
    scenarios = [
        ("401", GET_RANGE, 1),
        ("403", "metadata.get_cost", 1),
        ("422", GET_RANGE, 1),
        ("500", GET_RANGE, FAST.max_attempts),
        ("cut", GET_RANGE, FAST.max_attempts),
    ]
    for kind, endpoint, times in scenarios:
        gateway.fail(kind, endpoint=endpoint, times=times)
        source = make_source(gateway, tmp_path)
        texts.append(repr(source))
        logs: list[str] = []
        with pytest.raises(SourceError) as info:
            source.fetch(FetchRequest(ES, JAN), logs.append)
        texts += [str(info.value), repr(info.value), *logs]
    fetched, logs = fetch(make_source(gateway, tmp_path))  # and a good download
    texts += logs + [str(v) for v in fetched.metadata.values()]
    assert all(r.auth_user == TEST_KEY for r in gateway.requests)  # the key was really used
    texts += [record.getMessage() for record in caplog.records]
    assert not [t for t in texts if TEST_KEY in t]
    for path in files_under(tmp_path):
        assert TEST_KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("key", ["", "  ", "YOUR_API_KEY"])
def test_a_missing_key_says_what_to_do(tmp_path, key):
    with pytest.raises(SourceError) as info:
        DatabentoSource(key, tmp_path)
    assert "DATABENTO_API_KEY" in str(info.value) and "DBENTO_SOURCE=demo" in str(info.value)


# --------------------------------------------------------------------------- availability


def test_month_not_fully_available_fails_before_paying_and_writes_nothing(gateway, tmp_path):
    # Issue 13: a month that has begun is bought so far (see test_current_month.py); one
    # that has not begun yet is still refused before any cost.
    gateway.set_range("GLBX.MDP3", "2010-06-06", "2024-01-15")
    with pytest.raises(SourceError) as info:
        fetch(make_source(gateway, tmp_path), month=Month(2024, 2))
    message = str(info.value)
    assert "not fully available" in message and "2024-01-15" in message
    assert [r.endpoint for r in gateway.requests] == ["metadata.get_dataset_range"]
    assert files_under(tmp_path) == []


def test_the_current_month_is_bought_up_to_the_available_end(gateway, tmp_path):
    gateway.set_range("GLBX.MDP3", "2010-06-06", "2024-01-15")
    fetched, _ = fetch(make_source(gateway, tmp_path))
    (call,) = gateway.calls(GET_RANGE)
    assert pd.Timestamp(call.fields["start"]) == pd.Timestamp("2024-01-01T00:00:00Z")
    assert pd.Timestamp(call.fields["end"]) == pd.Timestamp("2024-01-15T00:00:00Z")
    assert not fetched.complete
    assert fetched.through_ns == pd.Timestamp("2024-01-15T00:00:00Z").value
    assert "has not closed yet" in fetched.metadata["partial_month_reason"]


def test_month_wholly_before_the_dataset_start_fails_clearly(gateway, tmp_path):
    with pytest.raises(SourceError, match="wholly before the dataset's start") as info:
        fetch(make_source(gateway, tmp_path), QQQ, Month(2023, 2))
    assert "2023-03-28" in str(info.value)
    assert [r.endpoint for r in gateway.requests] == ["metadata.get_dataset_range"]
    assert files_under(tmp_path) == []


def test_dataset_starting_mid_month_downloads_what_exists_and_says_so(gateway, tmp_path):
    march = Month(2023, 3)
    fetched, logs = fetch(make_source(gateway, tmp_path), QQQ, march)
    (call,) = gateway.calls(GET_RANGE)
    assert pd.Timestamp(call.fields["start"]) == pd.Timestamp("2023-03-28T00:00:00Z")
    assert pd.Timestamp(call.fields["end"]) == pd.Timestamp("2023-04-01T00:00:00Z")
    meta = fetched.metadata
    assert meta["partial_month"] is True
    assert "starts mid-month" in meta["partial_month_reason"]
    assert "2023-03-28" in meta["partial_month_reason"]
    assert pd.Timestamp(meta["request_start"]) == pd.Timestamp("2023-03-28T00:00:00Z")
    bars = decode_month(fetched.payloads, "QQQ", march).bars
    assert len(bars) == meta["records_downloaded"] > 0
    assert bars["ts_event"].min() >= pd.Timestamp("2023-03-28T00:00:00Z")
    assert any("mid-month" in line for line in logs)
    # The fact survives a cache hit.
    again, _ = fetch(make_source(gateway, tmp_path), QQQ, march)
    assert again.metadata["dbn_cache"] == "hit" and again.metadata["partial_month"] is True


# --------------------------------------------------------------------------- cost


def test_cost_above_the_ceiling_is_refused_before_any_download(gateway, tmp_path):
    gateway.price_per_gb = 1_000_000.0
    with pytest.raises(SourceError) as info:
        fetch(make_source(gateway, tmp_path, max_cost_usd=5.0))
    message = str(info.value)
    assert "above the ceiling of $5.00" in message and "DBENTO_MAX_COST_USD" in message
    assert "`dbento estimate`" in message
    assert gateway.count("metadata.get_cost") == 1
    assert gateway.count(GET_RANGE) == 0
    assert files_under(tmp_path) == []


def test_a_price_just_above_the_ceiling_does_not_read_as_the_ceiling(gateway, tmp_path):
    gateway.price_per_gb = 1.0
    cost = make_source(gateway, tmp_path).estimate(ES, JAN).cost_usd
    assert cost is not None and 0 < cost < 0.005  # a fraction of a cent
    ceiling = cost / 2  # both under a cent: "$0.00 above $0.00" before
    with pytest.raises(SourceError) as info:
        fetch(make_source(gateway, tmp_path, max_cost_usd=ceiling))
    assert f"estimates ${cost:,.4f} for this partition, above the ceiling of " in str(info.value)
    assert f"${cost:,.4f}" != f"${ceiling:,.4f}"


def test_cost_just_under_the_ceiling_is_downloaded(gateway, tmp_path):
    n = len(expected_records(gateway, ES, JAN))
    cost = n * RECORD_BYTES / 2**30 * gateway.price_per_gb
    fetched, _ = fetch(make_source(gateway, tmp_path, max_cost_usd=cost * 1.0001))
    assert fetched.metadata["cost_usd"] == pytest.approx(cost)
    assert fetched.metadata["max_cost_usd"] == pytest.approx(cost * 1.0001)


# --------------------------------------------------------------------------- file check


def _payload(n: int = 50, compress: bool = True) -> tuple[bytes, Month]:
    month = Month(2024, 1)
    ts = month.start_ns + np.arange(n, dtype=np.int64) * 10**9
    px = np.full(n, 4_800_250_000_000, dtype=np.int64)
    records = ohlcv_records(ts, np.full(n, 7), px, px, px, px, np.ones(n, dtype=np.uint64))
    return encode_month(records, CATALOG.instrument("ES"), month, compress=compress), month


def test_check_dbn_file_flags_every_cut_of_a_zstd_stream(tmp_path):
    payload, month = _payload()
    whole = tmp_path / "whole.dbn.zst"
    whole.write_bytes(payload)
    assert check_dbn_file(whole, month.start_ns, month.end_ns).records == 50
    for cut in range(1, len(payload)):
        part = tmp_path / "part.dbn.zst"
        part.write_bytes(payload[:cut])
        with pytest.raises(TruncatedDbn):
            check_dbn_file(part, month.start_ns, month.end_ns)


def test_check_dbn_file_reads_several_frames_and_plain_dbn(tmp_path):
    payload, month = _payload(compress=False)
    meta_len = 8 + int.from_bytes(payload[4:8], "little")
    head, body = payload[:meta_len], payload[meta_len:]
    frames = b"".join(
        zstandard.ZstdCompressor().compress(piece)
        for piece in (head + body[:100], body[100:1000], body[1000:])
    )
    multi = tmp_path / "multi.dbn.zst"
    multi.write_bytes(frames)
    assert check_dbn_file(multi, month.start_ns, month.end_ns).records == 50
    plain = tmp_path / "plain.dbn"
    plain.write_bytes(payload[:-3])  # a partial last record
    with pytest.raises(TruncatedDbn, match="partial record"):
        check_dbn_file(plain, month.start_ns, month.end_ns)


def test_check_dbn_file_hashes_the_bytes_it_reads_zstd_several_frames_and_plain(tmp_path):
    # The manifest's SHA-256 comes from this pass, so it must be the hash of the whole file
    # whatever its layout (one frame, several frames, no compression).
    payload, month = _payload(n=300_000)  # several read chunks
    plain, _ = _payload(n=3_000, compress=False)
    meta_len = 8 + int.from_bytes(plain[4:8], "little")
    frames = b"".join(
        zstandard.ZstdCompressor().compress(piece)
        for piece in (plain[: meta_len + 100], plain[meta_len + 100 : 50_000], plain[50_000:])
    )
    for name, data in (("one.dbn.zst", payload), ("multi.dbn.zst", frames), ("p.dbn", plain)):
        path = tmp_path / name
        path.write_bytes(data)
        assert check_dbn_file(path, month.start_ns, month.end_ns).sha256 == sha256(data).hexdigest()


def test_check_dbn_file_refuses_records_outside_the_window(tmp_path):
    payload, month = _payload()
    path = tmp_path / "x.dbn.zst"
    path.write_bytes(payload)
    with pytest.raises(DbnError, match="outside the requested window"):
        check_dbn_file(path, month.start_ns + 10 * 10**9, month.end_ns)


def test_gateway_serves_the_demo_records_for_the_exact_window():
    gw = FakeGateway()
    query = Query(
        "GLBX.MDP3",
        ("ES.v.0",),
        "ohlcv-1s",
        "continuous",
        JAN.start_ns + 86_400 * 10**9,
        JAN.end_ns,
    )
    records, mappings = gw.records_for(query)
    ts = records["ts_event"].astype("int64")
    assert ts.min() >= query.start_ns and ts.max() < query.end_ns
    assert set(mappings) == {"ES.v.0"}
    assert {int(iv["symbol"]) for iv in mappings["ES.v.0"]} == set(
        np.unique(records["instrument_id"]).tolist()
    )


# --------------------------------------------------------------------------- vendor 1m


def fetch_1m(source: DatabentoSource, inst: Instrument = ES, month: Month = JAN, force=False):
    logs: list[str] = []
    fetched = source.fetch_vendor_1m(FetchRequest(inst, month, force=force), logs.append)
    return fetched, logs


def test_vendor_1m_is_the_same_request_in_ohlcv_1m_cached_beside_the_1s_file(gateway, tmp_path):
    source = make_source(gateway, tmp_path)
    fetch(source)
    fetched, _ = fetch_1m(source)

    one_s, one_m = gateway.calls(GET_RANGE)
    assert one_m.fields["schema"] == "ohlcv-1m"
    for name in ("dataset", "symbols", "stype_in", "start", "end"):
        assert one_m.fields[name] == one_s.fields[name], name
    assert [r.fields.get("schema") for r in gateway.calls("metadata.get_cost")] == [
        "ohlcv-1s",
        "ohlcv-1m",
    ]
    cache = dbn_cache_path(tmp_path, "ES", JAN, "ohlcv-1m")
    assert cache == tmp_path / "dbn" / "ES" / "ES_2024_01.ohlcv-1m.dbn.zst"
    assert fetched.payloads == [cache] and fetched.metadata["schema"] == "ohlcv-1m"
    bars = decode_month(fetched.payloads, "ES", JAN, schema="ohlcv-1m").bars
    truth = expected_records(gateway, ES, JAN)
    minutes = truth["ts_event"].astype("int64") // (60 * 10**9)
    assert len(bars) == len(np.unique(np.stack([minutes, truth["instrument_id"]]), axis=1).T)
    assert int(bars["volume"].sum()) == int(truth["volume"].sum())
    assert fetched.metadata["record_count"] == len(bars)

    before = gateway.count()
    again, logs = fetch_1m(make_source(gateway, tmp_path))
    assert gateway.count() == before and again.metadata["dbn_cache"] == "hit"
    assert any("cache hit" in line and "ohlcv-1m" in line for line in logs)
    forced, _ = fetch_1m(make_source(gateway, tmp_path), force=True)
    assert gateway.count(GET_RANGE) == 3 and forced.metadata["dbn_cache"] == "forced"
    assert gateway.calls(GET_RANGE)[-1].fields["schema"] == "ohlcv-1m"


def test_vendor_1m_has_the_ceiling_retries_and_file_checks_of_the_1s_path(gateway, tmp_path):
    gateway.price_per_gb = 1e7
    with pytest.raises(SourceError, match="ES 2024-01 ohlcv-1m: Databento estimates") as info:
        fetch_1m(make_source(gateway, tmp_path))
    assert TEST_KEY not in str(info.value) and gateway.count(GET_RANGE) == 0
    gateway.price_per_gb = 10.0
    gateway.fail("cut", endpoint=GET_RANGE)
    fetched, _ = fetch_1m(make_source(gateway, tmp_path))
    assert fetched.metadata["download_attempts"] == 2
    assert not [p for p in tmp_path.rglob("*.part")]
    assert not dbn_cache_path(tmp_path, "ES", JAN).exists()  # the 1s month was not bought


def test_check_dbn_file_refuses_records_of_another_schema(tmp_path):
    payload, month = _payload()
    path = tmp_path / "x.dbn.zst"
    path.write_bytes(payload)
    with pytest.raises(DbnError, match="records that are not ohlcv-1m"):
        check_dbn_file(path, month.start_ns, month.end_ns, "ohlcv-1m")
    with pytest.raises(SourceError, match="not one the Databento source downloads"):
        dbn_cache_path(tmp_path, "ES", month, "trades")
