"""Plain HTTP on the receiver's ports (/healthz, /metrics) and reading the Prometheus text."""

from __future__ import annotations

import asyncio
import re
import ssl

from tests.support.wire import HOST, SERVER_NAME


async def http_get(
    port: int, path: str, context: ssl.SSLContext | None, *, timeout_s: float = 10.0
) -> tuple[int, dict[str, str], str]:
    """A raw HTTP/1.1 GET on loopback (TLS when ``context``), no token: status, headers, body.
    The connection is aborted if the answer does not come within ``timeout_s``."""
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=context, server_hostname=SERVER_NAME if context else None
    )
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            data = await reader.read()
    except BaseException:
        writer.transport.abort()
        raise
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_total(body: str, name: str, **labels: str) -> float:
    """The sum of every sample whose name matches the regular expression ``name`` (with or
    without ``_total``; any labels, or those given); 0 when absent."""
    total = 0.0
    pattern = re.compile(rf"^(?:{name})(?:_total)?(\{{[^}}]*\}})? (\S+)$")
    for line in body.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def metric_names(body: str) -> set[str]:
    """The names of every sample in the exposition."""
    return {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1].isalpha()}
