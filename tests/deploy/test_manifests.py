"""The deploy files, checked offline: deploy/Dockerfile, the compose stack in deploy/compose
(against the compose-spec schema check-jsonschema vendors) with its Prometheus, alert and
Grafana files, and the kustomizations in deploy/k8s, rendered here and validated strictly
against Kubernetes' own schemas with kubernetes-validate. Nothing is built, pulled or run,
and nothing is downloaded: both validators carry their schemas."""

from __future__ import annotations

import base64
import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from deploy.cli import SERVERS
from workers.settings import MIN_SECRET_BYTES, Settings
from workers.worker import SHUTDOWN_TIMEOUT

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
KUBERNETES_VERSION = "1.30"

WORKERS = ("worker-1", "worker-2")
APIS = ("api-1", "api-2")
API_PORT = 8000
API_METRICS_PORT = 9465
WORKER_HEALTH_PORT = 8081
WORKER_METRICS_PORT = 9464
GRACE_SECONDS = 30
SHUTDOWN_SECONDS = SHUTDOWN_TIMEOUT.total_seconds()

# What the dashboard and the alerts may query: Tenure's metrics, the Temporal SDK's, `up`.
TENURE_METRICS = {
    "tenure_api_requests_total",
    "tenure_api_request_duration_seconds",
    "tenure_api_cache_reads_total",
    "tenure_api_refusals_total",
    "tenure_commands_total",
    "tenure_publish_failures_total",
    "tenure_offered_publishes_total",  # tests/workers/test_offers.py scrapes it from a worker
    "tenure_publish_lag_seconds",  # as it does this one, by the write that stored each
    "tenure_continue_as_new_total",
    "tenure_saga_outcomes_total",
    "tenure_webhooks_total",  # tests/workers/test_metrics.py scrapes both from a worker
    "tenure_webhook_subscribers_lost_total",
    "tenure_stuck_workflows",  # tests/workers/test_repair.py scrapes both from a watchdog
    "tenure_entity_repairs_total",
}
SDK_METRICS = {
    "temporal_workflow_task_schedule_to_start_latency",
    "temporal_activity_schedule_to_start_latency",
    "temporal_sticky_cache_size",
}
METRIC = re.compile(r"\b((?:tenure|temporal)_[a-z0-9_]+)")


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads, a histogram's series named by the histogram."""
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in METRIC.findall(expr)}


# --- Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def dockerfile_args() -> dict[str, str]:
    """Global ARGs (before the first FROM) with their defaults."""
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def image_uid() -> int:
    users = [rest for keyword, rest in dockerfile_stages()[-1] if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    return int(users[-1].split(":")[0])


def test_the_dockerfile_builds_in_one_stage_and_runs_in_a_slim_one() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "deploy/Dockerfile is not multi-stage"
    names = [shlex.split(stage[0][1]) for stage in stages]
    assert any(words[-2:-1] == ["AS"] and words[-1] == "builder" for words in names)
    args = dockerfile_args()
    runtime_image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], names[-1][0])
    assert runtime_image == "python:3.11-slim"
    runtime = stages[-1]
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert any(rest.startswith("--from=builder ") for rest in copies), "runtime copies no build"
    assert not any(keyword == "RUN" and "pip install" in rest for keyword, rest in runtime), (
        "the runtime stage installs packages itself instead of copying the builder's"
    )


def test_the_image_installs_no_dev_dependencies() -> None:
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN":
            assert "[dev]" not in rest and "optional-dependencies" not in rest, rest
            assert "--editable" not in rest and " -e " not in rest, rest


def test_the_image_runs_tenure_as_a_user_that_is_not_root() -> None:
    runtime = dockerfile_stages()[-1]
    users = [(i, rest) for i, (keyword, rest) in enumerate(runtime) if keyword == "USER"]
    assert users, "no USER in the runtime stage: the image runs as root"
    last_user_at, user = users[-1]
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user}: Kubernetes can only check runAsNonRoot on a numeric uid"
    assert int(uid) != 0
    assert not [k for k, _ in runtime[last_user_at:] if k == "RUN"], "RUN after the last USER"
    entrypoints = [json.loads(rest) for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    commands = [json.loads(rest) for keyword, rest in runtime if keyword == "CMD"]
    assert entrypoints[-1] == ["tenure"]
    assert commands[-1] == ["api"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "tenure" in pyproject["project"]["scripts"], "no `tenure` console script to run"
    assert commands[-1][0] in SERVERS


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/").rstrip("/")
        for prefix in prefixes:
            anywhere = pattern.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], bare)
            if fnmatch.fnmatch(prefix, bare) or anywhere:
                return True
    return False


def test_the_build_context_holds_what_the_image_copies_and_nothing_local() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for local in (".venv", ".data", ".git", "tests/api/http_audit/node_modules", ".ruff_cache"):
        assert dockerignored(local, patterns), f".dockerignore lets {local} into the context"
    assert dockerignored("api/__pycache__/app.cpython-311.pyc", patterns)
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source.rstrip("/"), patterns), f"COPY {source}: ignored"


# --- compose -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema against the compose-spec schema it vendors: no network."""
    schema = ["--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_compose_file_follows_the_compose_specification() -> None:
    checked = check_compose_schema(COMPOSE_FILE)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_compose_schema_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    text = COMPOSE_FILE.read_text()
    assert "stop_grace_period: 30s" in text
    broken.write_text(text.replace("stop_grace_period: 30s", "stop_grace_period: [30]", 1))
    checked = check_compose_schema(broken)
    assert checked.returncode != 0
    assert "stop_grace_period" in checked.stdout + checked.stderr


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as the container sees it (unset entries dropped)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: str(value) for name, value in env.items() if value is not None}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    needs = service.get("depends_on") or {}
    if isinstance(needs, list):
        return {name: "service_started" for name in needs}
    return {name: spec.get("condition", "service_started") for name, spec in needs.items()}


def test_two_workers_and_two_apis_run_the_image_built_from_deploy_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    tenure = {name for name, s in services.items() if "build" in s}
    assert tenure == set(WORKERS + APIS)
    for name in WORKERS + APIS:
        build = services[name]["build"]
        assert (COMPOSE_DIR / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE
        command = services[name]["command"]
        assert command == (["worker"] if name in WORKERS else ["api"]), name
        assert command[0] in SERVERS
    assert len({services[name]["image"] for name in WORKERS + APIS}) == 1


def test_every_tenure_service_is_healthchecked_on_readyz_and_stopped_gracefully(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in WORKERS + APIS:
        service = services[name]
        test = " ".join(service["healthcheck"]["test"])
        port = WORKER_HEALTH_PORT if name in WORKERS else API_PORT
        assert f"127.0.0.1:{port}/readyz" in test, name
        assert service["stop_grace_period"] == f"{GRACE_SECONDS}s", name
        assert service.get("read_only") is True, name
        assert "/tmp" in service.get("tmpfs", []), name
        needs = depends_on(service)
        assert needs["temporal"] == "service_healthy", name
        assert needs["redis"] == "service_healthy", name
        assert needs["temporal-create-namespace"] == "service_completed_successfully", name


def test_the_tenure_services_are_configured_for_production(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in WORKERS + APIS:
        env = environment(services[name])
        settings = Settings.from_env(env)
        assert settings.environment == "production", name
        assert settings.temporal_address == "temporal:7233", name
        assert settings.redis_url is not None and "//redis:6379" in settings.redis_url, name
        assert settings.log_format == "json", name
        if name in APIS:
            assert settings.api_host == "0.0.0.0" and settings.api_port == API_PORT, name
            assert env["TENURE_AUTH_SECRET"].startswith("${TENURE_AUTH_SECRET:?"), (
                f"{name}: the auth secret must come from the operator, never a default"
            )
            assert settings.api_shutdown_grace < GRACE_SECONDS, name
        else:
            assert settings.worker_health_host == "0.0.0.0", name
            assert settings.worker_health_port == WORKER_HEALTH_PORT, name
            assert settings.worker_metrics_port == WORKER_METRICS_PORT, name
            assert settings.worker_shutdown_grace + SHUTDOWN_SECONDS < GRACE_SECONDS, name
            assert "TENURE_AUTH_SECRET" not in env, f"{name} does not need the API's secret"


def test_redis_keeps_an_append_only_file_on_a_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:") and ":${REDIS_VERSION:-7" in redis["image"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    data = [v for v in redis["volumes"] if v.split(":")[1] == "/data"]
    assert data and data[0].split(":")[0] in compose["volumes"]


def test_every_depends_on_target_exists(services: dict[str, dict[str, Any]]) -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on {target}, which is no service"
            assert condition in conditions, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}'s health"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no").startswith(("no", "on-failure"))


def mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each volume, in short or long syntax."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            yield volume["source"], volume["target"]
        else:
            source, target, *_ = volume.split(":")
            yield source, target


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a bind mount puts at `container_path`, if one does."""
    for source, target in mounts(service):
        if not source.startswith((".", "/")):
            continue
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return (COMPOSE_DIR / source / container_path[len(target) :].lstrip("/")).resolve()
    return None


def test_every_file_compose_mounts_exists_and_every_volume_is_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name, service in services.items():
        for source, _ in mounts(service):
            if source.startswith((".", "/")):
                path = (COMPOSE_DIR / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which is not in the repository"
                assert REPO in path.parents, f"{name} mounts {source} from outside the repository"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
        for word in (service.get("entrypoint") or []) + (service.get("command") or []):
            if word.startswith("/scripts/"):
                script = host_path(service, word)
                assert script is not None and script.is_file(), f"{name} runs {word}: missing"


def test_temporal_is_set_up_as_temporals_current_compose_examples_do(
    services: dict[str, dict[str, Any]],
) -> None:
    assert not [s["image"] for s in services.values() if "auto-setup" in s.get("image", "")]
    assert services["temporal"]["image"].startswith("temporalio/server:")
    assert depends_on(services["temporal"]) == {
        "postgresql": "service_healthy",
        "temporal-admin-tools": "service_completed_successfully",
    }
    admin = services["temporal-admin-tools"]
    assert admin["image"].startswith("temporalio/admin-tools:")
    assert depends_on(admin) == {"postgresql": "service_healthy"}
    setup = host_path(admin, admin["command"][0])
    assert setup is not None
    script = setup.read_text()
    for step in ("create", "setup-schema -v 0.0", "update-schema -d"):
        assert f'--db "${{db}}" {step}' in script, step
    assert "temporal:temporal temporal_visibility:visibility" in script
    namespace = services["temporal-create-namespace"]
    assert depends_on(namespace) == {"temporal": "service_healthy"}
    created = host_path(namespace, namespace["command"][0])
    assert created is not None and "temporal operator namespace create" in created.read_text()
    assert services["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert services["postgresql"]["image"].startswith("postgres:")


def test_temporal_sets_the_search_attribute_the_watchdog_needs(
    services: dict[str, dict[str, Any]],
) -> None:
    temporal = services["temporal"]
    path = "/etc/temporal/" + environment(temporal)["DYNAMIC_CONFIG_FILE_PATH"]
    config_file = host_path(temporal, path)
    assert config_file == COMPOSE_DIR / "temporal" / "dynamicconfig.yaml"
    config = load_yaml(config_file)
    values = config["system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute"]
    assert values == [{"value": 3, "constraints": {}}]


def test_the_proxy_balances_over_both_apis(services: dict[str, dict[str, Any]]) -> None:
    proxy = services["proxy"]
    conf = host_path(proxy, "/etc/nginx/conf.d/default.conf")
    assert conf is not None
    upstream = re.search(r"upstream \w+ \{(.*?)\}", conf.read_text(), re.S)
    assert upstream is not None
    servers = set(re.findall(r"server ([\w-]+):(\d+)", upstream.group(1)))
    assert servers == {(name, str(API_PORT)) for name in APIS}
    assert depends_on(proxy) == {name: "service_healthy" for name in APIS}


def test_the_proxy_passes_websockets_on(services: dict[str, dict[str, Any]]) -> None:
    """Subscriptions over graphql-transport-ws through the proxy: without the Upgrade header
    passed on, the API refused every handshake (400; run under nginx 1.22 from Debian's
    package, the shipped block verbatim, by a reviewer)."""
    conf = host_path(services["proxy"], "/etc/nginx/conf.d/default.conf")
    assert conf is not None
    text = conf.read_text()
    mapped = re.search(r"map \$http_upgrade \$(\w+) \{(.*?)\}", text, re.S)
    assert mapped is not None
    assert re.search(r"default\s+upgrade;", mapped.group(2))
    location = re.search(r"location / \{(.*?)\n    \}", text, re.S)
    assert location is not None
    headers = dict(re.findall(r"proxy_set_header (\S+) (\S+);", location.group(1)))
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == f"${mapped.group(1)}"
    assert "proxy_http_version 1.1;" in location.group(1)


# --- Prometheus and Grafana --------------------------------------------------------------


def test_prometheus_scrapes_every_tenure_process_where_compose_runs_it(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    config_flag = next(w for w in prometheus["command"] if w.startswith("--config.file="))
    config_file = host_path(prometheus, config_flag.partition("=")[2])
    assert config_file == COMPOSE_DIR / "prometheus.yml"
    config = load_yaml(config_file)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: {t for group in job["static_configs"] for t in group["targets"]}
        for name, job in jobs.items()
    }
    assert targets["tenure-api"] == {f"{name}:{API_PORT}" for name in APIS}
    assert targets["tenure-worker"] == {f"{name}:{WORKER_METRICS_PORT}" for name in WORKERS}
    for name in ("tenure-api", "tenure-worker"):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    for target in set().union(*targets.values()):
        host, _, port = target.partition(":")
        assert host == "localhost" or host in services, f"scrapes {target}: no such service"
        assert port.isdigit()
    temporal_metrics = environment(services["temporal"])["PROMETHEUS_ENDPOINT"].split(":")[1]
    assert targets["temporal"] == {f"temporal:{temporal_metrics}"}
    for rule_file in config["rule_files"]:
        assert (path := host_path(prometheus, rule_file)) is not None and path.is_file()


def test_every_alert_has_an_expression_over_known_metrics_and_a_severity() -> None:
    groups = load_yaml(COMPOSE_DIR / "alerts.yml")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 8
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")"), rule["alert"]
        assert metric_names(expr) <= TENURE_METRICS | SDK_METRICS, rule["alert"]
        assert metric_names(expr) or "up{" in expr, rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def test_the_grafana_dashboard_queries_every_metric_in_every_panel() -> None:
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "tenure.json").read_text())
    datasources = load_yaml(COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml")
    uids = {source["uid"] for source in datasources["datasources"]}
    panels = [p for p in dashboard_panels(dashboard["panels"]) if p["type"] != "row"]
    assert panels
    assert len({p["id"] for p in dashboard_panels(dashboard["panels"])}) == len(
        list(dashboard_panels(dashboard["panels"]))
    )
    queried: set[str] = set()
    for panel in panels:
        exprs = [target.get("expr", "").strip() for target in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for expr in exprs:
            assert expr.count("(") == expr.count(")"), expr
            queried |= metric_names(expr)
    assert queried == TENURE_METRICS | SDK_METRICS
    latency = [e for p in panels for t in p["targets"] if "quantile" in (e := t["expr"])]
    for quantile in ("0.5", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile},")
            and "tenure_api_request_duration_seconds_bucket" in e
            for e in latency
        ), quantile
    assert any("by (operation, code)" in t["expr"] for p in panels for t in p["targets"])
    assert any("by (entity_type, outcome, code)" in t["expr"] for p in panels for t in p["targets"])


def test_grafana_provisions_the_datasource_and_the_mounted_dashboards(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == COMPOSE_DIR / "grafana" / "provisioning"
    providers = load_yaml(provisioning / "dashboards" / "tenure.yaml")["providers"]
    for provider in providers:
        folder = host_path(grafana, provider["options"]["path"])
        assert folder is not None and (folder / "tenure.json").is_file()
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == COMPOSE_DIR / "grafana" / "dashboards" / "tenure.json"
    for source in load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]:
        assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in services


# --- Kubernetes --------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "images",
    "replicas",
    "patches",
    "secretGenerator",
    "configMapGenerator",
}
CLUSTER_SCOPED = {"Namespace"}


def merge_patch(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    """A strategic-merge patch of maps; lists, whose merge keys vary by field, are refused."""
    for key, value in patch.items():
        if isinstance(value, list):
            raise NotImplementedError(f"{where}: list patches are not rendered here ({key})")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value, f"{where}.{key}")
        else:
            target[key] = copy.deepcopy(value)


def image_parts(image: str) -> tuple[str, str]:
    """An image reference's name and tag (a registry's port is part of the name)."""
    name, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        return image, ""
    return name, tag


def generated(kind: str, spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A Secret or ConfigMap from a generator's literals and env files, named as given."""
    if not spec.get("options", {}).get("disableNameSuffixHash"):
        raise NotImplementedError(f"{spec['name']}: name hashes are not rendered here")
    values: dict[str, str] = {}
    for literal in spec.get("literals", []):
        name, _, value = literal.partition("=")
        values[name] = value
    for env_file in spec.get("envs", []):
        for line in (folder / env_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, value = line.partition("=")
                values[name.strip()] = value
    unknown = set(spec) - {"name", "literals", "envs", "options", "behavior"}
    if unknown:
        raise NotImplementedError(f"{spec['name']}: {sorted(unknown)}")
    made: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        made["type"] = "Opaque"
        made["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    else:
        made["data"] = values
    return made


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Any]]:
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}:
            yield obj, obj["spec"]["template"]


def render(folder: Path) -> list[dict[str, Any]]:
    """What `kustomize build folder` gives, for the kustomization fields used in deploy/k8s;
    any other field fails, so nothing kustomize would apply is silently skipped."""
    kustomization = load_yaml(folder / "kustomization.yaml")
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise NotImplementedError(f"{folder}: {sorted(unknown)} are not rendered here")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            with path.open() as f:
                objects += [doc for doc in yaml.safe_load_all(f) if doc]
    for field, kind in (("secretGenerator", "Secret"), ("configMapGenerator", "ConfigMap")):
        for spec in kustomization.get(field, []):
            made = generated(kind, spec, folder)
            behavior = spec.get("behavior", "create")
            if behavior == "create":
                names = {o["metadata"]["name"] for o in objects if o["kind"] == kind}
                assert spec["name"] not in names, f"{kind}/{spec['name']} exists: merge or replace"
                objects.append(made)
            else:
                existing = find(objects, kind, spec["name"])
                if behavior == "replace":
                    existing["data"] = made["data"]
                else:
                    existing["data"].update(made["data"])
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"{folder}: patch {patch}")
        body = load_yaml(folder / patch["path"])
        target = find(objects, body["kind"], body["metadata"]["name"])
        merge_patch(target, {k: v for k, v in body.items() if k != "metadata"}, patch["path"])
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for _, template in pod_templates(objects):
            for container in template["spec"]["containers"]:
                name, tag = image_parts(container["image"])
                if name == image["name"]:
                    new = image.get("newName", name)
                    container["image"] = f"{new}:{image.get('newTag', tag)}"
    for replicas in kustomization.get("replicas", []):
        workload = next(
            o for o, _ in pod_templates(objects) if o["metadata"]["name"] == replicas["name"]
        )
        workload["spec"]["replicas"] = replicas["count"]
    return objects


@pytest.fixture(scope="module")
def production_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s with the overlay's auth.env made from its example, as an operator does."""
    copied = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copied)
    overlay = copied / "overlays" / "production"
    example = (overlay / "auth.env.example").read_text()
    secret = "test-secret-" + "x" * 40
    (overlay / "auth.env").write_text(
        example.replace("TENURE_AUTH_SECRET=", f"TENURE_AUTH_SECRET={secret}")
    )
    return overlay


@pytest.fixture(scope="module", params=["base", "production"])
def rendered(request: pytest.FixtureRequest, production_copy: Path) -> list[dict[str, Any]]:
    return render(BASE if request.param == "base" else production_copy)


def test_every_rendered_object_is_valid_kubernetes(rendered: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service"} <= kinds
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")


def test_strict_validation_refuses_a_misspelt_field() -> None:
    api = find(render(BASE), "Deployment", "tenure-api")
    container = api["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, KUBERNETES_VERSION, strict=True)


def test_every_object_lives_in_the_tenure_namespace(rendered: list[dict[str, Any]]) -> None:
    for obj in rendered:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == "tenure"
            assert obj["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        else:
            assert obj["metadata"]["namespace"] == "tenure", obj["metadata"]["name"]


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    text = str(value)
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def test_every_deployment_is_probed_bounded_and_stopped_gracefully(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = [o for o in rendered if o["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"tenure-api", "tenure-worker"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert pod["terminationGracePeriodSeconds"] == GRACE_SECONDS, name
        for container in pod["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            expected = WORKER_HEALTH_PORT if container["args"] == ["worker"] else API_PORT
            for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
                get = container[probe]["httpGet"]
                assert get["path"] == path, f"{name} {probe}"
                assert ports.get(get["port"], get["port"]) == expected, f"{name} {probe}"
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                assert 0 < request <= quantity(resources["limits"][resource]), name


def test_every_pod_runs_unprivileged_with_a_read_only_root(rendered: list[dict[str, Any]]) -> None:
    for workload, template in pod_templates(rendered):
        pod = template["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == image_uid(), name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: no writable /tmp"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_hpa_and_disruption_budgets_select_existing_deployments(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Deployment"}

    def selected(selector: dict[str, str]) -> list[str]:
        return [
            name
            for name, d in deployments.items()
            if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]

    for deployment in deployments.values():
        own = deployment["spec"]["selector"]["matchLabels"]
        assert selected(own) == [deployment["metadata"]["name"]]
    budgets = [o for o in rendered if o["kind"] == "PodDisruptionBudget"]
    covered = [selected(b["spec"]["selector"]["matchLabels"]) for b in budgets]
    assert all(len(names) == 1 for names in covered)
    assert sorted(names[0] for names in covered) == sorted(deployments)
    assert all(b["spec"]["minAvailable"] == 1 for b in budgets)
    for service in (o for o in rendered if o["kind"] == "Service"):
        names = selected(service["spec"]["selector"])
        assert len(names) == 1, service["metadata"]["name"]
        pod = deployments[names[0]]["spec"]["template"]["spec"]
        ports = {p["name"] for c in pod["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]
    hpa = find(rendered, "HorizontalPodAutoscaler", "tenure-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] in deployments
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in deployments[target["name"]]["spec"], (
        "a Deployment the HPA scales must leave its replica count to the HPA"
    )


def container_env(rendered: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets, every ConfigMap and Secret reference resolved; a
    reference to a missing object or key fails."""

    def data(kind: str, name: str) -> dict[str, str]:
        obj = find(rendered, kind, name)
        values = dict(obj.get("data") or {})
        if kind == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in values.items()}
            values.update(obj.get("stringData") or {})
        return values

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data("ConfigMap", source["configMapRef"]["name"]))
        else:
            env.update(data("Secret", source["secretRef"]["name"]))
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        ref = variable["valueFrom"]
        kind = "ConfigMap" if "configMapKeyRef" in ref else "Secret"
        key_ref = ref.get("configMapKeyRef") or ref["secretKeyRef"]
        values = data(kind, key_ref["name"])
        if key_ref["key"] not in values and key_ref.get("optional"):
            continue  # the kubelet leaves it unset: what envFrom gave stands
        assert key_ref["key"] in values, f"{variable['name']}: no {key_ref['key']} in {kind}"
        env[variable["name"]] = values[key_ref["key"]]
    return env


def test_every_referenced_setting_exists_and_builds_production_settings(
    rendered: list[dict[str, Any]],
) -> None:
    for _, template in pod_templates(rendered):
        for container in template["spec"]["containers"]:
            env = container_env(rendered, container)
            settings = Settings.from_env(env)
            assert settings.environment == "production"
            assert settings.temporal_address == "temporal-frontend.temporal.svc:7233"
            assert settings.redis_url and settings.redis_url.startswith("redis")
            assert settings.log_format == "json"
            # preStop (API) and the grace both fit in terminationGracePeriodSeconds.
            if container["args"] == ["api"]:
                assert (settings.api_host, settings.api_port) == ("0.0.0.0", API_PORT)
                # /metrics on a port the Service does not expose, where Prometheus looks.
                assert settings.api_metrics_port == API_METRICS_PORT
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert ports["metrics"] == API_METRICS_PORT
                annotations = template["metadata"]["annotations"]
                assert annotations["prometheus.io/port"] == str(API_METRICS_PORT)
                service = next(
                    o
                    for o in rendered
                    if o["kind"] == "Service" and o["metadata"]["name"] == "tenure-api"
                )
                assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
                assert settings.auth_secret, "the API has no key source"
                pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
                assert pause + settings.api_shutdown_grace < GRACE_SECONDS
            else:
                assert settings.worker_health_host == "0.0.0.0"
                assert settings.worker_health_port == WORKER_HEALTH_PORT
                assert settings.worker_metrics_port == WORKER_METRICS_PORT
                # The grace, then the SDK's workers' own stop, before the kill.
                assert settings.worker_shutdown_grace + SHUTDOWN_SECONDS < GRACE_SECONDS
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert ports["metrics"] == WORKER_METRICS_PORT


def test_a_redis_url_in_the_secret_reaches_the_api_and_the_workers(tmp_path: Path) -> None:
    """The ConfigMap said a Redis URL with a password belongs in the Secret, but no pod read
    it from there: the API and the workers kept the ConfigMap's URL, without the password,
    and could not write to the cache. Left out of the Secret, the ConfigMap's stands (the
    production test above)."""
    copied = tmp_path / "k8s"
    shutil.copytree(K8S, copied)
    overlay = copied / "overlays" / "production"
    with_password = "redis://:s3cret@redis.redis.svc:6379/0"
    example = (overlay / "auth.env.example").read_text()
    (overlay / "auth.env").write_text(
        example.replace("TENURE_AUTH_SECRET=", "TENURE_AUTH_SECRET=" + "x" * 48)
        + f"REDIS_URL={with_password}\n"
    )
    rendered = render(overlay)
    containers = [c for _, t in pod_templates(rendered) for c in t["spec"]["containers"]]
    assert {tuple(c["args"]) for c in containers} == {("api",), ("worker",)}
    for container in containers:
        assert Settings.from_env(container_env(rendered, container)).redis_url == with_password


def test_the_base_secret_is_a_placeholder_the_api_refuses() -> None:
    secret = find(render(BASE), "Secret", "tenure-auth")
    value = base64.b64decode(secret["data"]["TENURE_AUTH_SECRET"]).decode()
    assert "REPLACE" in value and len(value.encode()) < MIN_SECRET_BYTES


def test_the_production_overlay_sets_image_counts_redis_and_the_real_secret(
    production_copy: Path,
) -> None:
    base, production = render(BASE), render(production_copy)
    for objects, image in (
        (base, "tenure:0.1.0"),
        (production, "registry.example.com/tenure:0.1.0"),
    ):
        for _, template in pod_templates(objects):
            assert [c["image"] for c in template["spec"]["containers"]] == [image]
    assert find(base, "Deployment", "tenure-worker")["spec"]["replicas"] == 2
    assert find(production, "Deployment", "tenure-worker")["spec"]["replicas"] == 4
    assert find(base, "HorizontalPodAutoscaler", "tenure-api")["spec"]["minReplicas"] == 2
    hpa = find(production, "HorizontalPodAutoscaler", "tenure-api")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 20)
    assert hpa["metrics"], "the patch must not drop the HPA's metrics"
    settings = find(production, "ConfigMap", "tenure-settings")["data"]
    assert settings["REDIS_URL"] != find(base, "ConfigMap", "tenure-settings")["data"]["REDIS_URL"]
    assert settings["TEMPORAL_ADDRESS"] == "temporal-frontend.temporal.svc:7233"
    secret = find(production, "Secret", "tenure-auth")["data"]["TENURE_AUTH_SECRET"]
    assert len(base64.b64decode(secret)) >= MIN_SECRET_BYTES


def test_the_real_secret_stays_out_of_git() -> None:
    assert "auth.env" in (PRODUCTION / ".gitignore").read_text().split()
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()
    tracked = subprocess.run(
        ["git", "ls-files", "--", str(PRODUCTION / "auth.env"), str(COMPOSE_DIR / ".env")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert tracked.stdout == ""


def _helm_dynamic_config(markdown: Path) -> dict[str, Any]:
    """The Temporal chart's dynamic config in the first YAML block of `markdown` that has one."""
    for block in markdown.read_text().split("```yaml")[1:]:
        values = yaml.safe_load(block.split("```", 1)[0])
        if isinstance(values, dict) and "dynamicConfig" in values.get("server", {}):
            return dict(values["server"]["dynamicConfig"])
    raise AssertionError(f"{markdown} shows no server.dynamicConfig")


def test_the_helm_values_for_temporal_name_the_dynamic_config_value() -> None:
    dynamic = _helm_dynamic_config(K8S / "README.md")
    key = "system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute"
    assert dynamic[key] == [{"value": 3, "constraints": {}}]


# Dynamic config that Tenure needs on any cluster, whatever its size: the embedded server,
# the compose file and both Helm examples must set each the same.
EVERY_CLUSTER = (
    "history.MaxBufferedQueryCount",
    "frontend.enableExecuteMultiOperation",
    "system.enableActivityEagerExecution",
)


@pytest.mark.parametrize("key", EVERY_CLUSTER)
def test_every_temporal_tenure_ships_sets_the_dynamic_config_every_cluster_needs(
    key: str,
) -> None:
    from deploy.embedded import DYNAMIC_CONFIG

    expected = [{"value": DYNAMIC_CONFIG[key], "constraints": {}}]
    compose = yaml.safe_load((COMPOSE_DIR / "temporal" / "dynamicconfig.yaml").read_text())
    assert compose[key] == expected
    assert _helm_dynamic_config(K8S / "README.md")[key] == expected
    assert _helm_dynamic_config(REPO / "docs" / "operations.md")[key] == expected


def test_the_api_metrics_the_dashboard_reads_are_the_ones_the_api_exports() -> None:
    from api.metrics import ApiMetrics

    exported = {
        sample.name for family in ApiMetrics().registry.collect() for sample in family.samples
    } | {family.name + "_total" for family in ApiMetrics().registry.collect()}
    families = {family.name for family in ApiMetrics().registry.collect()}
    for name in TENURE_METRICS:
        if name.startswith("tenure_api_"):
            assert name in exported or name in families, name
