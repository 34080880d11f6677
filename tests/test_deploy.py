"""The deployment files a new user starts from: docker-compose.yml and the Dockerfile.

No Docker engine runs on the CI machines, so these check the files themselves: the compose file
parses and hangs together (every service, volume and health check it names exists), and both
agree with the receiver's own commands and settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from receiver.cli import build_parser
from receiver.settings import Settings

ROOT = Path(__file__).parent.parent


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_hangs_together() -> None:
    """Services receiver and redis exist; volumes, dependencies and env names are all known."""
    data = compose()
    services = data["services"]
    assert {"receiver", "redis"} <= set(services)
    declared_volumes = set(data.get("volumes", {}))
    known_settings = {f"RECEIVER_{name.upper()}" for name in Settings.model_fields}
    for name, service in services.items():
        assert "image" in service or service.get("build") == ".", name
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source in declared_volumes, f"{name}: undeclared volume {source}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name}: depends on unknown {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} has no health check"
        for variable in service.get("environment", {}):
            if variable.startswith("RECEIVER_"):
                assert variable in known_settings, f"{name}: unknown setting {variable}"
    receiver = services["receiver"]
    assert "redis" in receiver["environment"]["RECEIVER_SINKS"].split(",")
    assert receiver["environment"]["RECEIVER_REDIS_URL"].startswith("redis://redis:")
    assert receiver["healthcheck"]["test"] == ["CMD", "receiver", "health"]


def test_compose_and_dockerfile_commands_exist() -> None:
    """The commands the compose file and the Dockerfile run are receiver subcommands."""
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["receiver"]' in dockerfile
    assert 'CMD ["serve"]' in dockerfile and "serve" in subcommands
    assert 'CMD ["receiver", "health"]' in dockerfile and "health" in subcommands
    assert "USER receiver" in dockerfile
    for service in compose()["services"].values():
        command = service.get("command")
        if service.get("build") == "." and command:
            assert command[0] in subcommands
