"""Route policies: the TOML file that says which requests are allowed, and where they go.

::

    [gateway]                       # optional; limits of the built-in gateway
    max_request_bytes = 10485760

    [[upstreams]]
    name = "records"
    url = "http://127.0.0.1:9001"

    [[routes]]
    upstream = "records"            # optional: a route without one serves /authz only
    path = "/records/{rest:path}"   # {name} is one segment, {name:path} the rest
    methods = ["GET"]               # GET also allows HEAD; ["*"] is any method
    scope = "records:read"          # may use the path's names: "functions:invoke:{name}"
    project = "shop"                # optional: only tokens of this project
    environment = "live"            # optional: only live (or test) tokens
    rate_limit = "10/second;1000/hour"  # optional: per token, on this route
    cost = 5                        # optional: credits a request spends (default 1)
    mcp = "files"                   # optional: an MCP server; per-tool scopes (docs/agents.md)

An upstream may carry the provider's credential, added to every request the gateway forwards
(``credential_header`` or ``credential_query``, from ``credential_file`` or ``credential_env``;
see :mod:`~tokenward.gateway.credentials`).

Routes are tried in file order; the first whose method and path match decides. A request no
route matches is denied. Every problem is reported with the file, the line and the key, and
stops the server from starting.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tokenward.gateway import credentials
from tokenward.tokens.credits import MAX_COST
from tokenward.tokens.durations import DurationError, parse_rates
from tokenward.tokens.scopes import ScopeError, parse_scope

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")
_METHOD = re.compile(r"^[A-Z]{1,16}$")
_SEGMENT_VALUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class ConfigError(ValueError):
    """The route policy file is not valid; the message names file, line, key and problem."""


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    max_request_bytes: int = 10 * 1024 * 1024
    max_response_bytes: int = 100 * 1024 * 1024
    connect_timeout: float = 5.0
    timeout: float = 30.0
    pool_size: int = 100


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    connect_timeout: float
    timeout: float
    pool_size: int
    #: the provider's credential the gateway adds to every request (never the client's)
    credential: credentials.Credential | None = None
    #: scheme://host:port plus the URL's base path: a request path is appended to it
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        object.__setattr__(
            self, "prefix", f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        )


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    name: str
    methods: frozenset[str]  # empty: any method
    path: str
    regex: re.Pattern[str]
    scope: str
    upstream: Upstream | None = None
    project: str | None = None
    environment: str | None = None
    rate_limit: tuple[str, ...] = ()
    #: an MCP server's name: each JSON-RPC message is decided too (gateway/mcp.py)
    mcp: str | None = None
    #: credits a request on this route spends from a token with remaining uses
    cost: int = 1
    #: the path up to its first ``{name}``: a request path must start with it
    prefix: str = field(init=False)
    #: the route's limit as the verifier counts it (key, windows), if it has one
    limit: tuple[str, tuple[str, ...]] | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.path.partition("{")[0])
        limit = ("route:" + self.name, self.rate_limit) if self.rate_limit else None
        object.__setattr__(self, "limit", limit)

    def required_scope(self, params: Mapping[str, str]) -> str | None:
        """The scope with path names filled in; ``None`` if a value cannot be a scope segment."""
        if "{" not in self.scope:
            return self.scope
        values = {}
        for key, value in params.items():
            if not _SEGMENT_VALUE.match(value):
                return None
            values[key] = value
        return self.scope.format_map(values)


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    scope: str


@dataclass(slots=True)
class Policy:
    """The parsed file: upstreams, routes in order, gateway limits. Read-only once built."""

    routes: list[Route] = field(default_factory=list)
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    source: str = "(none)"
    #: PostgreSQL listeners (``[[postgres]]``), served next to the HTTP gateway
    postgres: list[PostgresListener] = field(default_factory=list)
    #: (method, proxied) → the routes that may match, in file order; a method that no route
    #: names has the routes of any method (``("", proxied)``), so the index stays bounded
    _index: dict[tuple[str, bool], tuple[Route, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, bool], tuple[Route, ...]] = {}
        named = {method for route in self.routes for method in route.methods}
        for method in (*named, ""):
            for proxied in (False, True):
                index[(method, proxied)] = tuple(
                    route
                    for route in self.routes
                    if (not route.methods or method in route.methods)
                    and not (proxied and route.upstream is None)
                    and not (not proxied and route.mcp is not None)  # /authz cannot read bodies
                )
        self._index = index

    def scopes(self) -> list[str]:
        """Every scope the policy asks for (a path's ``{name}`` as ``*``), in file order."""
        found = [_PARAM.sub("*", route.scope) for route in self.routes]
        found += [f"mcp:{route.mcp}:*" for route in self.routes if route.mcp is not None]
        for listener in self.postgres:
            found += [
                listener.read_scope,
                *([listener.write_scope] if listener.write_scope else []),
            ]
        return list(dict.fromkeys(found))

    def match(self, method: str, path: str, *, proxied: bool = False) -> Match | None:
        """The first route for ``method`` and the canonical ``path``, with its scope.

        ``proxied``: only routes with an upstream (the gateway's view; /authz sees all).
        """
        candidates = self._index.get((method, proxied))
        if candidates is None:
            candidates = self._index[("", proxied)]
        for route in candidates:
            if not path.startswith(route.prefix):
                continue
            found = route.regex.match(path)
            if found is None:
                continue
            scope = route.scope
            if "{" in scope:
                filled = route.required_scope(found.groupdict())
                if filled is None:
                    continue
                scope = filled
            return Match(route, scope)
        return None


def compile_path(path: str) -> tuple[re.Pattern[str], list[str]]:
    """``/records/{id}/{rest:path}`` → a regex with named groups, and the names."""
    pattern, names, pos = "^", [], 0
    for found in _PARAM.finditer(path):
        pattern += re.escape(path[pos : found.start()])
        name, kind = found.group(1), found.group(2)
        if name in names:
            raise ValueError(f"the name {{{name}}} appears twice")
        names.append(name)
        pattern += f"(?P<{name}>.*)" if kind == "path" else f"(?P<{name}>[^/]+)"
        pos = found.end()
    pattern += re.escape(path[pos:]) + "$"
    literal = _PARAM.sub("", path)
    if "{" in literal or "}" in literal:
        raise ValueError("use {name} for one segment or {name:path} for the rest")
    return re.compile(pattern), names


class _Locator:
    """Finds the line of ``[[routes]]`` number N and of a key in it (for error messages)."""

    _ARRAY = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_-]+)\s*\]\]")
    _TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, int | None, str | None], int] = {}
        counts: dict[str, int] = {}
        current: tuple[str, int | None] = ("", None)
        for number, line in enumerate(text.splitlines(), 1):
            if m := self._ARRAY.match(line):
                index = counts.get(m.group(1), 0)
                counts[m.group(1)] = index + 1
                current = (m.group(1), index)
                self.lines[(*current, None)] = number
            elif m := self._TABLE.match(line):
                current = (m.group(1), None)
                self.lines[(*current, None)] = number
            elif m := self._KEY.match(line):
                self.lines.setdefault((*current, m.group(1)), number)

    def line(self, table: str, index: int | None, key: str | None) -> int | None:
        return self.lines.get((table, index, key)) or self.lines.get((table, index, None))


class _Reader:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.locator = _Locator(text)

    def fail(self, table: str, index: int | None, key: str | None, problem: str) -> ConfigError:
        line = self.locator.line(table, index, key)
        where = f"{self.source}:{line}" if line else self.source
        name = table if index is None else f"{table}[{index}]"
        if key:
            name += f".{key}"
        return ConfigError(f"{where}: {name}: {problem}")

    def table(
        self, raw: Any, table: str, index: int | None, allowed: set[str], required: set[str]
    ) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(table, index, None, "must be a table")
        for key in raw:
            if key not in allowed:
                raise self.fail(
                    table, index, key, f"unknown key (allowed: {', '.join(sorted(allowed))})"
                )
        for key in sorted(required - raw.keys()):
            raise self.fail(table, index, None, f"the key '{key}' is required")
        return raw

    def number(
        self, raw: dict[str, Any], table: str, index: int | None, key: str, default: float
    ) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail(table, index, key, "must be a positive number")
        return float(value)

    def string(self, raw: dict[str, Any], table: str, index: int | None, key: str) -> str | None:
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.fail(table, index, key, "must be a non-empty string")
        return value


def load_policy(path: str | Path) -> Policy:
    """Read and check a route policy file; raises :class:`ConfigError` on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: the file is not UTF-8 text") from None
    return parse_policy(text, source)


def parse_policy(text: str, source: str = "<config>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    r = _Reader(source, text)
    r.table(data, "", None, {"gateway", "upstreams", "routes", "postgres"}, set())

    gw = r.table(
        data.get("gateway", {}),
        "gateway",
        None,
        {"max_request_bytes", "max_response_bytes", "connect_timeout", "timeout", "pool_size"},
        set(),
    )
    defaults = GatewayLimits()
    limits = GatewayLimits(
        max_request_bytes=int(
            r.number(gw, "gateway", None, "max_request_bytes", defaults.max_request_bytes)
        ),
        max_response_bytes=int(
            r.number(gw, "gateway", None, "max_response_bytes", defaults.max_response_bytes)
        ),
        connect_timeout=r.number(gw, "gateway", None, "connect_timeout", defaults.connect_timeout),
        timeout=r.number(gw, "gateway", None, "timeout", defaults.timeout),
        pool_size=int(r.number(gw, "gateway", None, "pool_size", defaults.pool_size)),
    )

    upstreams: dict[str, Upstream] = {}
    raw_upstreams = data.get("upstreams", [])
    if not isinstance(raw_upstreams, list):
        raise r.fail("upstreams", None, None, "use [[upstreams]] tables")
    for i, raw in enumerate(raw_upstreams):
        for key in credentials.INLINE_KEYS & (raw.keys() if isinstance(raw, dict) else set()):
            raise r.fail("upstreams", i, key, credentials.INLINE_PROBLEM)
        u = r.table(
            raw,
            "upstreams",
            i,
            {"name", "url", "connect_timeout", "timeout", "pool_size", *credentials.KEYS},
            {"name", "url"},
        )
        name = r.string(u, "upstreams", i, "name") or ""
        if not _NAME.match(name):
            raise r.fail("upstreams", i, "name", "letters, digits, '.', '_' and '-' only")
        if name in upstreams:
            raise r.fail("upstreams", i, "name", f"the upstream '{name}' is defined twice")
        url = r.string(u, "upstreams", i, "url") or ""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise r.fail("upstreams", i, "url", "must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise r.fail("upstreams", i, "url", "must not hold a query, fragment or credentials")
        upstreams[name] = Upstream(
            name=name,
            url=url,
            connect_timeout=r.number(u, "upstreams", i, "connect_timeout", limits.connect_timeout),
            timeout=r.number(u, "upstreams", i, "timeout", limits.timeout),
            pool_size=int(r.number(u, "upstreams", i, "pool_size", limits.pool_size)),
            credential=_credential(r, i, u),
        )

    routes: list[Route] = []
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        raise r.fail("routes", None, None, "use [[routes]] tables")
    for i, raw in enumerate(raw_routes):
        routes.append(_route(r, i, raw, upstreams))
    postgres = _postgres_listeners(r, data.get("postgres", []))
    return Policy(
        routes=routes, upstreams=upstreams, limits=limits, source=source, postgres=postgres
    )


def _credential(r: _Reader, i: int, u: dict[str, Any]) -> credentials.Credential | None:
    if not credentials.KEYS & u.keys():
        return None
    try:
        return credentials.load_credential(u)
    except credentials.CredentialError as exc:
        key, _, problem = str(exc).partition(": ")
        raise r.fail("upstreams", i, key, problem) from None


def _route(r: _Reader, i: int, raw: Any, upstreams: dict[str, Upstream]) -> Route:
    t = r.table(
        raw,
        "routes",
        i,
        {
            "name",
            "upstream",
            "path",
            "methods",
            "scope",
            "project",
            "environment",
            "rate_limit",
            "mcp",
            "cost",
        },
        {"path"} if isinstance(raw, dict) and "mcp" in raw else {"path", "methods", "scope"},
    )
    mcp_server = r.string(t, "routes", i, "mcp")
    if mcp_server is not None:  # an MCP server route: GET, POST, DELETE; a base scope
        if not _NAME.match(mcp_server):
            raise r.fail("routes", i, "mcp", "letters, digits, '.', '_' and '-' only")
        if "upstream" not in t:
            raise r.fail("routes", i, "upstream", "an mcp route needs an upstream")
        t = {"methods": ["GET", "POST", "DELETE"], "scope": f"mcp:{mcp_server}:connect", **t}
    path = r.string(t, "routes", i, "path") or ""
    if not path.startswith("/"):
        raise r.fail("routes", i, "path", "must start with '/'")
    try:
        regex, names = compile_path(path)
    except ValueError as exc:
        raise r.fail("routes", i, "path", str(exc)) from None

    methods = t["methods"]
    if not isinstance(methods, list) or not methods:
        raise r.fail("routes", i, "methods", 'must be a non-empty list such as ["GET", "POST"]')
    upper: set[str] = set()
    for method in methods:
        if not isinstance(method, str) or not (method == "*" or _METHOD.match(method.upper())):
            raise r.fail("routes", i, "methods", f"{method!r} is not an HTTP method")
        upper.add(method.upper())
    if "*" in upper:
        upper = set()
    elif "GET" in upper:
        upper.add("HEAD")

    scope = r.string(t, "routes", i, "scope") or ""
    used = _PARAM.findall(scope)
    for name, kind in used:
        if kind or name not in names:
            raise r.fail("routes", i, "scope", f"{{{name}}} is not a one-segment name of the path")
    try:
        parse_scope(_PARAM.sub("x", scope))
    except ScopeError as exc:
        raise r.fail("routes", i, "scope", str(exc)) from None

    upstream = None
    upstream_name = r.string(t, "routes", i, "upstream")
    if upstream_name is not None:
        upstream = upstreams.get(upstream_name)
        if upstream is None:
            raise r.fail("routes", i, "upstream", f"no [[upstreams]] is named '{upstream_name}'")

    environment = r.string(t, "routes", i, "environment")
    if environment not in (None, "live", "test"):
        raise r.fail("routes", i, "environment", "must be 'live' or 'test'")

    rate_limit: tuple[str, ...] = ()
    rate = r.string(t, "routes", i, "rate_limit")
    if rate is not None:
        try:
            rate_limit = tuple(parse_rates(rate))
        except DurationError as exc:
            raise r.fail("routes", i, "rate_limit", str(exc)) from None

    cost = t.get("cost", 1)
    if isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= MAX_COST:
        raise r.fail("routes", i, "cost", f"must be an integer from 0 to {MAX_COST}")

    name = r.string(t, "routes", i, "name") or f"{i}:{path}"
    return Route(
        index=i,
        name=name,
        methods=frozenset(upper),
        path=path,
        regex=regex,
        scope=scope,
        upstream=upstream,
        project=r.string(t, "routes", i, "project"),
        environment=environment,
        rate_limit=rate_limit,
        mcp=mcp_server,
        cost=cost,
    )


# -- [[postgres]]: PostgreSQL listeners (docs/databases.md) -----------------------------------

_PG_ENV = re.compile(r"^TOKENWARD_[A-Z0-9_]+$")
_PG_SSLMODES = ("disable", "require", "verify-full")
_PG_AUDIT = ("redacted", "full", "none")
#: the keys of a ``[[postgres]]`` table (docs/databases.md documents each)
POSTGRES_KEYS = frozenset(
    {
        "name",
        "listen",
        "upstream",
        "password_file",
        "password_env",
        "read_scope",
        "write_scope",
        "project",
        "environment",
        "rate_limit",
        "max_connections",
        "max_connections_per_token",
        "idle_timeout",
        "statement_timeout",
        "connect_timeout",
        "max_message_bytes",
        "audit_statements",
    }
)


@dataclass(frozen=True, slots=True)
class PostgresListener:
    """One ``[[postgres]]`` table: where clients connect, the server behind it, the scopes.

    The upstream login is tokenward's own (``upstream_user`` with the password read from
    ``password_file`` or ``password_env`` when the listener starts), never the client's.
    """

    name: str
    host: str
    port: int
    upstream_host: str
    upstream_port: int
    upstream_user: str
    upstream_database: str
    read_scope: str
    write_scope: str | None = None
    upstream_sslmode: str = "disable"
    password_file: str | None = None
    password_env: str | None = None
    project: str | None = None
    environment: str | None = None
    rate_limit: tuple[str, ...] = ()
    max_connections: int = 100
    max_connections_per_token: int = 10
    idle_timeout: float = 900.0  # 0: none
    statement_timeout: float = 0.0  # 0: none
    connect_timeout: float = 5.0
    max_message_bytes: int = 8 * 1024 * 1024
    audit_statements: str = "redacted"
    #: the listener's limit as the verifier counts it (key, windows), if it has one
    limit: tuple[str, tuple[str, ...]] | None = field(init=False)

    def __post_init__(self) -> None:
        limit = ("postgres:" + self.name, self.rate_limit) if self.rate_limit else None
        object.__setattr__(self, "limit", limit)

    def upstream_password(self) -> str | None:
        """The upstream role's password, read now (``ConfigError`` when it cannot be)."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if not value:
                raise ConfigError(f"postgres '{self.name}': {self.password_env} is not set")
            return value
        if self.password_file is not None:
            try:
                return Path(self.password_file).read_text(encoding="utf-8").strip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"postgres '{self.name}': cannot read {self.password_file} ({exc})"
                ) from None
        return None


def _split_listen(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host, int(port)) if host else None


def _postgres_listeners(r: _Reader, raw_list: Any) -> list[PostgresListener]:
    if not isinstance(raw_list, list):
        raise r.fail("postgres", None, None, "use [[postgres]] tables")
    listeners: list[PostgresListener] = []
    for i, raw in enumerate(raw_list):
        listener = _postgres(r, i, raw)
        for other in listeners:
            if other.name == listener.name:
                raise r.fail("postgres", i, "name", f"'{listener.name}' is defined twice")
            if listener.port and (other.host, other.port) == (listener.host, listener.port):
                raise r.fail("postgres", i, "listen", f"'{other.name}' listens there already")
        listeners.append(listener)
    return listeners


def _postgres(r: _Reader, i: int, raw: Any) -> PostgresListener:
    t = r.table(
        raw,
        "postgres",
        i,
        set(POSTGRES_KEYS),
        {"name", "listen", "upstream", "read_scope"},
    )
    name = r.string(t, "postgres", i, "name") or ""
    if not _NAME.match(name):
        raise r.fail("postgres", i, "name", "letters, digits, '.', '_' and '-' only")
    listen = _split_listen(r.string(t, "postgres", i, "listen") or "")
    if listen is None:
        raise r.fail("postgres", i, "listen", "must be host:port, e.g. 127.0.0.1:6432")
    url = r.string(t, "postgres", i, "upstream") or ""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise r.fail("postgres", i, "upstream", "must be a postgresql:// URL with a host")
    if parts.password is not None:
        raise r.fail(
            "postgres", i, "upstream", "must not hold a password: use password_file or password_env"
        )
    if not parts.username:
        raise r.fail("postgres", i, "upstream", "must name the role: postgresql://role@host/db")
    database = parts.path.lstrip("/")
    if not database or "/" in database:
        raise r.fail("postgres", i, "upstream", "must name the database: postgresql://role@host/db")
    sslmode = "disable"
    for key, _, value in (q.partition("=") for q in parts.query.split("&") if q):
        if key != "sslmode" or value not in _PG_SSLMODES:
            raise r.fail(
                "postgres", i, "upstream", f"only sslmode={'|'.join(_PG_SSLMODES)} may be given"
            )
        sslmode = value
    try:
        port = parts.port or 5432
    except ValueError:
        raise r.fail("postgres", i, "upstream", "the port is not a number") from None
    password_file = r.string(t, "postgres", i, "password_file")
    password_env = r.string(t, "postgres", i, "password_env")
    if password_file is not None and password_env is not None:
        raise r.fail("postgres", i, "password_env", "give password_file or password_env, not both")
    if password_env is not None and not _PG_ENV.match(password_env):
        raise r.fail("postgres", i, "password_env", "must be a TOKENWARD_* variable name")
    scopes: dict[str, str | None] = {}
    for key in ("read_scope", "write_scope"):
        scope = r.string(t, "postgres", i, key)
        if scope is not None:
            try:
                parse_scope(scope)
            except ScopeError as exc:
                raise r.fail("postgres", i, key, str(exc)) from None
        scopes[key] = scope
    environment = r.string(t, "postgres", i, "environment")
    if environment not in (None, "live", "test"):
        raise r.fail("postgres", i, "environment", "must be 'live' or 'test'")
    rate_limit: tuple[str, ...] = ()
    rate = r.string(t, "postgres", i, "rate_limit")
    if rate is not None:
        try:
            rate_limit = tuple(parse_rates(rate))
        except DurationError as exc:
            raise r.fail("postgres", i, "rate_limit", str(exc)) from None
    audit = r.string(t, "postgres", i, "audit_statements") or "redacted"
    if audit not in _PG_AUDIT:
        raise r.fail("postgres", i, "audit_statements", f"must be one of {', '.join(_PG_AUDIT)}")

    def seconds(key: str, default: float) -> float:
        value = t.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise r.fail("postgres", i, key, "must be a number of seconds (0: none)")
        return float(value)

    defaults = PostgresListener("", "", 0, "", 0, "", "", "")
    return PostgresListener(
        name=name,
        host=listen[0],
        port=listen[1],
        upstream_host=parts.hostname,
        upstream_port=port,
        upstream_user=parts.username,
        upstream_database=database,
        read_scope=scopes["read_scope"] or "",
        write_scope=scopes["write_scope"],
        upstream_sslmode=sslmode,
        password_file=password_file,
        password_env=password_env,
        project=r.string(t, "postgres", i, "project"),
        environment=environment,
        rate_limit=rate_limit,
        max_connections=int(
            r.number(t, "postgres", i, "max_connections", defaults.max_connections)
        ),
        max_connections_per_token=int(
            r.number(
                t, "postgres", i, "max_connections_per_token", defaults.max_connections_per_token
            )
        ),
        idle_timeout=seconds("idle_timeout", defaults.idle_timeout),
        statement_timeout=seconds("statement_timeout", defaults.statement_timeout),
        connect_timeout=r.number(t, "postgres", i, "connect_timeout", defaults.connect_timeout),
        max_message_bytes=int(
            r.number(t, "postgres", i, "max_message_bytes", defaults.max_message_bytes)
        ),
        audit_statements=audit,
    )
