"""A client for SignalWire's Conference Streams API: start and stop streaming a conference.

``POST /api/laml/2010-04-01/Accounts/{ProjectId}/Conferences/{ConferenceSid}/Streams`` creates a
stream (form-encoded, HTTP Basic auth ``project_id:api_token``); posting ``Status=stopped`` to
``…/Streams/{Sid or Name}`` stops it. Requests are checked before they are sent, and a create is
never retried: a retry after a timeout could start a second stream of the same conference.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx

from receiver import __version__
from receiver.exceptions import ReceiverError

__all__ = [
    "TRACKS",
    "ApiError",
    "ApiUnreachable",
    "ConferenceStream",
    "ConferenceStreamsClient",
    "SignalWireError",
    "StreamRequestInvalid",
    "StreamTrack",
    "check_id",
    "check_space",
    "stream_form",
]

StreamTrack = Literal["inbound_track", "outbound_track", "both_tracks"]
TRACKS: tuple[StreamTrack, ...] = ("inbound_track", "outbound_track", "both_tracks")
MAX_PARAMETERS = 99
# StreamCodec values the docs list, with the optional packetization suffix (``@40i``). G722
# exists on RELAY streams, but the receiver cannot decode it, so it is refused here.
_CODEC = re.compile(r"(PCMU|PCMA|L16|L16@16000h|L16@24000h)(@\d{1,3}i)?")
_ID = re.compile(r"[^/?#\s]{1,256}")
_SPACE = re.compile(r"[A-Za-z0-9-]{1,63}")
API_ROOT = "/api/laml/2010-04-01"


class SignalWireError(ReceiverError):
    """Base class of this client's errors."""


class StreamRequestInvalid(SignalWireError):
    """A request that would be refused, caught before it is sent; names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


class ApiError(SignalWireError):
    """The API answered with an error status; ``message`` is the API's own words."""

    def __init__(
        self, status_code: int, message: str, *, code: Any = None, more_info: str | None = None
    ) -> None:
        super().__init__(status_code, message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.more_info = more_info

    def __str__(self) -> str:
        code = f" (code {self.code})" if self.code not in (None, "") else ""
        return f"SignalWire API answered {self.status_code}: {self.message}{code}"


class ApiUnreachable(SignalWireError):
    """No answer: connection refused, TLS failure, or a timeout (the outcome is unknown)."""


@dataclass(frozen=True, slots=True)
class ConferenceStream:
    """A conference stream as the API describes it."""

    sid: str
    name: str | None
    status: str | None
    uri: str | None
    account_sid: str | None = None
    conference_sid: str | None = None
    date_updated: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> ConferenceStream:
        """Build from the API's JSON; ``sid`` is required."""
        sid = data.get("sid")
        if not isinstance(sid, str) or not sid:
            raise ApiError(200, "the API's answer has no stream sid")

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(
            sid=sid,
            name=text("name"),
            status=text("status"),
            uri=text("uri"),
            account_sid=text("account_sid"),
            conference_sid=text("conference_sid"),
            date_updated=text("date_updated"),
        )

    def as_dict(self) -> dict[str, str | None]:
        """The fields, for ``--json``."""
        return {
            "sid": self.sid,
            "name": self.name,
            "status": self.status,
            "uri": self.uri,
            "account_sid": self.account_sid,
            "conference_sid": self.conference_sid,
            "date_updated": self.date_updated,
        }


def check_id(field: str, value: str | None) -> str:
    """An id that goes into the URL path: present, no ``/ ? #`` or white space."""
    if not value:
        raise StreamRequestInvalid(field, "is required")
    if not _ID.fullmatch(value):
        raise StreamRequestInvalid(field, "must not contain '/', '?', '#' or white space")
    return value


def check_space(space: str | None) -> str:
    """A space name (``example`` of ``example.signalwire.com``), or StreamRequestInvalid."""
    if not space:
        raise StreamRequestInvalid("space", "give the space name (or an API URL)")
    host = space.removeprefix("https://").removeprefix("http://").rstrip("/")
    if host.lower().endswith(".signalwire.com") and _SPACE.fullmatch(
        host[: -len(".signalwire.com")]
    ):
        name = host[: -len(".signalwire.com")]
        raise StreamRequestInvalid(
            "space", f"give the space name alone, without the domain: {name!r}, not {space!r}"
        )
    if not _SPACE.fullmatch(space):
        raise StreamRequestInvalid(
            "space", "must be the space name: letters, digits and '-' (or give an API URL)"
        )
    return space


def stream_form(
    *,
    url: str,
    name: str | None = None,
    track: str | None = None,
    codec: str | None = None,
    real_time: bool | None = None,
    parameters: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    bearer_token: str | None = None,
    status_callback: str | None = None,
    status_callback_method: str | None = None,
) -> list[tuple[str, str]]:
    """The documented form fields of a create request, checked; raises StreamRequestInvalid."""
    target = urlsplit(url)
    if target.scheme.lower() != "wss" or not target.hostname:
        raise StreamRequestInvalid(
            "Url", f"must be a wss:// URL (the platform refuses others): {url!r}"
        )
    form = [("Url", url)]
    if name is not None:
        if not name or len(name) > 256:
            raise StreamRequestInvalid("Name", "must be 1 to 256 characters")
        form.append(("Name", name))
    if track is not None:
        if track not in TRACKS:
            raise StreamRequestInvalid("Track", f"must be one of {', '.join(TRACKS)}")
        form.append(("Track", track))
    if codec is not None:
        if not _CODEC.fullmatch(codec):
            raise StreamRequestInvalid(
                "StreamCodec",
                "must be PCMU, PCMA, L16, L16@16000h or L16@24000h (optionally @<ms>i)",
            )
        form.append(("StreamCodec", codec))
    if real_time is not None:
        form.append(("StreamRealTime", "true" if real_time else "false"))
    if status_callback is not None:
        if urlsplit(status_callback).scheme.lower() not in ("http", "https"):
            raise StreamRequestInvalid("StatusCallback", "must be an http(s) URL")
        form.append(("StatusCallback", status_callback))
    if status_callback_method is not None:
        method = status_callback_method.upper()
        if method not in ("GET", "POST"):
            raise StreamRequestInvalid("StatusCallbackMethod", "must be GET or POST")
        form.append(("StatusCallbackMethod", method))
    pairs = list(parameters.items()) if isinstance(parameters, Mapping) else list(parameters)
    if len(pairs) > MAX_PARAMETERS:
        raise StreamRequestInvalid(
            "Parameter", f"{len(pairs)} custom parameters: the API takes at most {MAX_PARAMETERS}"
        )
    seen: set[str] = set()
    for number, (key, value) in enumerate(pairs, start=1):
        if not key or key in seen:
            raise StreamRequestInvalid(f"Parameter{number}.Name", "must be non-empty and unique")
        seen.add(key)
        form += [(f"Parameter{number}.Name", key), (f"Parameter{number}.Value", value)]
    if bearer_token is not None:
        if not bearer_token or any(c.isspace() for c in bearer_token):
            raise StreamRequestInvalid("AuthorizationBearerToken", "must be one word")
        form.append(("AuthorizationBearerToken", bearer_token))
    return form


class ConferenceStreamsClient:
    """Create and stop conference streams. Use as a context manager, or call ``close``."""

    def __init__(
        self,
        *,
        project_id: str,
        api_token: str,
        space: str | None = None,
        api_url: str | None = None,
        cafile: Path | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (``httpx.MockTransport`` in tests); ``cafile``
        is trusted for the API's certificate instead of the system's CAs."""
        self.project_id = check_id("project id", project_id)
        if not api_token:
            raise StreamRequestInvalid("API token", "is required")
        if api_url is None:
            api_url = f"https://{check_space(space)}.signalwire.com"
        verify: ssl.SSLContext | bool = True
        if cafile is not None:
            verify = ssl.create_default_context(cafile=str(cafile))
        self._client = httpx.Client(
            base_url=api_url,
            auth=(project_id, api_token),
            timeout=timeout_s,
            verify=verify,
            transport=transport,
            follow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": f"receiver/{__version__}"},
        )

    def __repr__(self) -> str:
        return f"ConferenceStreamsClient(base_url={str(self._client.base_url)!r}, token=***)"

    def __enter__(self) -> ConferenceStreamsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()

    def create(self, *, conference_sid: str, url: str, **fields: Any) -> ConferenceStream:
        """Start streaming ``conference_sid`` to ``url``; ``fields`` as ``stream_form`` takes.

        Raises StreamRequestInvalid before sending, ApiError or ApiUnreachable after. Never
        retried: a create that timed out may have succeeded.
        """
        path = self._streams_path(conference_sid)
        return self._post(path, stream_form(url=url, **fields))

    def stop(self, *, conference_sid: str, stream: str) -> ConferenceStream:
        """Stop a stream, named by its sid or its name."""
        path = f"{self._streams_path(conference_sid)}/{quote(check_id('stream', stream), safe='')}"
        return self._post(path, [("Status", "stopped")])

    def _streams_path(self, conference_sid: str) -> str:
        account = quote(self.project_id, safe="")
        conference = quote(check_id("conference", conference_sid), safe="")
        return f"{API_ROOT}/Accounts/{account}/Conferences/{conference}/Streams"

    def _post(self, path: str, form: list[tuple[str, str]]) -> ConferenceStream:
        try:
            # Field names are unique (stream_form checks the parameters), so a dict loses nothing.
            response = self._client.post(path, data=dict(form))
        except httpx.TimeoutException:
            raise ApiUnreachable(
                f"no answer within {self._client.timeout.read} s: the request may or may not "
                "have taken effect (check the conference's streams before trying again)"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiUnreachable(f"cannot reach {self._client.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise _api_error(response)
        try:
            data = response.json()
        except ValueError:
            raise ApiError(response.status_code, "the API's answer is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(response.status_code, "the API's answer is not a JSON object")
        return ConferenceStream.from_api(data)


def _api_error(response: httpx.Response) -> ApiError:
    """The API's own message (Twilio-style JSON: message, code, more_info), or its text."""
    message, code, more_info = "", None, None
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("error") or body.get("detail") or "")
        code = body.get("code")
        more_info = body.get("more_info")
    if not message:
        text = " ".join(response.text.split())
        message = text[:200] or response.reason_phrase or "no message"
    return ApiError(response.status_code, message, code=code, more_info=more_info)
