"""The deployment files, checked with what runs here: no Docker engine and no cluster.

The Dockerfile passes hadolint, and its entrypoint, run with the image's default config, serves
and stops. The Kubernetes manifests validate against the Kubernetes schemas and agree with the
config each one mounts, read by the proxy's own loader. The alert rules and the dashboard pass
promtool and use only metric names that a running proxy exports.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.config import Settings, load_settings
from proxy.reload import RESTART_ONLY
from proxy.standins import Answer
from proxy.tokens import BACKOFF_CAP
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import (
    TENANT,
    FakeClock,
    console_script,
    eventually,
    running_command,
    subprocess_env,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
LAYOUTS = ("sidecar", "service")
MONITORING = DEPLOY / "monitoring"
COMPOSE = DEPLOY / "compose"

# The oldest Kubernetes the layouts support (native sidecars are on by default from 1.29)
# and the newest whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# Custom resources have no schema there; each is checked by a test of its own below.
CUSTOM_KINDS = {"ServiceMonitor"}

PROXY_CONTAINER = "skill-engine-proxy"
CONFIG_VARIABLE = "SKILL_ENGINE_PROXY_CONFIG"
METRIC_NAME = re.compile(r"\bskill_engine_proxy_[a-z0-9_]+\b")


# The Dockerfile.


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        command = json.loads(self.arguments)
        assert isinstance(command, list), self
        return command


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, by stage."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    stages: list[list[Instruction]] = []
    for logical in re.split(r"(?<!\\)\n", "\n".join(lines)):
        if not logical.strip():
            continue
        keyword, _, arguments = re.sub(r"\\\n\s*", " ", logical).strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), arguments.strip()))
    return stages


def final_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def instructions(keyword: str) -> list[Instruction]:
    return [each for each in final_stage() if each.keyword == keyword]


def image_environment() -> dict[str, str]:
    environment = {}
    for instruction in instructions("ENV"):
        for pair in shlex.split(instruction.arguments):
            name, _, value = pair.partition("=")
            environment[name] = value
    return environment


def image_config() -> Path:
    """The file in the repository that the image's SKILL_ENGINE_PROXY_CONFIG names."""
    in_image = image_environment()[CONFIG_VARIABLE]
    for instruction in instructions("COPY"):
        *sources, destination = instruction.arguments.split()
        if destination == in_image and not sources[0].startswith("--"):
            return ROOT / sources[0]
    raise AssertionError(f"nothing in the final stage is copied to {in_image}")


def healthcheck_command() -> list[str]:
    [healthcheck] = instructions("HEALTHCHECK")
    _, _, command = healthcheck.arguments.partition("CMD ")
    return Instruction("CMD", command).exec_form()


def image_user() -> tuple[int, int]:
    [user] = instructions("USER")
    uid, _, gid = user.arguments.partition(":")
    assert uid.isdigit(), "a numeric user, so that Kubernetes can check runAsNonRoot"
    assert gid.isdigit()
    return int(uid), int(gid)


def required_image_variables(secret_file: Path) -> dict[str, str]:
    """Values for the variables the image's default config requires."""
    return {
        "SKILL_ENGINE_URL": "https://skill-engine.example",
        "SKILL_ENGINE_CLIENT_ID": "client",
        "SKILL_ENGINE_AUDIENCE": "eu3.techwolf.ai",
        "SKILL_ENGINE_TENANT": "company_xyz",
        "SKILL_ENGINE_CLIENT_SECRET_FILE": str(secret_file),
    }


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text("standin-secret\n")
    return path


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_final_stage_copies_only_the_built_environment_and_the_default_config() -> None:
    copies = [each.arguments.split() for each in instructions("COPY")]
    for copy in copies:
        is_from_build = copy[0] == "--from=build"
        assert is_from_build or ROOT / copy[0] == image_config(), copy
    assert not instructions("ADD")
    assert dockerfile_stages()[0][0].arguments.endswith(" AS build")


def test_the_image_installs_every_runtime_extra_of_the_project() -> None:
    """An extra another change adds (a faster event loop, say) reaches the image too."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime_extras = set(project["optional-dependencies"]) - {"dev"}
    [build_stage, *_] = dockerfile_stages()
    [extras] = [each.arguments for each in build_stage if each.keyword == "ARG"]
    assert extras.startswith("EXTRAS=")
    assert set(extras.removeprefix("EXTRAS=").split(",")) == runtime_extras


def test_the_build_context_is_only_what_the_dockerfile_copies() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    included = {pattern.removeprefix("!").rstrip("/") for pattern in patterns if pattern[0] == "!"}
    copied = set()
    for stage in dockerfile_stages():
        for instruction in stage:
            words = instruction.arguments.split()
            if instruction.keyword == "COPY" and not words[0].startswith("--"):
                copied |= {source.rstrip("/") for source in words[:-1]}
    assert included == copied
    assert all((ROOT / source).exists() for source in copied)


def test_the_image_runs_as_a_fixed_user_and_listens_where_it_exposes(secret_file: Path) -> None:
    uid, gid = image_user()
    assert uid != 0
    assert gid != 0
    assert instructions("ENTRYPOINT")[0].exec_form() == ["skill-engine-proxy", "run"]

    settings = load_settings(image_config(), required_image_variables(secret_file))
    assert settings.admin_listen is not None
    assert (settings.listen.host, settings.admin_listen.host) == ("0.0.0.0", "0.0.0.0")
    exposed = {int(port) for each in instructions("EXPOSE") for port in each.arguments.split()}
    assert exposed == {settings.listen.port, settings.admin_listen.port}
    # Without SKILL_ENGINE_PROXY_ADMIN_LISTEN, the health check asks the default admin port.
    assert f"':{settings.admin_listen.port}'" in healthcheck_command()[-1]


def test_the_image_config_keeps_the_programs_loopback_default() -> None:
    assert Settings.model_fields["listen"].default.host == "127.0.0.1"


async def test_the_entrypoint_with_the_image_config_serves_healthz_and_stops_on_sigterm(
    standins: Standins, secret_file: Path
) -> None:
    """What `docker run` starts, here: the entrypoint, the image's environment and default
    config; only the addresses change, to loopback ports of the system's choosing."""
    program, *arguments = instructions("ENTRYPOINT")[0].exec_form()
    assert program == Path(console_script()).name
    environment = {
        **subprocess_env(),
        **{name: value for name, value in image_environment().items() if name != "PATH"},
        **required_image_variables(secret_file),
        CONFIG_VARIABLE: str(image_config()),
        "SKILL_ENGINE_URL": standins.upstream_url,
        "SKILL_ENGINE_TOKEN_URL": standins.token_url,
        "SKILL_ENGINE_CLIENT_ID": standins.tokens.client_id,
        "SKILL_ENGINE_AUDIENCE": standins.tokens.audience,
        "SKILL_ENGINE_PROXY_LISTEN": "127.0.0.1:0",
        "SKILL_ENGINE_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
        "SKILL_ENGINE_PROXY_DRAIN_DELAY": "0",
    }

    async with (
        running_command([console_script(), *arguments], environment) as proxy,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(f"{proxy.admin_url}/healthz") as response:
            assert response.status == 200
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200

        admin = proxy.admin_url.removeprefix("http://")
        assert await run_healthcheck({**environment, "SKILL_ENGINE_PROXY_ADMIN_LISTEN": admin}) == 0
        assert await proxy.stop() == 0

    assert '"message": "Stopped."' in proxy.log  # the image config logs JSON
    assert await run_healthcheck({**environment, "SKILL_ENGINE_PROXY_ADMIN_LISTEN": admin}) == 1


async def run_healthcheck(environment: dict[str, str]) -> int:
    program, *arguments = healthcheck_command()
    assert program == "python"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *arguments,
        env=environment,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), timeout=30)


# Kubernetes manifests.


def manifest_files(layout: str) -> list[Path]:
    return sorted((KUBERNETES / layout).glob("*.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def kubernetes_manifests() -> Iterator[Path]:
    for layout in LAYOUTS:
        for path in manifest_files(layout):
            if path.name != "kustomization.yaml":
                yield path


class Layout:
    """The objects of one directory of deploy/kubernetes, by kind, and the proxy's place in
    them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.objects: dict[str, list[dict[str, Any]]] = {}
        for path in manifest_files(name):
            for document in load_documents(path):
                self.objects.setdefault(document["kind"], []).append(document)

    def one(self, kind: str) -> dict[str, Any]:
        [found] = self.objects[kind]
        return found

    @property
    def pod(self) -> dict[str, Any]:
        pod: dict[str, Any] = self.one("Deployment")["spec"]["template"]
        return pod

    def containers(self) -> list[dict[str, Any]]:
        spec = self.pod["spec"]
        return [*spec.get("initContainers", []), *spec["containers"]]

    @property
    def proxy(self) -> dict[str, Any]:
        [proxy] = [each for each in self.containers() if each["name"] == PROXY_CONTAINER]
        return proxy

    def volume(self, name: str) -> dict[str, Any]:
        [volume] = [each for each in self.pod["spec"]["volumes"] if each["name"] == name]
        return volume

    def mount_of(self, path: str) -> tuple[dict[str, Any], PurePosixPath]:
        """The volume of the proxy container that holds `path`, and `path` inside it."""
        for mount in self.proxy["volumeMounts"]:
            inside = PurePosixPath(path)
            if inside.is_relative_to(mount["mountPath"]):
                return self.volume(mount["name"]), inside.relative_to(mount["mountPath"])
        raise AssertionError(f"{self.name}: no volume of the proxy holds {path}")

    def is_writable(self, path: str) -> bool:
        volume, _ = self.mount_of(path)
        return "emptyDir" in volume

    def proxy_environment(self) -> dict[str, str]:
        return {each["name"]: each["value"] for each in self.proxy.get("env", [])}

    def config_text(self) -> str:
        """The config file the proxy reads: its path, through a volume, to a ConfigMap."""
        path = self.proxy_environment()[CONFIG_VARIABLE]
        volume, inside = self.mount_of(path)
        name = volume["configMap"]["name"]
        [config_map] = [
            each for each in self.objects["ConfigMap"] if each["metadata"]["name"] == name
        ]
        text: str = config_map["data"][str(inside)]
        return text

    def settings(self, tmp_path: Path) -> Settings:
        """The mounted config, read by the proxy's loader with the container's environment;
        the secret file it names is checked to come from the Secret, then stood in for."""
        text = self.config_text()
        secret_path = yaml.safe_load(text)["auth"]["client_secret_file"]
        volume, inside = self.mount_of(secret_path)
        items = {item["path"]: item["key"] for item in volume["secret"]["items"]}
        assert str(inside) in items, f"{self.name}: {secret_path} is not in the Secret"

        stand_in = tmp_path / "client-secret"
        stand_in.write_text("placeholder\n")
        assert text.count(secret_path) == 1
        config = tmp_path / "config.yaml"
        config.write_text(text.replace(secret_path, str(stand_in)))
        return load_settings(config, self.proxy_environment())

    def container_port(self, container: dict[str, Any], port: int | str) -> int:
        if isinstance(port, int):
            return port
        [number] = [each["containerPort"] for each in container["ports"] if each["name"] == port]
        return int(number)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "path", list(kubernetes_manifests()), ids=lambda path: f"{path.parent.name}/{path.name}"
)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    for document in load_documents(path):
        if document["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = ".".join(str(part) for part in exc.path)
            raise AssertionError(f"{path.name}: {location}: {exc.message}") from None


def test_the_service_monitor_selects_the_proxy_services_admin_port() -> None:
    """ServiceMonitor is the Prometheus Operator's custom resource: no schema above."""
    layout = Layout("service")
    monitor = layout.one("ServiceMonitor")
    service = layout.one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])

    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    [port] = [each for each in service["spec"]["ports"] if each["name"] == endpoint["port"]]
    assert port["targetPort"] == "admin"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_kustomization_lists_every_manifest_but_the_secret_example(layout: str) -> None:
    [kustomization] = load_documents(KUBERNETES / layout / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    expected = {
        path.name
        for path in manifest_files(layout)
        if path.name != "kustomization.yaml" and not path.name.endswith(".example.yaml")
    }
    assert sorted(kustomization["resources"]) == sorted(expected)

    [image] = kustomization["images"]
    assert (image["name"], image["newTag"]) == ("skill-engine-proxy", __version__)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_configmap_names_every_setting_that_needs_a_restart(layout: str) -> None:
    comment = (KUBERNETES / layout / "configmap.yaml").read_text().partition("apiVersion")[0]
    words = set(re.findall(r"[a-z_]+", comment))
    assert set(RESTART_ONLY) <= words


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_proxy_container_agrees_with_the_config_it_mounts(layout: str, tmp_path: Path) -> None:
    manifests = Layout(layout)
    proxy = manifests.proxy
    settings = manifests.settings(tmp_path)
    assert settings.admin_listen is not None
    assert proxy["image"] == f"skill-engine-proxy:{__version__}"

    # The kubelet's probes and Prometheus reach the admin listener on the pod's address.
    assert settings.admin_listen.host == "0.0.0.0"
    probes = {
        kind: proxy[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in proxy
    }
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind, probe in probes.items():
        port = manifests.container_port(proxy, probe["httpGet"]["port"])
        assert port == settings.admin_listen.port, kind
    assert manifests.container_port(proxy, "admin") == settings.admin_listen.port

    shutdown = settings.shutdown
    grace = manifests.pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > shutdown.drain_delay + shutdown.timeout

    # The root filesystem is read-only: whatever the proxy writes goes to a volume.
    assert manifests.is_writable("/tmp")
    if settings.token_store.backend == "file":
        assert manifests.is_writable(str(settings.token_store.path))
    for address in (settings.listen, settings.admin_listen):
        if address.path is not None:
            assert manifests.is_writable(str(PurePosixPath(address.path).parent))


def test_the_sidecar_is_native_ready_before_the_app_and_reached_on_loopback(
    tmp_path: Path,
) -> None:
    manifests = Layout("sidecar")
    spec = manifests.pod["spec"]
    [sidecar] = spec["initContainers"]
    assert sidecar["name"] == PROXY_CONTAINER
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"

    settings = manifests.settings(tmp_path)
    assert settings.listen.host == "127.0.0.1"
    [app] = spec["containers"]
    environment = {each["name"]: each["value"] for each in app["env"]}
    assert environment["SKILL_ENGINE_URL"] == f"http://127.0.0.1:{settings.listen.port}"


def test_the_shared_service_reaches_the_proxy_port_only_from_client_pods(tmp_path: Path) -> None:
    manifests = Layout("service")
    settings = manifests.settings(tmp_path)
    proxy = manifests.proxy
    labels = manifests.pod["metadata"]["labels"]
    deployment = manifests.one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert matches(deployment["spec"]["selector"], labels)

    assert settings.listen.host == "0.0.0.0"
    assert manifests.container_port(proxy, "proxy") == settings.listen.port
    service = manifests.one("Service")
    assert all(labels.get(key) == value for key, value in service["spec"]["selector"].items())
    target_ports = {
        manifests.container_port(proxy, port["targetPort"]) for port in service["spec"]["ports"]
    }
    assert settings.listen.port in target_ports

    budget = manifests.one("PodDisruptionBudget")["spec"]
    assert matches(budget["selector"], labels)
    assert budget["maxUnavailable"] < deployment["spec"]["replicas"]

    policy = manifests.one("NetworkPolicy")["spec"]
    assert matches(policy["podSelector"], labels)
    assert policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod"
        ports = {manifests.container_port(proxy, port["port"]) for port in rule["ports"]}
        if settings.listen.port in ports:
            for peer in rule["from"]:
                assert peer["podSelector"]["matchLabels"] == {"skill-engine-proxy/client": "true"}
                assert set(peer) == {"podSelector"}


def test_the_secret_example_holds_placeholders_only_under_the_key_the_deployment_mounts() -> None:
    manifests = Layout("service")
    secret = manifests.one("Secret")
    assert "data" not in secret
    values = secret["stringData"]
    assert all(re.fullmatch(r"<[^<>]+>", value) for value in values.values())
    volume = manifests.volume("client-secret")["secret"]
    assert volume["secretName"] == secret["metadata"]["name"]
    assert {item["key"] for item in volume["items"]} == set(values)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_container_is_hardened(layout: str) -> None:
    manifests = Layout(layout)
    spec = manifests.pod["spec"]
    pod = spec["securityContext"]
    assert spec["automountServiceAccountToken"] is False
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["runAsNonRoot"] is True

    for container in manifests.containers():
        context = container["securityContext"]
        assert context.get("runAsNonRoot", pod["runAsNonRoot"]) is True, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "privileged" not in context
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, container["name"]

    proxy = {**pod, **manifests.proxy["securityContext"]}
    assert (proxy["runAsUser"], proxy["runAsGroup"]) == image_user()
    assert pod["fsGroup"] == image_user()[1]  # the mounted secret is readable to the proxy
    assert manifests.volume("client-secret")["secret"]["defaultMode"] == 0o440


# Compose.


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return document


def interpolate(value: str, dotenv: dict[str, str]) -> str:
    """`value` with compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}` filled in."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, operand = match.groups()
        if dotenv.get(name):
            return dotenv[name]
        assert operator == "-", f"compose refuses to start without {name}: {operand}"
        return str(operand)

    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", substitute, value)


def duration_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, value
    return float(match.group(1))


def test_compose_runs_the_image_hardened_with_what_its_config_needs(secret_file: Path) -> None:
    services = compose()["services"]
    proxy = services["skill-engine-proxy"]
    assert proxy["image"] == f"skill-engine-proxy:{__version__}"
    assert (COMPOSE / proxy["build"]["context"] / "Dockerfile").is_file()
    assert proxy["read_only"] is True
    assert proxy["tmpfs"] == ["/tmp"]
    assert proxy["cap_drop"] == ["ALL"]
    assert proxy["security_opt"] == ["no-new-privileges:true"]

    # Every variable the image's config requires is set, and the secret lands where it looks.
    text = image_config().read_text()
    required = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert required <= set(proxy["environment"])
    [secret] = proxy["secrets"]
    assert re.search(rf"client_secret_file: \$\{{\w+:-/run/secrets/{secret}\}}", text)
    assert secret in compose()["secrets"]

    # The container's environment as compose makes it, from a .env with the required values.
    dotenv = required_image_variables(secret_file)
    environment = {name: interpolate(value, dotenv) for name, value in proxy["environment"].items()}
    environment["SKILL_ENGINE_CLIENT_SECRET_FILE"] = str(secret_file)
    settings = load_settings(image_config(), environment)
    shutdown = settings.shutdown
    assert duration_seconds(proxy["stop_grace_period"]) > shutdown.drain_delay + shutdown.timeout

    app = services["example-app"]
    assert (
        app["environment"]["SKILL_ENGINE_URL"]
        == f"http://skill-engine-proxy:{settings.listen.port}"
    )
    assert app["depends_on"]["skill-engine-proxy"]["condition"] == "service_healthy"


def test_compose_prometheus_scrapes_the_admin_port_and_loads_the_alert_rules(
    promtool: str, tmp_path: Path, secret_file: Path
) -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, destination, *_ = volume.split(":")
        if source.startswith("."):
            mounts[destination] = (COMPOSE / source).resolve()
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())

    settings = load_settings(image_config(), required_image_variables(secret_file))
    assert settings.admin_listen is not None
    [job] = config["scrape_configs"]
    [static] = job["static_configs"]
    assert static["targets"] == [f"skill-engine-proxy:{settings.admin_listen.port}"]

    # promtool reads the rule files where the container sees them: here, where they come from.
    rule_files = [str(mounts[path]) for path in config["rule_files"]]
    assert rule_files == [str(MONITORING / "alerts.yaml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump({**config, "rule_files": rule_files}))
    run_promtool(promtool, "check", "config", str(local))


# Monitoring.


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing (Debian's prometheus; scripts/test-tools installs it)")
    return found


def run_promtool(promtool: str, *arguments: str) -> None:
    result = subprocess.run(
        [promtool, *arguments], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return document


def dashboard_queries() -> list[str]:
    queries = [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_the_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(MONITORING / "alerts.yaml"))


def test_every_alert_fires_and_holds_back_as_its_cases_say(promtool: str) -> None:
    cases = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())
    tested = {test["alertname"] for case in cases["tests"] for test in case["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}
    run_promtool(promtool, "test", "rules", str(MONITORING / "alerts.test.yaml"))


def test_the_dashboards_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool checks PromQL in rule files: each panel query becomes a recording rule, with
    Grafana's variables given values."""
    rules = []
    for index, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            continue
        expression = query.replace("$__rate_interval", "5m").replace("$tenant", ".*")
        rules.append({"record": f"dashboard:query_{index}", "expr": expression})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def test_the_dashboard_has_the_panels_the_issue_asks_for() -> None:
    panels = dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    titles = {panel["title"] for panel in panels}
    assert titles == {
        "Requests by status",
        "Request latency",
        "Token fetches and errors",
        "Seconds until token expiry",
        "Upstream errors",
        "Requests in flight",
    }
    for panel in panels:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def hang_up_route() -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/hang-up")
    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    return routes


async def exported_samples(start_standins: StartStandins, start_proxy: StartProxy) -> str:
    """The /metrics of a proxy that fetched a token, renewed it after a failed try, answered
    a request and failed another upstream: every labelled series the monitoring uses."""
    standins = await start_standins(hang_up_route())
    clock = FakeClock()
    proxy = await start_proxy(standins.settings(), clock=clock)
    registry = proxy.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(f"skill_engine_proxy_{name}", labels) or 0.0

    tenant = {"tenant": TENANT}
    await eventually(lambda: proxy.lifecycle.token_problem() is None, "the first token")
    standins.tokens.answer_next(Answer(500, {"error": "server_error"}))
    clock.advance(float(standins.tokens.lifetime) * 0.8)
    await eventually(
        lambda: sample("token_refreshes_total", outcome="error", **tenant), "a failure"
    )
    clock.advance(BACKOFF_CAP)
    await eventually(
        lambda: sample("token_refreshes_total", outcome="success", **tenant), "renewal"
    )

    async with aiohttp.ClientSession() as client:
        for path, status in (("/version", 200), ("/hang-up", 502)):
            async with client.get(f"{proxy.proxy_url}{path}") as response:
                assert response.status == status
        async with client.get(f"{proxy.admin_url}/metrics") as response:
            return await response.text()


async def test_every_metric_in_the_rules_and_the_dashboard_is_one_the_proxy_exports(
    start_standins: StartStandins, start_proxy: StartProxy
) -> None:
    """Prometheus stores the sample names of the exposition (`_total`, `_bucket`, ...), so
    those are what the queries must use, with label names the samples carry."""
    exposition = await exported_samples(start_standins, start_proxy)
    labels_of: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels_of.setdefault(sample.name, set()).update(sample.labels)

    # Queries, and the descriptions that name a metric for the reader to look up.
    texts = [(MONITORING / name).read_text() for name in ("alerts.yaml", "grafana-dashboard.json")]
    used = {name for text in texts for name in METRIC_NAME.findall(text)}
    assert len(used) >= 8, used
    assert used <= set(labels_of), sorted(used - set(labels_of))

    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    for query in queries:
        for name, matchers in re.findall(r"(skill_engine_proxy_\w+)\{([^}]*)\}", query):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels_of[name], f"{name} has no label {label}"
