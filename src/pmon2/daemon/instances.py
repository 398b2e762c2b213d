"""Instances of a service (`instances = N`): their names, and the per-instance values in argv and env.

A service with N instances is N services named NAME:0 ... NAME:N-1 (`:` is reserved for this: no user
name contains it), each with `instance_of = NAME` and its number in the stored spec. `${instance}` and
`${port}` in argv and env values are expanded per instance when it is launched; with `port`, each
instance also gets PORT = port + its number, as honcho and foreman do.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = ":"


def name(group: str, number: int) -> str:
    return f"{group}{SEPARATOR}{number}"


def group_of(spec: dict[str, Any], name_: str) -> str:
    """The group a service belongs to: NAME for NAME:i, else its own name."""
    return spec.get("instance_of") or name_


def expand(text: str, number: int | None, port: int | None) -> str:
    """${instance} and ${port} in one string (other ${...} were expanded by the CLI, from the caller's
    environment, or are the service's own business)."""
    if "${" not in text:
        return text
    if number is not None:
        text = text.replace("${instance}", str(number))
    if port is not None:
        text = text.replace("${port}", str(port))
    return text


def launch_values(spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The argv and env one instance is launched with."""
    number = spec.get("instance")
    base_port = spec.get("port")
    port = None if base_port is None else base_port + (number or 0)
    if number is None and port is None:
        return spec["argv"], spec["env"]
    argv = [expand(a, number, port) for a in spec["argv"]]
    env = {k: expand(v, number, port) for k, v in spec["env"].items()}
    if port is not None:
        env["PORT"] = str(port)
    return argv, env
