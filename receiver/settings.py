"""Every setting of the receiver, read once at the edge (the CLI) and passed down as values.

Sources, strongest first: CLI flags (passed as init arguments), ``RECEIVER_*`` environment
variables, a ``.env`` file in the working directory, the defaults below. The receiver's own
``RECEIVER_*`` variables are read here only (``receiver streams`` reads ``SIGNALWIRE_*`` itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from receiver.codecs import ByteOrder
from receiver.exceptions import ConfigError

ENV_PREFIX = "RECEIVER_"

SampleFormat = Literal["pcm16", "native"]
FileFormat = Literal["wav", "flac"]
EventLoop = Literal["auto", "asyncio", "uvloop"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Settings(BaseSettings):
    """The receiver's configuration; field ``x`` is the variable ``RECEIVER_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    host: str = "0.0.0.0"  # noqa: S104 - a server meant to be reached from the platform
    port: int = Field(default=8443, ge=0, le=65535)
    # Accepted bearer tokens; several at once so that a token can be rotated without downtime.
    tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_ws: bool = False
    # Where the development certificate is kept so that it survives restarts.
    state_dir: Path = Path(".receiver")
    recordings_dir: Path = Path("recordings")
    l16_byte_order: ByteOrder = "little"
    sample_format: SampleFormat = "pcm16"
    file_format: FileFormat = "wav"
    # Also write stereo.<ext> (inbound left, outbound right) when a stream ends.
    stereo: bool = False
    sinks: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["wav"])
    # How much audio a track gathers before it is handed to the sinks.
    batch_ms: int = Field(default=200, ge=20, le=10_000)
    # Limits. A 20 ms frame of 24 kHz L16 is about 1.4 KB of JSON; 64 KiB holds over 1 s of it.
    max_message_bytes: int = Field(default=65_536, ge=4_096, le=16 * 1024 * 1024)
    max_streams: int = Field(default=500, ge=1, le=100_000)
    # Streams at once from one address. SignalWire may send many streams from few addresses:
    # raise it for large deployments.
    max_connections_per_ip: int = Field(default=250, ge=1, le=100_000)
    max_custom_parameters: int = Field(default=99, ge=0, le=10_000)
    max_parameter_chars: int = Field(default=4096, ge=16, le=1_000_000)
    # The most silence one jump (of timestamp or chunk) may insert; a larger jump shifts the
    # track's clock. At most 600, so that what one frame can make stays small.
    max_gap_s: float = Field(default=60.0, gt=0, le=600)
    # Per-stream bounds (issue 11). Defaults sit far above what a real conference sends, so that
    # they only ever stop an attack; past each one the excess is counted in stream.json's
    # "dropped" (or the track's statistics) and dropped, never stored.
    # A track's silence in all (lost frames, a late start): a stream losing a tenth of its frames
    # for 6 hours makes 36 minutes of it. Past it, jumps shift the track's clock instead.
    max_silence_s: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    # Marks and DTMF digits kept a stream: a 6-hour call with a mark or a key press every 3 s is
    # 7,200. With names of 256 characters the final stream.json stays under ~35 MB even when
    # every character needs a 12-byte escape; it is written off the event loop.
    max_marks: int = Field(default=10_000, ge=0, le=1_000_000)
    max_dtmf: int = Field(default=10_000, ge=0, le=1_000_000)
    # Longest mark name kept (cut beyond, counted) and longest unknown event name remembered.
    max_name_chars: int = Field(default=256, ge=8, le=65_536)
    # Distinct unknown event names remembered (and logged) a stream; the rest are only counted.
    max_unknown_events: int = Field(default=32, ge=0, le=10_000)
    handshake_timeout_s: float = Field(default=10.0, gt=0, le=600)
    idle_timeout_s: float = Field(default=60.0, gt=0, le=86_400)
    max_stream_duration_s: float = Field(default=6 * 3600.0, gt=0, le=7 * 86_400)
    # `receiver serve`'s event loop: uvloop when installed (`pip install '.[uvloop]'`), whose
    # TLS reads cost less CPU a frame than asyncio's (bench/README.md); "asyncio" to opt out.
    event_loop: EventLoop = "auto"
    drain_timeout_s: float = Field(default=10.0, ge=0, le=600)
    # The redis sink (RECEIVER_SINKS=wav,redis) and `receiver consume`: see docs/redis.md.
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    redis_prefix: str = Field(default="receiver", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # XADD MAXLEN ~ of every key: 100000 batches of 200 ms is 5.5 hours of a track.
    redis_maxlen: int = Field(default=100_000, ge=1_000, le=100_000_000)
    # A finished stream's keys expire this long after its stop (0: never).
    redis_ttl_s: float = Field(default=86_400.0, ge=0, le=365 * 86_400)
    # Memory the receiver may hold for a slow Redis, all streams together.
    redis_max_queued_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024, le=16 * 1024**3)
    # How long a stream's end waits (on the event loop) for its last entries to be in Redis.
    redis_flush_timeout_s: float = Field(default=2.0, ge=0, le=60)
    # --- Delivery (receiver/delivery/, README "Uploads" and "Webhooks") -------------------
    # Where finished streams are uploaded: s3://bucket/prefix, gs://..., az://..., file:///...
    # Credentials and endpoints come from each store's own variables (AWS_*, GOOGLE_*, AZURE_*).
    upload_url: str | None = None
    # Delete the local copy once every file of a stream is verified in the store.
    upload_delete_local: bool = False
    # Multipart part size (S3's minimum is 5 MiB); an upload holds about part size x concurrency
    # in memory (tests/test_upload.py measures it). More parts in flight: faster, more RAM.
    upload_part_bytes: int = Field(default=5 * 1024 * 1024, ge=5 * 1024 * 1024, le=1024**3)
    upload_concurrency: int = Field(default=2, ge=1, le=16)
    # One request to the store (a part, a HEAD) fails after this long and is retried.
    upload_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Signed POSTs (Standard Webhooks) of stream.started, stream.ended, recording.uploaded.
    webhook_url: str | None = None
    # whsec_<base64 key>; required with webhook_url; never logged.
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Retries of uploads and webhooks: exponential from the first delay up to the cap, with
    # jitter, for ever (nothing is dropped; the queue is on disk).
    delivery_retry_first_s: float = Field(default=1.0, gt=0, le=3600)
    delivery_retry_max_s: float = Field(default=300.0, gt=0, le=86_400)
    # --- end of delivery settings ------------------------------------------------------------
    # --- Status callbacks (receiver/status.py, README "Status callbacks") --------------------
    # The project's signing key (dashboard: API > Signing Key; not the API token), several
    # comma-separated while rotating. Unset: RECEIVER_STATUS_PATH answers 404.
    signalwire_signing_key: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # The receiver's public base URL as the platform reaches it (https://receiver.example.com,
    # through a proxy or a tunnel): callbacks are checked against the URL signed from it, and
    # `receiver streams create` points StatusCallback at it plus RECEIVER_STATUS_PATH.
    public_url: str | None = None
    # Where the platform's status callbacks arrive on the stream port (no token: signed).
    status_path: str = Field(
        default="/signalwire/status", pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,255}$"
    )
    # --- end of status callback settings ----------------------------------------------------
    log_level: LogLevel = "INFO"
    log_format: Literal["text", "json"] = "text"
    # /metrics is served on the stream port without a token; give it a port of its own (bound
    # to metrics_host) to keep it off the public interface.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Connection shell (issue 11): what one connection may hold before and after its
    # handshake. Handshakes (TLS + HTTP) in progress, overall and from one address; past
    # either, a new TCP connection is closed at accept.
    max_pending_handshakes: int = Field(default=1000, ge=1, le=1_000_000)
    max_pending_handshakes_per_ip: int = Field(default=200, ge=1, le=1_000_000)
    # Bytes we may hold for a client that does not read (its pongs); past it, it is aborted.
    max_write_buffer_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=1024**3)
    # Once our close frame is sent, how long the client has to answer it before we cut.
    close_timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Keepalive: a ping every ping_interval_s, the stream ends (1011) without a pong in time.
    ping_interval_s: float = Field(default=20.0, gt=0, le=3600)
    ping_timeout_s: float = Field(default=20.0, gt=0, le=3600)
    # Read coalescing: after a read, a stream's connection is read again this much later, so
    # one recv and one decrypt serve every frame that arrived meanwhile (0: read on arrival).
    # It adds at most this much to the frame-to-disk lag.
    read_interval_ms: int = Field(default=100, ge=0, le=1000)
    # /healthz answers 503 below this much free space in the recordings directory.
    min_free_disk_mb: int = Field(default=256, ge=0, le=1024**3)

    # --- The web page (receiver.web): live streams and recordings, on an address of its own.
    ui_host: str = "127.0.0.1"
    # Empty (RECEIVER_UI_PORT=) turns the page off.
    ui_port: int | None = Field(default=8080, ge=0, le=65535)
    # Tokens that log in to the page; when empty, any accepted bearer token does.
    ui_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # How long a login lasts (the session cookie's expiry).
    ui_session_s: float = Field(default=12 * 3600.0, ge=60, le=30 * 86_400)
    # The newest stream directories the list reads; older ones are not listed.
    ui_max_listed: int = Field(default=10_000, ge=1, le=1_000_000)

    @field_validator("ui_port", mode="before")
    @classmethod
    def _empty_port_is_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def ui_token_values(self) -> list[str]:
        """The page's own login tokens, plain; never log them."""
        return [t.get_secret_value() for t in self.ui_tokens]

    # --- end of the web page's settings.

    @field_validator("tokens", "ui_tokens", "signalwire_signing_key", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("tokens", "ui_tokens", "signalwire_signing_key")
    @classmethod
    def _check_tokens(cls, value: list[SecretStr]) -> list[SecretStr]:
        for token in value:
            secret = token.get_secret_value()
            # RFC 6750 b64token characters; anything else could not travel in the header.
            if len(secret) < 16 or not secret.isascii() or any(c.isspace() for c in secret):
                raise ValueError("each one needs at least 16 printable ASCII characters")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        if urlsplit(value.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("upload_url", "webhook_url", "webhook_secret", "public_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # docker compose passes ${VAR:-} as an empty string: that means "off", not a URL.
        return None if value == "" else value

    @field_validator("upload_url")
    @classmethod
    def _check_upload_url(cls, value: str | None) -> str | None:
        schemes = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "file")
        if value is not None and urlsplit(value).scheme not in schemes:
            raise ValueError("must be an s3://, gs://, az:// or file:/// URL")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an https:// (or http://) URL with a host")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError("takes no query, fragment or user part: only scheme, host, port, path")
        return value.rstrip("/")

    @property
    def signing_key_values(self) -> list[str]:
        """The plain signing keys, for checking callbacks only; never log them."""
        return [k.get_secret_value() for k in self.signalwire_signing_key]

    @property
    def status_callback_url(self) -> str | None:
        """``public_url`` + ``status_path``: where the platform is told to call, or None."""
        return None if self.public_url is None else self.public_url + self.status_path

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from receiver.delivery.signing import parse_secret

            parse_secret(value.get_secret_value())
        return value

    @field_validator("sinks", mode="before")
    @classmethod
    def _split_sinks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        # Messages start with the variable: load_settings names it from there.
        if (self.tls_cert is None) != (self.tls_key is None):
            missing, given = (
                ("TLS_KEY", "TLS_CERT") if self.tls_key is None else ("TLS_CERT", "TLS_KEY")
            )
            raise ValueError(f"{ENV_PREFIX}{missing} must be set together with {ENV_PREFIX}{given}")
        if not self.sinks:
            raise ValueError(f"{ENV_PREFIX}SINKS must name at least one sink")
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError(f"{ENV_PREFIX}WEBHOOK_SECRET must be set with {ENV_PREFIX}WEBHOOK_URL")
        return self

    @property
    def token_values(self) -> list[str]:
        """The plain token strings, for the handshake check only; never log them."""
        return [t.get_secret_value() for t in self.tokens]


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, ``.env`` and ``overrides`` (CLI flags).

    Raises ``ConfigError`` naming the invalid variables, for a one-line message. No value is
    ever echoed: a token, a Redis password, or a token pasted into the wrong variable would
    end up in a terminal or a log (pydantic's own errors carry the input, and a model
    validator's input is every setting).
    """
    cleaned = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**cleaned)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        problems = [(_variable(error["loc"]), str(error["msg"])) for error in errors]
    except SettingsError:
        # pydantic-settings could not parse a variable (its message names the field, the
        # value stays on the exception's cause, which is not shown).
        raise ConfigError("settings", "a variable could not be parsed") from None
    variable, message = problems[0]
    message = message.removeprefix("Value error, ")
    if variable == "settings" and message.startswith(ENV_PREFIX):  # a model validator's
        variable, _, message = message.partition(" ")
    others = sorted({v for v, _ in problems[1:]} - {variable})
    if others:
        message += f" (also invalid: {', '.join(others)})"
    raise ConfigError(variable, message) from None


def _variable(location: tuple[int | str, ...]) -> str:
    """The variable a pydantic error location names; a model validator names its own."""
    names = [str(part) for part in location if not isinstance(part, int)]
    return ENV_PREFIX + names[0].upper() if names else "settings"
