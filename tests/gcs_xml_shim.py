"""GCS's XML API, as delta-rs's object store speaks it, served on loopback over fake-gcs-server's JSON API.

delta-rs (the Rust ``object_store`` crate) reads and writes GCS through the XML API: path-style
GET/HEAD/PUT/DELETE, ``x-goog-if-generation-match`` preconditions, ``x-goog-copy-source`` copies and
``?list-type=2`` listings. fake-gcs-server implements the JSON API (with real generation
preconditions) but not those XML calls, so tests put this translator in front of it. Every
precondition is forwarded as ``ifGenerationMatch`` and enforced by the emulator, not here.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from email.utils import format_datetime
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class _Handler(BaseHTTPRequestHandler):
    upstream = ""  # fake-gcs-server's base URL, set by serve()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # --- plumbing -----------------------------------------------------------------------------
    def _call(self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.upstream + url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.command != "HEAD" or "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int) -> None:
        code = {404: "NoSuchKey", 412: "PreconditionFailed", 304: "NotModified"}.get(status, "Error")
        self._send(status, f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code></Error>".encode(), {"Content-Type": "application/xml"})

    def _split(self) -> tuple[str, str, dict[str, list[str]]]:
        parsed = urllib.parse.urlsplit(self.path)
        bucket, _, key = parsed.path.lstrip("/").partition("/")
        return urllib.parse.unquote(bucket), urllib.parse.unquote(key), urllib.parse.parse_qs(parsed.query)

    @staticmethod
    def _meta_headers(meta: dict) -> dict[str, str]:
        updated = datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
        return {"Content-Length": str(meta["size"]), "ETag": f'"{meta.get("etag", meta["generation"])}"', "x-goog-generation": str(meta["generation"]),
                "Last-Modified": format_datetime(updated, usegmt=True), "Content-Type": meta.get("contentType", "application/octet-stream")}

    def _metadata(self, bucket: str, key: str) -> tuple[int, dict | None]:
        status, _, body = self._call("GET", f"/storage/v1/b/{_q(bucket)}/o/{_q(key)}")
        return status, json.loads(body) if status == 200 else None

    # --- verbs --------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        bucket, key, _ = self._split()
        status, meta = self._metadata(bucket, key)
        if meta is None:
            return self._error(status)
        self._send(200, b"", self._meta_headers(meta))

    def do_GET(self) -> None:
        bucket, key, query = self._split()
        if not key and "list-type" in query:
            return self._list(bucket, query)
        status, meta = self._metadata(bucket, key)
        if meta is None:
            return self._error(status)
        if (want := self.headers.get("If-Match")) and want.strip('"') != str(meta.get("etag")).strip('"'):
            return self._error(412)
        headers = {"Range": self.headers["Range"]} if self.headers.get("Range") else {}
        status, up_headers, body = self._call("GET", f"/storage/v1/b/{_q(bucket)}/o/{_q(key)}?alt=media&generation={meta['generation']}", headers=headers)
        out = self._meta_headers(meta)
        out["Content-Length"] = str(len(body))
        if status == 206 and "Content-Range" in up_headers:
            out["Content-Range"] = up_headers["Content-Range"]
        self._send(status, body, out)

    def do_PUT(self) -> None:
        bucket, key, _ = self._split()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cond = self.headers.get("x-goog-if-generation-match")
        extra = f"&ifGenerationMatch={cond}" if cond is not None else ""
        if source := self.headers.get("x-goog-copy-source"):
            src_bucket, _, src_key = urllib.parse.unquote(source).lstrip("/").partition("/")
            status, _, resp = self._call("POST", f"/storage/v1/b/{_q(src_bucket)}/o/{_q(src_key)}/copyTo/b/{_q(bucket)}/o/{_q(key)}?{extra.lstrip('&')}",
                                         b"", {"Content-Type": "application/json"})
        else:
            status, _, resp = self._call("POST", f"/upload/storage/v1/b/{_q(bucket)}/o?uploadType=media&name={_q(key)}{extra}", body,
                                         {"Content-Type": self.headers.get("Content-Type", "application/octet-stream")})
        if status != 200:
            return self._error(status)
        meta = json.loads(resp)
        self._send(200, b"", {"ETag": f'"{meta.get("etag", meta["generation"])}"', "x-goog-generation": str(meta["generation"])})

    def do_DELETE(self) -> None:
        bucket, key, _ = self._split()
        status, _, _ = self._call("DELETE", f"/storage/v1/b/{_q(bucket)}/o/{_q(key)}")
        self._send(204) if status in (200, 204) else self._error(status)

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        after = query.get("start-after", [""])[0]
        params = {"prefix": prefix, "maxResults": "1000"}
        if delimiter:
            params["delimiter"] = delimiter
        if token := query.get("continuation-token", [""])[0]:
            params["pageToken"] = token
        status, _, body = self._call("GET", f"/storage/v1/b/{_q(bucket)}/o?{urllib.parse.urlencode(params)}")
        if status != 200:
            return self._error(status)
        listing = json.loads(body)
        items = [o for o in listing.get("items", []) if not after or o["name"] > after]
        parts = [f"<?xml version='1.0' encoding='UTF-8'?><ListBucketResult><Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
                 f"<KeyCount>{len(items)}</KeyCount>"]
        for o in items:
            updated = o["updated"] if o["updated"].endswith("Z") else o["updated"] + "Z"
            parts.append(f"<Contents><Key>{escape(o['name'])}</Key><Size>{o['size']}</Size><LastModified>{escape(updated)}</LastModified>"
                         f"<ETag>\"{escape(str(o.get('etag', o['generation'])))}\"</ETag></Contents>")
        for p in listing.get("prefixes", []):
            parts.append(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>")
        if listing.get("nextPageToken"):
            parts.append(f"<NextContinuationToken>{escape(listing['nextPageToken'])}</NextContinuationToken>")
        parts.append("</ListBucketResult>")
        self._send(200, "".join(parts).encode(), {"Content-Type": "application/xml"})


if __name__ == "__main__":  # its own process: delta-rs may hold the GIL while it waits on a request
    import sys

    handler = type("Handler", (_Handler,), {"upstream": sys.argv[1].rstrip("/")})
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), handler).serve_forever()
