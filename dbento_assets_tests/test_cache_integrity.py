"""Issue 9, the DBN cache: a month is paid for once and nothing paid for is lost.

Through the real ``databento`` client against the test gateway (and Dagster where the user
sees the behaviour): cached files are verified on every read (a cut file, a same-size tampered
file, an entry of an earlier version), a forced download that brings bad data never replaces
the good file, a refused download is remembered instead of bought again, one download per
entry at a time (threads and real processes, a SIGKILLed lock holder), a full or read-only
disk fails at once, and the vendor 1m download follows the same rules. Gateway request counts
prove "paid once"; SHA-256 of files before and after proves "nothing lost".
"""

# ruff: noqa: F811 (the Dagster fixtures env and instance are imported from test_databento_dagster)
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zstandard
from dagster import (
    AssetKey,
    Definitions,
    ReexecutionOptions,
    define_asset_job,
    execute_job,
    reconstructable,
)

from dbento_assets.assets import FORCE_TAG
from dbento_assets.core.catalog import DEFAULT_CATALOG, Catalog, load_catalog
from dbento_assets.core.databento_api import DatabentoSource, RetryPolicy
from dbento_assets.core.dbn import decode_month
from dbento_assets.core.dbn_cache import DbnCache
from dbento_assets.core.months import Month
from dbento_assets.core.source import DownloadRefused, FetchRequest, SourceError
from dbento_assets.definitions import build_definitions
from dbento_assets.estimate import run as estimate
from dbento_assets.partitions import PARTITION_TAG, partition_key
from dbento_assets.resources import databento_resource_from_env
from dbento_assets_tests.gateway import (
    GET_RANGE,
    TEST_KEY,
    FakeGateway,
    Query,
)
from dbento_assets_tests.test_databento_dagster import (  # noqa: F401 (fixtures)
    BARS_1MIN,
    FAILED,
    JAN,
    PASSED,
    RAW,
    cache_file,
    catalog_from,
    clean_env,
    env,
    failure_text,
    instance,
    raw_file,
    raw_metadata,
    run,
    vendor_check,
    vendor_file,
)

FAST = RetryPolicy(max_attempts=3, backoff_base_seconds=0.0, backoff_max_seconds=0.0)
CATALOG_ES = load_catalog().instrument("ES")
FEB = Month(2024, 2)
TICK = 250_000_000  # a quarter point, in DBN fixed-point units


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_of(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))


def quarantined(data: Path) -> list[Path]:
    folder = data / "dbn" / "quarantine"
    return sorted(p for p in folder.rglob("*.dbn.zst.*") if not p.name.endswith(".json"))


def bad_minute_provider(gw: FakeGateway):
    """The demo records, but every bar of the first traded minute has its high a tick below
    its low (so the vendor's 1m bar of that minute is inverted too)."""

    def provider(query: Query):
        records, mappings = gw._demo_provider(query)  # the fake's own data, then broken
        records = records.copy()
        minute = records["ts_event"] // (60 * 10**9)
        first = minute == minute[0]
        level = records["low"][0]
        records["low"][first] = level
        records["high"][first] = level - TICK
        records["open"][first] = records["close"][first] = level
        return records, mappings

    return provider


def serve_bad_data(gw: FakeGateway) -> None:
    gw.provider = bad_minute_provider(gw)
    gw.reset_data()


def serve_good_data(gw: FakeGateway) -> None:
    gw.provider = None
    gw.reset_data()


def source_for(gw: FakeGateway, root: Path) -> DatabentoSource:
    return DatabentoSource(TEST_KEY, root, gateway=gw.url, retry=FAST, sleep=lambda _s: None)


# --------------------------------------------------------------------------- verified reads


def test_a_cut_cached_file_is_quarantined_and_never_decoded(gateway, env, instance):
    assert run(instance, resource=databento_resource_from_env()).success
    cached = cache_file(env)
    raw_before = sha(raw_file(env))
    whole = cached.read_bytes()
    cached.write_bytes(whole[: int(len(whole) * 0.6)])  # cut to 60% of its bytes
    paid = gateway.count(GET_RANGE)

    result = run(instance, resource=databento_resource_from_env())

    assert not result.success
    (moved,) = quarantined(env)
    text = failure_text(result)
    assert "failed verification" in text and str(moved) in text
    assert "nothing was decoded" in text
    assert moved.read_bytes() == whole[: int(len(whole) * 0.6)]
    assert not cached.exists() and sha(raw_file(env)) == raw_before
    assert gateway.count(GET_RANGE) == paid  # nothing bought behind the user's back


def test_a_tampered_cached_file_of_the_right_size_is_caught_by_its_hash(gateway, env, instance):
    assert run(instance, resource=databento_resource_from_env()).success
    cached = cache_file(env)
    original = cached.read_bytes()
    plain = bytearray(zstandard.ZstdDecompressor().decompress(original))
    # Change one bar's volume and recompress until the file has exactly its old size: the
    # records still decode whole and count the same, so only the SHA-256 can tell.
    tampered = None
    for offset in range(len(plain) - 8, len(plain) - 56 * 200, -56):
        changed = bytearray(plain)
        changed[offset] ^= 1
        candidate = zstandard.ZstdCompressor(level=3).compress(bytes(changed))
        if len(candidate) == len(original):
            tampered = candidate
            break
    assert tampered is not None, "no same-size tampering found"
    cached.write_bytes(tampered)
    assert len(decode_month([cached], "ES", JAN).bars) == manifest_of(cached)["records_downloaded"]

    result = run(instance, resource=databento_resource_from_env())

    assert not result.success
    assert "SHA-256" in failure_text(result)
    (moved,) = quarantined(env)
    assert moved.read_bytes() == tampered and not cached.exists()


def test_an_entry_of_an_earlier_version_gets_a_manifest_after_one_verified_read(
    gateway, env, instance
):
    assert run(instance, resource=databento_resource_from_env()).success
    cached = cache_file(env)
    note = cached.with_name(cached.name + ".json")
    # What the earlier version wrote next to a download: a sidecar without size or hash.
    old = manifest_of(cached)
    legacy = {k: old[k] for k in ("cost_usd", "record_count", "request_start", "request_end")}
    note.write_text(json.dumps(legacy), encoding="utf-8")
    paid = gateway.count()

    again = run(instance, resource=databento_resource_from_env())

    assert again.success and gateway.count() == paid
    manifest = manifest_of(cached)
    assert manifest["sha256"] == sha(cached)
    assert manifest["dbn_file_bytes"] == cached.stat().st_size
    assert manifest["records_downloaded"] == raw_metadata(again)["records_decoded"]
    assert manifest["cost_usd"] == legacy["cost_usd"] and "adopted_at" in manifest
    note.unlink()  # no sidecar at all: verified by a full decode, then given a manifest
    assert run(instance, resource=databento_resource_from_env()).success
    assert manifest_of(cached)["sha256"] == sha(cached) and gateway.count() == paid


# --------------------------------------------------------------------------- force and refusals


def test_a_forced_download_of_bad_data_keeps_the_old_file_and_quarantines_the_new(
    gateway, env, instance
):
    assert run(instance, resource=databento_resource_from_env()).success
    cached = cache_file(env)
    before, manifest_before, raw_before = sha(cached), manifest_of(cached), sha(raw_file(env))
    serve_bad_data(gateway)

    forced = run(instance, resource=databento_resource_from_env(), tags={FORCE_TAG: "true"})

    assert not forced.success and gateway.count(GET_RANGE) == 2
    assert sha(cached) == before and manifest_of(cached) == manifest_before
    assert sha(raw_file(env)) == raw_before
    (moved,) = quarantined(env)
    text = failure_text(forced)
    assert "High/low consistent" in text and str(moved) in text and "kept unchanged" in text
    bad = decode_month([moved], "ES", JAN).bars
    assert (bad["high"] < bad["low"]).any()
    assert not list(env.rglob("*.part"))
    # The good month is still there: a plain run uses it without paying.
    assert run(instance, resource=databento_resource_from_env()).success
    assert gateway.count(GET_RANGE) == 2


def test_a_refused_download_is_quarantined_and_not_bought_again_without_force(
    gateway, env, instance
):
    serve_bad_data(gateway)
    first = run(instance, resource=databento_resource_from_env())
    assert not first.success and gateway.count(GET_RANGE) == 1
    (moved,) = quarantined(env)
    assert not cache_file(env).exists() and not raw_file(env).exists()
    assert str(moved) in failure_text(first) and "dbento/force=true" in failure_text(first)

    again = run(instance, resource=databento_resource_from_env())

    assert not again.success
    assert gateway.count(GET_RANGE) == 1 and gateway.count("metadata.get_cost") == 1
    text = failure_text(again)
    assert "was refused" in text and "ohlc_consistent" in text and str(moved) in text
    assert "dbento/force=true" in text and "force: true" in text

    serve_good_data(gateway)
    forced = run(instance, resource=databento_resource_from_env(), tags={FORCE_TAG: "true"})
    assert forced.success, failure_text(forced)
    assert gateway.count(GET_RANGE) == 2 and cache_file(env).is_file()
    assert run(instance, resource=databento_resource_from_env()).success  # refusal cleared
    assert gateway.count(GET_RANGE) == 2


def test_a_month_refused_under_a_catalog_typo_is_bought_once_the_typo_is_fixed(
    gateway, env, instance, tmp_path, monkeypatch
):
    # ES mistyped as NQ.v.0, whose data fails the checks: refused and remembered for NQ.v.0.
    # Fixed, the catalog asks for ES.v.0, which nobody refused: bought without force; the
    # typo made again parks ES.v.0's month, then is still refused at once; nothing is paid again.
    typo = catalog_from(tmp_path, "2024-01", **{'symbol = "ES.v.0"': 'symbol = "NQ.v.0"'})
    monkeypatch.setenv("DBENTO_CATALOG", str(typo.path))
    serve_bad_data(gateway)
    assert not run(instance, catalog=typo, resource=databento_resource_from_env()).success
    assert gateway.count(GET_RANGE) == 1 and len(quarantined(env)) == 1

    serve_good_data(gateway)
    monkeypatch.setenv("DBENTO_CATALOG", str(DEFAULT_CATALOG))
    fixed = run(instance, resource=databento_resource_from_env())
    assert fixed.success, failure_text(fixed)
    asked = [c.fields["symbols"] for c in gateway.calls(GET_RANGE) if c.fault is None]
    assert asked == ["NQ.v.0", "ES.v.0"]
    assert manifest_of(cache_file(env))["request_symbol"] == "ES.v.0"

    monkeypatch.setenv("DBENTO_CATALOG", str(typo.path))
    parks = run(instance, catalog=typo, resource=databento_resource_from_env())
    assert "was bought for ES.v.0" in failure_text(parks)
    refused = run(instance, catalog=typo, resource=databento_resource_from_env())
    assert "was refused" in failure_text(refused)
    monkeypatch.setenv("DBENTO_CATALOG", str(DEFAULT_CATALOG))
    assert run(instance, resource=databento_resource_from_env()).success
    assert gateway.count(GET_RANGE) == 2


def test_a_month_refused_for_negative_prices_is_judged_again_once_the_catalog_allows_them(
    gateway, env, instance, tmp_path, monkeypatch
):
    # The first minute trades below zero (as crude oil did in April 2020): refused by the
    # schema rule, whose message says to set negative_prices. Once set, the quarantined
    # copy is judged again and stored: the month is paid for once, without a force.
    def below_zero(query: Query):
        records, mappings = gateway._demo_provider(query)
        records = records.copy()
        minute = records["ts_event"] // (60 * 10**9)
        for price in ("open", "high", "low", "close"):
            records[price][minute == minute[0]] *= -1
        low, high = records["low"].copy(), records["high"].copy()
        first = minute == minute[0]
        records["low"][first], records["high"][first] = high[first], low[first]
        return records, mappings

    gateway.provider = below_zero
    gateway.reset_data()
    refused = run(instance, resource=databento_resource_from_env())
    assert not refused.success and "set negative_prices = true" in failure_text(refused)
    es_entry = 'kind = "future"\n\n[instruments.NQ]'
    allowed = catalog_from(
        tmp_path, "2024-01", **{es_entry: es_entry.replace("\n\n", "\nnegative_prices = true\n\n")}
    )
    assert allowed.instrument("ES").negative_prices
    monkeypatch.setenv("DBENTO_CATALOG", str(allowed.path))
    stored = run(instance, catalog=allowed, resource=databento_resource_from_env())
    assert stored.success, failure_text(stored)
    assert gateway.count(GET_RANGE) == 1 and quarantined(env) == []
    assert (pd.read_parquet(raw_file(env))["low"] < 0).any()


def raw_job():  # for reconstructable(): a job Dagster can re-execute
    raw_only = Definitions(jobs=[define_asset_job("raw_only", selection=[RAW])])
    return Definitions.merge(build_definitions(), raw_only).resolve_job_def("raw_only")


def test_re_executing_a_forced_run_does_not_buy_the_month_again(gateway, env, instance):
    # A forced run pays for the month again, then fails writing the raw file (its name taken
    # by a folder). Re-executed from failure (the UI copies the force tag, as do the
    # daemon's retries), it uses what its parent bought; a new forced run still buys.
    assert run(instance, resource=databento_resource_from_env()).success
    raw_file(env).unlink()
    raw_file(env).mkdir()
    tags = {PARTITION_TAG: str(partition_key(JAN, "ES")), FORCE_TAG: "true"}
    job = reconstructable(raw_job)
    forced = execute_job(job, instance, tags=tags, raise_on_error=False)
    assert not forced.success and gateway.count(GET_RANGE) == 2
    bought = sha(cache_file(env))
    raw_file(env).rmdir()

    again = execute_job(
        job,
        instance,
        tags=tags,
        raise_on_error=False,
        reexecution_options=ReexecutionOptions.from_failure(forced.run_id, instance),
    )
    assert again.success and gateway.count(GET_RANGE) == 2
    assert sha(cache_file(env)) == bought
    assert run(instance, resource=databento_resource_from_env(), tags={FORCE_TAG: "true"}).success
    assert gateway.count(GET_RANGE) == 3


def test_a_refused_vendor_1m_download_is_remembered_and_the_check_is_a_warning(
    gateway, env, instance, monkeypatch
):
    assert run(instance, resource=databento_resource_from_env()).success  # 1s month cached
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    serve_bad_data(gateway)  # only the 1m month is bought from here on

    first = run(instance, resource=databento_resource_from_env(), assets=[RAW, BARS_1MIN])

    assert first.success, failure_text(first)  # a vendor problem never fails the data
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s", "ohlcv-1m"]
    assert "ohlc_consistent" in raw_metadata(first)["vendor_1m_error"]
    assert not vendor_file(env).exists() and len(quarantined(env)) == 1
    record, found = vendor_check(instance, first)
    assert record.status == FAILED and found["severity"] == "WARN" and found["skipped"] is True

    again = run(instance, resource=databento_resource_from_env(), assets=[RAW, BARS_1MIN])

    assert again.success and gateway.schemas(GET_RANGE) == ["ohlcv-1s", "ohlcv-1m"]
    record, found = vendor_check(instance, again)
    assert record.status == FAILED and found["severity"] == "WARN"
    assert "was refused" in found["skipped_because"]
    # dbento/force=true renews the partition's downloads: the hint says it buys the 1s month
    # too, and names the force that buys only the 1-minute bars.
    assert (
        "buys it again (a paid request), with the month's 1-second data; "
        "dbento/force=vendor-1m buys only these 1-minute bars again" in found["skipped_because"]
    )

    # That force, once Databento serves good 1m data: one request, the 1m month alone.
    serve_good_data(gateway)
    cached_1s = sha(next((env / "dbn" / "ES").glob("ES_*.ohlcv-1s.dbn.zst")))
    forced = run(
        instance,
        resource=databento_resource_from_env(),
        assets=[RAW, BARS_1MIN],
        tags={FORCE_TAG: " Vendor-1m "},
    )

    assert forced.success, failure_text(forced)
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s", "ohlcv-1m", "ohlcv-1m"]
    meta = raw_metadata(forced)
    assert meta["forced"] is False and meta["vendor_1m_forced"] is True
    assert meta["source_dbn_cache"] == "hit" and meta["vendor_1m_dbn_cache"] == "forced"
    assert sha(next((env / "dbn" / "ES").glob("ES_*.ohlcv-1s.dbn.zst"))) == cached_1s
    record, found = vendor_check(instance, forced)
    assert record.status == PASSED and found["violations"] == 0


def test_a_catalog_without_1min_buys_no_vendor_bars_it_cannot_compare(
    gateway, env, instance, monkeypatch, tmp_path
):
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    catalog = catalog_from(tmp_path, **{'"1min"]': '"5min"]'})
    assert [tf.label for tf in catalog.timeframes] == ["15s", "30s", "5min"]
    result = run(instance, catalog=catalog, resource=databento_resource_from_env())
    assert result.success, failure_text(result)
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s"]
    logged = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("no 1min timeframe to compare" in m for m in logged)
    forced = run(
        instance,
        catalog=catalog,
        resource=databento_resource_from_env(),
        tags={FORCE_TAG: "vendor-1m"},
    )
    assert not forced.success
    assert "the catalog has no 1min timeframe" in failure_text(forced)
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s"]


def test_a_force_tag_it_does_not_know_fails_before_any_request(gateway, env, instance, monkeypatch):
    # A typo must not pass for "no force" (the user believes the month was bought again),
    # nor for a force (paid). The vendor-only force without the cross-check buys nothing.
    for tag, words in (
        ("on", "dbento/force='on' is not understood"),
        ("vendor-1m", "but the vendor cross-check is off (DBENTO_VENDOR_CHECK=true"),
    ):
        result = run(instance, resource=databento_resource_from_env(), tags={FORCE_TAG: tag})
        assert not result.success
        assert words in failure_text(result) and "nothing was downloaded" in failure_text(result)
    assert gateway.count() == 0
    for tag in ("", "TRUE", "no"):  # the values it knows, any case
        assert run(instance, resource=databento_resource_from_env(), tags={FORCE_TAG: tag}).success
    assert gateway.schemas(GET_RANGE) == ["ohlcv-1s", "ohlcv-1s"]  # bought, forced, cache hit


# --------------------------------------------------------------------------- one download at a time


def test_two_threads_on_one_partition_make_one_request(gateway, tmp_path):
    gateway.gate(GET_RANGE, parties=2, timeout=1.5)  # lets two requests overlap, if made
    results: list[object] = []

    def fetch() -> None:
        logs: list[str] = []
        fetched = source_for(gateway, tmp_path).fetch(FetchRequest(CATALOG_ES, JAN), logs.append)
        results.append((fetched.metadata["dbn_cache"], sha(fetched.payloads[0])))

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert gateway.count(GET_RANGE) == 1
    assert sorted(kind for kind, _ in results) == ["hit", "miss"]
    assert len({digest for _, digest in results}) == 1


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dbento_assets.core.catalog import DEFAULT_CATALOG, load_catalog
    from dbento_assets.core.databento_api import DatabentoSource, RetryPolicy
    from dbento_assets.core.months import Month
    from dbento_assets.core.source import FetchRequest

    gateway, root, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    symbol = sys.argv[4] if len(sys.argv) > 4 else "ES"
    source = DatabentoSource(
        "{key}", root, gateway=gateway, retry=RetryPolicy(max_attempts=1)
    )
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    fetched = source.fetch(
        FetchRequest(load_catalog().instrument(symbol), Month(2024, 1)), lambda line: None
    )
    print(fetched.metadata["dbn_cache"], flush=True)
    """
).format(key=TEST_KEY)


def alias_catalog(tmp_path: Path) -> Catalog:
    """The packaged catalog plus ESV: a second name for ES's request (ES.v.0)."""
    catalog = catalog_from(tmp_path, "2024-01")
    text = catalog.path.read_text(encoding="utf-8")
    es = text[text.index("[instruments.ES]") : text.index("[instruments.NQ]")]
    catalog.path.write_text(text + "\n" + es.replace("[instruments.ES]", "[instruments.ESV]"))
    return load_catalog(catalog.path)


def test_a_month_refused_under_one_name_is_not_bought_again_under_another(gateway, tmp_path):
    # ES and ESV ask Databento for the same thing: ES's refused month is ESV's too (the same
    # data, refused again once paid); only a forced run buys it.
    catalog = alias_catalog(tmp_path)

    def refuse(fetched: object) -> None:
        raise DownloadRefused("a bar has its high below its low", rules=["ohlc_consistent"])

    source = source_for(gateway, tmp_path / "data")
    for symbol in ("ES", "ESV"):
        request = FetchRequest(catalog.instrument(symbol), JAN)
        with pytest.raises((DownloadRefused, SourceError)) as info:
            source.fetch_accepted(request, lambda line: None, refuse)
    assert gateway.count(GET_RANGE) == 1
    assert type(info.value) is SourceError  # refused before buying, naming why
    assert "was refused" in str(info.value) and "ohlc_consistent" in str(info.value)
    forced = FetchRequest(catalog.instrument("ESV"), JAN, force=True)
    source.fetch_accepted(forced, lambda line: None, lambda fetched: None)
    assert gateway.count(GET_RANGE) == 2


@pytest.mark.parametrize(
    "symbols", [("ES", "ES"), ("ES", "ESV")], ids=["one symbol", "two symbols, one request"]
)
def test_two_processes_on_one_partition_make_one_request(gateway, tmp_path, symbols):
    # ESV is a second catalog name for ES.v.0: the same purchase, whichever name asks.
    catalog = alias_catalog(tmp_path)
    gateway.gate(GET_RANGE, parties=2, timeout=1.5)
    go = tmp_path / "go"
    env = {**os.environ, "DBENTO_CATALOG": str(catalog.path)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, gateway.url, str(tmp_path / "data"), str(go), symbol],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for symbol in symbols
    ]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready"
    go.touch()  # both start at once
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=60)
        assert racer.returncode == 0, err
        outcomes.append(out.strip())
    assert sorted(outcomes) == ["hit", "miss"]
    assert gateway.count(GET_RANGE) == 1


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dbento_assets.core.dbn_cache import DbnCache
    from dbento_assets.core.months import Month

    cache = DbnCache(Path(sys.argv[1]))
    entry = cache.entry("ES", Month(2024, 1), "ohlcv-1s")
    with cache.lock(entry, print):
        cache.new_part(entry).write_bytes(b"half a download")
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_a_sigkilled_lock_holder_blocks_nobody_and_its_part_file_is_cleaned(gateway, tmp_path):
    root = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (stale,) = (root / "dbn" / "ES").glob("*.part")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    done: list[object] = []
    logs: list[str] = []
    thread = threading.Thread(
        target=lambda: done.append(
            source_for(gateway, root).fetch(FetchRequest(CATALOG_ES, JAN), logs.append)
        )
    )
    thread.start()
    thread.join(timeout=30)
    assert done, "the fetch is still waiting for the killed process's lock"
    assert gateway.count(GET_RANGE) == 1
    assert not stale.exists() and not list(root.rglob("*.part"))
    assert any(str(stale) in line for line in logs)


JUDGE_SLOWLY = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dbento_assets.core.catalog import load_catalog
    from dbento_assets.core.databento_api import DatabentoSource, RetryPolicy
    from dbento_assets.core.months import Month
    from dbento_assets.core.source import FetchRequest

    def judge(fetched):  # the rules take their time: the run is stopped meanwhile
        print("judging", flush=True)
        time.sleep(120)

    source = DatabentoSource(
        "{key}", Path(sys.argv[2]), gateway=sys.argv[1], retry=RetryPolicy(max_attempts=1)
    )
    request = FetchRequest(load_catalog().instrument("ES"), Month(2024, 1))
    source.fetch_accepted(request, lambda line: None, judge)
    """
).format(key=TEST_KEY)


@pytest.mark.parametrize("stop", ["kill", "ctrl-c", "changed since"])
def test_a_paid_download_outlives_a_run_stopped_while_its_rules_run(gateway, tmp_path, stop):
    # Every byte arrived and was paid for; the run dies while the rules judge the month. The
    # next run judges that download, buying nothing, unless it is no longer what was paid for.
    root = tmp_path / "data"
    judged = subprocess.Popen(
        [sys.executable, "-c", JUDGE_SLOWLY, gateway.url, str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert judged.stdout.readline().strip() == "judging"
        judged.send_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGKILL)
        judged.wait(timeout=30)
    finally:
        if judged.poll() is None:
            judged.kill()
    assert gateway.count(GET_RANGE) == 1
    (held,) = (root / "dbn" / "ES").glob("*.pending")
    paid = sha(held)
    priced = source_for(gateway, root).estimate(CATALOG_ES, JAN)
    assert priced.cached and str(held) in priced.note  # what the run will use: $0
    if stop == "changed since":
        held.write_bytes(held.read_bytes()[:-1] + b"x")
    logs: list[str] = []
    fetched = source_for(gateway, root).fetch(FetchRequest(CATALOG_ES, JAN), logs.append)
    assert gateway.count(GET_RANGE) == (2 if stop == "changed since" else 1)
    assert sha(fetched.payloads[0]) == paid and sha(cache_file(root)) == paid
    assert not list(root.rglob("*.pending*")) and not list(root.rglob("*.part"))
    if stop == "changed since":
        assert len(quarantined(root)) == 1
    else:
        assert any("a stopped run paid for" in line for line in logs), logs


def stopped_while_judging(fetched: object) -> None:
    raise RuntimeError("the run stopped while the rules judged the month")


def test_a_forced_run_that_judges_a_held_download_buys_once_for_its_lineage(gateway, tmp_path):
    # A paid download left held; a forced run judges it (no request) and, re-executed, does
    # not buy the month again: the held file became the lineage's purchase.
    root = tmp_path / "data"
    source = source_for(gateway, root)
    with pytest.raises(RuntimeError):
        source.fetch_accepted(FetchRequest(CATALOG_ES, JAN), print, stopped_while_judging)
    forced = FetchRequest(CATALOG_ES, JAN, force=True, lineage="root-run-1")
    source.fetch(forced, print)
    assert manifest_of(cache_file(root))["forced_in_run"] == "root-run-1"
    source.fetch(forced, print)  # its re-execution
    assert gateway.count(GET_RANGE) == 1


def test_a_held_piece_of_a_month_that_has_closed_since_is_not_served_as_the_month(
    gateway, tmp_path
):
    # Held while March was open to the 4th; March has closed since: the whole month is
    # bought, never the piece stored as if it were March (the held file is quarantined).
    root = tmp_path / "data"
    source = source_for(gateway, root)
    march = Month(2024, 3)
    gateway.set_range("GLBX.MDP3", "2010-06-06", "2024-03-04")
    with pytest.raises(RuntimeError):
        source.fetch_accepted(FetchRequest(CATALOG_ES, march), print, stopped_while_judging)
    gateway.set_range("GLBX.MDP3", "2010-06-06", "2024-04-02")
    fetched = source.fetch(FetchRequest(CATALOG_ES, march, whole=True), print)
    assert fetched.complete and fetched.through_ns is None
    assert gateway.count(GET_RANGE) == 2 and len(quarantined(root)) == 1


def test_a_download_bought_for_another_request_symbol_is_not_served(
    gateway, env, instance, tmp_path, monkeypatch
):
    # A typo in the catalog (NQ asking for ES.v.0) bought ES's month under NQ's name. Once the
    # catalog is corrected, that file must not become NQ's bars: refused before anything is
    # decoded or bought and parked under its request, so the next run buys the month for
    # NQ.v.0; the typo made again, the parked month is used again without buying.
    typo = catalog_from(tmp_path, "2024-01", **{'symbol = "NQ.v.0"': 'symbol = "ES.v.0"'})
    monkeypatch.setenv("DBENTO_CATALOG", str(typo.path))
    assert run(instance, symbol="NQ", catalog=typo, resource=databento_resource_from_env()).success
    wrong = sha(raw_file(env, "NQ"))
    bought_for_es = sha(cache_file(env, "NQ"))
    fixed = load_catalog(DEFAULT_CATALOG)
    monkeypatch.setenv("DBENTO_CATALOG", str(fixed.path))

    result = run(instance, symbol="NQ", catalog=fixed, resource=databento_resource_from_env())
    assert not result.success
    text = failure_text(result)
    assert f"{cache_file(env, 'NQ')} was bought for ES.v.0 (continuous)" in text
    assert "the catalog now asks for NQ.v.0 (continuous)" in text
    assert gateway.count(GET_RANGE) == 1  # nothing bought
    assert sha(raw_file(env, "NQ")) == wrong  # nothing written
    parked = sorted((env / "dbn" / "by_request").rglob("*.dbn.zst"))
    assert [sha(p) for p in parked] == [bought_for_es] and quarantined(env) == []

    again = run(instance, symbol="NQ", catalog=fixed, resource=databento_resource_from_env())
    assert again.success, failure_text(again)
    asked = [c.fields["symbols"] for c in gateway.calls(GET_RANGE) if c.fault is None]
    assert asked == ["ES.v.0", "NQ.v.0"]
    assert manifest_of(cache_file(env, "NQ"))["request_symbol"] == "NQ.v.0"
    assert sha(raw_file(env, "NQ")) != wrong

    monkeypatch.setenv("DBENTO_CATALOG", str(typo.path))  # the typo again: NQ.v.0 parked,
    parks = run(instance, symbol="NQ", catalog=typo, resource=databento_resource_from_env())
    assert not parks.success
    back = run(instance, symbol="NQ", catalog=typo, resource=databento_resource_from_env())
    assert back.success, failure_text(back)  # and ES.v.0's month back, not bought again
    assert gateway.count(GET_RANGE) == 2 and sha(cache_file(env, "NQ")) == bought_for_es


def test_a_catalog_typo_and_its_fix_buy_nothing(gateway, env, instance, tmp_path, monkeypatch):
    # ES bought as ES.v.0; the catalog then mistyped (NQ.v.0, another request) and fixed:
    # the typo's run buys nothing and parks the month, the fixed catalog's run uses it
    # again. dbento estimate prices the typo's month and says the fixed one is bought.
    assert run(instance, resource=databento_resource_from_env()).success
    paid = sha(cache_file(env))
    typo = catalog_from(tmp_path, "2024-01", **{'symbol = "ES.v.0"': 'symbol = "NQ.v.0"'})
    monkeypatch.setenv("DBENTO_CATALOG", str(typo.path))
    priced, err = io.StringIO(), io.StringIO()
    assert estimate(["--symbols", "ES", "--start", "2024-01"], priced, err) == 0, err.getvalue()
    assert "bought again for NQ.v.0 (continuous)" in priced.getvalue(), priced.getvalue()
    assert not run(instance, catalog=typo, resource=databento_resource_from_env()).success

    monkeypatch.setenv("DBENTO_CATALOG", str(DEFAULT_CATALOG))
    priced = io.StringIO()
    assert estimate(["--symbols", "ES", "--start", "2024-01"], priced) == 0
    assert "total: $0.0000" in priced.getvalue() and "1 cached" in priced.getvalue()
    fixed = run(instance, resource=databento_resource_from_env())
    assert fixed.success, failure_text(fixed)
    assert gateway.count(GET_RANGE) == 1 and sha(cache_file(env)) == paid
    assert raw_metadata(fixed)["source_dbn_cache"] == "hit"


def test_a_symbol_renamed_in_the_catalog_buys_nothing(
    gateway, env, instance, tmp_path, monkeypatch
):
    # [instruments.ES] renamed [instruments.ESV], still ES.v.0: ES's month is ESV's too.
    assert run(instance, resource=databento_resource_from_env()).success
    renamed = catalog_from(tmp_path, "2024-01", **{"[instruments.ES]": "[instruments.ESV]"})
    monkeypatch.setenv("DBENTO_CATALOG", str(renamed.path))
    priced = io.StringIO()
    assert estimate(["--symbols", "ESV", "--start", "2024-01"], priced) == 0
    assert "total: $0.0000" in priced.getvalue(), priced.getvalue()
    result = run(instance, symbol="ESV", catalog=renamed, resource=databento_resource_from_env())
    assert result.success, failure_text(result)
    assert gateway.count(GET_RANGE) == 1
    assert sha(cache_file(env, "ESV")) == sha(cache_file(env, "ES"))


def test_a_month_bought_into_another_data_folder_is_not_bought_again(
    gateway, env, instance, tmp_path, monkeypatch
):
    # Run from another working directory (or with DBENTO_DATA_DIR changed), the same
    # instance: the new folder has no cache, but the instance recorded where the month went.
    assert run(instance, resource=databento_resource_from_env()).success
    paid = sha(cache_file(env))
    moved = tmp_path / "elsewhere"
    monkeypatch.setenv("DBENTO_DATA_DIR", str(moved))
    result = run(instance, resource=databento_resource_from_env())
    assert result.success, failure_text(result)
    assert gateway.count(GET_RANGE) == 1
    assert sha(cache_file(moved)) == paid and raw_file(moved).is_file()
    assert manifest_of(cache_file(moved))["dbn_file"] == str(cache_file(moved))
    logs = "\n".join(e.user_message for e in instance.all_logs(result.run_id))
    assert f"{cache_file(env)} is used, after checking its size and SHA-256" in logs

    # A recorded file that is no longer what its manifest says is never used: bought again.
    data = bytearray(cache_file(moved).read_bytes())
    data[-1] ^= 0xFF
    cache_file(moved).write_bytes(bytes(data))
    again = tmp_path / "again"
    monkeypatch.setenv("DBENTO_DATA_DIR", str(again))
    assert run(instance, resource=databento_resource_from_env()).success
    assert gateway.count(GET_RANGE) == 2 and sha(cache_file(again)) == paid


def test_a_month_bought_from_another_working_directory_is_not_bought_again(
    gateway, env, instance, tmp_path, monkeypatch
):
    # The default ./data, the same instance, a command started from another folder: neither
    # the 1-second month nor the vendor's 1-minute bars bought with it are bought again.
    monkeypatch.setenv("DBENTO_DATA_DIR", "data")
    monkeypatch.setenv("DBENTO_VENDOR_CHECK", "true")
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        result = run(instance, resource=databento_resource_from_env())
        assert result.success, failure_text(result)
        schemas = sorted(c.fields["schema"] for c in gateway.calls(GET_RANGE) if c.fault is None)
        assert schemas == ["ohlcv-1m", "ohlcv-1s"]
    assert sha(cache_file(tmp_path / "second" / "data")) == sha(
        cache_file(tmp_path / "first" / "data")
    )


def test_another_symbols_month_is_never_reused_unless_it_says_it_is_this_request(
    gateway, env, instance
):
    # ES's month, its manifest lost (adopted again as a file of earlier versions): NQ, which
    # has no January, must buy its own, not link ES's bars as NQ's.
    assert run(instance, resource=databento_resource_from_env()).success
    manifest = cache_file(env).with_name(cache_file(env).name + ".json")
    manifest.unlink()
    assert run(instance, resource=databento_resource_from_env()).success  # adopted
    adopted = manifest_of(cache_file(env))
    assert (adopted["dataset"], adopted["request_symbol"], adopted["stype_in"]) == (
        "GLBX.MDP3",
        "ES.v.0",
        "continuous",
    )
    # A manifest that does not say what it was bought for (its header named several
    # symbols, say) is no reason to reuse it either.
    for key in ("dataset", "request_symbol", "stype_in"):
        adopted.pop(key)
    manifest.write_text(json.dumps(adopted))
    result = run(instance, symbol="NQ", resource=databento_resource_from_env())
    assert result.success, failure_text(result)
    asked = [c.fields["symbols"] for c in gateway.calls(GET_RANGE) if c.fault is None]
    assert asked == ["ES.v.0", "NQ.v.0"]
    assert sha(cache_file(env, "NQ")) != sha(cache_file(env))


def test_a_request_symbol_spelled_otherwise_is_the_same_request(
    gateway, env, instance, tmp_path, monkeypatch
):
    # The client sends "es.V.0 " as ES.v.0: the catalog written so is the same request, so
    # the month bought before is served from the cache, and its files are still its own.
    respelled = catalog_from(tmp_path, "2024-01", **{'symbol = "ES.v.0"': 'symbol = " es.V.0"'})
    assert run(instance, catalog=load_catalog(DEFAULT_CATALOG), assets=[RAW, BARS_1MIN]).success
    cached, stored = sha(cache_file(env)), sha(raw_file(env))
    monkeypatch.setenv("DBENTO_CATALOG", str(respelled.path))
    again = run(
        instance,
        catalog=respelled,
        resource=databento_resource_from_env(),
        assets=[RAW, BARS_1MIN],
    )
    assert again.success, failure_text(again)
    assert gateway.count(GET_RANGE) == 1 and quarantined(env) == []
    assert sha(cache_file(env)) == cached and sha(raw_file(env)) == stored
    assert raw_metadata(again)["request_symbol"] == "ES.v.0 (continuous)"


# --------------------------------------------------------------------------- local disk errors


def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``mount`` (needs root and mount rights; skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 64 KiB disk."""
    yield from tmpfs(tmp_path / "small-disk", "64k")


@pytest.fixture
def data_disk(tmp_path) -> Iterator[Path]:
    """A 32 MiB disk, room for a few months of bars."""
    yield from tmpfs(tmp_path / "data-disk", "32m")


def test_a_full_disk_pays_once_and_says_how_much_is_needed(
    gateway, env, instance, small_disk, monkeypatch
):
    monkeypatch.setenv("DBENTO_CACHE_DIR", str(small_disk))

    result = run(instance, resource=databento_resource_from_env())

    assert not result.success
    assert gateway.count(GET_RANGE) == 1  # not retried as a network fault
    text = failure_text(result)
    assert "No space left" in text and str(small_disk / "dbn" / "ES") in text
    assert "MB" in text and "billable size" in text and "materialize again later" not in text
    assert not list(small_disk.rglob("*.part"))


def files_of(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def bought_months(gateway: FakeGateway) -> Counter[str]:
    """Answered ohlcv-1s ``get_range`` requests per month (``YYYY-MM``)."""
    return Counter(
        call.fields["start"][:7]
        for call in gateway.calls(GET_RANGE)
        if call.fault is None and call.fields.get("schema") == "ohlcv-1s"
    )


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_full_data_disk_fails_its_month_alone_and_the_retry_pays_nothing(
    gateway, env, instance, data_disk, tmp_path, monkeypatch, fmt
):
    # The bars' disk fills up (the DBN cache is elsewhere): the month being written fails
    # with the system's reason, nothing half written is left, the months stored before are
    # untouched, and once there is room the month is built from its cached download.
    monkeypatch.setenv("DBENTO_DATA_DIR", str(data_disk / "data"))
    monkeypatch.setenv("DBENTO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DBENTO_FORMAT", fmt)
    every_asset = [RAW, *(AssetKey(f"bars_{label}") for label in ("15s", "30s", "1min"))]
    assert run(instance, JAN, assets=every_asset).success
    before = files_of(data_disk)
    filler = data_disk / "filler"
    with filler.open("wb") as f:  # all but 8 KiB of the disk
        os.posix_fallocate(f.fileno(), 0, os.statvfs(data_disk).f_bavail * 4096 - 8192)

    result = run(instance, FEB, assets=every_asset)
    assert not result.success
    text = failure_text(result)
    assert f"No space left on the device holding {data_disk / 'data' / 'raw_1s'}" in text
    assert "MB are free there" in text and "not bought again" in text
    filler.unlink()
    after = files_of(data_disk)
    assert {name: after[name] for name in before} == before  # nothing stored before changed
    left = [name for name in after if name not in before]
    assert left == [], left

    assert run(instance, FEB, assets=every_asset).success
    assert bought_months(gateway) == {"2024-01": 1, "2024-02": 1}  # each month paid once
    assert (data_disk / "data" / "raw_1s" / "ES" / f"ES_{FEB.tag}.{fmt}").exists()


def test_a_read_only_cache_fails_before_any_paid_call(gateway, tmp_path, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(SourceError, match="read-only") as info:
        source_for(gateway, small_disk).fetch(FetchRequest(CATALOG_ES, JAN), lambda _l: None)
    assert str(small_disk) in str(info.value)
    assert gateway.count() == 0


def test_manifest_names_what_was_bought(gateway, tmp_path):
    fetched = source_for(gateway, tmp_path).fetch(FetchRequest(CATALOG_ES, JAN), lambda _l: None)
    (path,) = fetched.payloads
    manifest = manifest_of(path)
    assert manifest["sha256"] == sha(path) and manifest["dbn_file_bytes"] == path.stat().st_size
    assert (manifest["dataset"], manifest["request_symbol"], manifest["stype_in"]) == (
        "GLBX.MDP3",
        "ES.v.0",
        "continuous",
    )
    assert manifest["schema"] == "ohlcv-1s" and manifest["gateway"] == gateway.url
    assert manifest["records_downloaded"] == manifest["record_count"] > 0
    assert manifest["cost_usd"] > 0 and manifest["downloaded_at"]
    assert manifest["request_start"] == JAN.start.isoformat()
    assert manifest["request_end"] == JAN.end.isoformat()
    assert DbnCache(tmp_path).entry("ES", JAN, "ohlcv-1s").path == path
    assert np.isclose(
        manifest["cost_usd"],
        manifest["billable_size_bytes"] / 2**30 * gateway.price_per_gb,
    )


def test_a_new_download_is_hashed_by_its_file_check_not_read_again(gateway, tmp_path, monkeypatch):
    # The file check reads every byte of a download; its pass also gives the manifest's
    # SHA-256, so a download is read for its check and its decode only.
    def read_again(path: Path) -> str:
        raise AssertionError(f"{path} was read again to hash it")

    monkeypatch.setattr("dbento_assets.core.dbn_cache.sha256_of", read_again)
    fetched = source_for(gateway, tmp_path).fetch(FetchRequest(CATALOG_ES, JAN), lambda _l: None)
    (path,) = fetched.payloads
    assert manifest_of(path)["sha256"] == sha(path)
    monkeypatch.undo()  # a later read verifies the file against that hash
    again = source_for(gateway, tmp_path).fetch(FetchRequest(CATALOG_ES, JAN), lambda _l: None)
    assert again.payloads == [path] and gateway.count(GET_RANGE) == 1


def serve_a_bar_outside_the_window(gw: FakeGateway) -> None:
    """The gateway answers with its usual data plus one bar at the first instant after the
    requested window (a download the file check refuses)."""

    def outside_the_window(query: Query):
        records, mappings = gw._demo_provider(query)
        extra = records[-1:].copy()
        extra["ts_event"] = query.end_ns
        return np.concatenate([records, extra]), mappings

    gw.provider = outside_the_window


def test_an_unusable_download_is_quarantined_and_remembered(gateway, tmp_path):
    serve_a_bar_outside_the_window(gateway)
    with pytest.raises(SourceError, match="outside the requested window") as info:
        source_for(gateway, tmp_path).fetch(FetchRequest(CATALOG_ES, JAN), lambda _l: None)
    (moved,) = quarantined(tmp_path)
    assert str(moved) in str(info.value) and gateway.count(GET_RANGE) == 1  # not retried
    assert not DbnCache(tmp_path).entry("ES", JAN, "ohlcv-1s").path.exists()

    with pytest.raises(SourceError, match="was refused") as again:
        source_for(gateway, tmp_path).fetch(FetchRequest(CATALOG_ES, JAN), lambda _l: None)
    assert "the DBN file check" in str(again.value) and "dbento/force=true" in str(again.value)
    assert gateway.count(GET_RANGE) == 1 and gateway.count("metadata.get_cost") == 1
