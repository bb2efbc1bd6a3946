"""A fake Databento historical gateway for the tests: real HTTPS, real wire format, faults.

The real, unpatched ``databento`` client talks to :class:`FakeGateway` exactly as it talks to
``hist.databento.com``: HTTPS (a trustme certificate for IP 127.0.0.1, trusted through
``REQUESTS_CA_BUNDLE``), HTTP Basic auth with the API key as user name, form fields for POST
and query parameters for GET, a zstd-compressed DBN body streamed with chunked transfer
encoding, and JSON errors shaped ``{"detail": {"case", "message", "docs"}}``. Endpoints:
``/v0/timeseries.get_range``, ``/v0/metadata.get_cost``, ``/v0/metadata.get_billable_size``,
``/v0/metadata.get_record_count`` and ``/v0/metadata.get_dataset_range``. Data comes from a
pluggable provider of ohlcv-1s records; the default one resolves the request symbol through
the catalog and serves the demo generator's records for the requested ``[start, end)`` window.
Schema ``ohlcv-1m`` is served too, as the vendor does it: the same 1-second records aggregated
per minute and instrument (bar at the minute's open, no bar for a minute without a record),
computed here with plain numpy on the fixed-point integers, independently of the project's
aggregation kernel, so the cross-check compares against a second implementation;
:meth:`FakeGateway.corrupt_vendor_bar` makes one of those bars disagree. Tests queue faults
with :meth:`FakeGateway.fail` (429 with Retry-After, 5xx, a stream cut mid-body, a clean EOF
mid-body, a short but valid stream, a connection reset, 401/403/422, an empty result), move
the dataset's available range with :meth:`FakeGateway.set_range`, and count requests through
:attr:`FakeGateway.requests`. The ``gateway`` fixture starts one per test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pandas as pd
import pytest
import trustme

from dbento_assets.core.catalog import DEFAULT_CATALOG, Catalog, Instrument, load_catalog
from dbento_assets.core.dbn import OHLCV_RECORD_DTYPE, encode_ohlcv, ohlcv_records
from dbento_assets.core.demo import generate_month_records
from dbento_assets.core.months import Month

TEST_KEY = "db-GATEWAYTESTKEY0123456789abcdef"
RECORD_BYTES = OHLCV_RECORD_DTYPE.itemsize
ENDPOINTS = {
    "/v0/timeseries.get_range": "timeseries.get_range",
    "/v0/metadata.get_cost": "metadata.get_cost",
    "/v0/metadata.get_billable_size": "metadata.get_billable_size",
    "/v0/metadata.get_record_count": "metadata.get_record_count",
    "/v0/metadata.get_dataset_range": "metadata.get_dataset_range",
}
GET_RANGE = "timeseries.get_range"
SCHEMAS = ("ohlcv-1s", "ohlcv-1m")
MINUTE_NS = 60 * 10**9
HTTP_FAULTS = {"401", "403", "404", "408", "422", "429", "500", "502", "503", "504"}
STREAM_FAULTS = {"cut", "truncate", "short", "reset", "empty", "stall"}
DEFAULT_RANGES = {
    "GLBX.MDP3": pd.Timestamp("2010-06-06", tz="UTC"),
    "EQUS.MINI": pd.Timestamp("2023-03-28", tz="UTC"),
}


@dataclass(frozen=True)
class Query:
    """A data request as the gateway understood it."""

    dataset: str
    symbols: tuple[str, ...]
    schema: str
    stype_in: str
    start_ns: int
    end_ns: int


Mappings = dict[str, list[dict[str, object]]]
Provider = Callable[[Query], tuple[np.ndarray, Mappings]]


class ProviderError(Exception):
    """Raised by a provider to answer 422 (e.g. a symbol that does not resolve)."""

    def __init__(self, case: str, message: str) -> None:
        super().__init__(message)
        self.case = case
        self.message = message


@dataclass
class RecordedRequest:
    """One request as received: enough to count calls and check what was sent."""

    method: str
    path: str
    endpoint: str
    fields: dict[str, str]
    auth_user: str | None
    fault: str | None = None


@dataclass
class Fault:
    """A queued failure for the next matching request."""

    kind: str
    endpoint: str | None = None
    times: int = 1
    retry_after: str | None = "0"
    case: str | None = None
    message: str | None = None
    stall_seconds: float = 2.0


@dataclass
class FakeGateway:
    """The fake Databento historical API; see the module docstring."""

    key: str = TEST_KEY
    activity: float = 0.02
    price_per_gb: float = 10.0
    catalog: Catalog | None = None
    provider: Provider | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    ranges: dict[str, tuple[pd.Timestamp, pd.Timestamp]] = field(default_factory=dict)
    url: str = ""
    _faults: list[Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _months: dict[tuple[str, Month], np.ndarray] = field(default_factory=dict)
    _bodies: dict[Query, tuple[np.ndarray, Mappings, bytes]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    max_in_flight: dict[str, int] = field(default_factory=dict)
    _gates: dict[str, threading.Barrier] = field(default_factory=dict)
    _vendor_corruption: int | None = None
    _vendor_inverted: bool = False

    # ------------------------------------------------------------------ test controls

    def fail(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        times: int = 1,
        retry_after: str | None = "0",
        case: str | None = None,
        message: str | None = None,
        stall_seconds: float = 2.0,
    ) -> None:
        """Queue ``times`` failures of ``kind`` for requests to ``endpoint`` (None: any).

        Kinds: an HTTP status (``"429"``, ``"500"``, ``"401"``, ``"422"``, ...), ``"cut"``
        (stream aborted mid-body), ``"truncate"`` (clean EOF mid-body), ``"short"`` (a valid
        stream with half the records), ``"reset"`` (TCP reset, no response), ``"empty"`` (no
        records) and ``"stall"`` (wait ``stall_seconds`` before answering normally).
        """
        if kind not in HTTP_FAULTS | STREAM_FAULTS:
            raise ValueError(f"unknown fault {kind!r}")
        if endpoint is not None and endpoint not in ENDPOINTS.values():
            raise ValueError(f"unknown endpoint {endpoint!r}")
        with self._lock:
            self._faults.append(
                Fault(kind, endpoint, times, retry_after, case, message, stall_seconds)
            )

    def set_range(self, dataset: str, start: Any, end: Any) -> None:
        """Set the available ohlcv-1s range of ``dataset`` (``end`` exclusive)."""
        self.ranges[dataset] = (_utc(start), _utc(end))

    def available(self, dataset: str) -> tuple[pd.Timestamp, pd.Timestamp]:
        if dataset in self.ranges:
            return self.ranges[dataset]
        start = DEFAULT_RANGES.get(dataset, pd.Timestamp("2018-01-01", tz="UTC"))
        return start, pd.Timestamp.now(tz="UTC").floor("D")

    def calls(self, endpoint: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if endpoint is None or r.endpoint == endpoint]

    def count(self, endpoint: str | None = None) -> int:
        return len(self.calls(endpoint))

    def gate(self, endpoint: str, parties: int, timeout: float) -> None:
        """Hold each request to ``endpoint`` until ``parties`` of them are in flight together
        (or ``timeout`` seconds pass): proves whether requests can overlap, without guessing
        at timing. :attr:`max_in_flight` then tells how many did."""
        self._gates[endpoint] = threading.Barrier(parties, timeout=timeout)

    def release(self, endpoint: str) -> None:
        """Remove the gate of ``endpoint``, letting the requests held at it through."""
        gate = self._gates.pop(endpoint, None)
        if gate is not None:
            gate.abort()

    def corrupt_vendor_bar(self, index: int | None = 0, *, inverted: bool = False) -> None:
        """Serve the ``index``-th ohlcv-1m bar of every answer with one lot more volume, or
        ``inverted``: its high below its low, which no bar can be (None: serve them right
        again)."""
        with self._lock:
            self._vendor_corruption = index
            self._vendor_inverted = inverted
            for query in [q for q in self._bodies if q.schema == "ohlcv-1m"]:
                del self._bodies[query]

    def schemas(self, endpoint: str = GET_RANGE) -> list[str]:
        """The schema of each request to ``endpoint``, in order."""
        return [r.fields.get("schema", "") for r in self.calls(endpoint)]

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.times for f in self._faults)

    # ------------------------------------------------------------------ data

    def records_for(self, query: Query) -> tuple[np.ndarray, Mappings]:
        return self.answer(query)[:2]

    def answer(self, query: Query) -> tuple[np.ndarray, Mappings, bytes]:
        """Records, symbology and the encoded DBN body of a query (cached per query)."""
        with self._lock:
            cached = self._bodies.get(query)
        if cached is not None:
            return cached
        provider = self.provider or self._demo_provider
        records, mappings = provider(replace(query, schema="ohlcv-1s"))
        if query.schema == "ohlcv-1m":
            records = minute_records(records)
            index = self._vendor_corruption
            if index is not None and len(records):
                at = min(index, len(records) - 1)
                if self._vendor_inverted:
                    records["high"][at] = records["low"][at] - 1
                else:
                    records["volume"][at] += 1
        body = _encode(records, query, mappings)
        with self._lock:
            self._bodies[query] = (records, mappings, body)
        return records, mappings, body

    def reset_data(self) -> None:
        """Forget cached answers (after changing ``provider`` or ``activity``)."""
        with self._lock:
            self._bodies.clear()
            self._months.clear()

    def _demo_provider(self, query: Query) -> tuple[np.ndarray, Mappings]:
        catalog = self.catalog or load_catalog(DEFAULT_CATALOG)  # the vendor ignores DBENTO_CATALOG
        if len(query.symbols) != 1:
            raise ProviderError("symbology_invalid_request", "the fake serves one symbol")
        inst = _resolve(catalog, query)
        parts = []
        month = Month.parse(pd.Timestamp(query.start_ns, tz="UTC").strftime("%Y-%m"))
        while month.start_ns < query.end_ns:
            cache_key = (inst.symbol, month)
            if cache_key not in self._months:
                self._months[cache_key] = generate_month_records(inst, month, self.activity)
            parts.append(self._months[cache_key])
            month = month.next()
        records = np.concatenate(parts) if parts else np.empty(0, OHLCV_RECORD_DTYPE)
        ts = records["ts_event"].astype("int64")
        records = records[(ts >= query.start_ns) & (ts < query.end_ns)]
        return records, _mappings(inst.request_symbol, records, query)

    # ------------------------------------------------------------------ server

    def start(self, cert_dir: Path) -> Path:
        """Serve on a random port of 127.0.0.1; return the CA bundle clients must trust."""
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ca_file = cert_dir / "fake-databento-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        gateway = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = self.socket.accept()
                wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                return wrapped, addr

        class Handler(_Handler):
            owner = gateway

        self._server = Server(("127.0.0.1", 0), Handler)
        port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return ca_file

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint in (None, endpoint):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeGateway
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.do_handshake()  # type: ignore[attr-defined]
        except (ssl.SSLError, OSError):
            self.close_connection = True
            raise

    def handle(self) -> None:
        with contextlib.suppress(ssl.SSLError, ConnectionError, BrokenPipeError):
            super().handle()

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr noise
        return

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self._serve(parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        parts = urlsplit(self.path)
        fields = dict(parse_qsl(parts.query, keep_blank_values=True))
        fields.update(parse_qsl(body, keep_blank_values=True))
        self._serve(parts.path, fields)

    # ------------------------------------------------------------------ dispatch

    def _serve(self, path: str, fields: dict[str, str]) -> None:
        gw = self.owner
        endpoint = ENDPOINTS.get(path, path)
        with gw._lock:
            now = gw.in_flight.get(endpoint, 0) + 1
            gw.in_flight[endpoint] = now
            gw.max_in_flight[endpoint] = max(now, gw.max_in_flight.get(endpoint, 0))
        self._in_flight: str | None = endpoint
        try:
            gate = gw._gates.get(endpoint)
            if gate is not None:
                with contextlib.suppress(threading.BrokenBarrierError):
                    gate.wait()
            self._answer(path, endpoint, fields)
        finally:
            self._leave_flight()

    def _leave_flight(self) -> None:
        # Called before a stream's last bytes are sent too: once the client holds the whole
        # body it may start its next request, and this thread may not have run again by then.
        endpoint, self._in_flight = self._in_flight, None
        if endpoint is not None:
            with self.owner._lock:
                self.owner.in_flight[endpoint] -= 1

    def _answer(self, path: str, endpoint: str, fields: dict[str, str]) -> None:
        gw = self.owner
        fault = gw._take_fault(endpoint) if path in ENDPOINTS else None
        gw._record(
            RecordedRequest(
                self.command, path, endpoint, fields, self._auth_user(), fault and fault.kind
            )
        )
        if path not in ENDPOINTS:
            return self._error(404, "not_found", f"no endpoint {path}")
        if fault is not None and fault.kind in HTTP_FAULTS:
            return self._http_fault(fault)
        if fault is not None and fault.kind == "reset":
            return self._reset()
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.stall_seconds)
        user = self._auth_user()
        if user is None:
            return self._error(401, "auth_no_credentials", "Authentication required.")
        if user != gw.key:
            return self._error(401, "auth_invalid_key", "Authentication failed.")
        try:
            if endpoint == "metadata.get_dataset_range":
                return self._dataset_range(fields)
            query = self._query(fields)
            if fault is not None and fault.kind == "empty":
                records = np.empty(0, dtype=OHLCV_RECORD_DTYPE)
                mappings: Mappings = {}
                body = None
            else:
                records, mappings, body = gw.answer(query)
        except ProviderError as exc:
            return self._error(422, exc.case, exc.message)
        if endpoint == "metadata.get_record_count":
            return self._json(len(records))
        if endpoint == "metadata.get_billable_size":
            return self._json(len(records) * RECORD_BYTES)
        if endpoint == "metadata.get_cost":
            return self._json(len(records) * RECORD_BYTES / 2**30 * gw.price_per_gb)
        if body is None or (fault is not None and fault.kind == "short"):
            records = records[: len(records) // 2] if body is not None else records
            body = _encode(records, query, mappings)
        kind = fault.kind if fault is not None else None
        if kind == "cut":
            return self._stream(body, cut_at=len(body) // 2)
        if kind == "truncate":
            return self._close_delimited(body[: len(body) // 2 + 1])
        return self._stream(body)

    def _query(self, fields: dict[str, str]) -> Query:
        gw = self.owner
        try:
            dataset = fields["dataset"]
            start = _parse_time(fields["start"])
            end = _parse_time(fields["end"]) if fields.get("end") else start + 86_400 * 10**9
        except (KeyError, ValueError) as exc:
            raise ProviderError("invalid_request", f"bad request fields: {exc}") from None
        schema = fields.get("schema", "trades")
        if schema not in SCHEMAS:
            raise ProviderError(
                "schema_unsupported", f"the fake serves {' and '.join(SCHEMAS)}, not {schema}"
            )
        if end <= start:
            raise ProviderError("data_start_after_end", "start must be before end")
        avail_start, avail_end = gw.available(dataset)
        if start < avail_start.value:
            raise ProviderError(
                "data_start_before_available_start",
                f"The dataset {dataset} has data available from {_iso(avail_start)}. Use a "
                "start time on or after this.",
            )
        if end > avail_end.value:
            raise ProviderError(
                "data_end_after_available_end",
                f"The dataset {dataset} has data available up to {_iso(avail_end)}. "
                "Use an end time on or before this.",
            )
        symbols = tuple(s for s in fields.get("symbols", "").split(",") if s)
        return Query(dataset, symbols, schema, fields.get("stype_in", "raw_symbol"), start, end)

    # ------------------------------------------------------------------ responses

    def _auth_user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:]).decode("utf-8")
        except ValueError:
            return None
        return decoded.partition(":")[0]

    def _dataset_range(self, fields: dict[str, str]) -> None:
        start, end = self.owner.available(fields.get("dataset", ""))
        span = {"start": _iso(start), "end": _iso(end)}
        schemas = {s: dict(span) for s in ("ohlcv-1s", "ohlcv-1m", "ohlcv-1h", "ohlcv-1d")}
        self._json({"start": span["start"], "end": span["end"], "schema": schemas})

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(
        self, status: int, case: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self._json({"detail": {"case": case, "message": message, "docs": None}}, status, headers)

    def _http_fault(self, fault: Fault) -> None:
        status = int(fault.kind)
        defaults = {
            401: ("auth_invalid_key", "Authentication failed."),
            403: ("auth_forbidden", "The key is not entitled to this dataset."),
            404: ("not_found", "Not found."),
            408: ("request_timeout", "The request transmission timed out."),
            422: ("symbology_invalid_symbol", "The symbol could not be resolved."),
            429: ("rate_limited", "Too many requests."),
        }
        case, message = defaults.get(status, ("internal_error", f"Server error {status}."))
        headers = {}
        if status == 429 and fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        self._error(status, fault.case or case, fault.message or message, headers)

    def _stream(self, body: bytes, cut_at: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        limit = len(body) if cut_at is None else cut_at
        for offset in range(0, limit, 1 << 14):
            piece = body[offset : min(offset + (1 << 14), limit)]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        if cut_at is not None:
            self.wfile.flush()
            self._reset()  # abort: no terminating chunk
            return
        self._leave_flight()
        self.wfile.write(b"0\r\n\r\n")

    def _close_delimited(self, body: bytes) -> None:
        """A response without length or chunking whose body ends early with a clean EOF."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.settimeout(5)
            self.connection.unwrap()  # type: ignore[attr-defined]
        except (ssl.SSLError, OSError):
            pass

    def _reset(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


def minute_records(records: np.ndarray) -> np.ndarray:
    """ohlcv-1s records aggregated to ohlcv-1m records, per minute and instrument.

    Open is the minute's first open, high the max, low the min, close the last close, volume
    the sum; a minute without a record has no bar. Sorted by minute, then instrument id.
    """
    if len(records) == 0:
        return np.empty(0, dtype=OHLCV_RECORD_DTYPE)
    order = np.lexsort((records["ts_event"], records["instrument_id"]))
    ones = records[order]
    minute = ones["ts_event"].astype("int64") // MINUTE_NS * MINUTE_NS
    iid = ones["instrument_id"]
    first = np.flatnonzero(
        np.concatenate([[True], (minute[1:] != minute[:-1]) | (iid[1:] != iid[:-1])])
    )
    last = np.append(first[1:], len(ones)) - 1
    out = ohlcv_records(
        minute[first],
        iid[first],
        ones["open"][first],
        np.maximum.reduceat(ones["high"], first),
        np.minimum.reduceat(ones["low"], first),
        ones["close"][last],
        np.add.reduceat(ones["volume"], first),
        publisher_id=ones["publisher_id"][first],
        schema="ohlcv-1m",
    )
    return out[np.lexsort((out["instrument_id"], out["ts_event"]))]


def _encode(records: np.ndarray, query: Query, mappings: Mappings) -> bytes:
    return encode_ohlcv(
        records,
        dataset=query.dataset,
        symbols=list(query.symbols),
        stype_in=query.stype_in,
        start_ns=query.start_ns,
        end_ns=query.end_ns,
        mappings=mappings,
        compress=True,
        schema=query.schema,
    )


def _resolve(catalog: Catalog, query: Query) -> Instrument:
    symbol = query.symbols[0]
    for inst in catalog.instruments.values():
        if (
            inst.dataset == query.dataset
            and inst.request_symbol == symbol
            and inst.stype_in == query.stype_in
        ):
            return inst
    raise ProviderError(
        "symbology_invalid_symbol",
        f"Could not resolve symbol '{symbol}' with stype_in '{query.stype_in}' in dataset "
        f"{query.dataset}.",
    )


def _mappings(request_symbol: str, records: np.ndarray, query: Query) -> Mappings:
    """Databento-style symbology: the request symbol to each instrument id, per date range."""
    if len(records) == 0:
        return {request_symbol: []}
    day = 86_400 * 10**9
    days = records["ts_event"].astype("int64") // day
    ids = records["instrument_id"]
    change = np.flatnonzero((ids[1:] != ids[:-1]) | (days[1:] != days[:-1])) + 1
    starts = np.concatenate([[0], change])
    intervals: list[dict[str, object]] = []
    for first in starts:
        iid, d = str(int(ids[first])), int(days[first])
        start = pd.Timestamp(d * day, tz="UTC").date()
        end = pd.Timestamp((d + 1) * day, tz="UTC").date()
        if intervals and intervals[-1]["symbol"] == iid and intervals[-1]["end_date"] >= start:
            intervals[-1]["end_date"] = end
        else:
            intervals.append({"start_date": start, "end_date": end, "symbol": iid})
    return {request_symbol: intervals}


def _parse_time(text: str) -> int:
    if text.strip().lstrip("-").isdigit():
        return int(text)
    return int(_utc(text).value)


def _utc(value: Any) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")


def _iso(stamp: pd.Timestamp) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


@pytest.fixture(name="gateway")
def gateway_fixture(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeGateway]:
    """A running :class:`FakeGateway`, trusted by ``requests`` and named by DBENTO_GATEWAY.

    conftest.py registers this module as a plugin, so every test module can ask for it.
    """
    gw = FakeGateway()
    ca_file = gw.start(tmp_path_factory.mktemp("fake-databento"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("DBENTO_GATEWAY", gw.url)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def served_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeGateway, Path]]:
    """A :class:`FakeGateway` for a whole module, with its CA file: for a deployment, whose
    processes get both through ``deployment.gateway_env`` rather than this process's
    environment."""
    gw = FakeGateway()
    ca_file = gw.start(tmp_path_factory.mktemp("fake-databento"))
    try:
        yield gw, ca_file
    finally:
        gw.stop()
