#!/usr/bin/env python3
"""A ClickHouse HTTP endpoint for development and tests, backed by chDB.

ClickHouse's own engine runs in this process through chDB (PyPI `chdb-core`),
so `CLICKHOUSE_URL` can point here exactly as it points at a real ClickHouse
in production. It speaks the part of the HTTP interface that the Rust
`clickhouse` crate uses:

  GET /ping                     -> "Ok.\\n"
  GET|POST /?query=...          -> run SQL; the body is the INSERT data when
                                   `query` ends in `FORMAT <fmt>`, otherwise it
                                   is appended to `query` (as ClickHouse does)
  database, default_format      -> per-request default database / output format
  param_<name>                  -> bound to {name:Type} by chDB, never spliced
  any other URL parameter       -> a query setting (unknown ones are an error,
                                   as on ClickHouse)

Errors come back as ClickHouse sends them: a non-2xx status, the body
"Code: N. DB::Exception: ...", and the header X-ClickHouse-Exception-Code.

Dev only: there are no users. Credentials (X-ClickHouse-User/Key, basic
auth, bearer tokens) are accepted and ignored. Compressed framing
(compress=1 / decompress=1) is refused with a clear error instead of being
implemented: the project's clients use Compression::None against this server.

Concurrency: every request gets its own chDB connection. chDB 26.x keeps
session state (the current database, SET settings) per connection and runs
queries of different connections in parallel; a connection itself must not be
shared between threads. A per-request connection is therefore race-free
without a global lock, and costs ~0.1 ms. One long-lived connection keeps the
engine up (chDB shuts it down when its last connection closes).
"""

import argparse
import re
import signal
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import chdb

# URL parameters that the HTTP layer of ClickHouse consumes itself; they are
# not query settings, so they must not reach SET.
HTTP_ONLY_PARAMS = {
    "query", "database", "default_format", "compress", "decompress", "user",
    "password", "quota_key", "query_id", "session_id", "session_timeout",
    "session_check", "role", "wait_end_of_query", "buffer_size", "stacktrace",
    "client_protocol_version", "close_session",
}  # fmt: skip

# HTTP status by exception name, as ClickHouse chooses it; anything else is 500.
STATUS_BY_ERROR = {
    400: """BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE
        CANNOT_PARSE_QUOTED_STRING CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER
        CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 CANNOT_PARSE_UUID
        CANNOT_PARSE_INPUT_ASSERTION_FAILED DUPLICATE_COLUMN ILLEGAL_COLUMN UNKNOWN_ELEMENT_IN_AST
        UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST TOO_BIG_AST UNEXPECTED_AST_STRUCTURE
        SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE""",
    404: """UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE
        UNKNOWN_DATABASE UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION
        UNKNOWN_FORMAT UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE""",
    408: "TIMEOUT_EXCEEDED",
    413: "QUERY_IS_TOO_LARGE",
    501: "NOT_IMPLEMENTED",
    503: "SOCKET_TIMEOUT CANNOT_OPEN_FILE CANNOT_SCHEDULE_TASK",
}
STATUS_BY_ERROR = {name: status for status, names in STATUS_BY_ERROR.items() for name in names.split()}

# `INSERT ... FORMAT <fmt>` at the end of the `query` parameter: the body is
# raw data (often binary), which chDB takes through its streaming insert API.
INSERT_WITH_FORMAT = re.compile(r"^\s*(INSERT\b.*?)\s+FORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE | re.DOTALL)
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
EXCEPTION = re.compile(r"Code: (\d+)\. .*?(?:\((\w+)\))?(?: \(version [^)]*\))?\s*$", re.DOTALL)


class ClickHouseError(Exception):
    def __init__(self, code, name, message, status=None):
        super().__init__(message)
        self.code, self.name = code, name
        self.status = status or STATUS_BY_ERROR.get(name, 500)

    @classmethod
    def from_chdb(cls, err):
        # chDB's Python layer may prefix the engine's text ("Streaming insert
        # finish failed: Code: ..."); the client wants the engine's own.
        text = str(err)
        match = EXCEPTION.search(text)
        if not match:
            return cls(1001, "STD_EXCEPTION", f"Code: 1001. DB::Exception: {text}. (STD_EXCEPTION)")
        return cls(int(match.group(1)), match.group(2) or "", match.group(0).strip())


def sql_string(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_identifier(value):
    return "`" + value.replace("\\", "\\\\").replace("`", "\\`") + "`"


class Engine:
    def __init__(self, path):
        self.path = path
        self.anchor = chdb.connect(path)
        self.inflight = 0
        self.stopping = False
        self.idle = threading.Condition()

    def session(self, database, settings, readonly):
        """A connection whose session has this request's database and settings."""
        conn = chdb.connect(self.path)
        try:
            if database:
                conn.query(f"USE {sql_identifier(database)}")
            for name, value in settings.items():
                if not SETTING_NAME.match(name):
                    message = f"Code: 115. DB::Exception: Unknown setting '{name}'. (UNKNOWN_SETTING)"
                    raise ClickHouseError(115, "UNKNOWN_SETTING", message)
                conn.query(f"SET {name} = {sql_string(value)}")
            if readonly and "readonly" not in settings:
                conn.query("SET readonly = 2")  # ClickHouse runs GET queries read-only
        except BaseException:
            conn.close()
            raise
        return conn

    def track(self, delta):
        with self.idle:
            if delta > 0 and self.stopping:  # a kept-alive connection after shutdown began
                raise ClickHouseError(
                    210, "NETWORK_ERROR", "Code: 210. DB::Exception: The server is shutting down. (NETWORK_ERROR)", 503
                )
            self.inflight += delta
            self.idle.notify_all()

    def drain(self, timeout):
        """Waits for running requests, so shutdown does not cut a query in half."""
        with self.idle:
            self.stopping = True
            self.idle.wait_for(lambda: self.inflight == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the crate pools connections
    # One write per response and no Nagle: headers and body sent apart meet
    # the client's delayed ACK and cost ~40 ms a request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server_version = "clickhouse-dev-server"
    engine: Engine = None  # set in main()

    def log_message(self, format, *args):
        pass  # failed queries are logged in reply_error; successful ones are noise

    def do_GET(self):
        self.handle_query(readonly=True)

    def do_POST(self):
        self.handle_query(readonly=False)

    def body_chunks(self):
        """Yields the request body as it arrives, plain or chunked (the crate
        streams inserts with Transfer-Encoding: chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def handle_query(self, readonly):
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        body = self.body_chunks()
        try:
            if url.path == "/ping" or (url.path == "/" and not params and self.command == "GET"):
                return self.reply(200, b"Ok.\n")
            if url.path != "/":
                raise ClickHouseError(
                    36, "BAD_ARGUMENTS", f"Code: 36. DB::Exception: No handler for {url.path}: "
                    "the dev server answers /ping and / only. (BAD_ARGUMENTS)", status=404
                )
            if params.get("compress") in ("1", "true") or params.get("decompress") in ("1", "true"):
                raise ClickHouseError(
                    48, "NOT_IMPLEMENTED",
                    "Code: 48. DB::Exception: The ClickHouse dev server (chDB) speaks uncompressed HTTP only, "
                    "but this request asked for compressed data (compress=1/decompress=1). "
                    "Set CLICKHOUSE_COMPRESSION=none for dev and tests. (NOT_IMPLEMENTED)",
                )
            self.engine.track(+1)
            try:
                self.reply(200, self.run(params, body, readonly))
            finally:
                self.engine.track(-1)
        except Exception as err:  # noqa: BLE001 - every failure becomes a ClickHouse-style error
            try:
                for _ in body:
                    pass  # read what is left, so the connection stays usable
            except Exception:  # noqa: BLE001 - a malformed body: this connection is done
                self.close_connection = True
            self.reply_error(err if isinstance(err, ClickHouseError) else ClickHouseError.from_chdb(err))

    def run(self, params, body, readonly):
        query = params.get("query", "")
        fmt = params.get("default_format") or "TabSeparated"
        settings = {k: v for k, v in params.items() if k not in HTTP_ONLY_PARAMS and not k.startswith("param_")}
        bound = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
        insert = INSERT_WITH_FORMAT.match(query)
        conn = self.engine.session(params.get("database"), settings, readonly)
        try:
            if insert:
                # Stream the body into chDB's insert API, which parses any
                # ClickHouse input format (RowBinary, RowBinaryWithNamesAndTypes,
                # ...) exactly as the server would.
                inserter = conn.send_insert(insert.group(1), insert.group(2))
                try:
                    for chunk in body:
                        inserter.append(chunk)
                    inserter.finish()
                except BaseException:
                    inserter.cancel()
                    raise
                return b""
            data = b"".join(body)
            sql = query + ("\n" + data.decode("utf-8") if data else "")
            if not sql.strip():
                raise ClickHouseError(62, "SYNTAX_ERROR", "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
            # chDB runs several statements at once; ClickHouse's HTTP interface
            # refuses them, so code that relies on it must fail here too.
            if conn._conn.classify_query(sql)["statement_count"] > 1:
                message = "Code: 62. DB::Exception: Syntax error (Multi-statements are not allowed). (SYNTAX_ERROR)"
                raise ClickHouseError(62, "SYNTAX_ERROR", message)
            return conn.query(sql, fmt, params=bound).bytes()
        finally:
            conn.close()

    def reply(self, status, payload, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream" if status == 200 else "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def reply_error(self, err):
        message = str(err)
        print(f"clickhouse-dev-server: {message}", file=sys.stderr, flush=True)
        self.reply(err.status, (message + "\n").encode(), [("X-ClickHouse-Exception-Code", str(err.code))])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", required=True, help="data directory (kept across restarts)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()

    Handler.engine = engine = Engine(args.path)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True  # idle keep-alive connections must not block exit

    def stop(signum, _frame):
        # shutdown() waits for serve_forever() to return, and that runs on
        # this (the main) thread: call it from another one.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"clickhouse-dev-server: ready on http://{args.host}:{server.server_address[1]} "
        f"(chdb {chdb.__version__}, data {args.path})",
        file=sys.stderr,
        flush=True,
    )
    server.serve_forever()
    server.server_close()
    engine.drain(timeout=10)
    engine.anchor.close()
    print("clickhouse-dev-server: stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
