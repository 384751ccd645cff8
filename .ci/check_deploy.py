#!/usr/bin/env python3
"""Consistency checks of deploy/ that the generic linters cannot make.

kubernetes-validate knows the built-in kinds only (it warns about, and skips, the ServiceMonitor
and the ScaledObject), and no linter knows that the Deployment, the relay's config and the
dashboard must agree with each other. This script checks that they do:

- the ScaledObject targets the Deployment, queries cfq_relay_queue_backlog_messages with
  max (replicas report the same figure), and has string-valued trigger metadata (KEDA's rule);
- the ServiceMonitor selects the Service, whose port is the container's named port;
- the probes use /healthz and /readyz on that port, the pod runs as non-root with a read-only
  root file system and no capabilities, and terminationGracePeriodSeconds exceeds the drain
  (shutdown.grace_period + 2 x cloudflare.api_timeout + 1s) of the ConfigMap's config;
- every metric the dashboard and the ScaledObject use is one the relay exports (README table);
- writes the ConfigMap's config.toml, and a Prometheus rule file holding every PromQL
  expression of the dashboard and the ScaledObject, to OUT_DIR for `cfq-relay check-config`
  and `promtool check rules`.

Usage: check_deploy.py OUT_DIR
"""

import json
import pathlib
import re
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
problems = []


def check(cond, message):
    if not cond:
        problems.append(message)


def load(name):
    return yaml.safe_load((K8S / name).read_text())


def seconds(text):
    """A humantime duration such as "25s", "1m" or "1m 30s" in seconds (the units used here)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    check(parts, f"cannot read the duration {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def main(out_dir):
    out = pathlib.Path(out_dir)
    deployment = load("deployment.yaml")
    service = load("service.yaml")
    configmap = load("configmap.yaml")
    monitor = load("servicemonitor.yaml")
    scaled = load("scaledobject.yaml")
    pdb = load("poddisruptionbudget.yaml")
    kustomization = load("kustomization.yaml")

    manifests = sorted(p.name for p in K8S.glob("*.yaml"))
    listed = set(kustomization["resources"])
    for name in manifests:
        if name not in ("kustomization.yaml", "secret.example.yaml"):
            check(name in listed, f"kustomization.yaml does not list {name}")

    labels = deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]
    check(
        labels.items() <= pod["metadata"]["labels"].items(),
        "the Deployment's selector does not match its pod labels",
    )
    check(
        service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(),
        "the Service does not select the pods",
    )
    check(
        pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(),
        "the PodDisruptionBudget does not select the pods",
    )
    check("replicas" not in deployment["spec"], "the ScaledObject owns the replica count")

    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check("metrics" in ports, "the container has no port named metrics")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = container.get(probe, {}).get("httpGet", {})
        check(got.get("path") == path, f"{probe} must GET {path}, got {got}")
        check(got.get("port") in ports, f"{probe} port {got.get('port')} is not a container port")
    psc, csc = spec.get("securityContext", {}), container.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "runAsNonRoot must be true")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp: RuntimeDefault")
    check(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    check(csc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")
    check("limits" in container.get("resources", {}), "the container needs resource limits")
    check(
        any(
            v.get("secret", {}).get("secretName") == "cfq-relay" for v in spec.get("volumes", [])
        ),
        "the token must come from the Secret cfq-relay",
    )

    svc_ports = {p["name"]: p for p in service["spec"]["ports"]}
    check("metrics" in svc_ports, "the Service has no port named metrics")
    check(
        svc_ports.get("metrics", {}).get("targetPort") in ports,
        "the Service's metrics port does not target the container's",
    )
    check(
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(),
        "the ServiceMonitor does not select the Service",
    )
    for endpoint in monitor["spec"]["endpoints"]:
        check(endpoint.get("port") in svc_ports, f"ServiceMonitor port {endpoint.get('port')}")
        check(endpoint.get("path", "/metrics") == "/metrics", "ServiceMonitor path")

    text = configmap["data"]["config.toml"]
    config = tomllib.loads(text)
    (out / "config.toml").write_text(text)
    check(
        config.get("admin", {}).get("listen", "").startswith("0.0.0.0:"),
        "admin.listen must be 0.0.0.0:PORT in a pod (probes and scrapes come from outside)",
    )
    check(
        config.get("admin", {}).get("listen", "").endswith(f":{ports.get('metrics')}"),
        "admin.listen's port must be the container's metrics port",
    )
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    token_file = config["cloudflare"].get("api_token_file", "")
    check(
        token_file.startswith(mounts.get("token", "?") + "/"),
        "cloudflare.api_token_file must be in the Secret's mount",
    )
    drain = (
        seconds(config.get("shutdown", {}).get("grace_period", "25s"))
        + 2 * seconds(config["cloudflare"].get("api_timeout", "15s"))
        + 1
    )
    check(
        spec["terminationGracePeriodSeconds"] > drain,
        f"terminationGracePeriodSeconds ({spec['terminationGracePeriodSeconds']}) must exceed "
        f"the drain ({drain}s)",
    )

    target = scaled["spec"]["scaleTargetRef"]
    check(
        target.get("kind", "Deployment") == "Deployment"
        and target["name"] == deployment["metadata"]["name"],
        "the ScaledObject must target the Deployment",
    )
    check(scaled["spec"].get("minReplicaCount", 0) >= 1, "minReplicaCount must be at least 1")
    queries = []
    for trigger in scaled["spec"]["triggers"]:
        check(trigger["type"] == "prometheus", "the trigger must be a prometheus one")
        meta = trigger["metadata"]
        for key, value in meta.items():
            check(isinstance(value, str), f"KEDA trigger metadata {key} must be a string")
        for key in ("serverAddress", "query", "threshold"):
            check(key in meta, f"the prometheus trigger needs {key}")
        query = meta.get("query", "")
        check(
            "cfq_relay_queue_backlog_messages" in query and query.startswith("max"),
            "the trigger must scale on max(cfq_relay_queue_backlog_messages…)",
        )
        queries.append(query)

    readme = (ROOT / "README.md").read_text()
    exported = set(re.findall(r"^\| `(cfq_relay_[a-z_]+)`", readme, re.M))
    check(exported, "no metrics table found in README.md")
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "cfq-relay.json").read_text())
    exprs = [
        t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")
    ]
    for expr in exprs + queries:
        for name in re.findall(r"\bcfq_relay_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            check(name in exported or base in exported, f"{name} is not exported: {expr}")

    # Grafana variables replaced by something PromQL accepts, for promtool.
    def plain(expr):
        return expr.replace("$__rate_interval", "5m").replace("$queue", ".*")

    rules = {
        "groups": [
            {
                "name": "cfq-relay-deploy-queries",
                "rules": [
                    {"record": f"cfq_relay_deploy_check:{i}", "expr": plain(e)}
                    for i, e in enumerate(exprs + queries)
                ],
            }
        ]
    }
    (out / "queries.rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))

    if problems:
        for p in problems:
            print(f"deploy check: {p}", file=sys.stderr)
        sys.exit(1)
    print(
        f"deploy cross-checks: ok ({len(manifests)} manifests, {len(exprs)} dashboard queries, "
        f"{len(queries)} KEDA queries)"
    )


if __name__ == "__main__":
    main(sys.argv[1])
