"""The deployment files agree with the code and with each other, checked offline (no cluster).

Kubernetes: every container that runs `memckpt-agent` or `memckpt-coordinator` is started
the way kubelet would start it (volumes laid out under tmp, env resolved, the agent's init
step run) and its flags, env and TOML go through the real parser and config checks, so a
renamed flag or a TOML typo fails here; then ports, probes, memory, shared volumes and UIDs
are compared across files. systemd: each unit's ExecStart, environment and hardening.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from memckpt.agent import daemon as agent_daemon
from memckpt.agent.config import AgentConfig
from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.config import ENV_PREFIX, load_config, split_host_port
from memckpt.coordinator import daemon as coordinator_daemon
from memckpt.coordinator.config import CoordinatorConfig

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
EXAMPLE = "trainer-pod-example.yaml"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"Deployment", "DaemonSet", "Job"}
# What the downward API would give the agent pod in the test's imaginary node.
FIELD_VALUES = {"spec.nodeName": "gpu-node-17", "status.podIP": "10.1.2.3"}
NODE_DOMAIN = "rack-7"
GiB = 1 << 30

Doc = dict[str, Any]


# --- reading the files -------------------------------------------------------------------


def load_manifests() -> list[tuple[str, Doc]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


MANIFESTS = load_manifests()


def find(kind: str, name: str | None = None) -> Doc:
    found = [doc for _, doc in MANIFESTS if doc["kind"] == kind and name in (None, doc.get("metadata", {}).get("name"))]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kubernetes, found {len(found)}"
    return found[0]


def kustomization() -> Doc:
    return find("Kustomization")


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def container(doc: Doc, name: str, init: bool = False) -> Doc:
    found = [c for c in pod_spec(doc).get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(found) == 1, f"{doc['kind']} {doc['metadata']['name']} has no container {name}"
    return found[0]


def workload_containers() -> Iterator[tuple[Doc, Doc, bool]]:
    for _, doc in MANIFESTS:
        if doc["kind"] in WORKLOADS:
            for c in pod_spec(doc).get("initContainers", []):
                yield doc, c, True
            for c in pod_spec(doc)["containers"]:
                yield doc, c, False


def generated_configmap_files() -> dict[str, Path]:
    """The ConfigMap `memckpt-config` as kustomize makes it: key = file name."""
    (generator,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == "memckpt-config"]
    return {Path(f).name: K8S / f for f in generator["files"]}


def volume(doc: Doc, name: str) -> Doc:
    (found,) = [v for v in pod_spec(doc)["volumes"] if v["name"] == name]
    return found


def mount_of(doc: Doc, c: Doc, path: str | Path) -> tuple[Doc, Doc]:
    """The volume mount (and its volume) whose mountPath holds `path` in container `c`."""
    mounts = [m for m in c.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of container {c['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return mount, volume(doc, mount["name"])


def host_path(doc: Doc, c: Doc, path: str | Path) -> Path:
    """Where `path` of container `c` is on the node: it must be on a hostPath volume."""
    mount, vol = mount_of(doc, c, path)
    assert "hostPath" in vol, f"{path} in {c['name']} is on volume {vol['name']}, not a hostPath"
    return Path(vol["hostPath"]["path"]) / Path(path).relative_to(mount["mountPath"])


def parse_quantity(text: str) -> int:
    units = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": GiB, "Ti": 1 << 40}
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert match, f"not a Kubernetes quantity: {text!r}"
    return int(float(match.group(1)) * units[match.group(2) or ""])


# --- starting a container as kubelet would ---------------------------------------------


@dataclasses.dataclass
class Pod:
    """One workload's volumes laid out under `root`; container paths on them rewritten there."""

    doc: Doc
    root: Path

    def __post_init__(self) -> None:
        for vol in pod_spec(self.doc)["volumes"]:
            where = self.volume_dir(vol["name"])
            where.mkdir(parents=True)
            if "configMap" in vol:
                assert vol["configMap"]["name"] in {g["name"] for g in kustomization()["configMapGenerator"]}
                files = generated_configmap_files()
                for item in vol["configMap"].get("items") or [{"key": k, "path": k} for k in files]:
                    (where / item["path"]).write_bytes(files[item["key"]].read_bytes())
            if "secret" in vol:
                # Placeholder files under the paths the Secret's items give (the keys are spelled out).
                for item in vol["secret"]["items"]:
                    (where / item["path"]).write_text(f"placeholder for {vol['secret']['secretName']}/{item['key']}\n")

    def volume_dir(self, name: str) -> Path:
        return self.root / "volumes" / name

    def rewrite(self, c: Doc, text: str) -> str:
        """`text` with every path on a configMap, Secret or emptyDir volume of `c` moved under root."""
        moved = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", []) if "hostPath" not in volume(self.doc, m["name"])}
        if not moved:
            return text
        paths = "|".join(re.escape(path) for path in sorted(moved, key=len, reverse=True))
        pattern = rf"(?<![\w./-])({paths})(?![\w.-])"  # whole path components only, in one pass
        return re.sub(pattern, lambda m: str(self.volume_dir(moved[m[1]])), text)

    def env(self, c: Doc) -> dict[str, str]:
        """The container's env as kubelet resolves it (downward API and Secrets with stand-ins)."""
        env: dict[str, str] = {}
        for item in c.get("env", []):
            if "value" in item:
                env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(item["value"]))
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                field_path = source["fieldRef"]["fieldPath"]
                env[item["name"]] = (
                    self.doc["metadata"]["namespace"] if field_path == "metadata.namespace" else FIELD_VALUES[field_path]
                )
            else:
                ref = source["secretKeyRef"]
                env[item["name"]] = f"secret {ref['name']}/{ref['key']}"
        return env


def effective_config(
    build_parser: Callable[[], argparse.ArgumentParser],
    cls: Any,
    argv: list[str],
    env: dict[str, str],
    rewrite: Callable[[str], str] = str,
) -> Any:
    """What the daemon would run with: its real parser, the layered config and its checks.

    `rewrite` maps the paths inside the --config file as `argv` and `env` were mapped."""
    parser = build_parser()
    flags = {word.partition("=")[0] for word in argv if word.startswith("--")}
    # Spelled out: argparse takes abbreviations, which a new flag sharing the prefix breaks.
    assert flags <= parser._option_string_actions.keys(), (
        f"{parser.prog}: no such flags {flags - parser._option_string_actions.keys()}"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{parser.prog} refuses {argv} (a renamed or unknown flag?)")
    if args.config is not None:
        if not args.config.is_file():
            pytest.fail(f"--config {args.config} is on no volume, or nothing writes it")
        seen = args.config.with_name(f"{args.config.name}.as-seen")
        seen.write_text(rewrite(args.config.read_text()))
        args.config = seen
    return load_config(cls, args, env)


def daemon_argv(c: Doc, program: str) -> list[str]:
    argv = [*c.get("command", []), *c.get("args", [])]
    starts = [i for i, word in enumerate(argv) if Path(word).name == program]
    assert starts, f"container {c['name']} does not run {program}"
    return argv[starts[0] + 1 :]


def load_node_config_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("memckpt_deploy_node_config", generated_configmap_files()["node_config.py"])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_node_config(pod: Pod, labels: dict[str, str]) -> None:
    """The agent pod's `node-config` init step, with the node's labels given instead of read from the API."""
    init = container(pod.doc, "node-config", init=True)
    script = load_node_config_script()
    assert Path(init["command"][-1]).name == "node_config.py"
    base = Path(pod.rewrite(init, str(script.BASE)))
    out = Path(pod.rewrite(init, str(script.OUT)))
    assert base.is_file() and out.parent.is_dir(), "node_config.py reads or writes outside the init container's volumes"
    out.write_text(script.node_config(base.read_text(), labels, pod.env(init)))


@dataclasses.dataclass
class Started:
    pod: Pod
    container: Doc
    config: Any


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Started:
    doc = find("DaemonSet", "memckpt-agent")
    pod = Pod(doc, tmp_path_factory.mktemp("agent"))
    label = pod.env(container(doc, "node-config", init=True))["DOMAIN_LABEL"]
    run_node_config(pod, {label: NODE_DOMAIN, "kubernetes.io/hostname": FIELD_VALUES["spec.nodeName"]})
    c = container(doc, "agent")
    argv = [pod.rewrite(c, word) for word in daemon_argv(c, "memckpt-agent")]
    env = {k: pod.rewrite(c, v) for k, v in pod.env(c).items()}
    return Started(pod, c, effective_config(agent_daemon.build_parser, AgentConfig, argv, env, lambda s: pod.rewrite(c, s)))


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Started:
    doc = find("Deployment", "memckpt-coordinator")
    pod = Pod(doc, tmp_path_factory.mktemp("coordinator"))
    c = container(doc, "coordinator")
    argv = [pod.rewrite(c, word) for word in daemon_argv(c, "memckpt-coordinator")]
    env = {k: pod.rewrite(c, v) for k, v in pod.env(c).items()}
    return Started(
        pod, c, effective_config(coordinator_daemon.build_parser, CoordinatorConfig, argv, env, lambda s: pod.rewrite(c, s))
    )


def trainer() -> tuple[Doc, Doc]:
    doc = find("Job")
    (c,) = pod_spec(doc)["containers"]
    return doc, c


# --- Kubernetes ---------------------------------------------------------------------------


def test_every_manifest_has_api_version_kind_and_name() -> None:
    assert len(MANIFESTS) >= 8
    for file, doc in MANIFESTS:
        assert doc.get("apiVersion") and doc.get("kind"), file
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], f"{file}: {doc['kind']} without a name"


def test_kustomization_applies_every_manifest_but_the_example_into_one_namespace() -> None:
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml", EXAMPLE}
    assert set(kustomization()["resources"]) == files
    assert all(path.is_file() for path in generated_configmap_files().values())
    namespace = kustomization()["namespace"]
    assert find("Namespace")["metadata"]["name"] == namespace
    for file, doc in MANIFESTS:
        if file not in (EXAMPLE, "kustomization.yaml") and doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == namespace, f"{file}: {doc['kind']} outside {namespace}"


def test_workload_selectors_match_their_pod_labels() -> None:
    for _, doc in MANIFESTS:
        if doc["kind"] in ("Deployment", "DaemonSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{doc['metadata']['name']}: selector matches no pod"
    service = find("Service", "memckpt-coordinator")["spec"]["selector"]
    assert service.items() <= find("Deployment", "memckpt-coordinator")["spec"]["template"]["metadata"]["labels"].items()
    assert not service.items() <= find("DaemonSet", "memckpt-agent")["spec"]["template"]["metadata"]["labels"].items()


def test_every_container_has_an_image_and_resources() -> None:
    for doc, c, _ in workload_containers():
        where = f"{doc['metadata']['name']}/{c['name']}"
        assert c.get("image"), where
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert {"cpu", "memory"} <= requests.keys() and "memory" in limits, where
        assert parse_quantity(requests["memory"]) <= parse_quantity(limits["memory"]), where


def test_containers_run_unprivileged_and_only_the_socket_dir_step_as_root() -> None:
    for doc, c, init in workload_containers():
        where = f"{doc['metadata']['name']}/{c['name']}"
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], where
        assert pod_spec(doc)["securityContext"]["runAsNonRoot"] is True, where
        if doc["kind"] != "Job":
            assert context["readOnlyRootFilesystem"] is True, where
        if context.get("runAsUser") == 0:
            assert init and set(context["capabilities"]["add"]) <= {"CHOWN", "FOWNER"}, where
        else:
            assert not context["capabilities"].get("add"), where


@pytest.mark.parametrize("which", ["agent", "coordinator"])
def test_probes_and_scrape_annotations_use_the_metrics_port(which: str, request: pytest.FixtureRequest) -> None:
    started: Started = request.getfixturevalue(which)
    assert started.config.metrics_listen, f"the {which} serves no /healthz: its probes would fail"
    _, port = split_host_port(started.config.metrics_listen, "metrics_listen")
    scheme = "HTTPS" if started.config.tls.enabled else "HTTP"  # the metrics endpoint uses the TLS certificate
    probes = [started.container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe") if p in started.container]
    assert {"livenessProbe", "readinessProbe"} <= started.container.keys()
    for probe in probes:
        assert probe["httpGet"] == {"path": "/healthz", "port": port, "scheme": scheme}
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in started.container["ports"]
    annotations = started.pod.doc["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/scheme"]) == (str(port), scheme.lower())


def test_agent_config_is_what_the_manifests_intend(agent: Started) -> None:
    config: AgentConfig = agent.config
    assert (config.node, config.domain) == (FIELD_VALUES["spec.nodeName"], NODE_DOMAIN)
    assert config.on_exit == "keep", "an agent pod's restart must leave the slots for the next one"
    assert config.token == "secret memckpt-token/token"
    _, peer_port = split_host_port(config.peer_listen, "peer_listen")
    assert {"name": "peer", "containerPort": peer_port, "protocol": "TCP"} in agent.container["ports"]
    assert config.peer_bulk and config.tls.enabled, "fragments on the bulk channel, with TLS"
    assert {"name": "bulk", "containerPort": config.peer_bulk_port, "protocol": "TCP"} in agent.container["ports"]
    namespace = agent.pod.doc["metadata"]["namespace"]
    dashed_ip = FIELD_VALUES["status.podIP"].replace(".", "-")
    assert config.advertise == f"{dashed_ip}.{namespace}.pod.cluster.local:{peer_port}", "peers check this name"
    assert "hostPath" in mount_of(agent.pod.doc, agent.container, config.persist_root)[1]


def test_node_config_refuses_a_node_without_the_domain_label(agent: Started) -> None:
    init_env = agent.pod.env(container(agent.pod.doc, "node-config", init=True))
    with pytest.raises(SystemExit, match=init_env["DOMAIN_LABEL"]):
        load_node_config_script().node_config('peer_listen = "0.0.0.0:7500"\n', {}, init_env)


def test_agent_memory_limit_is_its_budget_plus_headroom(agent: Started) -> None:
    resources = agent.container["resources"]
    limit = parse_quantity(resources["limits"]["memory"])
    assert parse_quantity(resources["requests"]["memory"]) == limit, "Guaranteed QoS: evicted last"
    headroom = limit - agent.config.memory_limit
    assert 1 * GiB <= headroom <= 4 * GiB, f"memory limit {limit} for a {agent.config.memory_limit}-byte budget"


def test_agent_reaches_the_coordinator_through_its_service(agent: Started, coordinator: Started) -> None:
    service = find("Service", "memckpt-coordinator")
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    _, listen_port = split_host_port(coordinator.config.listen, "listen")
    assert {"name": grpc_port["targetPort"], "containerPort": listen_port, "protocol": "TCP"} in coordinator.container["ports"]
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert agent.config.coordinator == f"{name}:{grpc_port['port']}"
    assert coordinator.config.listen.startswith("0.0.0.0:"), "the Service forwards to the pod IP"


def test_tls_files_and_token_come_from_secrets(agent: Started, coordinator: Started) -> None:
    for started in (agent, coordinator):
        tls = started.config.tls
        assert tls.enabled
        for path in (tls.cert, tls.key, tls.ca):
            if path is not None:
                assert "secret" in volume(started.pod.doc, path.relative_to(started.pod.root / "volumes").parts[0])
        token = [e for e in started.container["env"] if e["name"] == f"{ENV_PREFIX}TOKEN"]
        assert token and "secretKeyRef" in token[0]["valueFrom"]
    assert agent.config.token == coordinator.config.token, "agents and the coordinator read different tokens"
    for name in ("agent.toml", "coordinator.toml"):
        assert "token" not in tomllib.loads(generated_configmap_files()[name].read_text()), f"a token in plain sight in {name}"


def test_agent_and_trainer_share_shm_socket_and_uid(agent: Started) -> None:
    ds, job = agent.pod.doc, trainer()
    trainer_doc, trainer_c = job
    assert agent.config.shm_dir == DEFAULT_ROOT, "the trainer's client maps slots from DEFAULT_ROOT, whatever shm_dir says"
    for doc, c in ((ds, agent.container), job):
        _, shm = mount_of(doc, c, DEFAULT_ROOT)
        assert shm["hostPath"] == {"path": "/dev/shm", "type": "Directory"}
        assert host_path(doc, c, DEFAULT_ROOT) == Path("/dev/shm")
    trainer_socket = {e["name"]: e.get("value") for e in trainer_c["env"]}["MEMCKPT_SOCKET"]
    assert host_path(trainer_doc, trainer_c, trainer_socket) == host_path(ds, agent.container, agent.config.socket)
    for key in ("runAsUser", "runAsGroup"):
        assert pod_spec(ds)["securityContext"][key] == pod_spec(trainer_doc)["securityContext"][key]


def test_socket_dir_is_handed_to_the_agent_uid_before_it_starts(agent: Started) -> None:
    ds = agent.pod.doc
    init = container(ds, "socket-dir", init=True)
    socket_dir = agent.config.socket.parent
    user, group = pod_spec(ds)["securityContext"]["runAsUser"], pod_spec(ds)["securityContext"]["runAsGroup"]
    assert f"chown {user}:{group} {socket_dir}" in init["command"][-1] and f"chmod 0700 {socket_dir}" in init["command"][-1]
    assert host_path(ds, init, socket_dir) == host_path(ds, agent.container, socket_dir)


# --- systemd ------------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value given (keys like LoadCredential repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def example_env(*sections: str) -> dict[str, str]:
    """The lines of memckpt.env under the `## SECTION` headers given."""
    env: dict[str, str] = {}
    section = ""
    for line in (SYSTEMD / "memckpt.env").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line and not line.startswith("#") and section in sections:
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_example_env_names_only_real_settings() -> None:
    owners = {"both": (AgentConfig, CoordinatorConfig), "agent": (AgentConfig,), "coordinator": (CoordinatorConfig,)}
    for section, classes in owners.items():
        names = example_env(section)
        assert names, f"memckpt.env has no ## {section} lines"
        for cls in classes:
            fields = {f"{ENV_PREFIX}{f.name.upper()}" for f in dataclasses.fields(cls)}
            assert names.keys() <= fields, f"{sorted(names.keys() - fields)} are no settings of {cls.__name__}: ignored"


def start_unit(name: str, tmp_path: Path) -> tuple[dict[str, list[str]], Any]:
    """The unit's [Service] and the config its ExecStart would run with (host files as stand-ins)."""
    service = read_unit(SYSTEMD / name)["Service"]
    credentials = tmp_path / "credentials"
    credentials.mkdir(parents=True)
    for entry in service.get("LoadCredential", []):
        (credentials / entry.partition(":")[0]).write_text("placeholder\n")
    env = dict(value.split("=", 1) for value in service.get("Environment", []))
    for env_file in service.get("EnvironmentFile", []):
        env |= example_env("both", Path(env_file.lstrip("-")).stem)
    for key in [k for k in env if k.startswith(f"{ENV_PREFIX}TLS_")]:  # files the operator installs
        env[key] = str(tmp_path / Path(env[key]).name)
        Path(env[key]).write_text("placeholder\n")
    program, *argv = shlex.split(service["ExecStart"][0].replace("%d", str(credentials)))
    if Path(program).name == "memckpt-agent":
        return service, effective_config(agent_daemon.build_parser, AgentConfig, argv, env)
    assert Path(program).name == "memckpt-coordinator"
    return service, effective_config(coordinator_daemon.build_parser, CoordinatorConfig, argv, env)


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}


def test_agent_unit_keeps_slots_and_socket_usable_and_is_hardened(tmp_path: Path) -> None:
    service, config = start_unit("memckpt-agent.service", tmp_path)
    assert {key: service[key][-1] for key in HARDENING} == HARDENING
    # /dev/shm must be the host's; DynamicUser and RemoveIPC would delete the slots at stop.
    assert "yes" not in service.get("PrivateDevices", []) + service.get("DynamicUser", []) + service.get("RemoveIPC", [])
    assert service["User"] and service["RuntimeDirectoryPreserve"] == ["yes"]
    assert config.socket.parent == Path("/run") / service["RuntimeDirectory"][0]
    assert config.on_exit == "keep" and config.memory_limit and config.metrics_listen
    writable = " ".join(service["ReadWritePaths"]).split()
    assert f"-{config.persist_root}" in writable, "ProtectSystem=strict would make persist_root read-only"
    assert config.tls.enabled and config.coordinator


def test_coordinator_unit_is_hardened_and_agents_find_its_port(tmp_path: Path) -> None:
    service, config = start_unit("memckpt-coordinator.service", tmp_path)
    expected = HARDENING | {"PrivateDevices": "yes", "MemoryDenyWriteExecute": "yes", "DynamicUser": "yes"}
    assert {key: service[key][-1] for key in expected} == expected
    assert config.tls.enabled and config.tls.ca is None, "memckpt status --coordinator presents no client certificate"
    assert config.token and config.metrics_listen
    agent_config = start_unit("memckpt-agent.service", tmp_path / "agent")[1]
    assert split_host_port(agent_config.coordinator, "coordinator")[1] == split_host_port(config.listen, "listen")[1]
    assert split_host_port(agent_config.metrics_listen, "m")[1] != split_host_port(config.metrics_listen, "m")[1]
