"""Init step of the agent pod: adds the per-node settings Kubernetes cannot give as env.

Writes OUT (the agent's --config): the ConfigMap's agent.toml, plus `domain`, the value of the
node's DOMAIN_LABEL label (node labels are not in the downward API, so it asks the API server),
and `advertise`, the pod's DNS name (A-B-C-D.NAMESPACE.pod.CLUSTER_DOMAIN) and the peer port:
peers verify the agent's TLS certificate against that name, which one wildcard certificate
covers, where pod IPs would need a certificate per pod. Fails, naming the node, when the
label is missing: a guessed domain would put a group's fragments in one rack unnoticed.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import tomllib
import urllib.request
from collections.abc import Mapping
from pathlib import Path

BASE = Path("/etc/memckpt/agent.toml")
OUT = Path("/run/memckpt-config/agent.toml")
ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def node_config(base_toml: str, node_labels: Mapping[str, str], env: Mapping[str, str]) -> str:
    """The agent's TOML: `base_toml` plus this node's `domain` and `advertise` (pure)."""
    label = env["DOMAIN_LABEL"]
    domain = node_labels.get(label)
    if not domain:
        raise SystemExit(f"node {env['NODE_NAME']} has no label {label}: kubectl label node {env['NODE_NAME']} {label}=RACK")
    peer_port = tomllib.loads(base_toml).get("peer_listen", "0.0.0.0:7500").rpartition(":")[2]
    dashed_ip = env["POD_IP"].replace(".", "-").replace(":", "-")
    host = f"{dashed_ip}.{env['POD_NAMESPACE']}.pod.{env['CLUSTER_DOMAIN']}"
    added = [f"# Added by node_config.py for node {env['NODE_NAME']}.", f"domain = {json.dumps(domain)}"]
    added.append(f"advertise = {json.dumps(f'{host}:{peer_port}')}")  # JSON strings are TOML strings
    return base_toml.rstrip() + "\n\n" + "\n".join(added) + "\n"


def read_node_labels(node: str) -> dict[str, str]:
    """The node's labels, read with the pod's service account (RBAC: get nodes)."""
    request = urllib.request.Request(
        f"https://kubernetes.default.svc/api/v1/nodes/{node}",
        headers={"Authorization": f"Bearer {(ACCOUNT / 'token').read_text().strip()}"},
    )
    context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        labels: dict[str, str] = json.load(response)["metadata"].get("labels", {})
    return labels


def main() -> int:
    text = node_config(BASE.read_text(), read_node_labels(os.environ["NODE_NAME"]), os.environ)
    OUT.write_text(text)
    print(text, file=sys.stderr)  # in `kubectl logs POD -c node-config`: what this agent was given
    return 0


if __name__ == "__main__":
    sys.exit(main())
