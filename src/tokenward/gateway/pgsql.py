"""What the PostgreSQL gateway reads in a statement: its text for the audit log, with literal
values taken out, and whether it tries to leave a read-only session.

This is a lexer, not a parser: it knows PostgreSQL's comments, string constants (``'…'``,
``E'…'``, ``B'…'``, ``X'…'``, ``U&'…'``), dollar quoting (``$tag$…$tag$``), quoted
identifiers and numbers, which is what it takes to redact values and to find the few
statements that change a session's read-only mode. The server remains the one that enforces
read-only (``default_transaction_read_only=on`` from the startup packet); the check here
refuses the plain attempts early with a clear message, and the gateway watches the server's
``ParameterStatus`` reports for any attempt it did not recognise (docs/databases.md).
"""

from __future__ import annotations

import functools
import re

_TOKEN = re.compile(
    r"""(?P<line>--[^\n]*)
    |(?P<block>/\*)
    |(?P<string>(?:[eE]'(?:[^'\\]|\\.|'')*'|(?:[bBxXnN]|[uU]&)?'(?:[^']|'')*'))
    |(?P<open>(?:[eEbBxXnN]|[uU]&)?')
    |(?P<ident>(?:[uU]&)?"(?:[^"]|"")*"?)
    |(?P<dollar>\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$)
    |(?P<word>[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)
    |(?P<param>\$\d+)
    |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)""",
    re.VERBOSE | re.DOTALL,
)
_BLOCK = re.compile(r"/\*|\*/")
_SPACES = re.compile(r"\s+")
_LITERALS = frozenset({"string", "open", "dollar", "number"})

#: statements that turn a read-only session or transaction read-write (on lexed text)
_READ_WRITE = (
    re.compile(
        r'(?:^|;)\s*set\s+(?:session\s+|local\s+)?"?(?:default_transaction_read_only'
        r"|transaction_read_only)\b"
    ),
    re.compile(
        r"(?:^|;)\s*(?:begin|start\s+transaction|set\s+(?:session\s+characteristics\s+as\s+)?"
        r"transaction)\b[^;]*\bread\s+write\b"
    ),
    # a parameter name spelt with Unicode escapes cannot be read here: refused in a SET
    re.compile(r'(?:^|;)\s*set\b[^;]*u&"'),
)


def lex(sql: str, *, keep_literals: bool = False) -> str:
    """``sql`` with comments removed and, unless ``keep_literals``, every constant replaced
    by ``?`` (an unterminated one takes the rest of the text with it); whitespace is
    collapsed. Quoted identifiers and ``$1`` parameters stay."""
    out: list[str] = []
    pos, n = 0, len(sql)
    while pos < n:
        m = _TOKEN.search(sql, pos)
        if m is None:
            out.append(sql[pos:])
            break
        out.append(sql[pos : m.start()])
        kind = m.lastgroup
        end = m.end()
        if kind == "line":
            out.append(" ")
        elif kind == "block":
            depth = 1
            while depth:
                b = _BLOCK.search(sql, end)
                if b is None:
                    end = n
                    break
                depth += 1 if b.group(0) == "/*" else -1
                end = b.end()
            out.append(" ")
        elif kind == "open":
            end = n
            out.append(sql[m.start() :] if keep_literals else "?")
        elif kind == "dollar":
            close = sql.find(m.group(0), end)
            end = n if close < 0 else close + len(m.group(0))
            out.append(sql[m.start() : end] if keep_literals else "?")
        elif kind in _LITERALS and not keep_literals:
            out.append("?")
        else:
            out.append(m.group(0))
        pos = end
    return _SPACES.sub(" ", "".join(out)).strip()


_PLAIN_NUMBER = re.compile(r"(?<![\w$])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_SPECIAL = re.compile(r"['\"$]|--|/\*")


@functools.lru_cache(maxsize=1024)
def redact(sql: str) -> str:
    """The statement as the audit log keeps it: comments out, constants as ``?``."""
    if _SPECIAL.search(sql) is None:  # no string, comment or dollar: only numbers to replace
        return _SPACES.sub(" ", _PLAIN_NUMBER.sub("?", sql)).strip()
    return lex(sql)


def verb(lexed: str) -> str:
    """The statement's first keyword in capitals (``SELECT``), for the event's ``method``."""
    word = lexed.lstrip("( ").split(" ", 1)[0]
    return "".join(ch for ch in word if ch.isalpha()).upper()[:16] or "QUERY"


def leaves_read_only(sql: str) -> bool:
    """Whether ``sql`` tries to make the session or a transaction read-write: ``SET`` of
    ``default_transaction_read_only`` / ``transaction_read_only``, ``BEGIN`` / ``START
    TRANSACTION`` / ``SET TRANSACTION`` / ``SET SESSION CHARACTERISTICS`` with ``READ
    WRITE``, or ``set_config`` naming a read-only parameter."""
    if "read" not in sql.lower() and "u&" not in sql.lower():
        return False
    code = lex(sql).lower()
    if any(pattern.search(code) for pattern in _READ_WRITE):
        return True
    return "set_config" in code and "read_only" in lex(sql, keep_literals=True).lower()
