#!/usr/bin/env python3
"""Offline checks for taskmill's deployment files, driven by deploy/validate.sh.

Each subcommand prints what it checked and exits non-zero on the first kind of
failure it finds (after listing every instance of it). Needs PyYAML and
jsonschema (both come with kubernetes-validate) and kubernetes-validate itself
for the `k8s` subcommand. Run `checks.py SUBCOMMAND --help` for the options.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import yaml

# ---------------------------------------------------------------------------
# Metric names the worker exports (docs/operations.md#metrics). Histograms
# are queried through their _bucket/_sum/_count series.
TASKMILL_COUNTERS_GAUGES = {
    "taskmill_jobs_total",
    "taskmill_jobs_in_flight",
    "taskmill_cpu_pool_busy",
    "taskmill_cpu_pool_size",
    "taskmill_cpu_process_restarts_total",
    "taskmill_broker_reconnects_total",
    "taskmill_dead_letters_total",
    "taskmill_build_info",
    "taskmill_ack_failures_total",  # in crates/taskmill-telemetry/src/metrics.rs
    "taskmill_store_errors_total",
    "taskmill_leases_lost_total",
}
TASKMILL_HISTOGRAMS = {
    "taskmill_job_run_seconds",
    "taskmill_job_queue_wait_seconds",
    "taskmill_publish_confirm_seconds",
}
# RabbitMQ's rabbitmq_prometheus plugin, per-object endpoint (queue-level
# names from prometheus_rabbitmq_core_metrics_collector.erl). Extend when a
# panel needs more.
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
    "rabbitmq_queue_consumer_capacity",
    "rabbitmq_queue_consumer_utilisation",
    "rabbitmq_queue_messages_published_total",
    "rabbitmq_queue_messages_bytes",
    "rabbitmq_queue_process_memory_bytes",
    "rabbitmq_connections",
    "rabbitmq_channels",
    "rabbitmq_consumers",
    "rabbitmq_queues",
    "rabbitmq_channel_messages_acked_total",
    "rabbitmq_channel_messages_redelivered_total",
    "rabbitmq_channel_messages_delivered_ack_total",
    "rabbitmq_channel_messages_published_total",
    "rabbitmq_channel_messages_confirmed_total",
}


def allowed_metric_names() -> set[str]:
    names = set(TASKMILL_COUNTERS_GAUGES) | set(RABBITMQ_METRICS)
    for h in TASKMILL_HISTOGRAMS:
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    return names


# Standard OpenTelemetry variables the worker reads (besides TASKMILL_*).
OTEL_NAMES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"}


class Failures:
    def __init__(self, title: str):
        self.title = title
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def finish(self, ok_msg: str) -> int:
        if self.items:
            print(f"FAIL {self.title}:")
            for m in self.items:
                print(f"  - {m}")
            return 1
        print(f"ok   {ok_msg}")
        return 0


def load_yaml_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---------------------------------------------------------------------------
# compose: referenced files exist, grace periods line up
def cmd_compose(args: argparse.Namespace) -> int:
    compose_file = Path(args.file)
    base = compose_file.parent
    doc = load_yaml_docs(compose_file)[0]
    fails = Failures(f"{compose_file}: references")
    checked = 0
    named_volumes = set((doc.get("volumes") or {}).keys())

    def must_exist(rel: str, what: str, kind: str = "any") -> None:
        nonlocal checked
        checked += 1
        if "${" in rel:
            fails.add(f"{what}: '{rel}' uses interpolation; cannot check offline")
            return
        p = (base / os.path.expanduser(rel)).resolve() if not rel.startswith("/") else Path(rel)
        if not p.exists():
            fails.add(f"{what}: '{rel}' does not exist")
        elif kind == "file" and not p.is_file():
            fails.add(f"{what}: '{rel}' is not a file")
        elif kind == "dir" and not p.is_dir():
            fails.add(f"{what}: '{rel}' is not a directory")

    for name, svc in (doc.get("services") or {}).items():
        build = svc.get("build")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            ctx = build.get("context", ".")
            must_exist(ctx, f"services.{name}.build.context", "dir")
            dockerfile = build.get("dockerfile", "Dockerfile")
            must_exist(str(Path(ctx) / dockerfile), f"services.{name}.build.dockerfile", "file")
        for i, vol in enumerate(svc.get("volumes") or []):
            where = f"services.{name}.volumes[{i}]"
            if isinstance(vol, str):
                parts = vol.split(":")
                if len(parts) == 1:
                    continue  # anonymous volume
                src = parts[0]
                if src.startswith((".", "/", "~")):
                    must_exist(src, where)
                elif src not in named_volumes:
                    fails.add(f"{where}: named volume '{src}' is not declared under top-level volumes")
            elif isinstance(vol, dict):
                if vol.get("type") == "bind":
                    must_exist(vol["source"], where)
                elif vol.get("type") == "volume" and vol.get("source") and vol["source"] not in named_volumes:
                    fails.add(f"{where}: named volume '{vol['source']}' is not declared")
        env_files = svc.get("env_file") or []
        for ef in [env_files] if isinstance(env_files, (str, dict)) else env_files:
            path = ef if isinstance(ef, str) else ef.get("path")
            required = True if isinstance(ef, str) else ef.get("required", True)
            if required:
                must_exist(path, f"services.{name}.env_file", "file")
    for section in ("configs", "secrets"):
        for name, spec in (doc.get(section) or {}).items():
            if isinstance(spec, dict) and "file" in spec:
                must_exist(spec["file"], f"{section}.{name}.file", "file")
    rc = fails.finish(f"{compose_file}: {checked} referenced files/dirs exist")

    # Grace: stop_grace_period must exceed the worker's drain grace.
    g = Failures(f"{compose_file}: shutdown grace")
    seen = 0
    for name, svc in (doc.get("services") or {}).items():
        env = env_dict(svc.get("environment"))
        if "TASKMILL_SHUTDOWN_GRACE_MS" not in env:
            continue
        seen += 1
        drain_ms = int(str(env["TASKMILL_SHUTDOWN_GRACE_MS"]))
        stop = svc.get("stop_grace_period")
        if stop is None:
            g.add(f"services.{name}: sets TASKMILL_SHUTDOWN_GRACE_MS but no stop_grace_period (Docker's default is 10s)")
            continue
        stop_ms = parse_duration_ms(str(stop))
        if stop_ms < drain_ms + args.margin_ms:
            g.add(f"services.{name}: stop_grace_period {stop} < drain grace {drain_ms} ms + {args.margin_ms} ms margin")
    rc |= g.finish(f"{compose_file}: stop_grace_period exceeds TASKMILL_SHUTDOWN_GRACE_MS + {args.margin_ms} ms "
                   f"({seen} service(s))")
    return rc


def env_dict(env) -> dict:
    if env is None:
        return {}
    if isinstance(env, dict):
        return {k: ("" if v is None else v) for k, v in env.items()}
    out = {}
    for item in env:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def parse_duration_ms(s: str) -> int:
    total = 0.0
    units = {"h": 3600_000, "m": 60_000, "s": 1000, "ms": 1, "us": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise SystemExit(f"cannot parse duration '{s}'")
    for num, unit in parts:
        total += float(num) * units[unit]
    return int(total)


# ---------------------------------------------------------------------------
# env names: every TASKMILL_* name used is one the binary knows
def collect_env_names(path: Path) -> list[tuple[str, str]]:
    """(name, where) for every environment variable name set in a file."""
    found: list[tuple[str, str]] = []
    if path.suffix == ".env":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                found.append((line.split("=", 1)[0].strip(), f"{path}:{n}"))
        return found
    for i, doc in enumerate(load_yaml_docs(path)):
        if "services" in doc and isinstance(doc["services"], dict):  # compose file
            for key, val in doc.items():
                if key.startswith("x-") and isinstance(val, dict) and all(isinstance(k, str) for k in val):
                    for k in val:
                        if re.fullmatch(r"[A-Z][A-Z0-9_]*", k):
                            found.append((k, f"{path}: {key}"))
            for name, svc in doc["services"].items():
                for k in env_dict(svc.get("environment")):
                    if k != "<<":
                        found.append((k, f"{path}: services.{name}.environment"))
            continue
        kind = doc.get("kind")
        where = f"{path}: {kind}/{(doc.get('metadata') or {}).get('name')}"
        if kind in ("ConfigMap", "Secret"):
            for field in ("data", "stringData"):
                for k in (doc.get(field) or {}):
                    found.append((k, where))
        for c in iter_containers(doc):
            for e in c.get("env") or []:
                found.append((e["name"], f"{where} container {c.get('name')}"))
    return found


def iter_containers(doc: dict):
    spec = doc.get("spec") or {}
    pod = None
    if doc.get("kind") == "Pod":
        pod = spec
    elif isinstance(spec.get("template"), dict):
        pod = (spec["template"].get("spec") or {})
    elif isinstance(spec.get("jobTemplate"), dict):
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    if not pod:
        return
    for key in ("initContainers", "containers"):
        for c in pod.get(key) or []:
            yield c


def cmd_env_names(args: argparse.Namespace) -> int:
    keys = {line.strip() for line in Path(args.keys).read_text().splitlines() if line.strip()}
    bad = [k for k in keys if not re.fullmatch(r"TASKMILL_[A-Z0-9_]+", k)]
    fails = Failures("environment variable names")
    if not keys:
        fails.add(f"'{args.keys}' is empty: `config keys` printed nothing")
    for k in bad:
        fails.add(f"`config keys` printed '{k}', which is not a TASKMILL_* name")
    total = 0
    for f in args.files:
        for name, where in collect_env_names(Path(f)):
            if name.startswith("TASKMILL_"):
                total += 1
                if name not in keys:
                    fails.add(f"{name} ({where}) is not printed by `taskmill config keys`")
            elif name.startswith("OTEL_"):
                total += 1
                if name not in OTEL_NAMES:
                    fails.add(f"{name} ({where}) is not one of {sorted(OTEL_NAMES)}")
    return fails.finish(f"{total} TASKMILL_*/OTEL_* names in {len(args.files)} files are known "
                        f"({len(keys)} keys from `config keys`)")


# ---------------------------------------------------------------------------
# Kubernetes: schemas, plus the rules these manifests promise
def schema_problems(schema, where="#") -> list[str]:
    """Rules for the hand-written schemas in deploy/k8s/schemas: every object
    schema that lists properties says explicitly whether other keys are
    allowed (false: typos fail, like the API server's strict field
    validation; true only where documented)."""
    out = []
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            out.append(f"{where}: object schema with properties but no explicit additionalProperties")
        for k, v in schema.items():
            out += schema_problems(v, f"{where}/{k}")
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            out += schema_problems(v, f"{where}/{i}")
    return out


def load_crd_schemas(schema_dir: Path) -> dict:
    """Map (apiVersion, kind lowercased) to a draft-07 validator for every
    <kind lowercased>-<group>-<version>.json in schema_dir. Exits with a
    message if a file is not a valid draft-07 schema or breaks the rules above."""
    import jsonschema
    out, bad = {}, []
    for p in sorted(schema_dir.glob("*.json")):
        m = re.fullmatch(r"([a-z0-9]+)-(.+)-(v[0-9a-z]+)\.json", p.name)
        if not m:
            bad.append(f"{p}: name is not <kind lowercased>-<group>-<version>.json")
            continue
        kind_lower, group, version = m.groups()
        try:
            schema = json.loads(p.read_text())
            jsonschema.Draft7Validator.check_schema(schema)
        except (json.JSONDecodeError, jsonschema.SchemaError) as e:
            bad.append(f"{p}: not a valid draft-07 JSON Schema: {str(e).splitlines()[0][:300]}")
            continue
        if not schema.get("$comment"):
            bad.append(f"{p}: no $comment saying what the schema is")
        bad += [f"{p}: {msg}" for msg in schema_problems(schema)]
        out[(f"{group}/{version}", kind_lower)] = jsonschema.Draft7Validator(schema)
    if bad:
        print(f"FAIL schemas in {schema_dir}:")
        for b in bad:
            print(f"  - {b}")
        sys.exit(1)
    return out


def cmd_k8s(args: argparse.Namespace) -> int:
    import kubernetes_validate
    crds = load_crd_schemas(Path(args.schemas))
    rc = 0
    for f in args.files:
        docs = load_yaml_docs(Path(f))
        label = args.label or f
        s = Failures(f"{label}: schema validation")
        counts = {"built-in": 0, "crd": 0}
        for d in docs:
            kind, api = d.get("kind"), d.get("apiVersion", "")
            name = (d.get("metadata") or {}).get("name")
            key = (api, (kind or "").lower())
            if "/" in api and "." in api.split("/")[0]:
                if key in crds:
                    errs = sorted(crds[key].iter_errors(d), key=lambda e: list(e.absolute_path))
                    for e in errs[:5]:
                        s.add(f"{kind}/{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}")
                    counts["crd"] += 1
                    continue
                if kind and not api.endswith(".k8s.io/" + api.split("/")[-1]):
                    s.add(f"{kind}/{name} ({api}): no schema under {args.schemas}; add one or drop the kind")
                    continue
            try:
                kubernetes_validate.validate(d, args.kube_version, strict=True)
                counts["built-in"] += 1
            except kubernetes_validate.ValidationError as e:
                s.add(f"{kind}/{name}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}")
            except kubernetes_validate.SchemaNotFoundError as e:
                s.add(f"{kind}/{name}: {e.message}")
        rc |= s.finish(f"{label}: {counts['built-in']} built-in objects valid for Kubernetes {args.kube_version} "
                       f"(strict), {counts['crd']} custom resources valid against {args.schemas}")
        rc |= policy_checks(label, docs, args)
    return rc


def worker_env(dep: dict, configmaps: dict) -> dict:
    """The environment of a Deployment's worker container (envFrom ConfigMaps, then env values)."""
    pod = dep["spec"]["template"]["spec"]
    worker = next((c for c in pod.get("containers") or [] if "worker" in (c.get("args") or [])), None)
    env: dict = {}
    if worker is None:
        return env
    for ref in worker.get("envFrom") or []:
        env.update(configmaps.get((ref.get("configMapRef") or {}).get("name"), {}))
    env.update({e["name"]: e.get("value") for e in worker.get("env") or [] if "value" in e})
    return env


def policy_checks(label: str, docs: list[dict], args: argparse.Namespace) -> int:
    p = Failures(f"{label}: policy")
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    names = lambda k: {(d.get("metadata") or {}).get("name") for d in by_kind.get(k, [])}  # noqa: E731

    # Credentials never live in the manifests.
    for d in by_kind.get("Secret", []):
        p.add(f"Secret/{d['metadata']['name']} is part of the build: credentials must come from outside "
              f"(secret.example.yaml is not in any kustomization)")

    # One autoscaler per workload.
    deployments = names("Deployment")
    scaled = {}
    for d in by_kind.get("ScaledObject", []) + by_kind.get("HorizontalPodAutoscaler", []):
        target = d["spec"]["scaleTargetRef"]["name"]
        scaled.setdefault(target, []).append(f"{d['kind']}/{d['metadata']['name']}")
        if target not in deployments:
            p.add(f"{d['kind']}/{d['metadata']['name']} targets Deployment/{target}, which is not in the build")
    for target, who in scaled.items():
        if len(who) > 1:
            p.add(f"Deployment/{target} has more than one autoscaler: {', '.join(who)}")
        dep = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == target)
        if "replicas" in dep["spec"]:
            p.add(f"Deployment/{target} is autoscaled but sets spec.replicas (reset on every apply)")
    for d in by_kind.get("TriggerAuthentication", []):
        for ref in d["spec"].get("secretTargetRef", []):
            if ref["name"] != args.secret_name:
                p.add(f"TriggerAuthentication/{d['metadata']['name']} reads Secret {ref['name']}, "
                      f"expected {args.secret_name}")

    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in by_kind.get("ConfigMap", [])}
    for d in by_kind.get("Deployment", []) + by_kind.get("StatefulSet", []):
        dname = f"{d['kind']}/{d['metadata']['name']}"
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            p.add(f"{dname}: pod securityContext.seccompProfile.type is not RuntimeDefault")
        for c in list(pod.get("initContainers") or []) + list(pod.get("containers") or []):
            cname = f"{dname} container {c['name']}"
            csc = c.get("securityContext") or {}
            if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                p.add(f"{cname}: runAsNonRoot is not set")
            if csc.get("allowPrivilegeEscalation") is not False:
                p.add(f"{cname}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                p.add(f"{cname}: capabilities.drop does not contain ALL")
            if not ((c.get("resources") or {}).get("limits") or {}).get("memory"):
                p.add(f"{cname}: no memory limit")
            if not ((c.get("resources") or {}).get("requests") or {}).get("cpu"):
                p.add(f"{cname}: no CPU request")
            for ref in c.get("envFrom") or []:
                cm = (ref.get("configMapRef") or {}).get("name")
                if cm and cm not in configmaps:
                    p.add(f"{cname}: envFrom ConfigMap {cm} is not in the build")
            for e in c.get("env") or []:
                sk = ((e.get("valueFrom") or {}).get("secretKeyRef") or {})
                if sk and sk.get("name") != args.secret_name:
                    p.add(f"{cname}: env {e['name']} reads Secret {sk.get('name')}, expected {args.secret_name}")
        # The taskmill worker itself.
        worker = next((c for c in pod.get("containers") or [] if "worker" in (c.get("args") or [])), None)
        if worker is None:
            continue
        wname = f"{dname} container {worker['name']}"
        csc = worker.get("securityContext") or {}
        if pod.get("enableServiceLinks") is not False:
            p.add(f"{dname}: enableServiceLinks is not false (Services named taskmill-* would inject "
                  f"unknown TASKMILL_* variables, which the worker rejects)")
        if csc.get("readOnlyRootFilesystem") is not True:
            p.add(f"{wname}: readOnlyRootFilesystem is not true")
        probes = {k: (worker.get(k) or {}).get("httpGet", {}).get("path") for k in ("livenessProbe", "readinessProbe")}
        if probes != {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}:
            p.add(f"{wname}: expected liveness /healthz and readiness /readyz, got {probes}")
        env = {}
        for ref in worker.get("envFrom") or []:
            env.update(configmaps.get((ref.get("configMapRef") or {}).get("name"), {}))
        env.update({e["name"]: e.get("value") for e in worker.get("env") or [] if "value" in e})
        drain_ms = int(env.get("TASKMILL_SHUTDOWN_GRACE_MS", 30000))
        grace_s = pod.get("terminationGracePeriodSeconds", 30)
        if grace_s * 1000 < drain_ms + args.margin_ms:
            p.add(f"{dname}: terminationGracePeriodSeconds {grace_s}s < TASKMILL_SHUTDOWN_GRACE_MS {drain_ms} ms "
                  f"+ {args.margin_ms} ms margin")
        data_dir = env.get("TASKMILL_DATA_DIR")
        mounts = {m["mountPath"] for m in worker.get("volumeMounts") or []}
        if data_dir and data_dir not in mounts:
            p.add(f"{wname}: TASKMILL_DATA_DIR {data_dir} is not a mounted volume (root filesystem is read-only)")
    # KEDA scales on every queue the worker serves, the CPU queue's target
    # being the CPU pool size of one replica.
    for so in by_kind.get("ScaledObject", []):
        target = so["spec"]["scaleTargetRef"]["name"]
        dep = next((d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == target), None)
        if dep is None:
            continue
        env = worker_env(dep, configmaps)
        served = [q.strip() for q in env.get("TASKMILL_QUEUES", "default").split(",") if q.strip()]
        served += [q.strip() for q in env.get("TASKMILL_CELERY_QUEUES", "").split(",") if q.strip()]
        cpu_queue = env.get("TASKMILL_CPU_QUEUE", "cpu")
        served.append(cpu_queue)
        triggers = {}
        for t in so["spec"].get("triggers") or []:
            if t.get("type") == "rabbitmq":
                triggers[(t.get("metadata") or {}).get("queueName")] = (t.get("metadata") or {}).get("value")
        for q in served:
            if q not in triggers:
                p.add(f"ScaledObject/{so['metadata']['name']}: no rabbitmq trigger for served queue {q!r}")
        for q, v in triggers.items():
            if q not in served:
                p.add(f"ScaledObject/{so['metadata']['name']}: trigger on {q!r}, which the worker does not serve")
            elif not str(v).isdigit() or int(v) < 1:
                p.add(f"ScaledObject/{so['metadata']['name']}: trigger {q!r} has value {v!r}, not a positive integer")
        procs = env.get("TASKMILL_CPU_PROCESSES")
        if cpu_queue in triggers and procs is not None and str(triggers[cpu_queue]) != str(procs):
            p.add(f"ScaledObject/{so['metadata']['name']}: the {cpu_queue!r} trigger's value {triggers[cpu_queue]!r} "
                  f"is not TASKMILL_CPU_PROCESSES ({procs})")
        elif cpu_queue in triggers and procs is None:
            p.add(f"Deployment/{target}: TASKMILL_CPU_PROCESSES is not set, so the {cpu_queue!r} trigger's target "
                  f"cannot follow the pool size")

    # The Grafana dashboard ConfigMap is the dashboard file, byte for byte.
    for cm in by_kind.get("ConfigMap", []):
        if ((cm.get("metadata") or {}).get("labels") or {}).get("grafana_dashboard") is None:
            continue
        size = sum(len(v.encode()) for v in (cm.get("data") or {}).values())
        if size > 200 * 1024:
            # `kubectl apply` (client side) copies the object into the
            # last-applied annotation; annotations are limited to 256 KiB.
            p.add(f"ConfigMap/{cm['metadata']['name']}: {size} bytes of dashboards, over 200 KiB "
                  f"(client-side `kubectl apply` would hit the 256 KiB annotation limit)")
        if cm["metadata"]["labels"]["grafana_dashboard"] != "1":
            p.add(f"ConfigMap/{cm['metadata']['name']}: label grafana_dashboard is not \"1\"")
        for key, text in (cm.get("data") or {}).items():
            src = Path(args.dashboards) / key
            if not src.is_file():
                p.add(f"ConfigMap/{cm['metadata']['name']}: key {key} has no source {src}")
            elif src.read_text() != text:
                p.add(f"ConfigMap/{cm['metadata']['name']}: key {key} differs from {src}")
            else:
                json.loads(text)
    return p.finish(f"{label}: no Secrets, one autoscaler per Deployment, KEDA triggers on every served queue, "
                    f"dashboard ConfigMaps equal their source, restricted securityContext, no service links, "
                    f"probes, termination grace > drain grace + {args.margin_ms} ms")


def cmd_secret_example(args: argparse.Namespace) -> int:
    """The example Secret is valid, and names the keys the manifests read."""
    import kubernetes_validate
    f = Failures(f"{args.file}")
    docs = load_yaml_docs(Path(args.file))
    keys = set()
    for d in docs:
        try:
            kubernetes_validate.validate(d, args.kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            f.add(f"{d.get('kind')}: {'.'.join(map(str, e.path))}: {e.message[:300]}")
        if d.get("kind") == "Secret" and d["metadata"]["name"] == args.secret_name:
            keys |= set((d.get("stringData") or {}).keys()) | set((d.get("data") or {}).keys())
    needed = set()
    for built in args.built:
        for d in load_yaml_docs(Path(built)):
            for c in iter_containers(d):
                for e in c.get("env") or []:
                    sk = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                    if sk.get("name") == args.secret_name:
                        needed.add(sk["key"])
            for ref in (d.get("spec") or {}).get("secretTargetRef") or []:
                if ref.get("name") == args.secret_name:
                    needed.add(ref["key"])
    for k in sorted(needed - keys):
        f.add(f"key {k} is read by the manifests but missing from the example Secret {args.secret_name}")
    return f.finish(f"{args.file}: valid; provides every key the manifests read ({', '.join(sorted(needed))})")


# ---------------------------------------------------------------------------
# Grafana dashboard: parses, queries only known metrics
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "inf", "nan", "le",
}


def metric_names_in(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                      # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                     # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)                   # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or word in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def dashboard_exprs(node, path="$"):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield path, v
            elif k in ("query", "definition") and isinstance(v, str) and "label_values" in v:
                m = re.search(r"label_values\((.*),\s*\w+\)\s*$", v)
                if m:
                    yield path, m.group(1)
            else:
                yield from dashboard_exprs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from dashboard_exprs(v, f"{path}[{i}]")


def cmd_dashboard(args: argparse.Namespace) -> int:
    allowed = allowed_metric_names()
    rc = 0
    for fname in args.files:
        f = Failures(f"{fname}")
        try:
            dash = json.loads(Path(fname).read_text())
        except json.JSONDecodeError as e:
            f.add(f"not valid JSON: {e}")
            rc |= f.finish("")
            continue
        used: set[str] = set()
        n = 0
        for where, expr in dashboard_exprs(dash):
            n += 1
            names = metric_names_in(expr)
            if not names:
                f.add(f"{where}: no metric name found in '{expr}'")
            for name in names:
                used.add(name)
                if not name.startswith(("taskmill_", "rabbitmq_")):
                    f.add(f"{where}: '{name}' is neither a taskmill_ nor a rabbitmq_ metric")
                elif name not in allowed:
                    f.add(f"{where}: '{name}' is not a known metric (deploy/tools/checks.py lists them)")
        if not dash.get("uid") or not dash.get("panels"):
            f.add("dashboard has no uid or no panels")
        rc |= f.finish(f"{fname}: JSON parses; {n} queries use {len(used)} known metrics")
    return rc


# ---------------------------------------------------------------------------
# PrometheusRule generated from alerts.yml
class _BlockDumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper, data):
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_BlockDumper.add_representer(str, _str_presenter)


def render_prometheusrule(alerts_path: Path, source_label: str) -> str:
    rules = load_yaml_docs(alerts_path)[0]
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "taskmill", "labels": {"app.kubernetes.io/name": "taskmill"}},
        "spec": {"groups": rules["groups"]},
    }
    header = (f"# GENERATED from {source_label} by `deploy/tools/checks.py prometheusrule --write`.\n"
              f"# Do not edit: change {source_label} and regenerate (deploy/validate.sh fails when stale).\n")
    return header + yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, width=100, default_flow_style=False)


def cmd_prometheusrule(args: argparse.Namespace) -> int:
    text = render_prometheusrule(Path(args.alerts), args.source_label)
    out = Path(args.out)
    if args.write:
        out.write_text(text)
        print(f"wrote {out}")
        return 0
    f = Failures(f"{out}")
    if not out.exists() or out.read_text() != text:
        f.add(f"out of date with {args.alerts}: run `{sys.executable} deploy/tools/checks.py prometheusrule --write`")
    return f.finish(f"{out} matches {args.alerts}")


# ---------------------------------------------------------------------------
# images: every third-party image is pinned to an exact tag on a supported
# line, and docs/operations.md#image-versions names the same tags.
#
# repository -> (lowest supported (major, minor), required tag fragment or
# None, why). One place for the policy; bump it with the images.
IMAGE_LINES = {
    # 4.3: a dead letter returned after a `dlq list` browse no longer counts
    # against the quorum delivery limit (4.0-4.2 drop it after ~20 scans).
    "rabbitmq": ((4, 3), "management", "RabbitMQ 4.3 or newer with the management plugin (the -management image)"),
    "jaegertracing/jaeger": ((2, 0), None, "Jaeger v2 (OTLP in, configured by a YAML file)"),
    "prom/prometheus": ((3, 0), None, "Prometheus v3"),
    "grafana/grafana": ((12, 0), None, "Grafana 12 or newer"),
    "postgres": ((16, 0), None, "PostgreSQL 16 or newer"),
}
# Repositories of lines that are no longer released.
IMAGE_RETIRED = {
    "jaegertracing/all-in-one": "Jaeger v1 all-in-one; use jaegertracing/jaeger (v2)",
}
_INTERP = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")
# x.y.z, or x.y for images whose releases have two parts (PostgreSQL 16.6),
# with an optional variant suffix (-management, -bookworm).
_EXACT = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:-[A-Za-z0-9.-]+)?$")


def compose_images(path: Path) -> list[tuple[str, str]]:
    doc = load_yaml_docs(path)[0]
    out = []
    for name, svc in (doc.get("services") or {}).items():
        image = (svc or {}).get("image")
        if image:
            # The default of a ${VAR:-default} is what `docker compose up` pulls.
            out.append((f"{path} service {name}", _INTERP.sub(lambda m: m.group(2), image)))
    return out


def k8s_images(path: Path) -> list[tuple[str, str]]:
    out = []
    for d in load_yaml_docs(path):
        where = f"{path.name}: {d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        if d.get("kind") == "RabbitmqCluster" and (d.get("spec") or {}).get("image"):
            out.append((where, d["spec"]["image"]))
        pod = ((d.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in list(pod.get("initContainers") or []) + list(pod.get("containers") or []):
            out.append((f"{where} container {c['name']}", c["image"]))
    return out


def cmd_images(args: argparse.Namespace) -> int:
    f = Failures("images")
    found: list[tuple[str, str]] = []
    for c in args.compose:
        found += compose_images(Path(c))
    for k in args.k8s:
        found += k8s_images(Path(k))
    docs_text = "\n".join(Path(d).read_text() for d in args.docs)
    seen = set()
    for where, image in found:
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if repo == "taskmill" or repo.endswith("/taskmill"):
            continue  # our own image: its tag is the release, set by the overlay
        if repo in IMAGE_RETIRED:
            f.add(f"{where}: {image}: {IMAGE_RETIRED[repo]}")
            continue
        if repo not in IMAGE_LINES:
            f.add(f"{where}: {image}: no supported line recorded in checks.py IMAGE_LINES")
            continue
        low, fragment, why = IMAGE_LINES[repo]
        m = _EXACT.match(tag)
        if not m:
            f.add(f"{where}: {image}: not pinned to an exact version tag (x.y.z)")
            continue
        if (int(m.group(1)), int(m.group(2))) < low:
            f.add(f"{where}: {image}: below the supported line ({why})")
        if fragment and fragment not in tag:
            f.add(f"{where}: {image}: tag lacks '{fragment}' ({why})")
        if f"{repo}:{tag}" not in docs_text and f"`{tag}`" not in docs_text:
            f.add(f"{where}: {image}: not named in {', '.join(args.docs)} (keep the version table true)")
        seen.add(image)
    return f.finish(f"{len(found)} image references, {len(seen)} distinct pinned images on supported lines "
                    f"and named in the docs: {', '.join(sorted(seen))}")


# ---------------------------------------------------------------------------
# runbooks: every alert's runbook_url points at a heading that exists
def markdown_anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to
    dashes, repeats numbered -1, -2, ... Fenced code blocks hold no headings."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(2).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def cmd_runbooks(args: argparse.Namespace) -> int:
    f = Failures(f"{args.alerts}: runbook_url")
    rules = load_yaml_docs(Path(args.alerts))[0]
    root = Path(args.root)
    checked = 0
    for g in rules.get("groups") or []:
        for r in g.get("rules") or []:
            if "alert" not in r:
                continue
            checked += 1
            url = (r.get("annotations") or {}).get("runbook_url")
            if not url:
                f.add(f"{r['alert']}: no runbook_url annotation")
                continue
            path, _, anchor = url.partition("#")
            doc = root / path
            if not anchor:
                f.add(f"{r['alert']}: runbook_url {url} has no #anchor (point at the alert's section)")
            elif not doc.is_file():
                f.add(f"{r['alert']}: runbook_url {url}: {doc} does not exist")
            elif anchor not in markdown_anchors(doc.read_text()):
                f.add(f"{r['alert']}: runbook_url {url}: no heading with anchor #{anchor} in {path}")
    return f.finish(f"{checked} alerts, each with a runbook_url whose anchor is a heading")


# ---------------------------------------------------------------------------
# jaeger: the Jaeger v2 config is consistent (no Jaeger binary offline)
def cmd_jaeger(args: argparse.Namespace) -> int:
    """What `jaeger --config` would refuse at start, checked by hand: every
    component a pipeline names is defined, extensions are defined, and the
    storage names the query extension and the exporter use exist."""
    f = Failures(f"{args.file}")
    doc = load_yaml_docs(Path(args.file))[0]
    service = doc.get("service") or {}
    for ext in service.get("extensions") or []:
        if ext not in (doc.get("extensions") or {}):
            f.add(f"service.extensions names {ext!r}, not defined under extensions")
    pipelines = service.get("pipelines") or {}
    if "traces" not in pipelines:
        f.add("no traces pipeline")
    for name, pl in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            for comp in (pl or {}).get(section) or []:
                if comp not in (doc.get(section) or {}):
                    f.add(f"pipeline {name}: {section[:-1]} {comp!r} is not defined under {section}")
    backends = set(((doc.get("extensions") or {}).get("jaeger_storage") or {}).get("backends") or {})
    query = ((doc.get("extensions") or {}).get("jaeger_query") or {}).get("storage") or {}
    if query.get("traces") not in backends:
        f.add(f"jaeger_query.storage.traces {query.get('traces')!r} is not a jaeger_storage backend {sorted(backends)}")
    for name, exp in (doc.get("exporters") or {}).items():
        if name.startswith("jaeger_storage_exporter") and (exp or {}).get("trace_storage") not in backends:
            f.add(f"exporter {name}: trace_storage {(exp or {}).get('trace_storage')!r} is not a jaeger_storage backend")
    otlp = ((doc.get("receivers") or {}).get("otlp") or {}).get("protocols") or {}
    for proto, port in (("grpc", "4317"), ("http", "4318")):
        endpoint = (otlp.get(proto) or {}).get("endpoint", "")
        if not endpoint.endswith(":" + port) or endpoint.startswith(("localhost", "127.")):
            f.add(f"receivers.otlp.protocols.{proto}.endpoint {endpoint!r}: workers send OTLP to jaeger:{port}, "
                  f"so it must listen on all interfaces (0.0.0.0:{port})")
    return f.finish(f"{args.file}: pipelines name defined components, storage names resolve, OTLP on 4317/4318")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compose", help="files referenced by a compose file exist; grace periods line up")
    c.add_argument("file")
    c.add_argument("--margin-ms", type=int, default=10000)
    c.set_defaults(func=cmd_compose)

    e = sub.add_parser("env-names", help="TASKMILL_* names used are printed by `taskmill config keys`")
    e.add_argument("--keys", required=True, help="file with the output of `taskmill config keys`")
    e.add_argument("files", nargs="+", help="compose files, *.env files, Kubernetes YAML (built or raw)")
    e.set_defaults(func=cmd_env_names)

    k = sub.add_parser("k8s", help="validate built manifests: schemas and policy")
    k.add_argument("--schemas", required=True, help="folder with CRD JSON schemas")
    k.add_argument("--kube-version", default="1.32.0")
    k.add_argument("--secret-name", default="taskmill-credentials")
    k.add_argument("--margin-ms", type=int, default=10000)
    k.add_argument("--label")
    k.add_argument("--dashboards", default="deploy/grafana/dashboards",
                   help="folder of the dashboard files the grafana_dashboard ConfigMaps are generated from")
    k.add_argument("files", nargs="+")
    k.set_defaults(func=cmd_k8s)

    s = sub.add_parser("secret-example", help="the example Secret is valid and complete")
    s.add_argument("file")
    s.add_argument("--built", nargs="+", default=[], help="built manifests whose secret keys it must provide")
    s.add_argument("--kube-version", default="1.32.0")
    s.add_argument("--secret-name", default="taskmill-credentials")
    s.set_defaults(func=cmd_secret_example)

    d = sub.add_parser("dashboard", help="Grafana dashboards parse and query known metrics")
    d.add_argument("files", nargs="+")
    d.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("prometheusrule", help="PrometheusRule generated from alerts.yml is up to date")
    p.add_argument("--alerts", default="deploy/prometheus/alerts.yml")
    p.add_argument("--out", default="deploy/k8s/components/prometheus-operator/prometheusrule.yaml")
    p.add_argument("--source-label", default="deploy/prometheus/alerts.yml")
    p.add_argument("--write", action="store_true")
    p.set_defaults(func=cmd_prometheusrule)

    i = sub.add_parser("images", help="third-party images are pinned, on supported lines, named in the docs")
    i.add_argument("--compose", nargs="*", default=[])
    i.add_argument("--k8s", nargs="*", default=[], help="built manifests")
    i.add_argument("--docs", nargs="+", required=True)
    i.set_defaults(func=cmd_images)

    r = sub.add_parser("runbooks", help="every alert's runbook_url resolves to a heading")
    r.add_argument("--alerts", default="deploy/prometheus/alerts.yml")
    r.add_argument("--root", default=".", help="the repository root runbook_url paths are relative to")
    r.set_defaults(func=cmd_runbooks)

    j = sub.add_parser("jaeger", help="the Jaeger v2 config is internally consistent")
    j.add_argument("file")
    j.set_defaults(func=cmd_jaeger)

    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
