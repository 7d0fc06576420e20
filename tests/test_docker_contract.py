"""The deployment contract: docker/Dockerfile, docker/Dockerfile.gpu, docker-compose.yml, .dockerignore.

No Docker daemon is needed: the files are parsed as text / YAML, the health-check command is run against a
real local HTTP server, and the container's exact CMD is run outside Docker (``reid serve``) against a
temporary data directory.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from index.redis_cluster import find_redis_cli, free_cluster_port
from index.redis_server import RedisBinaryNotFound, find_redis_server, free_port
from tests.ci import missing

yaml = pytest.importorskip("yaml", reason="PyYAML (dev extra) is needed to read docker-compose.yml")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERFILE_GPU = REPO / "docker" / "Dockerfile.gpu"
COMPOSE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"

SERVE_CMD = ["reid", "serve", "--host", "0.0.0.0", "--port", "8000"]


# ------------------------------------------------------------------------------------------- helpers


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with comments dropped and ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"dangling line continuation in {path}"
    return out


def instructions(parsed, name: str) -> list[str]:
    return [a for i, a in parsed if i == name]


def env_of(parsed) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(parsed, "ENV"):
        for tok in shlex.split(args):
            k, sep, v = tok.partition("=")
            assert sep, f"use ENV KEY=VALUE form: {args}"
            env[k] = v
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


def healthcheck_cmd(parsed) -> list[str]:
    (hc,) = instructions(parsed, "HEALTHCHECK")
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc)
    assert m, f"HEALTHCHECK must use the exec form CMD [...]: {hc}"
    return exec_form(m.group(1))


def reid_executable() -> Path | None:
    """The ``reid`` console script of the interpreter running the tests (the venv), else PATH."""
    here = Path(sys.executable).parent / "reid"
    if here.exists():
        return here
    found = shutil.which("reid")
    return Path(found) if found else None


@pytest.fixture(scope="module", params=[DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def dockerfile(request):
    assert request.param.exists(), request.param
    return request.param, parse_dockerfile(request.param)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --------------------------------------------------------------------------------------- Dockerfiles


def test_cmd_is_reid_serve(dockerfile):
    _, parsed = dockerfile
    cmds = instructions(parsed, "CMD")
    assert len(cmds) == 1
    assert exec_form(cmds[0]) == SERVE_CMD
    assert not instructions(parsed, "ENTRYPOINT"), "CMD alone should carry the command (easy to override)"


def test_non_root_user(dockerfile):
    _, parsed = dockerfile
    users = instructions(parsed, "USER")
    assert users and users[-1] == "reid"
    assert any(re.search(r"\buseradd\b.*\breid\b", a) for a in instructions(parsed, "RUN"))
    # the final USER comes after every RUN: nothing at build end runs as root by accident, and the
    # container's process is unprivileged
    last_user = max(i for i, (ins, _) in enumerate(parsed) if ins == "USER")
    assert not [a for ins, a in parsed[last_user:] if ins == "RUN"]
    # /data is writable by that user
    assert any("chown" in a and "/data" in a and "reid" in a for a in instructions(parsed, "RUN"))


def test_expose_env_volume(dockerfile):
    path, parsed = dockerfile
    assert instructions(parsed, "EXPOSE") == ["8000"]
    env = env_of(parsed)
    assert env["REID_DATA_DIR"] == "/data"
    model_dir = env["REID_MODEL_DIR"]
    assert model_dir.endswith("/site-packages/service/default_bundle"), model_dir
    # the python version in the path must be the image's python
    base = instructions(parsed, "FROM")[0]
    pyver = re.search(r"/python(3\.\d+)/", model_dir).group(1)
    if path == DOCKERFILE:
        assert base.startswith(f"python:{pyver}-slim")
    else:
        assert "ubuntu22.04" in base and pyver == "3.10"  # Ubuntu 22.04's python3
    # the build fails loudly if the bundle is not where REID_MODEL_DIR points
    assert any('test -d "$REID_MODEL_DIR"' in a for a in instructions(parsed, "RUN"))
    assert any("/data" in v for v in instructions(parsed, "VOLUME"))


def test_healthcheck_uses_python_urllib(dockerfile):
    _, parsed = dockerfile
    (hc,) = instructions(parsed, "HEALTHCHECK")
    assert "curl" not in hc and "wget" not in hc
    cmd = healthcheck_cmd(parsed)
    assert cmd[0] == "python" and "urllib" in cmd[-1] and "/healthz" in cmd[-1] and ":8000/" in cmd[-1]
    for opt in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert opt in hc


def test_cpu_image_installs_without_torch():
    parsed = parse_dockerfile(DOCKERFILE)
    assert instructions(parsed, "FROM")[0] == "python:3.11-slim"
    runs = " ".join(instructions(parsed, "RUN"))
    assert re.search(r"pip install (?:\S+ )*/src(\s|$)", runs), "installs the package itself"
    assert "[train]" not in runs and "torch" not in runs and "[gpu]" not in runs
    assert "-e " not in runs, "a regular install, so the default bundle lands in site-packages"


def test_gpu_image():
    parsed = parse_dockerfile(DOCKERFILE_GPU)
    base = instructions(parsed, "FROM")[0]
    assert base.startswith("nvidia/cuda:") and "cudnn" in base and "runtime" in base
    runs = " ".join(instructions(parsed, "RUN"))
    assert "[gpu]" in runs and "[train]" not in runs and "torch" not in runs
    # the CPU wheels pulled in by the base dependencies must not shadow the GPU ones
    assert re.search(r"pip uninstall -y .*onnxruntime", runs) and "faiss-cpu" in runs
    assert "onnxruntime-gpu" in runs and "faiss-gpu" in runs


def test_gpu_extra_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = " ".join(project["optional-dependencies"]["gpu"])
    assert "onnxruntime-gpu" in gpu and "faiss-gpu" in gpu
    assert not any("torch" in d for d in project["dependencies"]), "serving install must not need torch"
    assert project["scripts"]["reid"], "the image's CMD needs the reid console script"


def test_default_bundle_is_package_data():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = cfg["tool"]["setuptools"]["package-data"]["service"]
    assert any(p.startswith("default_bundle") for p in data)


def test_dockerfile_copies_repo(dockerfile):
    _, parsed = dockerfile
    assert any(a.split()[0] == "." for a in instructions(parsed, "COPY"))


# ----------------------------------------------------------------------------------------- .dockerignore


def _ignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_excludes_local_state():
    pats = _ignore_patterns()
    for rel in (".venv/bin/python", ".git/HEAD", "data/x.jpg", "runs/exp/model.pt", "test-artifacts/a.log"):
        assert _ignored(rel, pats), rel


def test_dockerignore_keeps_what_the_install_needs():
    pats = _ignore_patterns()
    needed = ["pyproject.toml", "README.md", "service/__init__.py", "index/__init__.py", "models/__init__.py"]
    needed += ["scripts/__init__.py", "bench/__init__.py"]
    needed += ["service/default_bundle/model.json", "service/default_bundle/encoder.onnx"]
    needed += ["service/default_bundle/nformer.onnx", "service/static/index.html"]
    for rel in needed:
        assert not _ignored(rel, pats), rel


# ---------------------------------------------------------------------------------------- compose


def _hc_script(test: list[str]) -> str:
    assert test[0] in ("CMD", "CMD-SHELL")
    return " ".join(test[1:])


def assert_shares_the_blob_store(service: dict, volume: str = "reid-blobs") -> None:
    """Kept image bytes live in the blob store, which every API replica must see: REID_BLOB_DIR is the mount point
    of one named volume (not the replica's own anonymous /data), and the image creates it owned by its user."""
    blob_dir = service["environment"]["REID_BLOB_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if ":" in v}
    assert mounts.get(blob_dir) == volume, service["volumes"]
    for dockerfile in (DOCKERFILE, DOCKERFILE_GPU):
        runs = " ".join(instructions(parse_dockerfile(dockerfile), "RUN"))
        assert re.search(rf"mkdir -p [^&]*{re.escape(blob_dir)}", runs) and "chown -R reid:reid /data" in runs


def test_compose_api(compose):
    api = compose["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    assert api["build"].get("context", ".") == "."
    assert "ports" not in api and api["expose"] == ["8000"]  # replicas: only the proxy publishes a port
    assert api["deploy"]["replicas"] >= 2
    assert api["environment"]["REID_REDIS_URL"] == "redis://redis:6379/0"
    assert api["environment"]["REID_DATA_DIR"] == "/data"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["restart"] == "unless-stopped"
    # each replica its own snapshots (an anonymous volume), one shared volume for adapted bundles
    assert "/data" in api["volumes"] and "reid-bundles:/data/bundles" in api["volumes"]
    assert_shares_the_blob_store(api)
    script = _hc_script(api["healthcheck"]["test"])
    assert "/healthz" in script and "urllib" in script and "curl" not in script
    assert "profiles" not in api


def test_compose_proxy_spreads_one_port_over_the_replicas(compose):
    proxy = compose["services"]["proxy"]
    assert [str(p) for p in proxy["ports"]] == ["8000:8000"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    assert "./docker/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in proxy["volumes"]
    assert "/healthz" in _hc_script(proxy["healthcheck"]["test"]) and proxy["restart"] == "unless-stopped"
    conf = (REPO / "docker" / "nginx.conf").read_text()
    assert re.search(r"upstream reid_api \{[^}]*server api:8000", conf)
    assert "listen 8000;" in conf and "proxy_pass http://reid_api;" in conf
    body = re.search(r"client_max_body_size (\d+)m;", conf)
    from service.settings import Settings

    assert body and int(body.group(1)) * 2**20 >= Settings().max_upload_bytes  # the API's limit decides


def test_compose_redis_is_durable(compose):
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7-alpine"
    cmd = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    joined = " ".join(cmd)
    assert "--appendonly yes" in joined
    assert "--appendfsync always" in joined
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"] or "redis-cli ping" in _hc_script(
        redis["healthcheck"]["test"]
    )
    assert redis["restart"] in ("unless-stopped", "always")


def test_compose_gpu_profile(compose):
    gpu = compose["services"]["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices)
    assert gpu["environment"]["REID_REDIS_URL"] == "redis://redis:6379/0"
    assert gpu["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in _hc_script(gpu["healthcheck"]["test"])
    assert gpu["restart"] == "unless-stopped"
    assert_shares_the_blob_store(gpu)
    # `docker compose --profile gpu up` starts both APIs: they must not fight over a host port
    host_ports = lambda s: {str(p).split(":")[0] for p in s.get("ports", [])}  # noqa: E731
    assert not host_ports(gpu) & host_ports(compose["services"]["api"])


def test_compose_named_volumes_declared(compose):
    declared = set(compose.get("volumes") or {})
    assert "reid-blobs" in declared
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/", "~")):
                assert src in declared, f"{name}: volume {src} not declared"


def test_compose_healthcheck_matches_image():
    """The compose health check and the image HEALTHCHECK run the same probe."""
    img = healthcheck_cmd(parse_dockerfile(DOCKERFILE))
    api = yaml.safe_load(COMPOSE.read_text())["services"]["api"]
    assert api["healthcheck"]["test"][1:] == img


# ------------------------------------------------------------------------- compose: the cluster profile

CLUSTER_NODES = [f"redis-node-{i}" for i in range(1, 7)]
CLUSTER_SERVICES = {*CLUSTER_NODES, "redis-cluster-init", "api-cluster", "proxy-cluster"}


# Shims that let the init script run outside Docker (test_compose_cluster_init_script_runs), where the service
# names do not resolve.
GETENT_SHIM = """#!PYTHON
import sys  # getent hosts redis-node-N: a made-up address for node N
name = sys.argv[2]
print("10.99.0." + name.rsplit("-", 1)[1] + "  " + name)
"""
REDIS_CLI_SHIM = """#!PYTHON
import os, re, sys  # redis-node-N and 10.99.0.N:6379 become node N's local address, then the real redis-cli runs
ports = os.environ["NODE_PORTS"].split(",")
args = []
for a in sys.argv[1:]:
    if m := re.fullmatch(r"redis-node-(\\d)", a):
        args += ["127.0.0.1", "-p", ports[int(m[1]) - 1]]
    elif m := re.fullmatch(r"10\\.99\\.0\\.(\\d):6379", a):
        args.append("127.0.0.1:" + ports[int(m[1]) - 1])
    else:
        args.append(a)
os.execv(os.environ["REAL_REDIS_CLI"], [os.environ["REAL_REDIS_CLI"]] + args)
"""


def _cmd(service: dict) -> list[str]:
    return service["command"] if isinstance(service["command"], list) else shlex.split(service["command"])


def _init_script(compose: dict) -> str:
    cmd = compose["services"]["redis-cluster-init"]["command"]
    assert cmd[:2] == ["sh", "-c"] and len(cmd) == 3, cmd
    return cmd[2]


def test_compose_cluster_profile_services(compose):
    profiled = {n for n, s in compose["services"].items() if "cluster" in s.get("profiles", [])}
    assert profiled == CLUSTER_SERVICES
    assert all(compose["services"][n]["profiles"] == ["cluster"] for n in CLUSTER_SERVICES)


def test_compose_cluster_nodes(compose):
    volumes = set()
    for name in CLUSTER_NODES:
        node = compose["services"][name]
        assert node["image"] == compose["services"]["redis"]["image"]  # the same Redis as the default profile
        joined = " ".join(_cmd(node))
        assert _cmd(node)[0] == "redis-server"
        for flag in ("--cluster-enabled yes", "--cluster-config-file nodes.conf", "--appendonly yes",
                     "--appendfsync always", "--dir /data"):
            assert flag in joined, (name, flag)
        assert re.search(r"--cluster-node-timeout \d+", joined)
        # nodes.conf and the AOF are in --dir, on the node's own named volume: a recreated container keeps its
        # node id, its slots and its data
        (vol,) = node["volumes"]
        assert vol == f"{name}-data:/data"
        volumes.add(vol.split(":")[0])
        assert "redis-cli ping" in " ".join(node["healthcheck"]["test"])
        assert node["restart"] == "unless-stopped"
        assert "ports" not in node  # reached inside the compose network only
    assert len(volumes) == 6


def test_compose_cluster_init_creates_three_masters_with_one_replica_each(compose):
    init = compose["services"]["redis-cluster-init"]
    assert init["image"] == compose["services"]["redis"]["image"]  # its redis-cli matches the nodes
    assert init["depends_on"] == {n: {"condition": "service_healthy"} for n in CLUSTER_NODES}
    assert init["restart"] == "no"  # one-shot: the APIs wait for it to have completed successfully
    script = _init_script(compose)
    (create,) = [line for line in script.splitlines() if "--cluster create" in line]
    assert "--cluster-replicas 1" in create and "--cluster-yes" in create
    # the six nodes, resolved to addresses (CLUSTER MEET takes IPs only): 6 nodes / (1 master + 1 replica) = 3
    (hosts,) = [line for line in script.splitlines() if line.strip().startswith("for host in")]
    assert hosts.split(" in ", 1)[1].rstrip("; do").split() == CLUSTER_NODES
    assert "getent hosts" in script and ":6379" in script
    # idempotent: nodes that already know each other are not created again, only waited for
    assert "cluster_known_nodes" in script and "cluster_state:ok" in script
    # compose interpolates $NAME in the file: each $ meant for the shell must be written $$
    assert "$" not in script.replace("$$", ""), script


@pytest.mark.timeout(120)
def test_compose_cluster_init_script_runs(compose, tmp_path):
    """The init script, run for real by sh against six redis-server started with the nodes' own command: it forms
    3 masters with 1 replica each, and a second run (the nodes' volumes already hold a cluster) changes nothing.
    Outside Docker the service names do not resolve: a `getent` shim gives node N the made-up address 10.99.0.N
    and a `redis-cli` shim sends redis-node-N / 10.99.0.N:6379 to node N's local port."""
    try:
        server = find_redis_server()
        cli = find_redis_cli(server)
    except RedisBinaryNotFound as e:
        missing(str(e))
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("getent", GETENT_SHIM), ("redis-cli", REDIS_CLI_SHIM)):
        (shims / name).write_text(text.replace("PYTHON", sys.executable))
        (shims / name).chmod(0o755)
    procs, ports = [], []
    try:
        for name in CLUSTER_NODES:
            port = free_cluster_port("127.0.0.1", set(ports) | {p + 10000 for p in ports})
            ports.append(port)
            folder = tmp_path / name
            folder.mkdir()
            cmd = [server, *_cmd(compose["services"][name])[1:], "--bind", "127.0.0.1", "--port", str(port)]
            cmd[cmd.index("--dir") + 1] = str(folder)
            with open(folder / "redis-server.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT))
        env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "NODE_PORTS": ",".join(map(str, ports)),
               "REAL_REDIS_CLI": cli}
        deadline = time.monotonic() + 15
        for name in CLUSTER_NODES:  # through the shim: checks it too
            while subprocess.run(["redis-cli", "-h", name, "ping"], env=env, capture_output=True,
                                 text=True).stdout.strip() != "PONG":
                assert time.monotonic() < deadline, f"{name} did not answer"
                time.sleep(0.05)
        script = _init_script(compose).replace("$$", "$")  # what compose hands to the container
        first = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=90)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "All 16384 slots covered" in first.stdout, first.stdout
        second = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=90)
        assert second.returncode == 0 and "not creating" in second.stdout, second.stdout + second.stderr
        # each node's own word on its role (another node's view of it follows by gossip, a moment later)
        roles = [subprocess.run([cli, "-p", str(port), "role"], capture_output=True, text=True).stdout.split()[0]
                 for port in ports]
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3, roles
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)


def test_compose_cluster_api(compose):
    api, cl = compose["services"]["api"], compose["services"]["api-cluster"]
    for key in ("build", "image", "expose", "healthcheck", "restart"):
        assert cl[key] == api[key], key  # the same image and probe as the default API
    assert cl["deploy"]["replicas"] >= 2 and "ports" not in cl
    env = cl["environment"]
    assert env["REID_REDIS_CLUSTER"] == "true"  # a string: compose refuses a YAML boolean in environment
    url = re.fullmatch(r"redis://([\w-]+):6379/0", env["REID_REDIS_URL"])
    assert url and url.group(1) in CLUSTER_NODES  # one node; the client discovers the others (db 0 only)
    assert env["REID_DATA_DIR"] == "/data"
    assert cl["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}
    # like api: each replica its own snapshots, named volumes shared by the replicas for bundles and blobs
    assert "/data" in cl["volumes"] and "reid-cluster-bundles:/data/bundles" in cl["volumes"]
    assert_shares_the_blob_store(cl, volume="reid-cluster-blobs")


def test_compose_a_blob_store_belongs_to_one_redis(compose):
    """A blob volume is referenced by one Redis's records only: `reid gc-blobs` against one store removes what
    that store does not reference, which would include the other store's blobs."""
    owners: dict[str, set[str]] = {}
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        if "REID_BLOB_DIR" not in env:
            continue
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"] if ":" in v}
        owners.setdefault(mounts[env["REID_BLOB_DIR"]], set()).add(env["REID_REDIS_URL"])
    assert owners == {"reid-blobs": {"redis://redis:6379/0"}, "reid-cluster-blobs": {"redis://redis-node-1:6379/0"}}


def test_compose_cluster_proxy(compose):
    proxy, cl = compose["services"]["proxy"], compose["services"]["proxy-cluster"]
    assert cl["image"] == proxy["image"] and cl["healthcheck"] == proxy["healthcheck"]
    assert cl["depends_on"] == {"api-cluster": {"condition": "service_healthy"}}
    assert cl["volumes"] == ["./docker/nginx-cluster.conf:/etc/nginx/conf.d/default.conf:ro"]
    # no two services publish the same host port (`--profile cluster --profile gpu up` starts them all)
    published = [str(p).split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)) and [str(p) for p in cl["ports"]] == ["8002:8000"]

    def body(path: Path) -> list[str]:
        return [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]

    # the same proxy as the default one but for the upstream host
    default, cluster = body(REPO / "docker" / "nginx.conf"), body(REPO / "docker" / "nginx-cluster.conf")
    assert [ln.replace("server api-cluster:8000", "server api:8000") for ln in cluster] == default
    assert sum("server api-cluster:8000" in ln for ln in cluster) == 1


def test_compose_default_profile_needs_nothing_from_the_cluster(compose):
    default = {n: s for n, s in compose["services"].items() if not s.get("profiles")}
    assert set(default) == {"api", "proxy", "redis"}  # `docker compose up` starts what it started before
    profiled = set(compose["services"]) - set(default)
    cluster_volumes = {f"{n}-data" for n in CLUSTER_NODES} | {"reid-cluster-bundles", "reid-cluster-blobs"}
    for name, svc in default.items():
        assert not set(svc.get("depends_on") or {}) & profiled, name
        assert "REID_REDIS_CLUSTER" not in (svc.get("environment") or {}), name
        assert not {v.split(":")[0] for v in svc.get("volumes", [])} & cluster_volumes, name
    assert cluster_volumes <= set(compose["volumes"])  # every named volume of the profile is declared


# ------------------------------------------------------------------ the health probe, run for real


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,expect_ok", [(200, True), (503, False)])
def test_healthcheck_probe_runs(status, expect_ok):
    """The image's HEALTHCHECK command (port swapped) exits 0 on a 200 /healthz and non-zero otherwise."""
    handler = type("H", (_Health,), {"status": status})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        cmd = healthcheck_cmd(parse_dockerfile(DOCKERFILE))
        cmd = [sys.executable] + [c.replace(":8000/", f":{port}/") for c in cmd[1:]]
        rc = subprocess.run(cmd, capture_output=True, timeout=30).returncode
        assert (rc == 0) is expect_ok
    finally:
        srv.shutdown()
        srv.server_close()


def test_healthcheck_probe_fails_without_server():
    cmd = healthcheck_cmd(parse_dockerfile(DOCKERFILE))
    cmd = [sys.executable] + [c.replace(":8000/", f":{free_port()}/") for c in cmd[1:]]
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode != 0


# ----------------------------------------------------- the container's CMD, run outside Docker


def _serve_skip_reason() -> str | None:
    if reid_executable() is None:
        return "the `reid` console script is not installed in this environment yet (pip install -e .)"
    if importlib.util.find_spec("scripts.cli") is None:
        return "scripts/cli.py (the `reid` command) is not written yet"
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(_serve_skip_reason() is not None, reason=str(_serve_skip_reason()))
def test_container_cmd_serves_healthz(tmp_path, request):
    """Run the Dockerfile's CMD (host/port swapped for a local free port) and wait for /healthz 200."""
    cmd = exec_form(instructions(parse_dockerfile(DOCKERFILE), "CMD")[0])
    port = free_port()
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[0] = str(reid_executable())

    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env["REID_DATA_DIR"] = str(tmp_path / "data")
    # mirror the image: REID_MODEL_DIR is the installed package's default bundle; until that bundle has
    # been built, the tiny test bundle from conftest stands in for it (the CMD itself is what is tested)
    spec = importlib.util.find_spec("service")
    bundle = Path(spec.origin).parent / "default_bundle" if spec is not None and spec.origin else None
    if bundle is not None and (bundle / "model.json").is_file():
        env["REID_MODEL_DIR"] = str(bundle)
    else:
        try:
            env["REID_MODEL_DIR"] = str(request.getfixturevalue("tiny_bundle"))
        except pytest.FixtureLookupError:
            pytest.skip("service/default_bundle is not built yet and conftest has no tiny_bundle fixture")
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}/healthz"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            status = None
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        status = r.status
                    if status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            assert status == 200, f"/healthz not 200 within 120 s (last {status}):\n{log_path.read_text()[-4000:]}"
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`reid serve` did not stop within 60 s of SIGTERM:\n{log_path.read_text()[-4000:]}")
            assert rc in (0, -signal.SIGTERM), f"exit code {rc}:\n{log_path.read_text()[-4000:]}"
            # whatever it started in its session (the embedded redis-server) is stopped with it
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.25)
            else:
                pytest.fail("processes started by `reid serve` survived its shutdown")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            try:  # anything the server left in its session (e.g. an embedded redis-server)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
