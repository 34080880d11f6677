"""The ``receiver`` command: ``serve``, ``repair``, ``health``, ``simulate``, ``streams``,
``consume``, ``upload``.

Reads settings once (flags over ``RECEIVER_*`` over ``.env``), sets up logging and TLS, picks
the sinks and runs. Every failure a user can cause is one line on stderr, never a traceback.
Exit codes: 0 done, 1 failed at run time, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import soundfile
from pydantic import SecretStr

from receiver import __version__
from receiver.auth import redact_websockets_logs
from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import Track
from receiver.exceptions import ConfigError, ListenError, ReceiverError
from receiver.logs import setup_logging
from receiver.settings import Settings, load_settings
from receiver.text import parse_pairs

__all__ = ["build_parser", "main"]

logger = logging.getLogger("receiver")
# How long a thread may hold the GIL while another waits (Python's default: 5 ms); see _serve.
_SWITCH_INTERVAL_S = 0.0005

DESCRIPTION = """\
Record SignalWire (Twilio-compatible) media streams: a wss:// endpoint that checks a bearer
token and writes each track of a stream to its own WAV file, with stream.json beside them.
Settings are RECEIVER_* environment variables (or a .env file); flags override them."""
EPILOG = "Exit codes: 0 done, 1 failed at run time, 2 bad configuration or usage."
SERVE_DESCRIPTION = """\
Accept streams and record them. Every setting is a RECEIVER_* variable (the README lists
them); the flags below override the most used. RECEIVER_TOKENS holds the accepted bearer
tokens, comma-separated; without it a token is generated for this run and printed once.
Without RECEIVER_TLS_CERT/RECEIVER_TLS_KEY a self-signed development certificate is used."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    except ReceiverError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default unless its help already says it (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: defaults shown in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="receiver", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"receiver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="accept and record streams (settings: RECEIVER_*, tokens: RECEIVER_TOKENS)",
        description=SERVE_DESCRIPTION,
        epilog=EPILOG,
    )
    serve.add_argument("--host", help="address to bind (RECEIVER_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (RECEIVER_PORT, default 8443)")
    serve.add_argument(
        "--recordings-dir",
        type=Path,
        help="where recordings go (RECEIVER_RECORDINGS_DIR, default ./recordings)",
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain (RECEIVER_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, help="PEM private key (RECEIVER_TLS_KEY)")
    serve.add_argument(
        "--insecure-ws",
        action="store_true",
        default=None,
        help="serve plain ws behind a TLS-terminating proxy (RECEIVER_INSECURE_WS)",
    )
    serve.add_argument(
        "--sinks", help="comma-separated sinks: wav, redis, ... (RECEIVER_SINKS, default wav)"
    )
    serve.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING, ERROR (RECEIVER_LOG_LEVEL, default INFO)",
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text or json lines (RECEIVER_LOG_FORMAT, default text)",
    )
    serve.set_defaults(func=_serve)

    rep = sub.add_parser("repair", help="finish the files of streams a crash interrupted")
    rep.add_argument(
        "directory",
        type=Path,
        nargs="?",
        metavar="DIR",
        help="recordings directory (default: RECEIVER_RECORDINGS_DIR)",
    )
    rep.set_defaults(func=_repair)

    health = sub.add_parser(
        "health",
        help="exit 0 if the receiver's /healthz answers 200 (for container health checks)",
        description="Probe /healthz of the receiver these settings describe: RECEIVER_HOST\n"
        "(a wildcard address is probed on loopback), RECEIVER_PORT, RECEIVER_INSECURE_WS.",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    health.set_defaults(func=_health)

    sim = sub.add_parser(
        "simulate",
        help="play WAV files into a receiver as the platform does",
        description="Play 16-bit mono WAV files into a receiver exactly as the platform streams\n"
        "them: connected, start, media frames of both tracks interleaved in time, stop.",
        epilog=EPILOG,
    )
    sim.add_argument("inbound", type=Path, metavar="IN.wav", help="audio of the inbound track")
    sim.add_argument(
        "outbound", type=Path, nargs="?", metavar="OUT.wav", help="audio of the outbound track"
    )
    sim.add_argument(
        "--url",
        help="the receiver's URL (default: wss://localhost:RECEIVER_PORT/, or the "
        "RECEIVER_HOST it binds; ws:// with RECEIVER_INSECURE_WS)",
    )
    sim.add_argument("--token", help="bearer token (default: the first of RECEIVER_TOKENS)")
    sim.add_argument(
        "--codec",
        choices=sorted(CLI_CODECS),
        default="pcmu",
        help="media format to send: G.711 μ-law/A-law at 8 kHz, or L16 at 8, 16 or 24 kHz",
    )
    sim.add_argument(
        "--frame-ms", type=int, default=20, help="milliseconds of audio a frame, 1 to 1000"
    )
    sim.add_argument(
        "--realtime",
        action="store_true",
        help="pace frames like a live call (default: as fast as the receiver takes them)",
    )
    sim.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="a custom parameter, repeatable"
    )
    sim.add_argument("--stream-sid", help="stream sid to send (default: a new UUID)")
    sim.add_argument(
        "--layout",
        choices=["signalwire", "twilio"],
        default="signalwire",
        help="message shape: SignalWire's, or Twilio's (streamSid on every message)",
    )
    sim.add_argument(
        "--cafile",
        type=Path,
        help="trust this CA/certificate (default: the dev certificate, if present)",
    )
    sim.set_defaults(func=_simulate)

    from receiver.consume import add_consume_parser
    from receiver.delivery.command import add_upload_parser
    from receiver.streams_cli import add_streams_parser

    add_streams_parser(sub)
    add_consume_parser(sub)
    add_upload_parser(sub)

    return parser


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        host=args.host,
        port=args.port,
        recordings_dir=args.recordings_dir,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure_ws=args.insecure_ws,
        sinks=args.sinks,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    setup_logging(level=settings.log_level, log_format=settings.log_format)
    redact_websockets_logs()  # process-wide, so the command's to make
    check_recordings_dir(settings.recordings_dir)
    from receiver.sinks import sink_factories_for

    sink_factories = sink_factories_for(settings)
    if not any(name == "delivery" for name, _ in sink_factories):
        _report_interrupted(settings.recordings_dir)  # delivery repairs them at its start
    if not settings.tokens:
        token = secrets.token_urlsafe(32)
        while token.startswith("-"):  # `--token -x...` would read as a flag: 1 in 64 tokens
            token = secrets.token_urlsafe(32)
        settings = settings.model_copy(update={"tokens": [SecretStr(token)]})
        print(
            "No RECEIVER_TOKENS set: this run accepts only this generated bearer token "
            f"(set RECEIVER_TOKENS to keep one across restarts):\n\n    {token}\n",
            file=sys.stderr,
            flush=True,
        )
    ssl_context = _server_tls(settings)
    fit_fd_limit(settings)
    _check_speedups()
    from receiver.server import Receiver

    ui = None
    if settings.ui_port is not None:  # the web page (receiver.web), beside it in this loop
        from receiver.web import WebUI

        ui = WebUI(settings)
        sink_factories.append(ui.sink())
    receiver = Receiver(settings, ssl_context=ssl_context, sink_factories=sink_factories)
    run = _run_until_signal(receiver)
    # What start-up made (modules, settings, the server) is never garbage: out of the
    # collector's sight, a full collection (the memory trim's after a wave of connections, and
    # Python's own) walks only what streams made: 49-70 ms -> see the trim's log line.
    gc.freeze()
    # The threads that finish streams (stream.json, FLAC) and the event loop share the GIL:
    # the loop gives it up at every syscall and waits up to the switch interval (5 ms) to get
    # it back while a thread works, so 150 streams ending at once held a live stream's pings
    # 311-422 ms; at 0.5 ms, 158-175 ms (tests/test_chaos.py, many streams at the fd limit).
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    return _event_loop_runner(settings.event_loop)(ui.serving(run) if ui else run)


def _check_speedups() -> None:
    """Say so when the hot path's C loops were not built (installed without a C compiler)."""
    try:
        import receiver._speedups  # noqa: F401
    except ImportError:
        logger.warning(
            "receiver._speedups is not built (no C compiler when this was installed): the "
            "frame splitter, the media parser, the session's steady path (a run of frames a "
            "call) and the G.711 decoder run as their Python twins, ~15x, ~4x, ~1.8x (~1.9x) "
            "and ~2x slower (python -m bench.core); reinstall with gcc to build it"
        )


def _event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """``uvloop.run`` for "uvloop", and for "auto" when uvloop is installed; else asyncio's."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(
                    "RECEIVER_EVENT_LOOP", "uvloop is not installed (pip install '.[uvloop]')"
                ) from None
        else:
            return uvloop.run
    return asyncio.run


def _server_tls(settings: Settings) -> Any:
    from receiver import tls

    if settings.insecure_ws:
        logger.warning(
            "RECEIVER_INSECURE_WS=true: serving PLAIN ws:// without TLS. Bearer tokens and audio "
            "cross the network in clear text: only run this behind a TLS-terminating proxy."
        )
        return None
    if settings.tls_cert is not None and settings.tls_key is not None:
        for name, path in (
            ("RECEIVER_TLS_CERT", settings.tls_cert),
            ("RECEIVER_TLS_KEY", settings.tls_key),
        ):
            if not path.is_file():
                raise ConfigError(name, f"no such file: {path}")
        try:
            return tls.server_context(settings.tls_cert, settings.tls_key)
        except (OSError, ValueError) as exc:
            problem = _pem_problem(settings.tls_cert, settings.tls_key, exc)
            raise ConfigError("RECEIVER_TLS_CERT", problem) from None
    cert = tls.ensure_dev_certificate(settings.state_dir)
    logger.warning(
        "no RECEIVER_TLS_CERT/RECEIVER_TLS_KEY: using a self-signed DEVELOPMENT certificate "
        "%s %s (SHA-256 %s). SignalWire will not trust it: put a real certificate or a TLS "
        "proxy in front for production.",
        "made at" if cert.created else "from",
        cert.cert_path,
        cert.fingerprint_sha256,
    )
    return tls.server_context(cert.cert_path, cert.key_path)


# Each stream holds about 4 fds (its socket, the in-progress marker, two track files), each
# handshake in progress one; the rest (listening sockets, logs, Redis, metrics) fits in this.
FDS_PER_STREAM = 4
FD_HEADROOM = 64


def fit_fd_limit(settings: Settings) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (the one process-wide change ``serve``
    makes for it); ConfigError when the configured streams cannot fit. Returns the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1024 * 1024)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            limit = wanted
        except (ValueError, OSError):
            pass
    if limit != soft:
        logger.info("file descriptor limit raised from %d to %d", soft, limit)
    needed = FDS_PER_STREAM * settings.max_streams + settings.max_pending_handshakes + FD_HEADROOM
    if needed > limit:
        raise ConfigError(
            "RECEIVER_MAX_STREAMS",
            f"{FDS_PER_STREAM} file descriptors a stream, plus "
            f"RECEIVER_MAX_PENDING_HANDSHAKES and {FD_HEADROOM} more, need {needed}; the fd "
            f"limit is {limit} (ulimit -n): lower them or raise the limit",
        )
    return limit


def _pem_problem(cert: Path, key: Path, exc: Exception) -> str:
    """What is wrong with a certificate/key pair OpenSSL refused ("[SSL] PEM lib")."""
    try:
        cert_text = cert.read_text(errors="replace")
        key_text = key.read_text(errors="replace")
    except OSError as error:
        return f"cannot read it: {error.strerror or error}"
    if "PRIVATE KEY-----" in cert_text and "CERTIFICATE-----" in key_text:
        return "RECEIVER_TLS_CERT and RECEIVER_TLS_KEY are swapped: the certificate holds a key"
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        return "is not a PEM certificate (-----BEGIN CERTIFICATE-----)"
    if "PRIVATE KEY-----" not in key_text:
        return "RECEIVER_TLS_KEY is not a PEM private key (-----BEGIN ... PRIVATE KEY-----)"
    reason = getattr(exc, "reason", None) or exc
    return f"cannot load the certificate with RECEIVER_TLS_KEY ({reason}): does the key match it?"


def check_recordings_dir(path: Path) -> None:
    """Create the recordings directory if needed and prove it writable, or raise ConfigError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        problem = f"{path} is not a writable directory ({exc.strerror or exc})"
        raise ConfigError("RECEIVER_RECORDINGS_DIR", problem) from None


async def _run_until_signal(receiver: Any) -> int:
    """Serve until SIGINT/SIGTERM; drain, and on a second signal close the streams at once."""
    loop = asyncio.get_running_loop()
    signals = 0
    stop = asyncio.Event()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.info("shutting down: no new streams; a second signal closes streams now")
            stop.set()
        else:
            receiver.close_now()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await receiver.start()
    except ListenError as exc:
        logger.error("%s", exc)
        await receiver.shutdown()
        return 1
    s = receiver.settings
    metrics_at = (
        f"http://{s.metrics_host}:{receiver.metrics_port}/metrics"
        if receiver.metrics_port is not None
        else "/metrics on this port"
    )
    logger.info(
        "listening on %s://%s:%d/ (health: /healthz, metrics: %s), %d token(s), recordings in "
        "%s, %s loop",
        "ws" if receiver.ssl_context is None else "wss",
        s.host,
        receiver.port,
        metrics_at,
        len(s.tokens),
        s.recordings_dir.resolve(),
        "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio",
    )
    await stop.wait()
    await receiver.shutdown()
    recorded = receiver.counters["streams"]
    logger.info("stopped: %d stream%s recorded", recorded, "" if recorded == 1 else "s")
    return 0


def _report_interrupted(recordings_dir: Path) -> None:
    from receiver.recovery import find_interrupted

    interrupted = find_interrupted(recordings_dir)
    if interrupted:
        logger.warning(
            "%d stream(s) were interrupted by an earlier crash or a full disk (e.g. %s); their WAV "
            "files are readable as they are: run `receiver repair %s` to finish them",
            len(interrupted),
            interrupted[0],
            recordings_dir,
        )


def _repair(args: argparse.Namespace) -> int:
    from receiver.recovery import repair

    directory = args.directory or load_settings().recordings_dir
    if not directory.is_dir():
        raise ConfigError("DIR", f"{directory} is not a directory")
    repaired = repair(directory)
    problems = 0
    for stream in repaired:
        files = ", ".join(
            f"{w.path.name} {w.samples} samples{' (header fixed)' if w.changed else ''}"
            for w in stream.wavs
        )
        print(f"{stream.directory}: interrupted; {files or 'no audio'}")
        for problem in stream.problems:  # one line each, never a traceback
            print(f"{stream.directory}: {problem}", file=sys.stderr)
        problems += len(stream.problems)
    print(f"{len(repaired)} interrupted stream(s) repaired under {directory}")
    if problems:
        print(f"{problems} problem(s) left: see above", file=sys.stderr)
        return 1
    return 0


def _probe_host(host: str) -> str:
    """Where a server bound to ``host`` is reached from this machine: loopback for a wildcard."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104


def _health(args: argparse.Namespace) -> int:
    """Probe this machine's receiver (for container health checks): 0 when /healthz is 200."""
    import http.client
    import ssl

    settings = load_settings()
    host = _probe_host(settings.host)
    if settings.insecure_ws:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            host, settings.port, timeout=args.timeout
        )
    else:
        # Liveness of our own process: the certificate is not what is checked here.
        context = ssl._create_unverified_context()  # noqa: S323
        conn = http.client.HTTPSConnection(
            host, settings.port, timeout=args.timeout, context=context
        )
    where = f"{host}:{settings.port}"
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        problem = (
            exc.strerror
            if isinstance(exc, OSError) and exc.strerror
            else str(exc) or type(exc).__name__
        )
        print(f"receiver health: {where}: {problem}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(f"receiver health: {where}: {status}")
    return 0 if status == 200 else 1


def default_url(settings: Settings) -> str:
    """The URL of the receiver these settings describe, as seen from this machine."""
    host = _probe_host(settings.host)
    if host in ("127.0.0.1", "::1"):
        host = "localhost"  # the name the development certificate is made for
    elif ":" in host:
        host = f"[{host}]"
    scheme = "ws" if settings.insecure_ws else "wss"
    return f"{scheme}://{host}:{settings.port}/"


def _simulate(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from receiver import simulate, tls

    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    settings = load_settings()
    token = args.token or (settings.token_values[0] if settings.tokens else None)
    if token is None:
        raise ConfigError("--token", "give --token or set RECEIVER_TOKENS")
    if not 1 <= args.frame_ms <= 1000:
        raise ConfigError("--frame-ms", f"must be 1 to 1000, got {args.frame_ms}")
    target = args.url or default_url(settings)
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("ws", "wss") or not urlsplit(target).hostname:
        suggestion = ""
        if scheme in ("http", "https"):
            rest = target.split("://", 1)[1]
            suggestion = f": did you mean {'wss' if scheme == 'https' else 'ws'}://{rest}?"
        raise ConfigError("--url", f"must be a wss:// (or ws://) URL, got {target!r}{suggestion}")
    codec = codec_for(CLI_CODECS[args.codec], l16_byte_order=settings.l16_byte_order)
    tracks: dict[Track, bytes] = {}
    paths: list[tuple[Track, Path | None]] = [
        ("inbound", args.inbound),
        ("outbound", args.outbound),
    ]
    for track, path in paths:
        if path is not None:
            tracks[track] = codec.encode(read_mono(path, sample_rate_hz=codec.sample_rate_hz))
    try:
        params = dict(parse_pairs(args.param))
    except ValueError as exc:
        raise ConfigError("--param", str(exc)) from None
    cafile = args.cafile
    if cafile is not None and not cafile.is_file():
        raise ConfigError("--cafile", f"no such file: {cafile}")
    dev_cert = settings.state_dir / tls.DEV_CERT_NAME
    if cafile is None and dev_cert.is_file():
        cafile = dev_cert
    messages = simulate.build_messages(
        codec=codec,
        tracks=tracks,
        frame_ms=args.frame_ms,
        stream_sid=args.stream_sid,
        custom_parameters=params,
        layout=args.layout,
    )
    seconds = max(len(d) for d in tracks.values()) / codec.bytes_per_sample / codec.sample_rate_hz
    shown = [-1]

    def show(sent: int, total: int) -> None:
        # Redraw on a terminal only, and at most 100 times: progress is for people.
        step = sent * 100 // total
        if step != shown[0]:
            shown[0] = step
            line = simulate.progress_bar(sent, total, seconds=seconds)
            print(f"\r{line}", end="" if sent < total else "\n", file=sys.stderr, flush=True)

    result = asyncio.run(
        simulate.play(
            target,
            messages,
            token=token,
            ssl_context=tls.client_context(cafile),
            pace=1.0 if args.realtime else 0.0,
            progress=show if sys.stderr.isatty() else None,
        )
    )
    print(
        f"sent {result.messages_sent} messages ({', '.join(tracks)}) to {target}; server closed "
        f"with {result.close_code} {result.close_reason or ''}".rstrip()
    )
    return 0 if result.close_code == 1000 else 1


def read_mono(path: Path, *, sample_rate_hz: int) -> Any:
    """A mono WAV file as int16 samples at ``sample_rate_hz``, or ConfigError saying why not.

    A file with several channels is refused rather than mixed down: each track of a stream is
    one channel, and which channel (or what mix) is meant is the user's choice, made with sox.
    """
    if not path.is_file():
        raise ConfigError(str(path), "no such file")
    try:
        data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise ConfigError(str(path), f"cannot read audio: {exc}") from None
    if rate != sample_rate_hz:
        raise ConfigError(
            str(path),
            f"is {rate} Hz but the codec needs {sample_rate_hz} Hz; convert it first, e.g. "
            f"sox {path} -r {sample_rate_hz} -c 1 -b 16 converted.wav",
        )
    if data.shape[1] != 1:
        raise ConfigError(
            str(path),
            f"has {data.shape[1]} channels, a track is one; pick one first, e.g. "
            f"sox {path} left.wav remix 1 (or remix - for a mix of all)",
        )
    return data[:, 0].copy()


if __name__ == "__main__":
    raise SystemExit(main())
