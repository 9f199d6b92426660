"""Permissions: what a session's policy says of one tool call (allow, ask or deny).

`bash` may be ruled by its command line; the rules are globs, documented in the
README ("Approvals"). What happens to a call that is asked about is
`shared.approvals`.

A glob over the raw command line is easy to sneak past: `\\rm x`, `/bin/rm x`,
`r''m x`, `env rm x` and `if true; then rm x; fi` all run `rm` without reading
as `rm *`. So the line is also read roughly as the shell would: cut into the
simple commands it chains, each with its quotes and backslashes removed, the
words that only lead to the command (keywords, assignments, redirections,
wrappers such as `env`, `exec`, `nohup`, `timeout`) dropped, and the command
named by its file name. It is still not a shell: what a command does with its
arguments (`find -delete`, `python3 -c`, `xargs rm`) is not seen.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import msgspec

from shared.models import CommandRules, Permissions, Verdict


class Ruling(msgspec.Struct, frozen=True):
    """What a session's permissions say of one tool call, and which entry said it."""

    verdict: Verdict
    rule: str


# Longer command lines, or ones chaining more commands, are asked about
# without reading them: ruling costs the worker's loop time per command and pattern.
MAX_RULED_CHARS = 65_536
MAX_RULED_COMMANDS = 256

# Where a shell command line chains another: each piece is checked on its own,
# so `ls; rm -rf x` is asked about like `rm -rf x`. Cutting also inside quotes
# only ever finds more pieces to check.
_CHAIN = re.compile(r"[;&|\n(){}`]|\$\(")
# `2>&1`, `>&-`: a redirection, not a command run in the background.
_FD_DUP = re.compile(r"([<>])&(?=[0-9-])")
# `$((6*7))` is arithmetic, not a subshell; a `$(` inside it still cuts.
_ARITHMETIC = re.compile(r"\$\(\(")
_KEYWORDS = frozenset({"!", "if", "then", "else", "elif", "do", "while", "until", "coproc"})
# Commands that run the rest of their words as a command, and their options
# that take a value of their own.
_WRAPPERS: dict[str, frozenset[str]] = {
    "command": frozenset(),
    "time": frozenset(),
    "busybox": frozenset(),
    "xargs": frozenset({"-I", "-n", "-L", "-P", "-s", "-d", "-E", "-a"}),
    "builtin": frozenset(),
    "exec": frozenset({"-a"}),
    "nohup": frozenset(),
    "eval": frozenset(),
    "env": frozenset({"-u", "-C", "-S", "--unset", "--chdir"}),
    "nice": frozenset({"-n", "--adjustment"}),
    "ionice": frozenset({"-c", "-n", "-p"}),
    "setsid": frozenset(),
    "stdbuf": frozenset({"-i", "-o", "-e"}),
    "sudo": frozenset({"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U"}),
    "doas": frozenset({"-u", "-C"}),
    "chroot": frozenset(),
    "timeout": frozenset({"-s", "-k", "--signal", "--kill-after"}),
}
# After their options, these take one more word before the command.
_WRAPPER_OPERAND = frozenset({"timeout", "chroot"})
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
_REDIRECTION = re.compile(r"[0-9]*(<<<|<<-?|<>|>>|>\||[<>]&?|&>>?)(.*)", re.DOTALL)
# A command name the matcher cannot read: the shell expands it.
_EXPANDED = re.compile(r"[$*?\[]")
_TESTS = frozenset({"[", "[["})  # the test command, not a glob


def rule_for(permissions: Permissions, name: str, tool_input: dict[str, Any]) -> Ruling:
    """The session's ruling on a call: the tool's own entry, else `*`, else allow."""
    if name in permissions:
        entry = permissions[name]
        where = name
    elif "*" in permissions:
        entry, where = permissions["*"], "*"
    else:
        return Ruling("allow", "default")
    if isinstance(entry, str):
        return Ruling(entry, where)
    command = tool_input.get("command")
    return command_ruling(entry, command if isinstance(command, str) else "")


def allowed_by_name(permissions: Permissions, name: str) -> bool:
    """Whether every call of this tool runs without asking, whatever its input."""
    for key in (name, "*"):
        if key in permissions:
            return permissions[key] == "allow"
    return True


def command_ruling(rules: CommandRules, command: str) -> Ruling:
    """deny, then ask, then allow; a command that matches none is asked about.

    Deny and ask patterns match the whole line, or any simple command of it as
    written or as read (`simple_commands`). Allow patterns must match every
    simple command of the line (as written or as read): a chain is let through
    only when each command in it is. A command whose name the shell expands
    (`$RM`, `r[m]`) is asked about when there are deny or ask patterns, which
    it could otherwise pass. A line too long or too chained to read in a few
    milliseconds is asked about."""
    whole = command.strip()
    if len(whole) > MAX_RULED_CHARS:
        return Ruling("ask", "bash: a command line too long to rule on")
    commands = simple_commands(whole, quoted=True)
    split = simple_commands(whole)
    if len(split) > MAX_RULED_COMMANDS:
        return Ruling("ask", "bash: a command line of too many commands to rule on")
    candidates = [whole, *(text for pair in commands + split for text in pair)]
    for verdict, patterns in (("deny", rules.deny), ("ask", rules.ask)):
        for pattern in patterns:
            if any(_glob(pattern).fullmatch(text) for text in candidates):
                return Ruling(verdict, f"bash {verdict} {pattern!r}")  # type: ignore[arg-type]
    names = {read.split(" ", 1)[0] for _, read in commands + split}
    if (rules.deny or rules.ask) and any(_EXPANDED.search(n) for n in names - _TESTS):
        return Ruling("ask", "bash: a command name the shell expands")
    if rules.allow and commands:
        matched = []
        for pair in commands:
            found = next((p for p in rules.allow if any(_glob(p).fullmatch(t) for t in pair)), None)
            if found is None:
                break
            matched.append(found)
        else:
            return Ruling("allow", f"bash allow {matched[0]!r}")
    return Ruling("ask", "bash: no rule matched")


def simple_commands(line: str, *, quoted: bool = False) -> list[tuple[str, str]]:
    """Each simple command the line chains: as written, and as read (quotes and
    backslashes removed, leading keywords, assignments, redirections and
    wrappers dropped, the command by its file name). Empty ones are left out.
    With `quoted`, an operator inside quotes does not cut (as in the shell);
    without it, it does too (more pieces to check)."""
    line = line.replace("\\\n", "")
    line = _ARITHMETIC.sub("$[", _FD_DUP.sub(r"\1", line))
    if quoted:
        line = _mask_quoted(line)
    found: list[tuple[str, str]] = []
    for piece in _CHAIN.split(line):
        written = piece.strip().translate(_UNMASK) if quoted else piece.strip()
        if not written:
            continue
        for read in _read(_words(written)):
            found.append((written, read))
    return found


# Operators inside quotes stand in for themselves as these private characters.
_MASK = {c: chr(0xE000 + i) for i, c in enumerate(";&|\n(){}`")}
_UNMASK = str.maketrans({v: k for k, v in _MASK.items()})


def _mask_quoted(line: str) -> str:
    """The line with the operators inside quotes masked: in single quotes every
    one, in double quotes all but those of a `$(...)` or backtick command in
    them, which runs there."""
    out: list[str] = []
    stack = [""]  # "'", '"', or a command: "" (the line), "$(" or "`" in it
    i = 0
    while i < len(line):
        char, top = line[i], stack[-1]
        following = line[i + 1 : i + 2]
        if char == "\\" and top != "'":
            out.append(char + following)
            i += 2
            continue
        if top == "'":
            if char == "'":
                stack.pop()
            out.append(_MASK.get(char, char))
        elif char == "$" and following == "(":
            stack.append("$(")
            out.append("$(")
            i += 1
        elif top == '"':
            if char == '"':
                stack.pop()
            elif char == "`":
                stack.append("`")
            out.append(char if char in '"`' else _MASK.get(char, char))
        else:
            if char in "'\"":
                stack.append(char)
            elif (top == "$(" and char == ")") or (top == "`" and char == "`"):
                stack.pop()
            elif top == "$(" and char == "(":
                stack.append("$(")
            elif char == "`":
                stack.append("`")
            out.append(char)
        i += 1
    return "".join(out)


def _words(text: str) -> list[str]:
    """The words of a piece with quotes removed and backslashes applied."""
    words: list[str] = []
    word: list[str] = []
    started = False
    quote = ""
    chars = iter(text)
    for char in chars:
        if quote:
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"':
                word.append(next(chars, ""))
            else:
                word.append(char)
        elif char in "'\"":
            quote, started = char, True
        elif char == "\\":
            word.append(next(chars, ""))
            started = True
        elif char.isspace():
            if started or word:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(char)
    if started or word:
        words.append("".join(word))
    return words


def _read(words: list[str], depth: int = 0) -> list[str]:
    """The command these words run, as `name args...`; a shell's `-c` script or
    `eval`'s words are read as the commands they are (a few levels deep)."""
    i = 0
    while i < len(words):
        word = words[i]
        redirection = _REDIRECTION.fullmatch(word)
        if word in _KEYWORDS or _ASSIGNMENT.match(word):
            i += 1
        elif redirection:
            i += 1 if redirection.group(2) else 2  # `>file` or `> file`
        elif word in _WRAPPERS:
            takes_value = _WRAPPERS[word]
            i += 1
            while i < len(words) and words[i].startswith("-"):
                i += 2 if words[i] in takes_value else 1
            while i < len(words) and _ASSIGNMENT.match(words[i]):  # env NAME=value
                i += 1
            if word in _WRAPPER_OPERAND:
                i += 1
            if word == "eval" and depth < 3:
                return _read(_words(" ".join(words[i:])), depth + 1) if i < len(words) else []
        else:
            break
    if i >= len(words):
        return []
    name = words[i].rsplit("/", 1)[-1] if "/" in words[i] and words[i] != "/" else words[i]
    rest = words[i + 1 :]
    read = [" ".join([name, *rest])]
    if name in _SHELLS and depth < 3:
        for j, arg in enumerate(rest):
            if not arg.startswith("-"):
                break
            if "c" in arg.lstrip("-") and not arg.startswith("--") and j + 1 < len(rest):
                script = rest[j + 1]
                read += [r for _, r in simple_commands(script)]  # shorter each time
                break
    return read


class _Glob:
    """`*` any run of characters (spaces and `/` too), `?` one; the rest literal.

    Matched without backtracking: the pieces between stars have fixed lengths,
    so each is placed at its leftmost fit after the one before (the first at the
    start, the last at the end). A regex of `.*` runs costs exponential time on
    patterns such as `*a*a*a*a*b` (minutes for 100 characters, with every turn
    of the worker stalled meanwhile); this costs at most the text's length per
    piece."""

    __slots__ = ("first", "last", "middle", "stars")

    def __init__(self, pattern: str) -> None:
        parts = pattern.split("*")
        self.stars = len(parts) > 1
        self.first, self.last = _fixed(parts[0]), _fixed(parts[-1])
        self.middle = [_fixed(part) for part in parts[1:-1] if part]

    def fullmatch(self, text: str) -> bool:
        first, first_len = self.first
        if not self.stars:
            return first.fullmatch(text) is not None
        last, last_len = self.last
        start, end = first_len, len(text) - last_len
        if start > end or not first.fullmatch(text, 0, start) or not last.fullmatch(text, end):
            return False
        for piece, _ in self.middle:
            found = piece.search(text, start, end)
            if found is None:
                return False
            start = found.end()
        return True


def _fixed(text: str) -> tuple[re.Pattern[str], int]:
    """A piece of a pattern without stars, and how many characters it matches."""
    source = "".join("." if c == "?" else re.escape(c) for c in text)
    return re.compile(source, re.DOTALL), len(text)


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> _Glob:
    return _Glob(pattern)
