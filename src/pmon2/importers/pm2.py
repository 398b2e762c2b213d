"""pm2 ecosystem files (`ecosystem.config.js`, `.json`, `.yaml`) as a pmon2 app file.

Reading:
- `.config.js` (`.cjs`, `.mjs`) is JavaScript: it runs through `node` (no shell, with a timeout), which
  prints the exported object as JSON. Without node the import says so and stops;
- `.json` is read as JSON; pm2 itself evaluates it as JavaScript, so a file with comments or trailing
  commas is handed to node too when JSON refuses it;
- `.yaml` / `.yml` needs PyYAML.
The file holds `{apps: [...]}` (a bare list of apps, or one app, are accepted as pm2 accepts them).

The keys, as pm2 reads them (lib/Common.js, lib/API/schema.json):
- `name` (default: the script's basename without its extension), `script` (aliases `cmd`, `command`),
  `args` (a list, or a string split with shell rules), `cwd` (relative to the ecosystem file; default its
  directory);
- `interpreter` (`exec_interpreter`) and `interpreter_args` (`node_args`): the command is
  `[interpreter, *interpreter_args, script, *args]`, or `[script, *args]` for `"none"`. Without one, pm2's
  table by extension (.js node, .py python, or python3 when there is no `python`, .sh bash, ...); a script
  found on PATH (`npm`, `sleep`) or an executable file (a binary, a `#!` script) runs as it is, other files
  under node. A script with a space in it is a command line: `["bash", "-c", SCRIPT]`, as pm2 does. A
  python interpreter gets PYTHONUNBUFFERED=1, as pm2 gives it;
- `env`, merged with `env_NAME` for `pmon2 import FILE --env NAME` (pm2's `--env`); values that are not
  strings are written as pm2 writes them (numbers as text, objects as JSON);
- `instances` (a number; "max" or 0: os.cpu_count(); -N: that many fewer) → `instances`. pm2 gives each
  process NODE_APP_INSTANCE (or `instance_var`): `${instance}`. `increment_var = "PORT"` → `port`;
- `exec_mode: "cluster"` (pm2's default for node with `instances`) is unmapped: pmon2 runs separate
  processes, so with a PORT each instance gets its own, PORT = port + its number;
- `autorestart: false` → restart = "no"; `stop_exit_codes` → restart = "on-failure" with
  success_exit_codes; `autostart`, `max_restarts`;
- `min_uptime` (ms, or "10s", "1m", "1h"), `kill_timeout` (ms) → seconds; `restart_delay` and
  `exp_backoff_restart_delay` (ms) → `backoff_base` (pmon2's delay doubles after each fast exit in a row);
- `out_file` / `error_file` → `log_dir` (pmon2 names the files NAME-out.log, NAME-err.log), the same file
  for both, `log_file`, or `merge_logs` → one `log`;
- `uid` / `user`, `gid` → user, group; `namespace` → a tag.
Everything else is reported: features pmon2 has not (yet): watch, cron_restart, max_memory_restart,
wait_ready...; and keys it does not know.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from typing import Any

from pmon2.importers.formats import ConvertError, Unmapped, dollars, finish, log_fields, seconds, service_name, tag_name

NODE_TIMEOUT = 20.0
# lib/API/interpreter.json, plus the module forms node runs itself
INTERPRETERS = {".sh": "bash", ".py": "python", ".rb": "ruby", ".php": "php", ".pl": "perl", ".js": "node",
                ".mjs": "node", ".cjs": "node", ".coffee": "coffee", ".ls": "lsc", ".ts": "bun", ".tsx": "bun"}
# Prints what a .config.js exports, as JSON: import() reads CommonJS (its module.exports) and ES modules alike.
NODE_LOAD = ("const p = require('path').resolve(process.argv[1]);"
             "import(require('url').pathToFileURL(p).href).then((m) => {"
             " const v = m.default !== undefined ? m.default : m;"
             " process.stdout.write(JSON.stringify(v === undefined ? null : v) || 'null'); })"
             ".catch((e) => { process.stderr.write(String((e && e.message) || e)); process.exitCode = 1; });")
# pm2 evaluates a .json "process file" as a JavaScript expression: comments and trailing commas pass.
NODE_EVAL = ("const fs = require('fs'), vm = require('vm');"
             "const v = vm.runInNewContext('(' + fs.readFileSync(process.argv[1], 'utf8') + ')', {}, {timeout: 5000});"
             "process.stdout.write(JSON.stringify(v));")

NOT_YET = "not in pmon2 yet"
UNMAPPED = {
    "watch": f"{NOT_YET}: pmon2 does not restart a service when its files change",
    "ignore_watch": f"{NOT_YET}: goes with watch",
    "watch_delay": f"{NOT_YET}: goes with watch",
    "watch_options": f"{NOT_YET}: goes with watch",
    "cron_restart": f"{NOT_YET}: no restarts on a schedule (a cron job can run `pmon2 restart NAME`)",
    "max_memory_restart": f"{NOT_YET}: no restart on memory use",
    "wait_ready": "pmon2 has no ready message: set `ready` to a tcp://, http:// or exec: check",
    "listen_timeout": "goes with wait_ready: with a `ready` check, `start_timeout` is the limit",
    "shutdown_with_message": "pmon2 stops a service with a signal (stop_signal)",
    "kill_retry_time": "pmon2 sends SIGKILL once, when kill_timeout has passed",
    "time": "pmon2 does not put a time in front of log lines",
    "log_date_format": "pmon2 does not put a time in front of log lines",
    "log_type": "pmon2 logs are plain text",
    "disable_logs": "pmon2 always keeps a service's output",
    "pid_file": "pmon2 keeps the pids itself (pmon2 ls --json)",
    "filter_env": "the service's environment is the file's env; nothing is inherited to filter",
    "source_map_support": "a Node.js option of pm2: add --enable-source-maps to interpreter_args",
    "vizion": "pm2's version-control metadata has no pmon2 counterpart",
    "post_update": "pm2's version-control metadata has no pmon2 counterpart",
    "automation": "pm2.io monitoring has no pmon2 counterpart",
    "pmx": "pm2.io monitoring has no pmon2 counterpart",
    "trace": "pm2.io monitoring has no pmon2 counterpart",
    "disable_trace": "pm2.io monitoring has no pmon2 counterpart",
    "deep_monitoring": "pm2.io monitoring has no pmon2 counterpart",
    "force": "pmon2 apply never starts a service twice",
    "windowsHide": "Windows only",
    "exec_mode": "pmon2 has no cluster mode: use instances with a port",
}
TOP_LEVEL = {"deploy": "pm2 deploy (git pull and hooks on remote hosts) is not part of pmon2"}
TIME_UNITS = {"h": 3_600_000, "m": 60_000, "s": 1000}


# reading the file


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise ConvertError("node is not installed, and a .config.js file is JavaScript: install node, or save "
                           "the apps as ecosystem.json")
    return node


def _run_node(script: str, path: str) -> Any:
    try:
        proc = subprocess.run([_node(), "-e", script, path], capture_output=True, text=True,
                              timeout=NODE_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConvertError(f"{path}: node took more than {NODE_TIMEOUT:g} s to load it") from None
    except OSError as exc:
        raise ConvertError(f"{path}: node could not run: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or "").strip().splitlines() or [f"node exited with {proc.returncode}"]
        raise ConvertError(f"{path}: node could not load it: {lines[0]}")
    try:
        return json.loads(proc.stdout or "null")
    except ValueError:
        raise ConvertError(f"{path}: node printed no JSON") from None


def load(path: str) -> Any:
    """What an ecosystem file holds, as JSON values."""
    low = path.lower()
    if low.endswith((".js", ".cjs", ".mjs")):
        return _run_node(NODE_LOAD, path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if low.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConvertError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or save the apps "
                               "as ecosystem.json") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConvertError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        if shutil.which("node") is None:
            raise ConvertError(f"{path}: not JSON: {exc}") from None
        return _run_node(NODE_EVAL, path)


def _apps(data: Any, path: str, unmapped: Unmapped) -> list[Any]:
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: holds no apps (a pm2 ecosystem file exports {{apps: [...]}})")
    if "apps" not in data:
        if "script" in data:
            return [data]
        if "services" in data:
            raise ConvertError(f"{path}: this looks like a pmon2 app file already: use pmon2 apply {path}")
        raise ConvertError(f"{path}: holds no apps (a pm2 ecosystem file exports {{apps: [...]}})")
    for key in data:
        if key != "apps":
            unmapped.append((key, TOP_LEVEL.get(key, "not part of pm2's apps")))
    apps = data["apps"]
    return apps if isinstance(apps, list) else [apps]


# values


def _ms(value: Any, key: str) -> float:
    """pm2's durations: milliseconds as a number or numeric string, or "10s", "5m", "1h"."""
    if isinstance(value, bool):
        raise ConvertError(f"{key}: not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([hms]?)", text)
    if not match:
        raise ConvertError(f"{key}: not a duration: {value!r} (milliseconds, or 10s, 5m, 1h)")
    return float(match[1]) * TIME_UNITS.get(match[2], 1)


def _env_value(value: Any) -> str | None:
    """An env value as node hands it to a child: text, numbers as JavaScript prints them, objects as JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float | str):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _env(value: Any, key: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConvertError(f"{key}: must be an object of variables, not {type(value).__name__}")
    out = {}
    for k, v in value.items():
        text = _env_value(v)
        if text is not None:
            out[str(k)] = text
    return out


def _words(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [_env_value(v) or "" for v in value]
    try:
        return shlex.split(str(value))
    except ValueError as exc:
        raise ConvertError(f"{key}: {exc}") from None


def _instances(value: Any) -> int:
    """pm2's `instances`: "max" and 0 are one per CPU, -N is N fewer than the CPUs."""
    if value is None:
        return 1
    if isinstance(value, str):
        value = 0 if value.strip() == "max" else (int(value) if re.fullmatch(r"-?\d+", value.strip()) else 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 1
    count = int(value)
    cpus = os.cpu_count() or 1
    if count == 0:
        return cpus
    if count < 0:
        return max(1, cpus + count)
    return count


def _runs_itself(path: str) -> bool:
    """A file that the kernel can run as it is: a binary, or a script with a #! line."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith((b"\x7fELF", b"#!"))


def _log_path(value: Any, cwd: str) -> str | None:
    if value is None or value is False or value is True:
        return None
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(str(value))))


# one app


def convert_app(app: dict[str, Any], index: int, base: str, env_name: str | None, unmapped: Unmapped,
                taken: set[str], selected: set[str]) -> tuple[str, dict[str, Any]]:
    """One app -> (its name, its service); `selected` gets env_name when the app has env_NAME."""
    a = dict(app)
    script = a.get("script") or a.get("cmd") or a.get("command")
    derived = os.path.splitext(os.path.basename(script))[0] if isinstance(script, str) else ""
    label = str(a.get("name") or derived or f"apps[{index}]")

    def pop(*keys: str) -> Any:
        found = None
        for key in keys:
            if key in a:
                value = a.pop(key)
                if found is None:
                    found = value
        return found

    def note(key: str, why: str) -> None:
        unmapped.append((f"{label}.{key}", why))

    script = pop("script", "cmd", "command")
    if not isinstance(script, str) or not script.strip():
        raise ConvertError(f"{label}: no script: pm2 needs `script` (the program to run)")
    raw_name = pop("name") or derived  # pm2's default: the script's basename without its extension
    if pop("append_env_to_name") is True and env_name:
        raw_name = f"{raw_name}-{env_name}"
    name = service_name(str(raw_name), taken, unmapped, f"{label}.name")

    cwd_value = pop("cwd")
    cwd = os.path.normpath(os.path.join(base, os.path.expanduser(str(cwd_value)))) if cwd_value else base
    args = _words(pop("args"), f"{label}.args")
    interpreter = pop("interpreter", "exec_interpreter")
    interpreter_args = _words(pop("interpreter_args", "node_args"), f"{label}.interpreter_args")

    # the command
    if " " in script.strip():
        shell = "bash" if shutil.which("bash") else "sh"
        command = [shell, "-c", script.strip()]
        interpreter = "none"
        if args:
            note("args", f"pm2 ignores args when script is a command line: it runs `{shell} -c SCRIPT`")
    else:
        path = os.path.normpath(os.path.join(cwd, os.path.expanduser(script)))
        on_path = False
        if not os.path.exists(path) and "/" not in script and shutil.which(script):
            path, on_path = script, True
        elif not os.path.exists(path):
            note("script", f"{path} does not exist (yet)")
        if interpreter is None:
            interpreter = INTERPRETERS.get(os.path.splitext(path)[1].lower())
            if interpreter == "python" and not shutil.which("python") and shutil.which("python3"):
                interpreter = "python3"
            if interpreter is None:
                interpreter = "none" if on_path or _runs_itself(path) else "node"
        interpreter = str(interpreter)
        if interpreter == "none":
            command = [path, *args]
            if interpreter_args:
                note("interpreter_args", "there is no interpreter (interpreter = \"none\") to give them to")
        else:
            command = [interpreter, *interpreter_args, path, *args]

    # the environment
    env = _env(pop("env"), f"{label}.env")
    envs = {k[4:]: a.pop(k) for k in list(a) if k.startswith("env_") and isinstance(a[k], dict)}
    if env_name and env_name in envs:
        env.update(_env(envs.pop(env_name), f"{label}.env_{env_name}"))
        selected.add(env_name)
    for other in envs:
        note(f"env_{other}", f"another environment: `pmon2 import FILE --env {other}` uses it")
    env = {k: dollars(v) for k, v in env.items()}
    if "python" in os.path.basename(interpreter):
        env["PYTHONUNBUFFERED"] = "1"

    # instances and ports
    raw_instances = pop("instances")
    instances = _instances(raw_instances)
    exec_mode = pop("exec_mode")
    mode = str(exec_mode).removesuffix("_mode") if exec_mode is not None else None
    if mode is None and raw_instances is not None and re.search(r"(node|bun)$", os.path.basename(interpreter)):
        mode = "cluster"  # pm2's default for node with `instances`
    port_key = pop("port")
    if port_key is not None:
        env["PORT"] = dollars(_env_value(port_key) or "")
    increment_var = pop("increment_var")
    instance_var = str(pop("instance_var") or "NODE_APP_INSTANCE")
    port = None
    if instances > 1:
        wanted = increment_var == "PORT" or mode == "cluster"
        if wanted and re.fullmatch(r"\d{1,5}", env.get("PORT", "")) and 0 < int(env["PORT"]) <= 65536 - instances:
            port = int(env.pop("PORT"))
        if increment_var is not None and increment_var != "PORT":
            note("increment_var", f"pmon2 adds the instance number to PORT only (`port`), not to {increment_var}")
        env[instance_var] = "${instance}"
    if mode == "cluster" and instances > 1:
        why = UNMAPPED["exec_mode"]
        if port is not None:
            why += f" (done: each instance gets its own PORT = {port} + its number)"
        note("exec_mode", why)
    elif mode not in (None, "fork", "cluster"):
        note("exec_mode", f"unknown exec_mode {exec_mode!r}")

    service: dict[str, Any] = {"command": [dollars(w) for w in command], "cwd": cwd,
                               "env": env}
    user = pop("uid", "user")
    if user is not None:
        service["user"] = str(user)
    group = pop("gid")
    if group is not None:
        service["group"] = str(group)

    # restarts
    autostart = pop("autostart")
    if autostart is False:
        service["autostart"] = False
    autorestart = pop("autorestart")
    stop_codes = pop("stop_exit_codes")
    if autorestart is False or autorestart == "false":
        service["restart"] = "no"
        if stop_codes is not None:
            note("stop_exit_codes", "autorestart is false: no exit restarts it")
    elif stop_codes is not None:
        codes = stop_codes if isinstance(stop_codes, list) else [stop_codes]
        try:
            service["restart"] = "on-failure"
            service["success_exit_codes"] = sorted({int(c) for c in codes})
        except (TypeError, ValueError):
            raise ConvertError(f"{label}.stop_exit_codes: not a list of exit codes: {stop_codes!r}") from None
    max_restarts = pop("max_restarts")
    if max_restarts is not None:
        try:
            service["max_restarts"] = int(max_restarts)
        except (TypeError, ValueError):
            raise ConvertError(f"{label}.max_restarts: not a whole number: {max_restarts!r}") from None
    min_uptime = pop("min_uptime")
    if min_uptime is not None:
        service["min_uptime"] = seconds(_ms(min_uptime, f"{label}.min_uptime") / 1000)
    restart_delay = pop("restart_delay")
    exp_backoff = pop("exp_backoff_restart_delay")
    delay = exp_backoff if exp_backoff is not None else restart_delay
    if exp_backoff is not None and restart_delay is not None:
        note("restart_delay", "exp_backoff_restart_delay is the backoff_base")
    if delay is not None:
        base_s = _ms(delay, f"{label}.restart_delay") / 1000
        if base_s > 0:
            service["backoff_base"] = seconds(base_s)
            if base_s > 15:
                service["backoff_cap"] = seconds(base_s)
    kill_timeout = pop("kill_timeout")
    if kill_timeout is not None:
        service["kill_timeout"] = seconds(_ms(kill_timeout, f"{label}.kill_timeout") / 1000)

    # logs
    out = pop("out_file", "output")
    err = pop("error_file", "error")
    combined = pop("log_file", "log")
    merge = pop("merge_logs", "combine_logs")
    for key, value in (("out_file", out), ("error_file", err), ("log_file", combined)):
        if value in ("/dev/null", "NULL"):
            note(key, "pmon2 always keeps a service's output: it goes to pmon2's log dir")
    out, err, combined = ((None if v in ("/dev/null", "NULL") else v) for v in (out, err, combined))
    out_path, err_path, log_path = (_log_path(v, cwd) for v in (out, err, combined))
    if log_path is not None:
        service["log"] = log_path
        for key, value in (("out_file", out_path), ("error_file", err_path)):
            if value is not None and value != log_path:
                note(key, f"pmon2 writes one file per service here: log_file, {log_path}")
    elif merge is True and out_path is not None and err_path is not None and out_path != err_path:
        service["log"] = out_path
        note("error_file", f"merge_logs: stdout and stderr both go to one file, {out_path}")
    else:
        service.update(log_fields(name, out_path, err_path, (f"{label}.out_file", f"{label}.error_file"),
                                  unmapped, instances))
    if combined is True:
        note("log_file", "pmon2 has no third, combined log: see pmon2 log NAME")

    if instances != 1:
        service["instances"] = instances
    if port is not None:
        service["port"] = port
    namespace = pop("namespace")
    if namespace not in (None, "default"):
        tag = tag_name(str(namespace))
        if tag is None:
            note("namespace", f"{namespace!r} is not a valid tag name")
        else:
            service["tags"] = [tag]

    treekill = pop("treekill")
    if treekill is False:
        note("treekill", "pmon2 always signals the whole process group")
    for key in list(a):
        value = a.pop(key)
        if key in ("watch", "ignore_watch") and value in (False, None, [], ""):
            continue
        if key in ("time", "wait_ready", "automation", "pmx", "vizion", "force", "source_map_support",
                   "disable_logs", "trace", "deep_monitoring") and value is False:
            continue
        if key in ("exec_mode",):
            continue
        note(key, UNMAPPED.get(key, "not a pm2 key that pmon2 knows"))
    return name, finish(service)


def convert(path: str, *, env_name: str | None = None) -> tuple[dict[str, Any], Unmapped]:
    """An ecosystem file -> (app-file document, unmapped keys)."""
    path = os.path.abspath(path)
    unmapped: Unmapped = []
    apps = _apps(load(path), path, unmapped)
    services: dict[str, Any] = {}
    taken: set[str] = set()
    selected: set[str] = set()
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            raise ConvertError(f"{path}: apps[{i}] is not an object")
        name, service = convert_app(app, i, os.path.dirname(path), env_name, unmapped, taken, selected)
        services[name] = service
    if not services:
        raise ConvertError(f"{path}: holds no apps")
    if env_name and not selected:
        unmapped.append(("--env", f"no app has env_{env_name}: it added nothing"))
    return {"defaults": {}, "services": services}, unmapped
