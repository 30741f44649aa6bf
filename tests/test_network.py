"""How the network keys are checked at load: proxy URLs, CA bundles, client certificates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from proxy.config import NetworkSettings, load_settings
from proxy.errors import ConfigError
from tests.support import settings_document, write_config

PROXY_PASSWORD = "pr0xy-pa55word"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The company CA: it signs the stand-ins' certificates and the client certificate."""
    return trustme.CA()


@pytest.fixture
def client_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate and its key, issued by the company CA."""
    client = ca.issue_cert("proxy.client.example.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    client.cert_chain_pems[0].write_to_path(cert)
    client.private_key_pem.write_to_path(key)
    return cert, key


@pytest.fixture
def load_network(tmp_path: Path) -> Callable[[dict[str, Any]], str]:
    """Load a config with `network` set; return the config error's message."""

    def load(network: dict[str, Any]) -> str:
        document = settings_document("https://auth.example/oauth/token", "https://se.example")
        document["network"] = network
        config = write_config(tmp_path / "config.yaml", document)
        with pytest.raises(ConfigError) as caught:
            load_settings(config, {})
        message = str(caught.value)
        assert message.startswith(f"{config}: ")
        return message.removeprefix(f"{config}: ")

    return load


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ({"proxy": "socks5://proxy.corp:1080"}, "network.proxy: must be an http:// or https://"),
        ({"proxy": "http://"}, "network.proxy: must be an http:// or https:// URL with a host"),
        ({"proxy": "http://proxy.corp:3128/path"}, "network.proxy: must be a proxy address"),
        ({"proxy": "http://proxy.corp:99999"}, "network.proxy: is not a valid URL"),
        ({"proxy": "http://a%3Ab:c@proxy.corp:3128"}, "network.proxy: the proxy user name"),
        ({"trust_env": "sometimes"}, "network.trust_env: input should be a valid boolean"),
        ({"insecure_skip_verify": "maybe"}, "network.insecure_skip_verify: input should be"),
        ({"ca_file": "/no/such/ca.pem"}, "network.ca_file: cannot read /no/such/ca.pem: No such"),
        ({"outbound_proxy": "http://p:1"}, "network.outbound_proxy: unknown key"),
        ({"tls": {"ca_file": "/x"}}, "network.tls: unknown key"),
    ],
)
def test_network_errors_name_the_key(
    load_network: Callable[[dict[str, Any]], str], network: dict[str, Any], expected: str
) -> None:
    assert load_network(network).startswith(expected)


@pytest.mark.parametrize(
    "proxy",
    [
        f"socks5://corp-user:{PROXY_PASSWORD}@proxy.corp:1080",
        f"corp-user:{PROXY_PASSWORD}@proxy.corp:3128",
        f"http://corp-user:{PROXY_PASSWORD}@proxy.corp:3128/path?q=1",
    ],
)
def test_a_proxy_password_is_never_echoed_in_a_config_error(
    load_network: Callable[[dict[str, Any]], str], proxy: str
) -> None:
    message = load_network({"proxy": proxy})
    assert message.startswith("network.proxy: ")
    assert PROXY_PASSWORD not in message
    assert "corp-user" not in message


def test_a_ca_file_without_certificates_is_refused_without_quoting_it(
    load_network: Callable[[dict[str, Any]], str], tmp_path: Path
) -> None:
    not_a_bundle = tmp_path / "secret.pem"
    not_a_bundle.write_text("password=hunter2-from-the-wrong-file\n")
    message = load_network({"ca_file": str(not_a_bundle)})
    assert message == f"network.ca_file: {not_a_bundle} holds no PEM certificate"


def test_client_cert_and_key_come_together(
    load_network: Callable[[dict[str, Any]], str], client_files: tuple[Path, Path]
) -> None:
    cert, key = client_files
    expected = "network: set client_cert and client_key together, or neither"
    assert load_network({"client_cert": str(cert)}) == expected
    assert load_network({"client_key": str(key)}) == expected


def test_a_client_key_of_another_certificate_is_refused(
    load_network: Callable[[dict[str, Any]], str],
    ca: trustme.CA,
    client_files: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cert, _ = client_files
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("other.example.test").private_key_pem.write_to_path(other_key)
    message = load_network({"client_cert": str(cert), "client_key": str(other_key)})
    assert message == f"network.client_key: {other_key} is not the key of the certificate {cert}"


def test_a_client_cert_file_without_a_certificate_is_refused(
    load_network: Callable[[dict[str, Any]], str], client_files: tuple[Path, Path]
) -> None:
    _, key = client_files
    message = load_network({"client_cert": str(key), "client_key": str(key)})
    assert message == f"network.client_cert: {key} holds no PEM certificate"


def test_an_encrypted_client_key_is_refused_without_asking_for_a_passphrase(
    load_network: Callable[[dict[str, Any]], str],
    client_files: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cert, key = client_files
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    message = load_network({"client_cert": str(cert), "client_key": str(encrypted)})
    assert message.startswith(f"network.client_key: {encrypted} is encrypted")


def test_the_network_defaults_are_the_contract_ones() -> None:
    network = NetworkSettings()
    assert network.trust_env is True
    assert network.proxy is None
    assert network.ca_file is None
    assert network.client_cert is None
    assert network.client_key is None
    assert network.insecure_skip_verify is False
