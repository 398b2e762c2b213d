"""A Procfile (foreman, honcho, Heroku), with the `.env` beside it, as a pmon2 app file.

- Each `NAME: COMMAND` line is a service (the pattern foreman and honcho use, `^[A-Za-z0-9_-]+:\\s*(.+)$`);
  `#` lines and blank lines are skipped, and any other line is reported.
- The command is a shell command line there (foreman and honcho run it with `/bin/sh -c`), so here too:
  `command = ["sh", "-c", COMMAND]`. `$PORT` and the like in it are left to that shell.
- `cwd` is the Procfile's directory, and `env` what `.env` beside it holds (read by python-dotenv, without
  `${VAR}` expansion, as foreman and honcho read it).
- Ports as foreman and honcho give them: the n-th process type (from 0) gets PORT = 5000 + 100 * n, so
  `port = 5000 + 100 * n`, and with instances each one gets port + its number, as `honcho start -c web=2`
  does. A PORT in `.env` moves the base from 5000.
- Heroku's `release` type runs once per deploy, before the others; pmon2 has no deploy phase: reported.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pmon2.importers.formats import ConvertError, Unmapped, dollars, finish, service_name

PROCESS = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
BASE_PORT = 5000
PORT_STEP = 100
ONE_OFF = {"release": "Heroku runs release once per deploy, before the other processes; pmon2 has no deploy "
                      "phase: run it before pmon2 apply"}


def read_dotenv(path: str) -> dict[str, str]:
    """The variables of a .env file, as python-dotenv reads them, without `${VAR}` expansion (foreman and
    honcho expand nothing either): `KEY=VALUE`, `export KEY=VALUE`, quotes, comments."""
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path, interpolate=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    return {k: v for k, v in values.items() if v is not None}


def convert(path: str, *, env_name: str | None = None) -> tuple[dict[str, Any], Unmapped]:
    """A Procfile -> (app-file document, unmapped lines)."""
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    label = os.path.basename(path)
    unmapped: Unmapped = []
    if env_name:
        unmapped.append(("--env", "only pm2 files have env_NAME sections; a Procfile has none"))
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    env: dict[str, str] = {}
    dotenv = os.path.join(base, ".env")
    if os.path.isfile(dotenv):
        env = read_dotenv(dotenv)
    base_port = BASE_PORT
    if "PORT" in env:
        if re.fullmatch(r"\d{1,5}", env["PORT"].strip()):
            base_port = int(env.pop("PORT").strip())
        else:
            unmapped.append((".env:PORT", f"not a port number: {env['PORT']!r}"))

    services: dict[str, Any] = {}
    taken: set[str] = set()
    index = 0
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = PROCESS.match(line)
        if not match:
            unmapped.append((f"{label}:{number}", "not `NAME: COMMAND`: foreman and honcho skip this line"))
            continue
        kind, command = match[1], match[2].strip()
        port = base_port + PORT_STEP * index
        index += 1
        if kind in ONE_OFF:
            unmapped.append((f"{label}:{number}", f"{kind}: {ONE_OFF[kind]}"))
            continue
        name = service_name(kind, taken, unmapped, f"{label}:{number}")
        service: dict[str, Any] = {"command": ["sh", "-c", dollars(command)], "cwd": base,
                                   "env": {k: dollars(v) for k, v in env.items()}}
        if 0 < port <= 65535:
            service["port"] = port
        else:
            unmapped.append((f"{label}:{number}", f"its PORT would be {port}, not a port number"))
        services[name] = finish(service)
    if not services:
        raise ConvertError(f"{path}: no `NAME: COMMAND` line")
    return {"defaults": {}, "services": services}, unmapped
