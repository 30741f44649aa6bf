"""The benchmark: what the proxy costs, beside a direct call, nginx and a bare aiohttp proxy.

One run starts an upstream (nginx serving a small JSON answer, a large file and an upload
sink that reads the whole body before it answers), a stand-in token endpoint, and four
ways to reach the upstream:

- direct: the client talks to the upstream nginx (the floor);
- nginx: nginx as a reverse proxy that sets a fixed Authorization header (the native
  ceiling), streaming both ways like the proxy does, with keep-alive upstream connections
  and 64 KiB buffers;
- bare, bare-uvloop: bench/bare_proxy.py, a minimal aiohttp proxy (the yardstick), on
  asyncio's loop and on uvloop;
- proxy: skill-engine-proxy with its default settings (metrics, token cache, request id,
  JSON access log written to a file), on uvloop when the `speed` extra is installed;
- proxy-asyncio: the same on asyncio's own loop (`run --loop asyncio`), the yardstick's.

Every round measures each of them in turn, in an order that rotates from round to round,
so that the machine's drift falls on all alike; ratios are taken within a round. Needs
nginx-light (nginx with its echo module), wrk and curl (Debian packages). See the README's
"Performance".

    .venv/bin/python bench/run.py [--rounds 5] [--duration 5] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.server import has_uvloop

BENCH = Path(__file__).resolve().parent
CLIENT_ID, CLIENT_SECRET, AUDIENCE = "bench-client", "bench-secret", "bench.techwolf.ai"
SMALL_ANSWER = json.dumps(
    {
        "version": "1.0.0",
        "service": "skill-engine",
        "skills": [{"id": f"skill-{n}", "name": f"Skill {n}", "score": 0.5} for n in range(3)],
    }
)
TARGETS = ("direct", "nginx", "bare", "bare-uvloop", "proxy", "proxy-asyncio")
PRODUCTS = ("proxy", "proxy-asyncio")
YARDSTICKS = ("bare", "bare-uvloop")
# Each product against the yardstick on its own event loop, and against nginx and direct.
RATIO_COLUMNS = (
    "proxy/bare-uvloop",
    "proxy-asyncio/bare",
    "proxy/nginx",
    "proxy/direct",
)
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
# Loopback only: an HTTP_PROXY in the environment must not carry the benchmark's requests.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CURL = ("curl", "--noproxy", "*", "-sS", "-o", "/dev/null", "-w")
MIB = 1024 * 1024


@dataclass
class Target:
    """One way to reach the upstream, and the process whose CPU and memory it costs."""

    name: str
    url: str
    pid: int | None

    def cpu_seconds(self) -> float:
        """CPU time of all the process's threads so far, to the nanosecond (schedstat)."""
        if self.pid is None:
            return 0.0
        tasks = Path(f"/proc/{self.pid}/task").glob("*/schedstat")
        return sum(int(task.read_text().split()[0]) for task in tasks) / 1e9

    def memory_kib(self, field_name: str) -> int:
        assert self.pid is not None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
        raise LookupError(field_name)

    def reset_peak_memory(self) -> None:
        """Start VmHWM again from the current RSS (Linux 4.0+)."""
        assert self.pid is not None
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


@dataclass
class Results:
    """Measurements by metric and target: one value per round."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    once: dict[str, float] = field(default_factory=dict)

    def add(self, metric: str, target: str, value: float) -> None:
        self.values.setdefault(metric, {}).setdefault(target, []).append(value)


# --- the processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
        return port


def wait_for(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with DIRECT.open(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s")
        time.sleep(0.02)


def nginx_config(workdir: Path, port: int, body: str, upstream: str = "") -> Path:
    """A one-process nginx (no master), so one pid holds all of its CPU time."""
    user = "user root;" if os.geteuid() == 0 else ""
    path = workdir / f"nginx-{port}.conf"
    path.write_text(
        f"""
load_module {ECHO_MODULE};
{user}
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx-{port}.pid;
error_log {workdir}/nginx-{port}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {workdir}/body-{port};
    proxy_temp_path {workdir}/proxy-{port};
    fastcgi_temp_path {workdir}/fastcgi-{port};
    uwsgi_temp_path {workdir}/uwsgi-{port};
    scgi_temp_path {workdir}/scgi-{port};
    sendfile on;
    keepalive_requests 1000000;
    client_max_body_size 0;
    {upstream}
    server {{
        listen 127.0.0.1:{port};
{body}
    }}
}}
"""
    )
    return path


def upstream_nginx(workdir: Path, port: int) -> str:
    files = workdir / "files"
    return nginx_config(
        workdir,
        port,
        f"""
        access_log off;
        location = /small {{ default_type application/json; return 200 '{SMALL_ANSWER}'; }}
        location /files/ {{ alias {files}/; }}
        location = /upload {{
            client_body_buffer_size 128m;
            echo_read_request_body;
            echo '{{"received": true}}';
        }}
""",
    ).as_posix()


def proxy_nginx(workdir: Path, port: int, upstream_port: int) -> str:
    return nginx_config(
        workdir,
        port,
        f"""
        access_log {workdir}/nginx-proxy.access.log;
        location / {{
            proxy_pass http://skill_engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer bench-fixed-token";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            client_body_buffer_size 64k;
        }}
""",
        upstream=f"upstream skill_engine {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}",
    ).as_posix()


def product_config(
    workdir: Path, name: str, port: int, admin: int, token_url: str, upstream: str
) -> Path:
    """The product as shipped: only what must name this machine is set."""
    path = workdir / f"{name}.yaml"
    path.write_text(
        json.dumps(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "upstream": {"url": upstream},
                "auth": {
                    "token_url": token_url,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                    "audience": AUDIENCE,
                    "tenant": "bench",
                },
            }
        )
    )
    return path


class Processes:
    """Every process the benchmark starts, stopped at the end whatever happens; each
    writes its output to NAME.log in the work directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.named: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def started(self) -> list[subprocess.Popen[bytes]]:
        return list(self.named.values())

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.named[name] = process
        return process

    def exited(self) -> str:
        """The end of the log of each process that has exited, for an error message."""
        return "".join(
            f"\n--- {name} exited with {process.returncode}:\n"
            + (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
            for name, process in self.named.items()
            if process.poll() is not None
        )

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def make_file(path: Path, size: int) -> Path:
    """A sparse file: its bytes cost no disk, and nothing on the way compresses them."""
    with path.open("wb") as file:
        file.truncate(size)
    return path


def start_all(processes: Processes, size: int) -> tuple[dict[str, Target], float]:
    """Start the upstream, the token endpoint and the targets; the time the product (as
    shipped) took from its start to `/readyz` answering 200, its token fetched."""
    workdir = processes.workdir
    (workdir / "files").mkdir()
    make_file(workdir / "files" / "big", size)
    up, ng, token = (free_port() for _ in range(3))
    upstream = f"http://127.0.0.1:{up}"
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    processes.start("upstream", [nginx, "-e", "stderr", "-c", upstream_nginx(workdir, up)])
    proxy_ng = processes.start(
        "nginx-proxy", [nginx, "-e", "stderr", "-c", proxy_nginx(workdir, ng, up)]
    )
    processes.start("token-endpoint", [sys.executable, __file__, "--token-endpoint", str(token)])
    targets = {
        "direct": Target("direct", upstream, None),
        "nginx": Target("nginx", f"http://127.0.0.1:{ng}", proxy_ng.pid),
    }
    for name, loop in zip(YARDSTICKS, ([], ["uvloop"]), strict=True):
        port = free_port()
        command = [sys.executable, str(BENCH / "bare_proxy.py"), str(port), upstream, *loop]
        targets[name] = Target(name, f"http://127.0.0.1:{port}", processes.start(name, command).pid)
    for target in targets.values():
        wait_for_any_answer(f"{target.url}/small")
    wait_for_any_answer(f"http://127.0.0.1:{token}/")

    startup = 0.0
    for name, loop in zip(PRODUCTS, ("auto", "asyncio"), strict=True):
        port, admin = free_port(), free_port()
        config = product_config(
            workdir, name, port, admin, f"http://127.0.0.1:{token}/oauth/token", upstream
        )
        began = time.perf_counter()
        command = [sys.executable, "-m", "proxy", "run", "--config", str(config), "--loop", loop]
        product = processes.start(name, command)
        wait_for(f"http://127.0.0.1:{admin}/readyz")
        startup = startup or time.perf_counter() - began
        targets[name] = Target(name, f"http://127.0.0.1:{port}", product.pid)
    return targets, startup


def wait_for_any_answer(url: str, timeout: float = 20.0) -> None:
    """Wait until something answers HTTP on `url`, whatever the status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with DIRECT.open(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing answered on {url} within {timeout:g} s")


def serve_token_endpoint(port: int) -> None:
    """The stand-in token endpoint of the tests, with the benchmark's credentials."""
    from aiohttp import web

    from proxy.standins import StandinTokenEndpoint

    endpoint = StandinTokenEndpoint(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE
    )
    web.run_app(endpoint.app(), host="127.0.0.1", port=port, access_log=None, print=None)


# --- the measurements -----------------------------------------------------------------------

_WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(ms|s)")
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def run(command: list[str], timeout: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def measure_wrk(target: Target, results: Results, duration: float) -> None:
    """Requests per second and p50/p99 latency at 64 connections; CPU per request."""
    cpu = target.cpu_seconds()
    output = run(
        ["wrk", "-t1", "-c64", f"-d{duration:g}s", "--latency", f"{target.url}/small"],
        timeout=duration + 30,
    )
    cpu = target.cpu_seconds() - cpu
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk against {target.name} saw errors:\n{output}")
    latency = {p: float(v) * _UNIT[unit] for p, v, unit in _WRK_LATENCY.findall(output)}
    requests_match = _WRK_REQUESTS.search(output)
    assert requests_match is not None, output
    requests = int(requests_match.group(1))
    seconds = float(requests_match.group(2)) * (1e-3 if requests_match.group(3) == "ms" else 1)
    results.add("wrk_rps", target.name, requests / seconds)
    results.add("wrk_p50_ms", target.name, latency["50"])
    results.add("wrk_p99_ms", target.name, latency["99"])
    if target.pid is not None:
        results.add("cpu_us_per_request", target.name, cpu / requests * 1e6)


def measure_fixed_rate(target: Target, results: Results, duration: int, rate: int) -> None:
    """Latency percentiles at a fixed, moderate request rate (bench/rate.py, microsecond
    resolution), and the CPU per request at that rate."""
    cpu = target.cpu_seconds()
    output = run(
        [sys.executable, str(BENCH / "rate.py"), f"{target.url}/small", str(rate), str(duration)],
        timeout=duration + 30,
    )
    cpu = target.cpu_seconds() - cpu
    outcome = json.loads(output)
    if outcome["failed"] or not outcome["requests"]:
        raise RuntimeError(f"fixed rate against {target.name}: {outcome}")
    results.add("rate_p50_ms", target.name, outcome["p50_us"] / 1000)
    results.add("rate_p99_ms", target.name, outcome["p99_us"] / 1000)
    if target.pid is not None:
        results.add("rate_cpu_us_per_request", target.name, cpu / outcome["requests"] * 1e6)


def measure_streams(target: Target, results: Results, workdir: Path, size: int) -> None:
    """A download and an upload of `size` bytes: MB/s, and the target's CPU time for each."""
    for direction in ("download", "upload"):
        cpu = target.cpu_seconds()
        began = time.perf_counter()
        transfer(target, workdir, direction, "big")
        elapsed = time.perf_counter() - began
        cpu = target.cpu_seconds() - cpu
        results.add(f"{direction}_mb_s", target.name, size / elapsed / 1e6)
        if target.pid is not None:
            results.add(f"{direction}_cpu_ms", target.name, cpu * 1000)


def transfer(target: Target, workdir: Path, direction: str, name: str) -> None:
    """One streamed transfer of the file `name` through `target`, checked for its size."""
    path = workdir / "files" / name
    if direction == "download":
        command = [*CURL, "%{http_code} %{size_download}"]
        command.append(f"{target.url}/files/{name}")
    else:
        command = [*CURL, "%{http_code} %{size_upload}"]
        command += ["-X", "POST", "-H", "Content-Type: application/octet-stream"]
        command += ["-T", str(path), f"{target.url}/upload"]
    status, moved = run(command, timeout=600).split()
    if status != "200" or int(moved) != path.stat().st_size:
        raise RuntimeError(f"{direction} through {target.name}: HTTP {status}, {moved} bytes")


def measure_idle_memory(targets: dict[str, Target], results: Results) -> None:
    """The RSS of the proxies and the yardsticks, idle after the warm-up."""
    for name in (*YARDSTICKS, *PRODUCTS):
        results.once[f"{name}_idle_rss_mib"] = targets[name].memory_kib("VmRSS") / 1024


def measure_streaming_memory(targets: dict[str, Target], results: Results, workdir: Path) -> None:
    """Peak RSS while a 1 GiB body streams each way through the proxies and the yardsticks."""
    for name in (*YARDSTICKS, *PRODUCTS):
        target = targets[name]
        target.reset_peak_memory()
        transfer(target, workdir, "download", "huge")
        transfer(target, workdir, "upload", "huge")
        results.once[f"{name}_stream_peak_rss_mib"] = target.memory_kib("VmHWM") / 1024


def measure_import(results: Results, repeat: int) -> None:
    """`import proxy` and `import proxy.cli` (all that `run` loads), each in a new process."""
    for module in ("proxy", "proxy.cli"):
        code = (
            "import time; began = time.perf_counter(); "
            f"import {module}; print(time.perf_counter() - began)"
        )
        seconds = [float(run([sys.executable, "-c", code], timeout=60)) for _ in range(repeat)]
        results.once[f"import_{module.replace('.', '_')}_ms"] = statistics.median(seconds) * 1000


def rotated(names: tuple[str, ...], round_number: int) -> Iterator[str]:
    shift = round_number % len(names)
    yield from names[shift:] + names[:shift]


def benchmark(arguments: argparse.Namespace) -> Results:
    results = Results()
    size = arguments.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="skill-engine-proxy-bench-") as temporary:
        workdir = Path(temporary)
        processes = Processes(workdir)
        try:
            try:
                targets, startup = start_all(processes, size)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}{processes.exited()}") from None
            results.once["proxy_startup_ms"] = startup * 1000
            if arguments.huge:
                make_file(workdir / "files" / "huge", 1024 * MIB)
            for target in targets.values():  # warm-up: connections, token, caches
                run(["wrk", "-t1", "-c64", "-d1s", f"{target.url}/small"], timeout=30)
            measure_idle_memory(targets, results)
            for round_number in range(arguments.rounds):
                for measure in measurements(arguments, workdir, size):
                    for name in rotated(TARGETS, round_number):
                        measure(targets[name], results)
                print(f"round {round_number + 1} of {arguments.rounds} done", file=sys.stderr)
            if arguments.huge:
                measure_streaming_memory(targets, results, workdir)
            measure_import(results, repeat=5)
        finally:
            processes.stop()
    return results


def measurements(
    arguments: argparse.Namespace, workdir: Path, size: int
) -> list[Callable[[Target, Results], None]]:
    duration = arguments.duration
    return [
        lambda target, results: measure_wrk(target, results, duration),
        lambda target, results: measure_fixed_rate(target, results, duration, arguments.rate),
        lambda target, results: measure_streams(target, results, workdir, size),
    ]


# --- the report -----------------------------------------------------------------------------

ROWS = (
    ("wrk_rps", "requests/s at 64 connections", "{:.0f}"),
    ("wrk_p50_ms", "p50 latency at 64 connections (ms)", "{:.2f}"),
    ("wrk_p99_ms", "p99 latency at 64 connections (ms)", "{:.2f}"),
    ("cpu_us_per_request", "CPU per small request at 64 connections (µs)", "{:.0f}"),
    ("rate_cpu_us_per_request", "CPU per small request at the fixed rate (µs)", "{:.0f}"),
    ("rate_p50_ms", "p50 latency at the fixed rate (ms)", "{:.3f}"),
    ("rate_p99_ms", "p99 latency at the fixed rate (ms)", "{:.3f}"),
    ("download_mb_s", "download (MB/s)", "{:.0f}"),
    ("download_cpu_ms", "CPU per download (ms)", "{:.0f}"),
    ("upload_mb_s", "upload (MB/s)", "{:.0f}"),
    ("upload_cpu_ms", "CPU per upload (ms)", "{:.0f}"),
)


def spread(values: list[float], shown: str) -> str:
    if len(values) == 1:
        return shown.format(values[0])
    low, high = shown.format(min(values)), shown.format(max(values))
    return f"{shown.format(statistics.median(values))} ({low}-{high})"


def ratios(results: Results) -> dict[str, dict[str, list[float]]]:
    """Round by round: each product's figure over another target's (`RATIO_COLUMNS`); for
    latencies at the fixed rate, each proxy's added latency over direct."""
    found: dict[str, dict[str, list[float]]] = {}
    for metric, by_target in results.values.items():
        for column in RATIO_COLUMNS:
            mine, other = column.split("/")
            if mine in by_target and other in by_target and all(by_target[other]):
                found.setdefault(metric, {})[column] = [
                    a / b for a, b in zip(by_target[mine], by_target[other], strict=True)
                ]
        if metric.startswith("rate_p"):
            for name in TARGETS[1:]:
                found.setdefault(f"added_{metric}", {})[name] = [
                    mine - direct
                    for mine, direct in zip(by_target[name], by_target["direct"], strict=True)
                ]
    return found


def report(results: Results, arguments: argparse.Namespace) -> str:
    lines = [
        f"skill-engine-proxy benchmark, {time.strftime('%Y-%m-%d')}: {arguments.rounds} rounds,"
        f" {arguments.duration:g} s per load, {arguments.rate} requests/s for the fixed rate,"
        f" {arguments.size_mib} MiB streams",
        f"machine: {os.cpu_count()} CPUs, {platform.python_implementation()}"
        f" {platform.python_version()} ({' '.join(platform.python_build())}),"
        f" {platform.machine()}; the proxy's default loop here:"
        f" {'uvloop' if has_uvloop() else 'asyncio'}",
        "",
        "median (min-max) over rounds",
        "",
        "| | " + " | ".join(TARGETS) + " |",
        "| --- |" + " --- |" * len(TARGETS),
    ]
    for metric, label, shown in ROWS:
        by_target = results.values.get(metric, {})
        cells = [spread(by_target[name], shown) if name in by_target else "-" for name in TARGETS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += ["", "ratios, round by round: median (min-max)", ""]
    lines += ["| | " + " | ".join(RATIO_COLUMNS) + " |", "| --- |" + " --- |" * len(RATIO_COLUMNS)]
    found = ratios(results)
    for metric, label, _ in ROWS:
        cells = [
            spread(found[metric][column], "{:.2f}") if column in found.get(metric, {}) else "-"
            for column in RATIO_COLUMNS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += ["", "latency added over direct at the fixed rate (ms)", ""]
    lines += ["| | " + " | ".join(TARGETS[1:]) + " |", "| --- |" + " --- |" * len(TARGETS[1:])]
    for percent in ("p50", "p99"):
        added = found.get(f"added_rate_{percent}_ms", {})
        cells = [spread(added[name], "{:.3f}") for name in TARGETS[1:]]
        lines.append(f"| {percent} | " + " | ".join(cells) + " |")

    memory = (*YARDSTICKS, *PRODUCTS)
    lines += ["", "memory, once per run (MiB)", ""]
    lines += ["| | " + " | ".join(memory) + " |", "| --- |" + " --- |" * len(memory)]
    for figure, label in (
        ("idle_rss", "idle RSS"),
        ("stream_peak_rss", "peak RSS, 1 GiB each way"),
    ):
        cells = [f"{results.once.get(f'{name}_{figure}_mib', float('nan')):.1f}" for name in memory]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    once = results.once
    lines += [
        "",
        f"start-up, process start to /readyz 200 with the token: {once['proxy_startup_ms']:.0f} ms",
        f"import proxy: {once['import_proxy_ms']:.1f} ms; import proxy.cli (all that run"
        f" loads): {once['import_proxy_cli_ms']:.0f} ms",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5, help="seconds per load run")
    parser.add_argument("--rate", type=int, default=500, help="requests/s of the fixed rate")
    parser.add_argument("--size-mib", type=int, default=100, help="size of the streamed bodies")
    parser.add_argument(
        "--no-huge",
        dest="huge",
        action="store_false",
        help="skip the peak-memory run with 1 GiB bodies",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--token-endpoint", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.token_endpoint:
        serve_token_endpoint(arguments.token_endpoint)
        return
    missing = missing_tools()
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}; apt-get install nginx-light wrk curl")

    results = benchmark(arguments)
    print(report(results, arguments))
    if arguments.json:
        arguments.json.write_text(
            json.dumps({"rounds": results.values, "once": results.once, "ratios": ratios(results)})
        )


def missing_tools() -> list[str]:
    """What the benchmark needs and this machine lacks."""
    missing = [
        tool
        for tool in ("nginx", "wrk", "curl")
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin"))
    ]
    if not Path(ECHO_MODULE).exists():
        missing.append(f"nginx's echo module ({ECHO_MODULE})")
    return missing


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so that the processes started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
