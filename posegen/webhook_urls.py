"""Webhook URLs: parsed strictly, spelled one way, and refused unless every address they
resolve to is public (the SSRF guard). Checked at submit, and again at each send."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
import idna

from posegen.errors import InvalidRequest


class RefusedUrl(InvalidRequest):
    """A webhook URL that is not a plain https URL, or whose host is not a public address."""


# -- SSRF guard -------------------------------------------------------------------------------

# Ranges that `is_global` (which follows the IANA registries) lets through but that reach
# addresses we must not: NAT64 prefixes translate to any IPv4 address, including private ones;
# site-local and IPv4-compatible addresses are deprecated forms that some stacks still route.
_NEVER_PUBLIC = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "fec0::/10", "::/96")
)
# A host whose last label is a number is an IPv4 address in any of inet_aton's spellings
# (0x7f.1, 2130706433, 0177.0.0.1), as browsers read it (WHATWG URL, "ends in a number").
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
MAX_URL_LENGTH = 2048


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in net for net in _NEVER_PUBLIC):
            return False
        # ::ffff:127.0.0.1 and friends: judge the IPv4 address they carry.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo:
            embedded = address.teredo[1]
        if embedded is not None:
            return _is_public(embedded)
    # is_global excludes loopback, private, link-local (169.254.169.254 metadata), CGNAT
    # (100.64/10), reserved, multicast-free documentation ranges and unspecified addresses.
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class Target:
    """A webhook URL in the one spelling we store, check and send to."""

    url: str  # ASCII: IDNA host, percent-encoded path and query, no fragment
    host: str  # as it goes into DNS and TLS SNI (an IPv6 literal without brackets)
    port: int


def _ascii_host(parts: SplitResult) -> str:
    host = parts.hostname
    if not host:
        raise RefusedUrl("webhook_url has no host.")
    if parts.netloc.rsplit("@", 1)[-1].startswith("["):
        try:
            return ipaddress.IPv6Address(host).compressed  # refuses zone ids (%eth0) too
        except ValueError:
            raise RefusedUrl("webhook_url has an invalid IPv6 address.") from None
    if not host.isascii():
        try:
            # UTS 46, as browsers and getaddrinfo's own codec map names (full-width letters
            # included), so the name we check is the name that would be looked up.
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise RefusedUrl(f"webhook_url host is not a valid domain name ({exc}).") from None
    if _NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]):
        try:
            return socket.inet_ntoa(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise RefusedUrl("webhook_url has an invalid IPv4 address.") from None
    if not _HOST_NAME.fullmatch(host) or len(host) > 253:
        raise RefusedUrl("webhook_url host is not a valid domain name.")
    return host


def normalise(url: str, *, allow_private: bool) -> Target:
    """Parse a webhook URL strictly and spell it one way; refuse what a sender could not send."""
    if len(url) > MAX_URL_LENGTH:
        raise RefusedUrl(f"webhook_url is longer than {MAX_URL_LENGTH} characters.")
    # Control and format characters, and whitespace of any script: urlsplit would drop some
    # and keep others, and the HTTP client refuses them only when it sends.
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise RefusedUrl("webhook_url contains whitespace or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedUrl("webhook_url is not a valid URL.") from None
    allowed_schemes = {"https", "http"} if allow_private else {"https"}
    if parts.scheme not in allowed_schemes:
        raise RefusedUrl("webhook_url must be an https URL.")
    if "@" in parts.netloc:
        raise RefusedUrl("webhook_url must not carry credentials.")
    if port == 0:
        raise RefusedUrl("webhook_url has port 0.")
    host = _ascii_host(parts)
    try:
        # httpx percent-encodes the path and query as it will when it sends.
        netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
        parsed = httpx.URL(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")))
    except (httpx.InvalidURL, UnicodeError):
        raise RefusedUrl("webhook_url is not a valid URL.") from None
    normalised = str(parsed)
    if not normalised.isascii() or len(normalised) > MAX_URL_LENGTH:
        raise RefusedUrl("webhook_url is not a valid URL.")
    return Target(url=normalised, host=host, port=port or (443 if parts.scheme == "https" else 80))


def resolve(host: str, port: int) -> list[str]:
    """The addresses a name resolves to (the one DNS lookup of a check)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def resolve_checked(url: str, *, allow_private: bool) -> tuple[Target, list[str]]:
    """Check a webhook URL and return it normalised, with the addresses to connect to."""
    target = normalise(url, allow_private=allow_private)
    try:
        addresses = resolve(target.host, target.port)
    except (OSError, UnicodeError):
        raise RefusedUrl(f"webhook_url host {target.host!r} does not resolve.") from None
    if not allow_private:
        for raw in addresses:
            if not _is_public(ipaddress.ip_address(raw.split("%", 1)[0])):
                raise RefusedUrl(
                    f"webhook_url host {target.host!r} resolves to a non-public address."
                )
    return target, addresses


def check_url(url: str, *, allow_private: bool) -> str:
    """Refuse a URL we would not send to; return the spelling to store (and send to)."""
    target, _ = resolve_checked(url, allow_private=allow_private)
    return target.url
