"""Who may drive the server: the API key, and, without one, the defence against web pages.

A server on localhost without a key is still reachable from any web page the user opens: a browser
sends a cross-site "simple" POST (Content-Type text/plain or a form) without asking first, and DNS
rebinding makes a page's own origin resolve to 127.0.0.1. So, as Jupyter and Vite do:
- POST /v1/* takes only `Content-Type: application/json` (415): a browser must ask (a CORS preflight,
  which this server never grants) before sending that cross-site;
- without a key, the Host header must name this machine (localhost, an IP address, or a host name the
  server was bound to or told to allow: `--allowed-host`) and an Origin header, when a browser sends
  one, must be the same host or localhost (403 otherwise). The built-in chat page is same-origin.
The key comes from `--api-key`, `--api-key-file` or the QWEN2_API_KEY environment variable (a
command-line key is visible to every local user in the process list) and is compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from urllib.parse import urlsplit

from qwen2.serve.protocol import APIError

ENV_KEY = "QWEN2_API_KEY"


def resolve_api_key(api_key: str | None = None, api_key_file: str | None = None) -> str | None:
    """The key to require: --api-key, else --api-key-file's first line, else $QWEN2_API_KEY, else None."""
    if api_key is None and api_key_file is not None:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                api_key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{api_key_file}: cannot read the API key ({e}); --api-key-file") from None
        if not api_key:
            raise ValueError(f"{api_key_file}: the API key file is empty (--api-key-file)")
    if api_key is None:
        api_key = os.environ.get(ENV_KEY) or None
    return api_key


def key_matches(expected: str, authorization: str) -> bool:
    """Constant-time comparison of an Authorization header with 'Bearer <expected>'."""
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent.
    return hmac.compare_digest(authorization.encode("latin-1", "replace"), f"Bearer {expected}".encode())


def _hostname(netloc: str) -> str:
    """'host:port', '[::1]:8000' -> 'host', '::1' (lower case)."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return _is_ip(host) and ipaddress.ip_address(host).is_loopback


def check_json_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, got {media or 'none'!r} "
            "(curl: -H 'Content-Type: application/json')",
            code="unsupported_media_type",
        )


def check_site(host_header: str | None, origin: str | None, allowed_hosts: frozenset[str]) -> None:
    """403 unless Host names this machine and Origin (when present) is that host or localhost."""
    host = _hostname(host_header or "")
    # DNS rebinding needs a name that resolves to us: an IP address in Host cannot be one.
    if not (host and (_is_ip(host) or _is_loopback(host) or host in allowed_hosts)):
        raise APIError(
            403,
            f"Host {host_header!r} is not this server's address: start the server with --allowed-host "
            f"{host or 'NAME'} or --api-key",
            type="permission_error",
            code="host_not_allowed",
        )
    if origin is None:  # not a browser, or a same-origin GET
        return
    o = urlsplit(origin.strip().lower())
    ohost = o.hostname or ""
    if o.scheme not in ("http", "https") or not (ohost == host or _is_loopback(ohost)):
        raise APIError(
            403,
            f"cross-site request from Origin {origin[:100]!r} refused: a web page may not drive this "
            "server; start it with --api-key to allow clients from other sites",
            type="permission_error",
            code="origin_not_allowed",
        )
