"""`receiver streams` against a local HTTPS stand-in for SignalWire's Conference Streams API."""

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
from receiver.signalwire import ConferenceStreamsClient, StreamRequestInvalid
from receiver.simulate import build_messages, play
from tests.conftest import TOKEN, StartReceiver, TlsFiles, env_with, read_wav, receiver_cmd, url
from tests.signalwire_fake import FakeSignalWire, serve

PROJECT = "b08dacad-0000-4000-8000-000000000001"
API_TOKEN = "PTsecret0123456789abcdef"
CONFERENCE = "CF0123456789abcdef"


@pytest.fixture
def fake(tls_files: TlsFiles) -> Iterator[FakeSignalWire]:
    """The fake API on a free loopback port, serving the test certificate."""
    api = FakeSignalWire(project_id=PROJECT, api_token=API_TOKEN, conferences={CONFERENCE})
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


def test_create_sends_every_documented_field_with_99_parameters(
    fake: FakeSignalWire, tls_files: TlsFiles
) -> None:
    """All documented fields reach the API, form-encoded with Basic auth, 99 parameters in order."""
    params = [f"--param=key{i}=value {i}" for i in range(1, 100)]
    result = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        "wss://rec.example.com/conf?x=1",
        "--name",
        "rec-1",
        "--track",
        "both_tracks",
        "--codec",
        "L16@16000h",
        "--real-time",
        "--bearer-token",
        "bearer-0123456789abcdef",
        "--status-callback",
        "https://hooks.example.com/s",
        "--status-callback-method",
        "GET",
        *params,
    )
    assert result.returncode == 0, result.stderr
    assert "created stream" in result.stdout and "in-progress" in result.stdout
    assert_no_secrets(result, "bearer-0123456789abcdef")
    (request,) = fake.requests
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
    (stream,) = fake.streams.values()
    assert stream["name"] == "rec-1"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([*(f"--param=k{i}=v" for i in range(100))], "at most 99"),
        (["--url", "ws://rec.example.com/"], "wss://"),
        (["--url", "https://rec.example.com/"], "wss://"),
        (["--track", "sideways"], "invalid choice"),
        (["--codec", "G722"], "StreamCodec"),
        (["--codec", "OPUS"], "StreamCodec"),
        (["--conference", "CF/../other"], "conference"),
        (["--param", "novalue"], "key=value"),
        (["--status-callback-method", "PUT"], "invalid choice"),
    ],
    ids=["100-params", "ws", "https", "track", "g722", "opus", "id-slash", "param", "method"],
)
def test_invalid_requests_are_refused_before_sending(
    fake: FakeSignalWire, tls_files: TlsFiles, args: list[str], words: str
) -> None:
    """Bad input is one readable line and exit 2, and no request reaches the API."""
    base = {"--conference": CONFERENCE, "--url": "wss://rec.example.com/"}
    for flag in ("--conference", "--url"):
        if flag in args:
            base.pop(flag)
    flat = [x for pair in base.items() for x in pair]
    result = cli(fake, tls_files, "create", *flat, *args)
    assert result.returncode == 2
    assert words in result.stderr
    assert fake.requests == []


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
def test_api_errors_become_one_readable_line(
    fake: FakeSignalWire, tls_files: TlsFiles, status: int, body: Any, words: str
) -> None:
    """Each documented error status: one line with the API's own message, exit 1, no secret."""
    fake.fail_next.append((status, body))
    result = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        "wss://r.example/",
        RECEIVER_TOKENS=TOKEN,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"answered {status}" in lines[0] and words in lines[0]
    assert_no_secrets(result, TOKEN)
    assert len(fake.requests) == 1


def test_real_contract_errors_from_the_fake(fake: FakeSignalWire, tls_files: TlsFiles) -> None:
    """The fake's own checks answer like the API: a wrong API token is 401, an unknown
    conference 404."""
    wrong = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        "wss://r.example/",
        SIGNALWIRE_API_TOKEN="not-the-token",
    )
    assert wrong.returncode == 1 and "401" in wrong.stderr and "Authentication" in wrong.stderr
    missing = cli(fake, tls_files, "create", "--conference", "CFnope", "--url", "wss://r.example/")
    assert missing.returncode == 1 and "404" in missing.stderr


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


@pytest.mark.parametrize("by", ["--sid", "--name"])
def test_stop_by_sid_or_name(fake: FakeSignalWire, tls_files: TlsFiles, by: str) -> None:
    """stop posts Status=stopped to the stream's sid or name."""
    created = cli(
        fake,
        tls_files,
        "create",
        "--conference",
        CONFERENCE,
        "--url",
        "wss://r.example/",
        "--name",
        "weekly",
        "--json",
    )
    stream = json.loads(created.stdout)
    which = stream["sid"] if by == "--sid" else "weekly"
    stopped = cli(fake, tls_files, "stop", "--conference", CONFERENCE, by, which, "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["status"] == "stopped"
    last = fake.requests[-1]
    assert last.path.endswith(f"/Streams/{which}") and last.form == [("Status", "stopped")]


def test_missing_credentials_exit_2(fake: FakeSignalWire, tls_files: TlsFiles) -> None:
    """Without a project id the command says what to set, exit 2."""
    result = cli(
        fake, tls_files, "stop", "--conference", CONFERENCE, "--sid", "x", SIGNALWIRE_PROJECT_ID=""
    )
    assert result.returncode == 2 and "SIGNALWIRE_PROJECT_ID" in result.stderr


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


def test_client_repr_hides_the_token() -> None:
    """The Python client never shows the API token."""
    client = ConferenceStreamsClient(project_id=PROJECT, api_token=API_TOKEN, space="example")
    assert API_TOKEN not in repr(client)
    client.close()
    with pytest.raises(StreamRequestInvalid, match="space"):
        ConferenceStreamsClient(project_id=PROJECT, api_token=API_TOKEN, space="evil.com/x")


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
    played: list[Any] = []

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
            played.append(
                asyncio.run(
                    play(
                        fields["Url"],
                        messages,
                        token=fields["AuthorizationBearerToken"],
                        ssl_context=client_ssl,
                    )
                )
            )

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
        while not played:
            await asyncio.sleep(0.05)
    assert played[0].close_code == 1000
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
