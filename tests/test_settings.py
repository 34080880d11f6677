"""Settings errors name the variables and never echo a value: a token set beside them, or
pasted into the wrong variable, appears in no message, in process or from `receiver serve`."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest

from receiver.exceptions import ConfigError
from receiver.settings import ENV_PREFIX, Settings, load_settings
from tests.support.commands import env_with, run_receiver

SECRET = "very-secret-token-0123456789"


def free_form(name: str) -> bool:
    """A field that takes any text or path, unconstrained: nothing to get wrong in it alone."""
    field = Settings.model_fields[name]
    return field.annotation in (str, Path, str | None, Path | None) and not field.metadata


def bad_values(name: str) -> list[str]:
    """Values that field ``name`` must refuse, most of them holding the secret."""
    field = Settings.model_fields[name]
    values = [SECRET, f"{SECRET} !"]  # the wrong type, or text no pattern allows
    for rule in field.metadata:
        for kind, step in ((annotated_types.Ge, -1), (annotated_types.Gt, 0)):
            if isinstance(rule, kind):
                values.append(str(getattr(rule, kind.__name__.lower()) + step))
        for kind, step in ((annotated_types.Le, 1), (annotated_types.Lt, 0)):
            if isinstance(rule, kind):
                values.append(str(getattr(rule, kind.__name__.lower()) + step))
    if name == "tokens":
        values += ["short", f"{SECRET},short", f"{SECRET}\u00e9"]
    if name == "redis_url":
        values.append(f"http://user:{SECRET}@localhost/")
    if name == "sinks":
        values.append(" , ")
    if typing.get_origin(field.annotation) is typing.Literal:
        values.append("bogus")
    return values


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_no_settings_error_echoes_a_value(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each field's refusals (types, bounds, patterns, its validators) name the variable and
    hold no value; every field that can be wrong is refused at least once."""
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    monkeypatch.setenv("RECEIVER_TOKENS", SECRET)
    variable = ENV_PREFIX + name.upper()
    refused = 0
    for value in bad_values(name):
        monkeypatch.setenv(variable, value)
        try:
            load_settings()
        except ConfigError as exc:
            refused += 1
            assert SECRET not in str(exc), (variable, value)
            assert value not in str(exc) or value in ("0", "1", "-1"), (variable, str(exc))
            assert str(exc).startswith(ENV_PREFIX) and variable in str(exc), str(exc)
    assert refused or free_form(name), f"no value of {variable} was refused"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"tls_key": Path("KEY")}, "RECEIVER_TLS_CERT"),
        ({"tls_cert": Path("CERT")}, "RECEIVER_TLS_KEY"),
        ({"sinks": []}, "RECEIVER_SINKS"),
        ({"webhook_url": "https://example.com/hook"}, "RECEIVER_WEBHOOK_SECRET"),
        ({"port": SECRET, "batch_ms": 1}, "RECEIVER_PORT"),
    ],
)
def test_model_validator_errors_name_variables_not_the_settings(
    overrides: dict[str, Any], variable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model validator's error carries every setting as its input: none of it is shown."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECEIVER_TOKENS", SECRET)
    monkeypatch.setenv("RECEIVER_REDIS_URL", f"redis://:{SECRET}@localhost/0")
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert str(info.value).startswith(f"{variable}: ")
    assert SECRET not in str(info.value)
    assert "redis" not in str(info.value)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--tls-key", "KEY"], {}),
        (["--tls-cert", "CERT"], {}),
        ([], {"RECEIVER_PORT": SECRET}),
        ([], {"RECEIVER_MAX_GAP_S": SECRET, "RECEIVER_MAX_MARKS": "-1"}),
        ([], {"RECEIVER_SINKS": " , "}),
        ([], {"RECEIVER_TOKENS": f"{SECRET},short"}),
        ([], {"RECEIVER_REDIS_URL": f"http://:{SECRET}@localhost/"}),
        ([], {"RECEIVER_REDIS_PREFIX": f"{SECRET}!"}),
        ([], {"RECEIVER_LOG_LEVEL": SECRET}),
    ],
)
def test_serve_never_prints_the_token_in_a_settings_error(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    """`receiver serve` with a token set and a bad setting: exit 2, one line, no token."""
    values = {"RECEIVER_TOKENS": SECRET, **env}
    result = run_receiver("serve", *args, cwd=tmp_path, env=env_with(**values))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("receiver: RECEIVER_"), result.stderr
    assert SECRET not in result.stdout + result.stderr
