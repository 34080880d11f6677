"""Standard Webhooks signatures (https://www.standardwebhooks.com/): what receivers verify.

``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), the key
being the base64 part of a ``whsec_...`` secret. Off-the-shelf libraries (``standardwebhooks``
for Python, ``svix`` and others) verify it; the test suite checks ours with one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix, not a secret
# The spec's minimum key length is 24 bytes; at most 64 bytes.
_MIN_KEY_BYTES = 24
_MAX_KEY_BYTES = 64


def parse_secret(secret: str) -> bytes:
    """The key of a ``whsec_<base64>`` secret; ``ValueError`` (never quoting it) if malformed."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if not _MIN_KEY_BYTES <= len(key) <= _MAX_KEY_BYTES:
        raise ValueError(f"its key must be {_MIN_KEY_BYTES} to {_MAX_KEY_BYTES} bytes")
    return key


def sign(key: bytes, *, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery attempt."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(key: bytes, *, msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers, plus the content type."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign(key, msg_id=msg_id, timestamp_s=timestamp_s, body=body),
    }
