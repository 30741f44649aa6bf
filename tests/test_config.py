"""The config file: expansion, validation, and errors that name the file and the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import TOKEN_URLS, ListenAddress, load_settings
from proxy.errors import ConfigError
from tests.support import alias_bomb

SECRET = "s3cr3t-value-never-printed"

MINIMAL = """\
upstream:
  url: https://skill-engine.example
auth:
  region: eu
  client_id: my-client
  client_secret: ${SECRET_VAR}
  audience: eu3.techwolf.ai
  tenant: company_xyz
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"SECRET_VAR": SECRET} if environ is None else environ)
    message = str(caught.value)
    assert SECRET not in message
    assert message.startswith(f"{path}: ")
    return message


def test_minimal_config_gets_the_contract_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), {"SECRET_VAR": SECRET})

    assert settings.listen == ListenAddress("127.0.0.1", 8080)
    assert settings.admin_listen == ListenAddress("127.0.0.1", 9090)
    assert settings.upstream.connect_timeout == 10
    assert settings.upstream.read_timeout == 60
    assert settings.auth.refresh_margin == 60
    assert settings.auth.refresh_at == 0.8
    assert settings.auth.idle_after == 3600
    assert settings.auth.prefetch is True
    assert settings.replay_body_limit == 65536
    assert settings.auth.scopes is None
    assert settings.auth.resolved_token_url == "https://techwolf.eu.auth0.com/oauth/token"
    assert settings.auth.secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("region", "url"),
    [
        ("eu", "https://techwolf.eu.auth0.com/oauth/token"),
        ("us", "https://techwolf-us.us.auth0.com/oauth/token"),
    ],
)
def test_region_picks_the_documented_token_url(tmp_path: Path, region: str, url: str) -> None:
    text = MINIMAL.replace("region: eu", f"region: {region}")
    assert (
        load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET}).auth.resolved_token_url == url
    )
    assert TOKEN_URLS[region] == url


def test_token_url_overrides_region(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "region: eu", "region: eu\n  token_url: https://auth.example/oauth/token"
    )
    settings = load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})
    assert settings.auth.resolved_token_url == "https://auth.example/oauth/token"


def test_scopes_are_sorted_and_free_of_duplicates(tmp_path: Path) -> None:
    text = MINIMAL + "  scopes: [write, read, write]\n"
    settings = load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})
    assert settings.auth.scopes == ("read", "write")


def test_variables_expand_with_defaults_and_escapes(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "audience: eu3.techwolf.ai", "audience: ${AUDIENCE:-eu3.techwolf.ai}"
    ).replace("tenant: company_xyz", "tenant: ${TENANT}_$${literal}")
    settings = load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET, "TENANT": "acme"})
    assert settings.auth.audience == "eu3.techwolf.ai"
    assert settings.auth.tenant == "acme_${literal}"


def test_operations_settings_get_the_contract_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), {"SECRET_VAR": SECRET})
    assert (settings.log.level, settings.log.format, settings.log.access) == ("info", "json", True)
    assert (settings.shutdown.drain_delay, settings.shutdown.timeout) == (5, 30)
    assert settings.unix_socket_mode == 0o660
    assert settings.auth.client_secret_next is None
    assert settings.token_store.backend == "memory"
    assert settings.token_store.lock_timeout == 40


def test_operations_settings_are_read(tmp_path: Path) -> None:
    text = "log: {level: DEBUG, format: text, access: false}\n" + MINIMAL
    text = "shutdown: {drain_delay: 0, timeout: 2.5}\nunix_socket_mode: 0600\n" + text
    settings = load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})
    assert (settings.log.level, settings.log.format, settings.log.access) == (
        "debug",
        "text",
        False,
    )
    assert (settings.shutdown.drain_delay, settings.shutdown.timeout) == (0, 2.5)
    assert settings.unix_socket_mode == 0o600  # YAML reads 0600 as octal


def test_the_next_secret_is_read_from_its_file(tmp_path: Path) -> None:
    next_file = tmp_path / "next"
    next_file.write_text("next-" + SECRET + "\n")
    text = MINIMAL.replace("  audience:", f"  client_secret_next_file: {next_file}\n  audience:")
    settings = load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})
    assert settings.auth.client_secret_next is not None
    assert settings.auth.client_secret_next.get_secret_value() == "next-" + SECRET
    assert settings.secret_files() == [next_file]
    assert "next-" + SECRET not in repr(settings)


def test_secret_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    text = MINIMAL.replace("client_secret: ${SECRET_VAR}", f"client_secret_file: {secret_file}")
    settings = load_settings(write(tmp_path, text), {})
    assert settings.auth.secret.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("  client_id: my-client\n", ""), "auth.client_id: field required"),
        (("  tenant: company_xyz\n", "  tenant: [1, 2]\n"), "auth.tenant: input should be"),
        (("region: eu", "region: asia"), "auth.region: input should be 'eu' or 'us'"),
        (("region: eu", "region: null"), "auth: set region (eu or us) or token_url"),
        (("url: https://skill-engine.example", "url: ftp://x"), "upstream.url: the upstream URL"),
        (
            ("url: https://skill-engine.example", "url: http://skill-engine.example"),
            "upstream.url: the upstream URL uses plain http",
        ),
        (
            ("tenant: company_xyz", "tenant: company_xyz\n  tenent: typo"),
            "auth.tenent: unknown key",
        ),
        (("upstream:", "listen: nowhere\nupstream:"), "listen: expected host:port"),
        (("upstream:", "listen: 127.0.0.1:99999\nupstream:"), "listen: port must be at most"),
        (
            ("tenant: company_xyz", "tenant: company_xyz\n  scopes: []"),
            "auth.scopes: must name at least one scope",
        ),
        (
            ("tenant: company_xyz", "tenant: company_xyz\n  scopes: ['bad scope']"),
            "auth.scopes: 'bad scope' is not a valid scope name",
        ),
        (
            ("tenant: company_xyz", "tenant: company_xyz\n  refresh_at: 1.5"),
            "auth.refresh_at: input should be less than or equal to 1",
        ),
        (
            ("tenant: company_xyz", "tenant: company_xyz\n  idle_after: 0"),
            "auth.idle_after: input should be greater than 0",
        ),
        (
            ("tenant: company_xyz", "tenant: company_xyz\n  prefetch: maybe"),
            "auth.prefetch: input should be a valid boolean",
        ),
        (("upstream:", "replay_body_limit: -1\nupstream:"), "replay_body_limit: input should be"),
        (("upstream:", "log: {level: loud}\nupstream:"), "log.level: input should be 'debug'"),
        (("upstream:", "log: {format: xml}\nupstream:"), "log.format: input should be 'json'"),
        (("upstream:", "shutdown: {timeout: -1}\nupstream:"), "shutdown.timeout: input should"),
        (("upstream:", "shutdown: {drain: 1}\nupstream:"), "shutdown.drain: unknown key"),
        (
            ("upstream:", "token_store: {backend: redis, lock_timeout: 0}\nupstream:"),
            "token_store.lock_timeout: input should be greater than 0",
        ),
        (
            ("upstream:", "token_store: {lock_timeout: true}\nupstream:"),
            "token_store.lock_timeout: expected a number of seconds",
        ),
        (("upstream:", "unix_socket_mode: 660\nupstream:"), "unix_socket_mode: expected perm"),
        (("upstream:", "unix_socket_mode: '0o999'\nupstream:"), "unix_socket_mode: expected"),
        (
            ("tenant: company_xyz", "tenant: company_xyz\n  client_secret_next: ''"),
            "auth.client_secret_next: must not be empty",
        ),
        (
            (
                "tenant: company_xyz",
                "tenant: company_xyz\n  client_secret_next: a\n  client_secret_next_file: /b",
            ),
            "auth: set at most one of client_secret_next and client_secret_next_file",
        ),
        (
            (
                "url: https://skill-engine.example",
                "url: https://skill-engine.example\n  read_timeout: 0",
            ),
            "upstream.read_timeout: input should be greater than 0",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    path = write(tmp_path, MINIMAL.replace(*change))
    assert expected in config_error(path)


def test_plain_http_token_url_is_refused_unless_loopback(tmp_path: Path) -> None:
    remote = MINIMAL.replace("region: eu", "token_url: http://auth.example/oauth/token")
    assert "auth.token_url: the token URL uses plain http" in config_error(write(tmp_path, remote))

    for host in ("127.0.0.1:8081", "localhost", "[::1]:8081"):
        local = MINIMAL.replace("region: eu", f"token_url: http://{host}/oauth/token")
        assert load_settings(write(tmp_path, local), {"SECRET_VAR": SECRET}).auth.token_url


def test_a_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "url: https://skill-engine.example", f"url: https://user:{SECRET}@skill-engine.example"
    )
    assert "must not carry a user or password" in config_error(write(tmp_path, text))


def test_exactly_one_secret_source(tmp_path: Path) -> None:
    both = MINIMAL.replace(
        "client_secret: ${SECRET_VAR}", "client_secret: ${SECRET_VAR}\n  client_secret_file: /x"
    )
    neither = MINIMAL.replace("  client_secret: ${SECRET_VAR}\n", "")
    for text in (both, neither):
        message = config_error(write(tmp_path, text))
        assert "set exactly one of client_secret and client_secret_file" in message


def test_undefined_variable_names_the_key_and_the_variable(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, MINIMAL), environ={})
    assert message.endswith("auth.client_secret: environment variable SECRET_VAR is not set")


def test_malformed_variable_is_an_error(tmp_path: Path) -> None:
    text = MINIMAL.replace("tenant: company_xyz", "tenant: ${TENANT")
    assert "auth.tenant: malformed ${...}" in config_error(write(tmp_path, text))


@pytest.mark.parametrize(
    "value",
    [
        "${CLIENT:-${FALLBACK}}",  # set: the default must not slip through either way
        "${UNSET:-${FALLBACK}}",
        "${UNSET:-${FALLBACK:-x}}",
        "${UNSET:-a${FALLBACK}b}",
        "${UNSET:-x",
        "${CLIENT-x}",
        "${CLIENT:x}",
        "${}",
        "${1X}",
    ],
)
def test_a_nested_or_odd_variable_is_an_error_naming_the_key(tmp_path: Path, value: str) -> None:
    text = MINIMAL.replace("client_id: my-client", f"client_id: '{value}'")
    environ = {"SECRET_VAR": SECRET, "CLIENT": "from-env", "FALLBACK": "fallback"}
    message = config_error(write(tmp_path, text), environ)
    assert message.endswith(
        "auth.client_id: malformed ${...}: expected ${VAR} or ${VAR:-default}, and a default "
        "holds no ${ (variables do not nest); write $${ for a literal ${"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$${UNSET}", "${UNSET}"),
        ("$${UNSET:-x}", "${UNSET:-x}"),
        ("${UNSET:-$${literal}}", "${literal}"),
        ("${UNSET:-cost: 5$}", "cost: 5$"),
        ("x${UNSET:-}y", "xy"),
        ("a$b", "a$b"),
    ],
)
def test_an_escaped_dollar_brace_stays_literal_in_defaults_too(
    tmp_path: Path, value: str, expected: str
) -> None:
    text = MINIMAL.replace("tenant: company_xyz", f"tenant: '{value}'")
    settings = load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})
    assert settings.auth is not None
    assert settings.auth.tenant == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "No such file or directory"),
        ("", "is empty"),
        ("\n", "is empty"),
        ("x" * (64 * 1024 + 1), "holds more than 64 KiB: not a secret"),
    ],
)
def test_unusable_secret_file_names_the_key(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    secret_file = tmp_path / "secret"
    if content is not None:
        secret_file.write_text(content)
    text = MINIMAL.replace("client_secret: ${SECRET_VAR}", f"client_secret_file: {secret_file}")
    message = config_error(write(tmp_path, text))
    assert "auth.client_secret_file: " in message
    assert expected in message


def test_an_endless_secret_or_config_file_is_refused_not_read_forever(tmp_path: Path) -> None:
    text = MINIMAL.replace("client_secret: ${SECRET_VAR}", "client_secret_file: /dev/zero")
    message = config_error(write(tmp_path, text))
    assert "auth.client_secret_file: /dev/zero holds more than 64 KiB: not a secret" in message
    message = config_error(Path("/dev/zero"))
    assert "the file holds more than 1 MiB: not a config file" in message


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        (MINIMAL, {"SECRET_VAR": "abc\udcffdefghijklmnop"}),  # os.environ's undecodable byte
        (MINIMAL.replace("${SECRET_VAR}", '"abc\\ud800defghijklmnop"'), {}),
    ],
    ids=["environment", "yaml-escape"],
)
def test_a_secret_utf8_cannot_carry_is_refused_without_being_shown(
    tmp_path: Path, text: str, environ: dict[str, str]
) -> None:
    message = config_error(write(tmp_path, text), environ)
    assert "auth.client_secret: must be text UTF-8 can carry" in message
    assert "defghijklmnop" not in message


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("client_secret pTyGJMuHbEL31IeL2HPc: x", "auth.client_s...: unknown key"),
        ("client_secret:pTyGJMuHbEL31IeL2HPc", "auth.client_s...: unknown key"),
        ("client_secret=pTyGJMuHbEL31IeL2HPc", "auth.client_s...: unknown key"),
        ("client_secret: '${pTyGJMuHbEL31IeL2HPc}'", "variable (a name not in capitals) is not"),
        ("client_secret_file: pTyGJMuHbEL31IeL2HPc", "cannot read the file it names (a bare"),
        ("client_secret_file: pTyG/JMuHbEL31IeL2HPc", "cannot read the file it names (a bare"),
    ],
    ids=["blank", "no-blank", "equals", "in-braces", "file-key", "file-key-slash"],
)
def test_a_secret_typed_into_a_key_or_a_file_name_is_not_shown(
    tmp_path: Path, written: str, expected: str
) -> None:
    """Typos in a flow mapping, where `client_secret:abc` is one key, as in a plain one."""
    text = (
        "upstream: {url: https://skill-engine.example}\n"
        "auth: {region: eu, client_id: my-client, audience: eu3.techwolf.ai, "
        f"tenant: company_xyz, {written}}}\n"
    )
    message = config_error(write(tmp_path, text))
    assert expected in message
    assert "JMuHbEL31IeL2HPc" not in message


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, MINIMAL + "  scopes: [read\n"))
    assert "YAML syntax error at line" in message


def test_a_yaml_syntax_error_shows_the_one_character_it_could_not_read(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, MINIMAL + "\tscopes: [read]\n"))
    assert "found character '\\t' that cannot start any token" in message


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("*Abc123secret", "found undefined alias '...'"),
        ("!Abc'123secret", "could not determine a constructor for the tag '...'"),
        ("!!int Abc123secret", "a value tagged !!int, !!float, !!bool or !!timestamp is not"),
        ("!!float Abc123secret", "a value tagged !!int"),
        ("!!bool Abc123secret", "a value tagged !!int"),
        ("!!timestamp Abc123secret", "a value tagged !!int"),
    ],
)
def test_a_secret_yaml_cannot_read_is_not_quoted(
    tmp_path: Path, written: str, expected: str
) -> None:
    """A secret written in clear and read as an alias or a tag."""
    text = MINIMAL.replace("client_secret: ${SECRET_VAR}", f"client_secret: {written}")
    message = config_error(write(tmp_path, text))
    assert expected in message
    assert "123secret" not in message.lower()


@pytest.mark.parametrize(
    ("text", "expected"), [("", "expected a mapping"), ("- a\n", "expected a mapping")]
)
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(write(tmp_path, text))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    assert "cannot read the file" in config_error(tmp_path / "absent.yaml")


def test_a_secret_that_is_a_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    text = MINIMAL.replace("client_secret: ${SECRET_VAR}", "client_secret: ['${SECRET_VAR}']")
    assert "auth.client_secret: input should be a valid string" in config_error(
        write(tmp_path, text)
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:8080", ListenAddress("0.0.0.0", 8080)),
        ("[::1]:9090", ListenAddress("::1", 9090)),
        ("unix:/run/proxy.sock", ListenAddress(path="/run/proxy.sock")),
    ],
)
def test_listen_addresses(tmp_path: Path, value: str, expected: ListenAddress) -> None:
    text = f"listen: '{value}'\n" + MINIMAL
    assert load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET}).listen == expected


@pytest.mark.parametrize(
    ("listen", "admin_listen", "expected"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080", "127.0.0.1:8080 is already taken by listen;"),
        (
            "0.0.0.0:9090",
            "127.0.0.1:9090",
            "127.0.0.1:9090 is already taken by listen (0.0.0.0:9090);",
        ),
        ("localhost:9090", "[::1]:9090", "[::1]:9090 is already taken by listen (localhost:9090);"),
        (
            "unix:/run/proxy.sock",
            "unix:/run/proxy.sock",
            "unix:/run/proxy.sock is already taken by listen;",
        ),
    ],
)
def test_admin_listen_on_the_listen_address_is_an_error_naming_the_key(
    tmp_path: Path, listen: str, admin_listen: str, expected: str
) -> None:
    text = f"listen: '{listen}'\nadmin_listen: '{admin_listen}'\n" + MINIMAL
    message = config_error(write(tmp_path, text))
    assert message.endswith(f"admin_listen: {expected} give each listener an address of its own")


@pytest.mark.parametrize(
    ("listen", "admin_listen"),
    [
        ("127.0.0.1:0", "127.0.0.1:0"),  # the OS picks a free port for each
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("[::]:8080", "127.0.0.1:8080"),  # :: is bound for IPv6 alone
        ("0.0.0.0:8080", "[::1]:8080"),
        ("unix:/run/proxy.sock", "unix:/run/admin.sock"),
    ],
)
def test_listeners_that_can_be_bound_side_by_side_are_accepted(
    tmp_path: Path, listen: str, admin_listen: str
) -> None:
    text = f"listen: '{listen}'\nadmin_listen: '{admin_listen}'\n" + MINIMAL
    assert load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})


def test_admin_listen_null_disables_it(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "admin_listen: null\n" + MINIMAL), {"SECRET_VAR": SECRET}
    )
    assert settings.admin_listen is None


def test_the_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    environ = {"SKILL_ENGINE_CLIENT_ID": "id", "SKILL_ENGINE_CLIENT_SECRET": SECRET}
    settings = load_settings(example, environ)
    assert settings.auth.client_id == "id"


@pytest.mark.parametrize("written", ["*S3cr3tV4lu3-zzq", "!S3cr3tV4lu3-zzq"])
def test_a_clear_secret_yaml_cannot_read_is_not_echoed(tmp_path: Path, written: str) -> None:
    text = MINIMAL.replace("client_secret: ${SECRET_VAR}", f"client_secret: {written}")
    message = config_error(write(tmp_path, text))
    assert "YAML" in message
    assert "S3cr3tV4lu3" not in message


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    text = MINIMAL + "  tenant: other\n"
    assert "the key tenant appears twice" in config_error(write(tmp_path, text))


def test_a_boolean_is_not_a_number_of_seconds(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "url: https://skill-engine.example",
        "url: https://skill-engine.example\n  read_timeout: true",
    )
    assert "upstream.read_timeout: expected a number of seconds" in config_error(
        write(tmp_path, text)
    )


def test_a_key_that_is_not_a_plain_name_is_an_error(tmp_path: Path) -> None:
    text = MINIMAL + "? [a, b]\n: c\n"
    assert "a key must be a plain name" in config_error(write(tmp_path, text))


def test_yaml_merge_keys_work(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "upstream:\n  url: https://skill-engine.example",
        "upstream:\n  <<: {connect_timeout: 3}\n  url: https://skill-engine.example",
    )
    settings = load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})
    assert settings.upstream.connect_timeout == 3


def test_an_alias_bomb_is_refused_naming_the_key_and_the_line(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, MINIMAL + alias_bomb(7)))
    assert message.endswith(
        "lol.l5[0]: the YAML aliases expand to more than 100000 values, far more than a "
        "config holds; write the values out, or nest fewer aliases (at line 15, column 12)"
    )


def test_an_alias_inside_the_collection_it_names_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("audience: eu3.techwolf.ai", "audience: &loop [eu3, *loop]")
    assert config_error(write(tmp_path, text)).endswith(
        "auth.audience[1]: an alias names a collection it is part of, which never ends once "
        "expanded (at line 7, column 25)"
    )


def test_yaml_nested_too_deeply_is_a_config_error(tmp_path: Path) -> None:
    text = MINIMAL + "deep: " + "[" * 5000 + "]" * 5000 + "\n"
    assert config_error(write(tmp_path, text)).endswith(": the YAML is nested too deeply to read")


def test_aliases_that_stay_small_work(tmp_path: Path) -> None:
    text = TENANTS.replace("upstream:\n", "upstream: &shared\n", 1).replace(
        "upstream: {url: https://beta.example}", "upstream: *shared"
    )
    settings = load_settings(write(tmp_path, text), {})
    tenants = settings.all_tenants()
    assert tenants["acme"].upstream == tenants["beta"].upstream


def test_a_token_url_query_is_not_echoed(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "region: eu", "token_url: https://auth.example/oauth/token?client_secret=q-secret"
    )
    message = config_error(write(tmp_path, text))
    assert "must not have a query" in message
    assert "q-secret" not in message


TENANTS = """\
upstream:
  url: https://skill-engine.example
tenants:
  acme:
    auth: {region: eu, client_id: acme-id, client_secret: a, audience: eu3, tenant: acme,
           scopes: [read, write]}
  beta:
    auth: {region: us, client_id: beta-id, client_secret: b, audience: us1, tenant: beta}
    upstream: {url: https://beta.example}
routes:
  - {listen: 127.0.0.1:8081, tenant: beta}
  - {prefix: /acme/, tenant: acme, scopes: [read]}
  - {header: true}
"""


def test_several_tenants_and_routes(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, TENANTS), {})
    tenants = settings.all_tenants()
    assert sorted(tenants) == ["acme", "beta"]
    assert tenants["acme"].upstream.url == "https://skill-engine.example"
    assert tenants["beta"].upstream.url == "https://beta.example"
    assert settings.routes[1].prefix == "/acme"
    assert settings.routes[0].listen == ListenAddress("127.0.0.1", 8081)


def test_the_single_tenant_config_is_one_default_tenant(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), {"SECRET_VAR": SECRET})
    [default] = settings.all_tenants().values()
    assert default.name == "default"
    [route] = settings.all_routes()
    assert route.tenant == "default"
    assert route.prefix is None
    assert route.listen is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("tenant: beta}", "tenant: gamma}"), "routes[0].tenant: unknown tenant 'gamma'"),
        (("{header: true}", "{header: true, tenant: acme}"), "routes[2]: a header route takes"),
        (("{header: true}", "{prefix: /x}"), "routes[2]: name a tenant, or set header: true"),
        (("routes:\n", "unused:\n"), "unknown key"),
        (("prefix: /acme/", "prefix: acme"), "routes[1].prefix: must be a path"),
        (("prefix: /acme/", "prefix: /"), "routes[1].prefix: must not be / alone"),
        (("scopes: [read]}", "scopes: [read_reports]}"), "routes[1].scopes: must be among"),
        (("127.0.0.1:8081", "127.0.0.1:8080"), "routes[0].listen: 127.0.0.1:8080 is already taken"),
        (("127.0.0.1:8081", "127.0.0.1:9090"), "routes[0].listen: 127.0.0.1:9090 is already taken"),
        (("upstream:\n  url: https://skill-engine.example\n", ""), "tenants.acme.upstream"),
        (("client_id: beta-id", "client_id: acme-id"), None),  # another region: another client
        (("{header: true}", "{header: true, scopes: [read]}"), None),  # every tenant allows it
        (
            ("{header: true}", "{header: true, scopes: [read, read_reports]}"),
            "routes[2].scopes: a header route can pick every tenant, and tenant acme allows",
        ),
        (
            ("audience: us1, tenant: beta", "audience: us1, tenant: acme"),
            "tenants.beta.auth.tenant: 'acme' is also the auth.tenant of acme",
        ),
    ],
)
def test_tenant_and_route_errors_name_the_key(
    tmp_path: Path, change: tuple[str, str], expected: str | None
) -> None:
    text = TENANTS.replace(*change)
    if expected is None:
        assert load_settings(write(tmp_path, text), {})
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), {})
    assert expected in str(caught.value)


def test_several_tenants_need_routes(tmp_path: Path) -> None:
    text = TENANTS[: TENANTS.index("routes:")]
    with pytest.raises(ConfigError, match="routes: field required when several tenants"):
        load_settings(write(tmp_path, text), {})


def test_the_same_client_twice_is_an_error(tmp_path: Path) -> None:
    text = TENANTS.replace(
        "region: us, client_id: beta-id, client_secret: b, audience: us1, tenant: beta",
        "region: eu, client_id: acme-id, client_secret: c, audience: eu3, tenant: acme",
    )
    with pytest.raises(ConfigError, match=r"tenants\.beta\.auth: same token URL, client_id"):
        load_settings(write(tmp_path, text), {})


def test_default_is_the_name_of_the_top_level_tenant(tmp_path: Path) -> None:
    text = MINIMAL + "tenants:\n  default:\n    auth: {region: eu, client_id: x, client_secret: y,"
    text += " audience: z, tenant: t}\nroutes: [{tenant: default}]\n"
    with pytest.raises(ConfigError, match=r"tenants\.default: the top-level auth is the tenant"):
        load_settings(write(tmp_path, text), {"SECRET_VAR": SECRET})


def test_tenant_secret_files_are_read(tmp_path: Path) -> None:
    secret_file = tmp_path / "beta-secret"
    secret_file.write_text("from-a-file\n")
    text = TENANTS.replace("client_secret: b,", f"client_secret_file: {secret_file},")
    settings = load_settings(write(tmp_path, text), {})
    assert settings.all_tenants()["beta"].auth.secret.get_secret_value() == "from-a-file"
