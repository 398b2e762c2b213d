"""Shell completion scripts for bash, zsh and fish, made from the CLI's own parser.

Service names come from `pmon2 _names`, which asks a running pmond and never starts one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    names: tuple[str, ...]
    help: str
    flags: tuple[str, ...]
    takes_service: bool
    choices: tuple[str, ...]


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    by_parser: dict[int, list[str]] = {}
    parsers: dict[int, argparse.ArgumentParser] = {}
    for name, p in sub.choices.items():
        by_parser.setdefault(id(p), []).append(name)
        parsers[id(p)] = p
    out = []
    for key, names in by_parser.items():
        if names[0].startswith("_"):
            continue
        p = parsers[key]
        flags: list[str] = []
        takes_service = False
        choices: tuple[str, ...] = ()
        for action in p._actions:
            flags.extend(o for o in action.option_strings if o.startswith("--"))
            if action.dest == "service":
                takes_service = True
            if not action.option_strings and action.choices:
                choices = tuple(action.choices)
        out.append(Command(tuple(names), helps.get(names[0], ""), tuple(flags), takes_service, choices))
    return out


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    cmds = commands(parser)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](cmds)


def _bash(cmds: list[Command]) -> str:
    all_names = " ".join(n for c in cmds for n in c.names)
    flag_cases = "\n".join(f"        {'|'.join(c.names)}) opts=\"{' '.join(c.flags)}\" ;;" for c in cmds)
    service_cmds = "|".join(n for c in cmds if c.takes_service for n in c.names)
    choice_cases = "\n".join(
        f"        {'|'.join(c.names)}) COMPREPLY=($(compgen -W \"{' '.join(c.choices)}\" -- \"$cur\"));;"
        for c in cmds if c.choices)
    return f"""# bash completion for pmon2: source it, or put it in /etc/bash_completion.d/pmon2
_pmon2() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" cmd="${{COMP_WORDS[1]}}" opts=""
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{all_names} --help --version" -- "$cur"))
        return
    fi
    case "$cmd" in
{flag_cases}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    case "$cmd" in
        {service_cmds}) COMPREPLY=($(compgen -W "$(pmon2 _names 2>/dev/null)" -- "$cur"));;
        run|exec) COMPREPLY=($(compgen -c -f -- "$cur"));;
{choice_cases}
    esac
}}
complete -F _pmon2 pmon2
"""


def _zsh_quote(text: str) -> str:
    return text.replace("'", "'\\''").replace(":", "\\:")


def _zsh(cmds: list[Command]) -> str:
    described = "\n".join(f"    '{_zsh_quote(n)}:{_zsh_quote(c.help)}'" for c in cmds for n in c.names)
    flag_cases = "\n".join(f"    {'|'.join(c.names)}) opts=({' '.join(c.flags)});;" for c in cmds)
    service_cmds = "|".join(n for c in cmds if c.takes_service for n in c.names)
    choice_cases = "\n".join(f"      {'|'.join(c.names)}) compadd -- {' '.join(c.choices)};;"
                             for c in cmds if c.choices)
    return f"""#compdef pmon2
# zsh completion for pmon2: put it in a directory of $fpath as _pmon2, or source it
_pmon2() {{
  local -a commands opts
  commands=(
{described}
  )
  if (( CURRENT == 2 )); then
    _describe 'command' commands
    return
  fi
  case ${{words[2]}} in
{flag_cases}
  esac
  if [[ $PREFIX == -* ]]; then
    compadd -- $opts
    return
  fi
  case ${{words[2]}} in
    {service_cmds}) compadd -- ${{(f)"$(pmon2 _names 2>/dev/null)"}};;
    run|exec) _command_names -e; _files;;
{choice_cases}
  esac
}}
if [[ "${{funcstack[1]}}" == "_pmon2" ]]; then
  _pmon2 "$@"
else
  compdef _pmon2 pmon2
fi
"""


def _fish(cmds: list[Command]) -> str:
    lines = ["# fish completion for pmon2: save as ~/.config/fish/completions/pmon2.fish",
             "complete -c pmon2 -f"]
    for c in cmds:
        for n in c.names:
            lines.append(f"complete -c pmon2 -n __fish_use_subcommand -a {n} -d '{c.help.replace(chr(39), '')}'")
        seen = f"__fish_seen_subcommand_from {' '.join(c.names)}"
        for flag in c.flags:
            lines.append(f"complete -c pmon2 -n '{seen}' -l {flag[2:]}")
        if c.takes_service:
            lines.append(f"complete -c pmon2 -n '{seen}' -a '(pmon2 _names 2>/dev/null)'")
        if c.choices:
            lines.append(f"complete -c pmon2 -n '{seen}' -a '{' '.join(c.choices)}'")
        if "run" in c.names:
            lines.append(f"complete -c pmon2 -n '{seen}' -F")
    return "\n".join(lines) + "\n"
