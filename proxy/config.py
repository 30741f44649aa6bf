"""The YAML config: read once, `${VAR}` expanded, validated into immutable settings.

Every problem becomes one `ConfigError` that names the file and the dotted key, and never
carries a secret's value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from proxy.errors import ConfigError

TOKEN_URLS = {
    "eu": "https://techwolf.eu.auth0.com/oauth/token",
    "us": "https://techwolf-us.us.auth0.com/oauth/token",
}

# RFC 6749 appendix A.4: a scope token is one or more of these characters.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")

# `$${` escapes a literal `${`; a `${` that is neither escaped nor well formed is an error.
# A default holds no `${` of its own (escaped, it is a literal): variables do not nest, and
# `${A:-${B}}` must not quietly become the text `${B}`.
_VARIABLE = re.compile(
    r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^$}]|\$\$\{|\$(?!\{))*))?\}|\$\{"
)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a listener binds: a TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen_address(value: object) -> ListenAddress:
    """Parse `host:port`, `[v6]:port` or `unix:/path`; port 0 lets the OS choose one."""
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str):
        raise ValueError("expected host:port or unix:/path/to.sock")
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {path!r}")
        return ListenAddress(path=path)

    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise ValueError(f"expected host:port or unix:/path/to.sock, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if int(port) > 65535:
        raise ValueError(f"port must be at most 65535, got {port}")
    return ListenAddress(host=host, port=int(port))


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(value: str) -> str:
    """`value` without a user:password part, query or fragment (any of which may hold a
    secret), for messages."""
    try:
        url = URL(value)
    except ValueError:
        return "<unparseable URL>"
    url = url.with_query(None).with_fragment(None)
    if not url.absolute:
        # No host, so yarl saw no user or password; but it reads `user:pw@host` as the
        # scheme `user` and a path.
        return "<URL without a host>" if "@" in str(url) else str(url)
    return str(url.with_user(None).with_password(None))


def _service_url(value: str, *, what: str) -> str:
    """Validate an http(s) URL the proxy sends credentials or tokens to; drop a trailing /.

    Plain http is refused unless the host is loopback: a client secret or a bearer token
    must not cross a network in clear (RFC 6750 section 5.3).
    """
    try:
        url = URL(value)
    except ValueError as exc:
        raise ValueError(f"{what} is not a valid URL: {exc}") from None
    shown = redact_url(value)
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ValueError(f"{what} must be an https:// URL with a host, got {shown!r}")
    if url.raw_user is not None or url.raw_password is not None:
        raise ValueError(f"{what} must not carry a user or password, got {shown!r}")
    if url.raw_query_string or url.raw_fragment:
        raise ValueError(f"{what} must not have a query or fragment, got {shown!r}")
    if url.scheme == "http" and not is_loopback(url.host):
        raise ValueError(
            f"{what} uses plain http to a host that is not loopback ({shown!r}); "
            "use https so that secrets and tokens are encrypted in transit"
        )
    return str(url).rstrip("/")


def _lowered(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _file_mode(value: object) -> int:
    """A permission mode such as `"0660"` (or YAML's octal 0660, already an int)."""
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        value = int(value.replace("o", ""), 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError('expected permission bits in octal, such as "0660"')
    return value


def _not_a_boolean(value: object) -> object:
    # pydantic would read `true` as 1 second.
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds, not true or false")
    return value


Listen = Annotated[ListenAddress, BeforeValidator(parse_listen_address)]
PositiveSeconds = Annotated[float, BeforeValidator(_not_a_boolean), Field(gt=0)]
Seconds = Annotated[float, BeforeValidator(_not_a_boolean), Field(ge=0)]
NonEmpty = Annotated[str, Field(min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UpstreamSettings(_Section):
    """The Skill Engine server requests are forwarded to."""

    url: str
    connect_timeout: PositiveSeconds = 10.0
    read_timeout: PositiveSeconds = 60.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _service_url(value, what="the upstream URL")


def parse_proxy_url(value: str) -> URL:
    """An outbound proxy's address: an http:// or https:// URL with a host and nothing after
    it. It may carry user:password, so messages show it through `redact_url`."""
    try:
        url = URL(value)
    except ValueError:
        raise ValueError("is not a valid URL") from None
    shown = redact_url(value)
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {shown!r}")
    if url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment:
        raise ValueError(
            f"must be a proxy address such as http://proxy.example:3128, got {shown!r}"
        )
    if url.user is not None and ":" in url.user:
        # RFC 7617 section 2: Basic credentials cannot tell such a name from its password.
        raise ValueError("the proxy user name must not contain ':'")
    return url


class NetworkSettings(_Section):
    """How the proxy reaches the token endpoints and the upstreams: proxies and TLS.

    The files are tried at load, so that one the proxy cannot use is an error naming its
    key, not a failed connection later. They are read again when the proxy starts.
    """

    trust_env: bool = True
    """Take the outbound proxy from HTTPS_PROXY, HTTP_PROXY and NO_PROXY."""
    proxy: SecretStr | None = None
    """The outbound proxy's URL, ahead of the environment's; secret, as it may hold a
    password."""
    ca_file: Path | None = None
    """More CA certificates to trust, beside the system's, for every outbound connection."""
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure_skip_verify: bool = False
    """Do not verify the upstream's certificate. The token endpoint is verified regardless."""

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_proxy_url(value.get_secret_value())
        return value

    @field_validator("ca_file", "client_cert")
    @classmethod
    def _check_certificates(cls, value: Path | None) -> Path | None:
        if value is not None:
            # A client certificate file is read as a CA bundle too: it must hold a certificate.
            _try_tls_file(value, lambda context: context.load_verify_locations(cafile=value))
        return value

    @field_validator("client_key")
    @classmethod
    def _check_client_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        certificate = info.data.get("client_cert")
        if value is None or certificate is None:
            return value
        # password=b"": an encrypted key fails here instead of OpenSSL asking on the terminal.
        _try_tls_file(
            value,
            lambda context: context.load_cert_chain(certificate, value, password=b""),
            certificate=certificate,
        )
        return value

    @model_validator(mode="after")
    def _check_pair(self) -> NetworkSettings:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("set client_cert and client_key together, or neither")
        return self


def _try_tls_file(
    path: Path, load: Callable[[ssl.SSLContext], None], *, certificate: Path | None = None
) -> None:
    """Load `path` into a throwaway context; a ValueError says why it cannot be used, and
    never quotes the file."""
    try:
        content = path.read_bytes()
        load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    except ssl.SSLError as exc:
        if certificate is None:
            raise ValueError(f"{path} holds no PEM certificate") from None
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{path} is not the key of the certificate {certificate}") from None
        if b"ENCRYPTED" in content:
            raise ValueError(
                f"{path} is encrypted; the proxy needs the key unencrypted (protect the "
                "file with its permissions instead)"
            ) from None
        raise ValueError(f"{path} holds no PEM private key") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


class AuthSettings(_Section):
    """Client credentials and the token they buy.

    After `load_settings`, `client_secret` holds the secret even when it came from
    `client_secret_file`.
    """

    region: Literal["eu", "us"] | None = None
    token_url: str | None = None
    client_id: NonEmpty
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_next: SecretStr | None = None
    """The next secret during a rotation: tried when the current one is rejected."""
    client_secret_next_file: Path | None = None
    audience: NonEmpty
    tenant: NonEmpty
    scopes: tuple[str, ...] | None = None
    refresh_margin: Seconds = 60.0
    refresh_at: Annotated[float, BeforeValidator(_not_a_boolean), Field(gt=0, le=1)] = 0.8
    idle_after: PositiveSeconds = 3600.0
    prefetch: bool = True

    @field_validator("token_url")
    @classmethod
    def _check_token_url(cls, value: str | None) -> str | None:
        return None if value is None else _service_url(value, what="the token URL")

    @field_validator("client_secret", "client_secret_next")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        if value is not None and not _is_utf8_text(value.get_secret_value()):
            # An environment variable of bytes that are not UTF-8, or a YAML \ud800 escape:
            # such a secret cannot be sent in a JSON body.
            raise ValueError("must be text UTF-8 can carry (it holds a lone surrogate)")
        return value

    @field_validator("scopes")
    @classmethod
    def _normalise_scopes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _scope_set(value)

    @model_validator(mode="after")
    def _check_choices(self) -> AuthSettings:
        if self.region is None and self.token_url is None:
            raise ValueError("set region (eu or us) or token_url")
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError("set exactly one of client_secret and client_secret_file")
        if self.client_secret_next is not None and self.client_secret_next_file is not None:
            raise ValueError("set at most one of client_secret_next and client_secret_next_file")
        return self

    @property
    def resolved_token_url(self) -> str:
        if self.token_url is not None:
            return self.token_url
        assert self.region is not None
        return TOKEN_URLS[self.region]

    @property
    def secret(self) -> SecretStr:
        assert self.client_secret is not None, "load_settings reads client_secret_file"
        return self.client_secret

    def secret_files(self) -> list[Path]:
        """The files the secrets were read from, to notice when they change."""
        files = (self.client_secret_file, self.client_secret_next_file)
        return [file for file in files if file is not None]


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _scope_set(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A configured scope set, sorted and without repeats; None stands for all scopes."""
    if value is None:
        return None
    if not value:
        raise ValueError("must name at least one scope; omit the key for all scopes")
    for scope in value:
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise ValueError(f"{scope!r} is not a valid scope name")
    return tuple(sorted(set(value)))


ScopeSet = Annotated[tuple[str, ...] | None, AfterValidator(_scope_set)]


class TenantSettings(_Section):
    """One tenant of `tenants:`: its credentials and, if it differs, its upstream."""

    auth: AuthSettings
    upstream: UpstreamSettings | None = None


class RouteSettings(_Section):
    """How requests find their tenant and scope set; a route matches when all it names does.

    `listen`: the request came to this extra listener (a route without one serves the main
    `listen`); `prefix`: the path starts with it (stripped before forwarding); `header`:
    the X-Skill-Engine-Tenant header names the tenant. `scopes` are those requests may ask
    for, and get when they do not ask.
    """

    listen: Listen | None = None
    prefix: str | None = None
    header: bool = False
    tenant: str | None = None
    scopes: ScopeSet = None

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or any(c in value for c in "?# \t"):
            raise ValueError(f"must be a path such as /acme, got {value!r}")
        stripped = value.rstrip("/")
        if not stripped:
            raise ValueError("must not be / alone: leave prefix out to match every path")
        return stripped

    @model_validator(mode="after")
    def _check_tenant(self) -> RouteSettings:
        if self.header and self.tenant is not None:
            raise ValueError("a header route takes its tenant from X-Skill-Engine-Tenant")
        if not self.header and self.tenant is None:
            raise ValueError("name a tenant, or set header: true")
        return self


class TokenStoreSettings(_Section):
    """Where tokens live: this process, this node (files), or the fleet (Redis)."""

    backend: Literal["memory", "file", "redis"] = "memory"
    path: Path = Path("/tmp/skill-engine-proxy")  # noqa: S108 - the contract's default
    url: str = "redis://127.0.0.1:6379/0"
    lock_timeout: PositiveSeconds = 40.0
    """redis: seconds the lock of a replica fetching a token lasts, so that one that died
    holding it holds the others up no longer. Longer than a token request may take (30 s),
    or a slow fetcher loses its lock and another replica fetches too."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except ValueError:
            raise ValueError("is not a valid URL") from None
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {url.scheme!r}")
        return value


class LogSettings(_Section):
    """What the proxy logs, and in which form."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lowered)] = (
        "info"
    )
    format: Literal["json", "text"] = "json"
    access: bool = True
    """One line per request on the access logger."""


class ShutdownSettings(_Section):
    """How the proxy stops after SIGTERM or SIGINT."""

    drain_delay: Seconds = 5.0
    """Seconds `/readyz` answers 503 while the proxy still serves, so that load balancers
    and Kubernetes endpoints stop sending before the listeners close."""
    timeout: Seconds = 30.0
    """Seconds requests in flight get to finish once the listeners are closed."""


DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Tenant:
    """A tenant as the proxy uses it: its name in the config, credentials and upstream."""

    name: str
    auth: AuthSettings
    upstream: UpstreamSettings


class Settings(_Section):
    """The whole config file."""

    listen: Listen = ListenAddress(host="127.0.0.1", port=8080)
    admin_listen: Listen | None = ListenAddress(host="127.0.0.1", port=9090)
    upstream: UpstreamSettings | None = None
    auth: AuthSettings | None = None
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    routes: tuple[RouteSettings, ...] = ()
    network: NetworkSettings = NetworkSettings()
    token_store: TokenStoreSettings = TokenStoreSettings()
    replay_body_limit: Annotated[int, BeforeValidator(_not_a_boolean), Field(ge=0)] = 65536
    """Largest request body (bytes, known length) kept to replay after an upstream 401."""
    unix_socket_mode: Annotated[int, BeforeValidator(_file_mode)] = 0o660
    """Permissions of the socket files of `unix:` listeners: who may connect."""
    client_header_timeout: PositiveSeconds = 60.0
    """Seconds a client connection gets to send a complete request head, from when it opens
    or its previous answer ended; then it is closed (idle keep-alive ones too)."""
    log: LogSettings = LogSettings()
    shutdown: ShutdownSettings = ShutdownSettings()

    def secret_files(self) -> list[Path]:
        """Every file a client secret was read from."""
        auths = [tenant.auth for tenant in self.all_tenants().values()]
        return [file for auth in auths for file in auth.secret_files()]

    def all_tenants(self) -> dict[str, Tenant]:
        """Every tenant by name; the top-level auth and upstream are "default"."""
        tenants = {}
        if self.auth is not None:
            assert self.upstream is not None, "checked at load"
            tenants[DEFAULT_TENANT] = Tenant(DEFAULT_TENANT, self.auth, self.upstream)
        for name, tenant in self.tenants.items():
            upstream = tenant.upstream or self.upstream
            assert upstream is not None, "checked at load"
            tenants[name] = Tenant(name, tenant.auth, upstream)
        return tenants

    def all_routes(self) -> tuple[RouteSettings, ...]:
        """The routes, or with none configured, one that sends everything to the only tenant."""
        if self.routes:
            return self.routes
        (only,) = self.all_tenants()
        return (RouteSettings(tenant=only),)


def load_settings(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, expand and validate the config file at `path`; raise `ConfigError`."""
    file = str(path)
    document = _read_yaml(file)
    expanded = expand_variables(document, os.environ if environ is None else environ, file=file)
    try:
        settings = Settings.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(file, [_describe(error) for error in exc.errors()]) from None
    problems = _cross_check(settings)
    if problems:
        raise ConfigError(file, problems)
    return _with_secret_files_read(settings, file=file)


def _cross_check(settings: Settings) -> list[tuple[str | None, str]]:
    """What no single section can check: tenants, their upstreams, and the routes to them."""
    problems: list[tuple[str | None, str]] = []
    if settings.auth is None and not settings.tenants:
        problems.append(("auth", "field required (or name tenants under tenants:)"))
    if settings.auth is not None and settings.upstream is None:
        problems.append(("upstream", "field required"))
    if settings.auth is not None and DEFAULT_TENANT in settings.tenants:
        problems.append(
            (f"tenants.{DEFAULT_TENANT}", "the top-level auth is the tenant named default")
        )
    for name, tenant in settings.tenants.items():
        if tenant.upstream is None and settings.upstream is None:
            problems.append((f"tenants.{name}.upstream", "field required (no top-level upstream)"))
    if problems:
        return problems

    tenants = settings.all_tenants()
    if not settings.routes and len(tenants) > 1:
        problems.append(("routes", "field required when several tenants are configured"))
    taken = {"listen": settings.listen}
    if settings.admin_listen is not None:
        problems += _listener_clash("admin_listen", settings.admin_listen, taken)
        taken["admin_listen"] = settings.admin_listen
    for index, route in enumerate(settings.routes):
        key = f"routes[{index}]"
        if route.tenant is not None and route.tenant not in tenants:
            known = ", ".join(sorted(tenants))
            problems.append((f"{key}.tenant", f"unknown tenant {route.tenant!r} (known: {known})"))
            continue
        if route.listen is not None:
            problems += _listener_clash(f"{key}.listen", route.listen, taken)
            taken[f"{key}.listen"] = route.listen
        problem = _scopes_beyond_tenants(route, tenants)
        if problem is not None:
            problems.append((f"{key}.scopes", problem))
    return problems + _shared_tenant_names(tenants)


def _listener_clash(
    key: str, address: ListenAddress, taken: dict[str, ListenAddress]
) -> list[tuple[str | None, str]]:
    """`key`'s `address` as a problem if it cannot be bound beside one of `taken`: at start
    it would fail with "address already in use", naming no key."""
    for other_key, other in taken.items():
        if _shares_a_socket(address, other):
            where = "" if str(address) == str(other) else f" ({other})"
            return [
                (
                    key,
                    f"{address} is already taken by {other_key}{where}; give each listener "
                    "an address of its own",
                )
            ]
    return []


def _shares_a_socket(first: ListenAddress, second: ListenAddress) -> bool:
    """Whether binding both addresses would clash: the same socket path, or the same port
    (but not 0, for which the OS picks a free one each time) on hosts that overlap."""
    if first.is_unix or second.is_unix:
        return first.path == second.path
    if first.port != second.port or first.port == 0:
        return False
    return any(
        _hosts_overlap(one, other)
        for one in _bound_hosts(first.host)
        for other in _bound_hosts(second.host)
    )


def _bound_hosts(host: str) -> list[IPAddress | str]:
    """The addresses a listener on `host` binds: localhost is both loopback addresses, no
    host at all every address, and another name stands for itself (it is resolved later)."""
    if host.lower() == "localhost":
        return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    if not host:
        return [ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")]
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return [host.lower()]


def _hosts_overlap(one: IPAddress | str, other: IPAddress | str) -> bool:
    if isinstance(one, str) or isinstance(other, str):
        return one == other
    # 0.0.0.0 takes every IPv4 address; asyncio binds :: for IPv6 alone (IPV6_V6ONLY).
    wildcard = one.is_unspecified or other.is_unspecified
    return one.version == other.version and (one == other or wildcard)


def _scopes_beyond_tenants(route: RouteSettings, tenants: dict[str, Tenant]) -> str | None:
    """Why `route.scopes` asks for more than a tenant it can lead to allows; None if not.

    A header route can lead to every tenant, so each must allow its scopes: otherwise a
    request for a tenant with narrower `auth.scopes` would get a token for scopes the
    tenant's config never allowed.
    """
    if route.scopes is None:
        return None
    if not route.header:
        assert route.tenant is not None
        allowed = tenants[route.tenant].auth.scopes
        if allowed is not None and not set(route.scopes) <= set(allowed):
            return f"must be among the tenant's auth.scopes {list(allowed)}"
        return None
    for tenant in tenants.values():
        allowed = tenant.auth.scopes
        if allowed is not None and not set(route.scopes) <= set(allowed):
            return (
                "a header route can pick every tenant, and tenant "
                f"{tenant.name} allows only its auth.scopes {list(allowed)}; narrow the "
                "route's scopes, or leave them out so that each tenant's auth.scopes apply"
            )
    return None


def _shared_tenant_names(tenants: dict[str, Tenant]) -> list[tuple[str | None, str]]:
    """Tenants that are the same client twice, or that share an `auth.tenant` with other
    credentials: metrics are labelled by `auth.tenant` alone, so two clients of one tenant
    would add up in the same series and overwrite each other's gauges."""
    problems: list[tuple[str | None, str]] = []
    clients: dict[tuple[str, str, str, str], str] = {}
    names: dict[str, str] = {}
    for name, resolved in tenants.items():
        auth = resolved.auth
        client = (auth.resolved_token_url, auth.client_id, auth.audience, auth.tenant)
        if client in clients:
            problems.append(
                (
                    f"tenants.{name}.auth",
                    f"same token URL, client_id, audience and tenant as {clients[client]}",
                )
            )
        elif auth.tenant in names:
            problems.append(
                (
                    f"tenants.{name}.auth.tenant",
                    f"{auth.tenant!r} is also the auth.tenant of {names[auth.tenant]}, with "
                    "another token URL, client_id or audience; metrics are labelled by "
                    "auth.tenant alone, so configure one client per tenant (routes can give "
                    "it several scope sets)",
                )
            )
        clients[client] = name
        names.setdefault(auth.tenant, name)
    return problems


# The most that is read of a config file and of a secret file: a path to something endless
# (/dev/zero) or huge is refused instead of filling the memory. (A pipe whose writer keeps it
# open still blocks the read, as it would any program's.)
CONFIG_FILE_LIMIT = 1024 * 1024
SECRET_FILE_LIMIT = 64 * 1024


def _read_text(path: Path, limit: int) -> str | None:
    """The UTF-8 text of `path`, or None if it holds more than `limit` bytes."""
    with path.open("rb") as stream:
        data = stream.read(limit + 1)
    return None if len(data) > limit else data.decode("utf-8")


def _size(limit: int) -> str:
    return f"{limit // 1024 // 1024} MiB" if limit % (1024 * 1024) == 0 else f"{limit // 1024} KiB"


def _read_yaml(file: str) -> dict[str, Any]:
    try:
        text = _read_text(Path(file), CONFIG_FILE_LIMIT)
    except OSError as exc:
        raise ConfigError(file, [(None, f"cannot read the file: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(file, [(None, "the file is not UTF-8 text")]) from None
    if text is None:
        problem = f"the file holds more than {_size(CONFIG_FILE_LIMIT)}: not a config file"
        raise ConfigError(file, [(None, problem)])

    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except _Unexpandable as exc:
        raise ConfigError(file, [(exc.key, exc.problem + exc.where)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, [(None, _describe_yaml_error(exc))]) from None
    except RecursionError:
        raise ConfigError(file, [(None, "the YAML is nested too deeply to read")]) from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        # PyYAML's constructors for !!int, !!float, !!bool, !!timestamp raise these on a
        # value they cannot read, quoting it (it may be a secret), and say nowhere where.
        problem = "a value tagged !!int, !!float, !!bool or !!timestamp is not of that type"
        raise ConfigError(file, [(None, problem)]) from None

    if not isinstance(document, dict):
        raise ConfigError(file, [(None, "expected a mapping of keys at the top level")])
    return document


# A config holds tens or hundreds of values. Aliases can make a few hundred bytes stand for
# billions ("billion laughs"): PyYAML composes an alias as one more reference to its node,
# but merge keys, `${VAR}` expansion and validation all walk each reference again.
MAX_EXPANDED_VALUES = 100_000


class _Unexpandable(yaml.YAMLError):
    """A document whose aliases expand to too much, or to something without end."""

    def __init__(self, key: str | None, mark: Any, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem
        self.where = "" if mark is None else f" (at line {mark.line + 1}, column {mark.column + 1})"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML forbids it,
    and PyYAML would silently keep the last value), and a document that expands to more
    than `MAX_EXPANDED_VALUES` values once its aliases are followed.

    Values are counted as they are composed, before anything is built from them: each node
    counts one, and each alias the size of the node it names.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded = 0
        self._sizes: dict[yaml.Node, int] = {}
        """How many values each finished node stands for, its own aliases expanded."""
        self._path: list[Any] = []
        """The `index` of every node being composed: a key's node, a position, or None."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._path.append(index)
        try:
            return self._compose_counted(parent, index)
        finally:
            self._path.pop()

    def _compose_counted(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # typeshed leaves peek_event unannotated; it returns the next Event.
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        mark = event.start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(node) if node is not None else 0
            if size is None:  # its node is still being composed: the alias is inside it
                raise _Unexpandable(
                    self._key(),
                    mark,
                    "an alias names a collection it is part of, which never ends once expanded",
                )
            self._count(size, mark)
            return node
        before = self._expanded
        self._count(1, mark)
        node = super().compose_node(parent, index)
        if node is not None:
            self._sizes[node] = self._expanded - before
        return node

    def _count(self, values: int, mark: Any) -> None:
        self._expanded += values
        if self._expanded > MAX_EXPANDED_VALUES:
            raise _Unexpandable(
                self._key(),
                mark,
                f"the YAML aliases expand to more than {MAX_EXPANDED_VALUES} values, far "
                "more than a config holds; write the values out, or nest fewer aliases",
            )

    def _key(self) -> str | None:
        """The dotted key of the node being composed, as errors name keys."""
        key = ""
        for index in self._path:
            if isinstance(index, int):
                key = f"{key}[{index}]"
            elif isinstance(index, yaml.ScalarNode):
                key = _join(key, str(index.value))
        return key or None


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`, resolved by construct_mapping below
        key = loader.construct_object(key_node)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain name", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {_shown_name(str(key))} appears twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "invalid YAML"
    # PyYAML quotes what it could not read (an alias, a tag), and that may be a secret
    # written in clear: `client_secret: *abc` reads as an alias. One character (a tab, as
    # PyYAML escapes it) tells what is wrong and no secret.
    problem = _QUOTED.sub(_quoted_safely, problem)
    if mark is None:
        return f"YAML syntax error: {problem}"
    return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _quoted_safely(match: re.Match[str]) -> str:
    one_character = _ONE_CHARACTER.fullmatch(match.group(2))
    return match.group(0) if one_character else "'...'"


# What PyYAML quotes, as Python's repr does: in single quotes, or in double quotes when the
# text holds a single quote.
_QUOTED = re.compile(r"""(['"])((?:\\.|(?!\1).)*)\1""")


# One character as PyYAML quotes it: itself, or an escape such as \t, \x00 or \u00a0.
_ONE_CHARACTER = re.compile(r".?|\\(?:[a-z0]|x[0-9a-f]{2}|u[0-9a-f]{4})")


def expand_variables(node: Any, environ: Mapping[str, str], *, file: str, key: str = "") -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string value under `node`."""
    if isinstance(node, dict):
        return {
            name: expand_variables(value, environ, file=file, key=_join(key, str(name)))
            for name, value in node.items()
        }
    if isinstance(node, list):
        return [
            expand_variables(value, environ, file=file, key=f"{key}[{index}]")
            for index, value in enumerate(node)
        ]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if match.group(0) == "$${":
            return "${"
        if name is None:
            problem = (
                "malformed ${...}: expected ${VAR} or ${VAR:-default}, and a default holds "
                "no ${ (variables do not nest); write $${ for a literal ${"
            )
            raise ConfigError(file, [(key, problem)])
        value = environ.get(name, "")
        if value:
            return value
        if default is not None:
            return default.replace("$${", "${")
        if name in environ:
            return ""
        # A name not in capitals may be a secret pasted into ${...} by mistake.
        shown = name if _ENVIRONMENT_NAME.fullmatch(name) else "(a name not in capitals)"
        raise ConfigError(file, [(key, f"environment variable {shown} is not set")])

    return _VARIABLE.sub(substitute, node)


def _shown_name(name: str) -> str:
    """A key of the config as messages show it: whole if it is a name of up to 24 letters,
    digits, - and _ (every key the config knows is), else its first 8 characters. A key is
    the user's own text, and a typo can make one of a secret: in `{client_secret pTyG...}`
    or `{client_secret:pTyG...}` the whole is one unknown key."""
    return name if _PLAIN_NAME.fullmatch(name) else f"{name[:8]}..."


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,24}")
_ENVIRONMENT_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(error: Any) -> tuple[str | None, str]:
    key = ""
    for part in error["loc"]:
        key = f"{key}[{part}]" if isinstance(part, int) else _join(key, _shown_name(str(part)))
    if error["type"] == "missing":
        problem = "field required"
    elif error["type"] == "extra_forbidden":
        problem = "unknown key"
    else:
        problem = str(error["msg"]).removeprefix("Value error, ")
        problem = problem[:1].lower() + problem[1:]
    return key or None, problem


def _with_secret_files_read(settings: Settings, *, file: str) -> Settings:
    def resolved(auth: AuthSettings, key: str) -> AuthSettings:
        update = {}
        for field in ("client_secret", "client_secret_next"):
            path = getattr(auth, f"{field}_file")
            if path is not None:
                update[field] = read_secret_file(path, file=file, key=f"{key}.{field}_file")
        return auth.model_copy(update=update) if update else auth

    update: dict[str, Any] = {}
    if settings.auth is not None:
        update["auth"] = resolved(settings.auth, "auth")
    update["tenants"] = {
        name: tenant.model_copy(update={"auth": resolved(tenant.auth, f"tenants.{name}.auth")})
        for name, tenant in settings.tenants.items()
    }
    return settings.model_copy(update=update)


def read_secret_file(path: Path, *, file: str, key: str) -> SecretStr:
    """The secret in `path`, without the trailing newline editors and `echo` leave."""
    try:
        text = _read_text(path, SECRET_FILE_LIMIT)
    except OSError as exc:
        # A bare name, or a path whose directory is missing too, may be the secret itself,
        # written in the wrong key: it is not shown.
        shown = "/" in str(path) and path.parent.is_dir()
        named = path if shown else "the file it names (a bare name or no such directory)"
        raise ConfigError(file, [(key, f"cannot read {named}: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(file, [(key, f"{path} is not UTF-8 text")]) from None
    if text is None:
        problem = f"{path} holds more than {_size(SECRET_FILE_LIMIT)}: not a secret"
        raise ConfigError(file, [(key, problem)])
    secret = text.rstrip("\r\n")
    if not secret:
        raise ConfigError(file, [(key, f"{path} is empty")])
    return SecretStr(secret)
