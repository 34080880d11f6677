"""`receiver streams` and its client against a stand-in for SignalWire's Conference Streams API:
in process through ``httpx.MockTransport``, and end to end over real HTTPS in a subprocess."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from receiver.codecs import CLI_CODECS, codec_for
from receiver.signalwire import (
    ApiError,
    ConferenceStream,
    ConferenceStreamsClient,
    StreamRequestInvalid,
)
from receiver.simulate import PlayResult, build_messages, play
from tests.support.audio import read_wav
from tests.support.commands import env_with, receiver_cmd
from tests.support.receiver import TOKEN, StartReceiver, TlsFiles, url
from tests.support.signalwire_fake import FakeSignalWire, mock_transport, serve

PROJECT = "b08dacad-0000-4000-8000-000000000001"
API_TOKEN = "PTsecret0123456789abcdef"
CONFERENCE = "CF0123456789abcdef"
RECEIVER_URL = "wss://rec.example.com/"


@pytest.fixture
def api() -> FakeSignalWire:
    """The fake API's state, for in-process clients."""
    return FakeSignalWire(project_id=PROJECT, api_token=API_TOKEN, conferences={CONFERENCE})


@pytest.fixture
def client(api: FakeSignalWire) -> Iterator[ConferenceStreamsClient]:
    """A real client whose transport is the fake, in process."""
    transport = mock_transport(api)
    with ConferenceStreamsClient(
        project_id=PROJECT, api_token=API_TOKEN, api_url=api.base_url, transport=transport
    ) as client:
        yield client


@pytest.fixture
def fake(api: FakeSignalWire, tls_files: TlsFiles) -> Iterator[FakeSignalWire]:
    """The fake API on a free loopback port over HTTPS, for the command line."""
    server = serve(api, tls_files.cert, tls_files.key)
    yield api
    server.shutdown()
    server.server_close()


def cli(fake: FakeSignalWire, tls_files: TlsFiles, *args: str, **env: str) -> Any:
    """Run `receiver streams ...` in a subprocess with SIGNALWIRE_* set for the fake."""
    defaults = {
        "SIGNALWIRE_PROJECT_ID": PROJECT,
        "SIGNALWIRE_API_TOKEN": API_TOKEN,
        "SIGNALWIRE_API_URL": fake.base_url,
        "RECEIVER_TOKENS": TOKEN,
    }
    environment = env_with(**{**defaults, **env})
    return subprocess.run(
        receiver_cmd("streams", *args, "--cafile", str(tls_files.cert)),
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_no_secrets(result: Any, *secrets: str) -> None:
    for secret in (API_TOKEN, *secrets):
        assert secret not in result.stdout and secret not in result.stderr


# ---------------------------------------------------------------------------------------------
# The client, in process.


def test_create_sends_every_documented_field_with_99_parameters(
    api: FakeSignalWire, client: ConferenceStreamsClient
) -> None:
    """All documented fields reach the API, form-encoded with Basic auth, 99 parameters in order."""
    stream = client.create(
        conference_sid=CONFERENCE,
        url="wss://rec.example.com/conf?x=1",
        name="rec-1",
        track="both_tracks",
        codec="L16@16000h",
        real_time=True,
        bearer_token="bearer-0123456789abcdef",
        status_callback="https://hooks.example.com/s",
        status_callback_method="GET",
        parameters=[(f"key{i}", f"value {i}") for i in range(1, 100)],
    )
    assert stream.status == "in-progress" and stream.name == "rec-1"
    (request,) = api.requests
    assert request.path == (
        f"/api/laml/2010-04-01/Accounts/{PROJECT}/Conferences/{CONFERENCE}/Streams"
    )
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = dict(request.form)
    assert len(form) == len(request.form) == 8 + 2 * 99
    assert form["Url"] == "wss://rec.example.com/conf?x=1"
    assert (form["Name"], form["Track"], form["StreamCodec"]) == (
        "rec-1",
        "both_tracks",
        "L16@16000h",
    )
    assert form["StreamRealTime"] == "true"
    assert form["StatusCallback"] == "https://hooks.example.com/s"
    assert form["StatusCallbackMethod"] == "GET"
    assert form["AuthorizationBearerToken"] == "bearer-0123456789abcdef"
    for i in range(1, 100):
        assert (form[f"Parameter{i}.Name"], form[f"Parameter{i}.Value"]) == (
            f"key{i}",
            f"value {i}",
        )
    (stored,) = api.streams.values()
    assert stored["name"] == "rec-1"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"parameters": [(f"k{i}", "v") for i in range(100)]}, "at most 99"),
        ({"url": "ws://rec.example.com/"}, "wss://"),
        ({"url": "https://rec.example.com/"}, "wss://"),
        ({"track": "sideways"}, "Track"),
        ({"codec": "G722"}, "StreamCodec"),
        ({"codec": "OPUS"}, "StreamCodec"),
        ({"conference_sid": "CF/../other"}, "conference"),
        ({"parameters": [("", "v")]}, "Parameter1.Name"),
        ({"status_callback_method": "PUT"}, "StatusCallbackMethod"),
        ({"bearer_token": "two words"}, "AuthorizationBearerToken"),
    ],
    ids=["100-params", "ws", "https", "track", "g722", "opus", "id-slash", "param", "method", "bt"],
)
def test_invalid_requests_are_refused_before_sending(
    api: FakeSignalWire, client: ConferenceStreamsClient, fields: dict[str, Any], words: str
) -> None:
    """A request the API would refuse raises StreamRequestInvalid naming the field; nothing
    is sent."""
    request: dict[str, Any] = {"conference_sid": CONFERENCE, "url": RECEIVER_URL, **fields}
    with pytest.raises(StreamRequestInvalid, match=words):
        client.create(**request)
    assert api.requests == []


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (400, {"code": 20001, "message": "Missing required parameter Url"}, "Missing required"),
        (
            401,
            {"code": 20003, "message": "Authentication Error - invalid username"},
            "Authentication",
        ),
        (404, {"code": 20404, "message": "Conference CF1 was not found"}, "not found"),
        (422, {"code": 21205, "message": "Url must use the wss scheme"}, "wss scheme"),
        (500, {"message": "Internal Server Error"}, "Internal Server Error"),
        (503, b"<html><body>Service Unavailable</body></html>", "Service Unavailable"),
    ],
)
def test_api_errors_carry_the_apis_own_words(
    api: FakeSignalWire, client: ConferenceStreamsClient, status: int, body: Any, words: str
) -> None:
    """Each documented error status is an ApiError with the API's message and code."""
    api.fail_next.append((status, body))
    with pytest.raises(ApiError) as info:
        client.create(conference_sid=CONFERENCE, url=RECEIVER_URL, bearer_token=TOKEN)
    assert info.value.status_code == status
    assert f"answered {status}" in str(info.value) and words in str(info.value)
    if isinstance(body, dict) and "code" in body:
        assert info.value.code == body["code"]
    assert len(api.requests) == 1


def test_real_contract_errors_from_the_fake(api: FakeSignalWire) -> None:
    """The fake's own checks answer like the API: a wrong API token is 401, an unknown
    conference 404."""
    transport = mock_transport(api)
    with ConferenceStreamsClient(
        project_id=PROJECT, api_token="not-the-token", api_url=api.base_url, transport=transport
    ) as wrong:
        with pytest.raises(ApiError, match="Authentication") as info:
            wrong.create(conference_sid=CONFERENCE, url=RECEIVER_URL)
        assert info.value.status_code == 401
    with ConferenceStreamsClient(
        project_id=PROJECT, api_token=API_TOKEN, api_url=api.base_url, transport=transport
    ) as right:
        with pytest.raises(ApiError) as info:
            right.create(conference_sid="CFnope", url=RECEIVER_URL)
        assert info.value.status_code == 404


@pytest.mark.parametrize("by", ["sid", "name"])
def test_stop_by_sid_or_name(api: FakeSignalWire, client: ConferenceStreamsClient, by: str) -> None:
    """stop posts Status=stopped to the stream's sid or name."""
    created = client.create(conference_sid=CONFERENCE, url=RECEIVER_URL, name="weekly")
    which = created.sid if by == "sid" else "weekly"
    stopped = client.stop(conference_sid=CONFERENCE, stream=which)
    assert isinstance(stopped, ConferenceStream) and stopped.status == "stopped"
    last = api.requests[-1]
    assert last.path.endswith(f"/Streams/{which}") and last.form == [("Status", "stopped")]


def test_client_repr_hides_the_token() -> None:
    """The Python client never shows the API token."""
    client = ConferenceStreamsClient(project_id=PROJECT, api_token=API_TOKEN, space="example")
    assert API_TOKEN not in repr(client)
    client.close()
    with pytest.raises(StreamRequestInvalid, match="space"):
        ConferenceStreamsClient(project_id=PROJECT, api_token=API_TOKEN, space="evil.com/x")


def test_a_space_given_with_its_domain_says_to_drop_it() -> None:
    """space="example.signalwire.com" is refused with the name to give instead."""
    with pytest.raises(StreamRequestInvalid, match="without the domain: 'example'"):
        ConferenceStreamsClient(
            project_id=PROJECT, api_token=API_TOKEN, space="example.signalwire.com"
        )


# ---------------------------------------------------------------------------------------------
# The command line, end to end over HTTPS.


def test_cli_create_prints_the_stream_and_sends_no_secret(
    fake: FakeSignalWire, tls_files: TlsFiles
) -> None:
    """`streams create` with flags: the stream is printed, the fields arrive, no secret shows."""
    result = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        RECEIVER_URL,
        "--name",
        "rec-1",
        "--bearer-token",
        "bearer-0123456789abcdef",
        "--param=room=4=2",
    )
    assert result.returncode == 0, result.stderr
    assert "created stream" in result.stdout and "in-progress" in result.stdout
    assert_no_secrets(result, "bearer-0123456789abcdef", TOKEN)
    form = dict(fake.requests[0].form)
    assert form["AuthorizationBearerToken"] == "bearer-0123456789abcdef"
    assert (form["Parameter1.Name"], form["Parameter1.Value"]) == ("room", "4=2")


@pytest.mark.parametrize(
    ("flag", "sent"),
    [
        ([], "https://rec.example.com/signalwire/status"),
        (["--status-callback", "https://hooks.example.com/s"], "https://hooks.example.com/s"),
        (["--status-callback", ""], None),
    ],
    ids=["from-public-url", "flag", "none"],
)
def test_cli_create_points_status_callbacks_at_the_public_url(
    fake: FakeSignalWire, tls_files: TlsFiles, flag: list[str], sent: str | None
) -> None:
    """With RECEIVER_PUBLIC_URL set, StatusCallback is it plus RECEIVER_STATUS_PATH (one command
    wires both directions) unless --status-callback names another URL, or '' none."""
    result = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        RECEIVER_URL,
        *flag,
        RECEIVER_PUBLIC_URL="https://rec.example.com/",
    )
    assert result.returncode == 0, result.stderr
    form = dict(fake.requests[0].form)
    assert form.get("StatusCallback") == sent
    assert (f"status callbacks: {sent}" in result.stdout) == (sent is not None)


def test_cli_create_without_a_public_url_sets_no_status_callback(
    fake: FakeSignalWire, tls_files: TlsFiles
) -> None:
    """Without RECEIVER_PUBLIC_URL nothing is guessed: no StatusCallback is sent."""
    result = cli(fake, tls_files, "create", "--conference", CONFERENCE, "--url", RECEIVER_URL)
    assert result.returncode == 0, result.stderr
    assert "StatusCallback" not in dict(fake.requests[0].form)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--track", "sideways"], "invalid choice"),
        (["--param", "novalue"], "key=value"),
        (["--url", "ws://rec.example.com/"], "wss://"),
    ],
    ids=["track", "param", "ws"],
)
def test_cli_refuses_invalid_input_before_sending(
    fake: FakeSignalWire, tls_files: TlsFiles, args: list[str], words: str
) -> None:
    """Bad flags: exit 2 and a readable line, and no request reaches the API."""
    base = ["--conference", CONFERENCE] + ([] if "--url" in args else ["--url", RECEIVER_URL])
    result = cli(fake, tls_files, "create", *base, *args)
    assert result.returncode == 2
    assert words in result.stderr
    assert fake.requests == []


def test_cli_create_without_a_bearer_token_is_refused(
    fake: FakeSignalWire, tls_files: TlsFiles
) -> None:
    """No --bearer-token and no RECEIVER_TOKENS: exit 2 before sending (the platform would
    connect without a token, and every connection would get 401)."""
    result = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        RECEIVER_URL,
        RECEIVER_TOKENS="",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bearer-token" in lines[0] and "RECEIVER_TOKENS" in lines[0]
    assert fake.requests == []


def test_cli_api_error_is_one_line_exit_1(fake: FakeSignalWire, tls_files: TlsFiles) -> None:
    """An API error status: one line with the API's own message, exit 1, no secret."""
    fake.fail_next.append((404, {"code": 20404, "message": "Conference CF1 was not found"}))
    result = cli(fake, tls_files, "create", "--conference", CONFERENCE, "--url", RECEIVER_URL)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "answered 404" in lines[0] and "not found" in lines[0]
    assert_no_secrets(result, TOKEN)


def test_json_output_and_bearer_token_from_receiver_tokens(
    fake: FakeSignalWire, tls_files: TlsFiles
) -> None:
    """--json prints the stream; the bearer token defaults to the first RECEIVER_TOKENS entry."""
    result = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        "wss://r.example/",
        "--json",
        RECEIVER_TOKENS=f"{TOKEN},second-token-0123456789",
    )
    assert result.returncode == 0, result.stderr
    stream = json.loads(result.stdout)
    assert stream["status"] == "in-progress" and stream["conference_sid"] == CONFERENCE
    assert set(stream) == {
        "sid",
        "name",
        "status",
        "uri",
        "account_sid",
        "conference_sid",
        "date_updated",
    }
    assert dict(fake.requests[0].form)["AuthorizationBearerToken"] == TOKEN
    assert_no_secrets(result, TOKEN)


def test_missing_credentials_are_named_at_once(fake: FakeSignalWire, tls_files: TlsFiles) -> None:
    """With no credentials the one line names all three to set, exit 2."""
    result = cli(
        fake,
        tls_files,
        "stop",
        "--conference",
        CONFERENCE,
        "--sid",
        "x",
        SIGNALWIRE_PROJECT_ID="",
        SIGNALWIRE_API_TOKEN="",
        SIGNALWIRE_API_URL="",
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    for name in ("SIGNALWIRE_PROJECT_ID", "SIGNALWIRE_API_TOKEN", "SIGNALWIRE_SPACE"):
        assert name in line
    assert fake.requests == []


def test_cli_space_with_its_domain_says_to_drop_it(
    fake: FakeSignalWire, tls_files: TlsFiles
) -> None:
    """SIGNALWIRE_SPACE=example.signalwire.com: exit 2, one line naming the variable and the
    name to give instead."""
    result = cli(
        fake,
        tls_files,
        "stop",
        "--conference",
        CONFERENCE,
        "--sid",
        "x",
        SIGNALWIRE_API_URL="",
        SIGNALWIRE_SPACE="example.signalwire.com",
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "SIGNALWIRE_SPACE" in line and "'example'" in line


def test_timeout_is_reported_and_never_retried(fake: FakeSignalWire, tls_files: TlsFiles) -> None:
    """An API slower than --timeout: a readable error, exit 1, exactly one request sent."""
    fake.delay_s = 2.0
    result = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        "wss://r.example/",
        "--timeout",
        "0.5",
    )
    assert result.returncode == 1
    assert "no answer within 0.5 s" in result.stderr and "may or may not" in result.stderr
    assert len(fake.requests) == 1


async def run_streams_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`receiver streams ARGS` in a subprocess, awaited: the test's receiver keeps serving."""
    process = await asyncio.create_subprocess_exec(
        *receiver_cmd("streams", *args),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess([], process.returncode, out.decode(), err.decode())


async def test_create_record_stop_round_trip(
    fake: FakeSignalWire,
    tls_files: TlsFiles,
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
) -> None:
    """create -> the fake API opens the stream to a running receiver with the bearer token it
    was given -> the files are recorded -> stop."""
    receiver = await start_receiver()
    pcmu = codec_for(CLI_CODECS["pcmu"])
    audio = speech["inbound"].samples(8000)
    loop = asyncio.get_running_loop()
    played: asyncio.Future[PlayResult] = loop.create_future()

    def open_stream(fields: dict[str, str]) -> None:
        # The platform's side: connect to Url with the token, as SignalWire would.
        def run() -> None:
            params = {
                fields[f"Parameter{i}.Name"]: fields[f"Parameter{i}.Value"]
                for i in range(1, 99)
                if f"Parameter{i}.Name" in fields
            }
            messages = build_messages(
                codec=pcmu,
                tracks={"inbound": pcmu.encode(audio)},
                stream_sid="MZround",
                custom_parameters=params,
            )
            try:
                result = asyncio.run(
                    play(
                        fields["Url"],
                        messages,
                        token=fields["AuthorizationBearerToken"],
                        ssl_context=client_ssl,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - handed to the test, which fails with it
                loop.call_soon_threadsafe(played.set_exception, exc)
            else:
                loop.call_soon_threadsafe(played.set_result, result)

        threading.Thread(target=run, daemon=True).start()

    fake.on_create = open_stream
    target = url(receiver, "/conferences/weekly")
    environment = env_with(
        SIGNALWIRE_PROJECT_ID=PROJECT,
        SIGNALWIRE_API_TOKEN=API_TOKEN,
        SIGNALWIRE_API_URL=fake.base_url,
        RECEIVER_TOKENS=TOKEN,
    )
    created = await run_streams_cli(
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        target,
        "--name",
        "weekly",
        "--param",
        "room=42",
        "--cafile",
        str(tls_files.cert),
        env=environment,
    )
    assert created.returncode == 0, created.stderr
    async with asyncio.timeout(30):
        assert (await played).close_code == 1000
    directory = receiver.settings.recordings_dir / "MZround"
    recorded, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(recorded, pcmu.decode(pcmu.encode(audio)))
    record = json.loads((directory / "stream.json").read_text())
    assert record["custom_parameters"] == {"room": "42"}
    assert record["path"] == "/conferences/weekly"

    stopped = await run_streams_cli(
        "stop",
        "--conference",
        CONFERENCE,
        "--name",
        "weekly",
        "--cafile",
        str(tls_files.cert),
        env=environment,
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    (stream,) = fake.streams.values()
    assert stream["status"] == "stopped"
