#!/usr/bin/env bash
# Starts, stops and queries an extra RabbitMQ node beside the service broker on
# 127.0.0.1:5672, for the TLS and cluster tests. Each node has its own node
# name, ports, database, logs, config file, enabled-plugins file and
# environment file (the system one pins the node name), under
# ${TASKMILL_RABBIT_BASE:-/tmp/taskmill-rabbit}/NAME, owned by the `rabbitmq`
# user. A node is stopped by its own node name, never the service broker.
#
#   rabbitmq-node.sh start NAME AMQP_PORT [--dist-port P] [--tls-port P
#       --ca FILE --cert FILE --key FILE [--verify-peer]] [--fresh]
#       Starts NAME@localhost (AMQP on 127.0.0.1:AMQP_PORT, Erlang
#       distribution on --dist-port, default AMQP_PORT + 20000) and waits
#       until it has booted. With --tls-port, also an amqps listener with the
#       given CA, certificate and key; --verify-peer requires a client
#       certificate signed by that CA. --fresh wipes the node's database
#       first. Prints the node's directory on stdout.
#   rabbitmq-node.sh stop NAME     stops NAME@localhost (no error if it is down)
#   rabbitmq-node.sh ctl NAME ARGS runs rabbitmqctl ARGS against NAME@localhost
#   rabbitmq-node.sh queues NAME ARGS runs rabbitmq-queues ARGS against it
#   rabbitmq-node.sh wipe NAME     stops NAME and removes its directory
set -euo pipefail

BASE=${TASKMILL_RABBIT_BASE:-/tmp/taskmill-rabbit}
LIB=/usr/lib/rabbitmq/bin
RUN_AS=rabbitmq

usage() {
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() { echo "rabbitmq-node: $*" >&2; exit 1; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Runs a RabbitMQ CLI tool as the broker's user, so it reads the same Erlang
# cookie as the nodes (root is switched to `rabbitmq`, as Debian's wrappers do).
as_rabbit() {
  if [ "$(id -u)" = 0 ]; then
    su "$RUN_AS" -s /bin/sh -c 'cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq exec "$0" "$@"' -- "$@"
  else
    (cd /var/lib/rabbitmq 2>/dev/null || true; HOME=${HOME:-/var/lib/rabbitmq} exec "$@")
  fi
}

node_of() { echo "$1@localhost"; }

ctl() { # NAME ARGS...
  local name=$1; shift
  as_rabbit "$LIB/rabbitmqctl" -n "$(node_of "$name")" "$@"
}

cmd_start() {
  [ $# -ge 2 ] || usage
  local name=$1 port=$2; shift 2
  local dist_port=$((port + 20000)) tls_port="" ca="" cert="" key="" verify=0 fresh=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --dist-port) dist_port=$2; shift 2 ;;
      --tls-port) tls_port=$2; shift 2 ;;
      --ca) ca=$2; shift 2 ;;
      --cert) cert=$2; shift 2 ;;
      --key) key=$2; shift 2 ;;
      --verify-peer) verify=1; shift ;;
      --fresh) fresh=1; shift ;;
      *) usage ;;
    esac
  done
  [[ "$name" =~ ^[a-z][a-z0-9_-]*$ ]] || die "node name \`$name\` must be lower-case letters, digits, - or _"
  [ "$name" != rabbit ] || die "\`rabbit\` is the service broker's node name; pick another"
  if [ -n "$tls_port" ]; then
    [ -n "$ca" ] && [ -n "$cert" ] && [ -n "$key" ] || die "--tls-port needs --ca, --cert and --key"
  fi
  id "$RUN_AS" >/dev/null 2>&1 || die "no \`$RUN_AS\` user: is rabbitmq-server installed?"
  [ -x "$LIB/rabbitmq-server" ] || die "$LIB/rabbitmq-server not found: is rabbitmq-server installed?"

  local dir=$BASE/$name
  if answers "$port"; then
    if ctl "$name" status >/dev/null 2>&1; then
      echo "$dir"
      return 0
    fi
    die "127.0.0.1:$port is taken by something other than node $(node_of "$name")"
  fi
  [ "$fresh" = 0 ] || rm -rf "$dir/mnesia"
  mkdir -p "$dir/mnesia" "$dir/log" "$dir/tls"
  chmod 755 "$BASE" 2>/dev/null || true

  local conf=$dir/rabbitmq.conf
  {
    echo "listeners.tcp.local = 127.0.0.1:$port"
    echo "loopback_users = none"
    if [ -n "$tls_port" ]; then
      cp "$ca" "$dir/tls/ca.pem"
      cp "$cert" "$dir/tls/cert.pem"
      cp "$key" "$dir/tls/key.pem"
      echo "listeners.ssl.local = 127.0.0.1:$tls_port"
      echo "ssl_options.cacertfile = $dir/tls/ca.pem"
      echo "ssl_options.certfile = $dir/tls/cert.pem"
      echo "ssl_options.keyfile = $dir/tls/key.pem"
      if [ "$verify" = 1 ]; then
        echo "ssl_options.verify = verify_peer"
        echo "ssl_options.fail_if_no_peer_cert = true"
      else
        echo "ssl_options.verify = verify_none"
        echo "ssl_options.fail_if_no_peer_cert = false"
      fi
    fi
  } >"$conf"
  echo "[]." >"$dir/enabled_plugins"
  # Our own environment file: the system one pins NODENAME to the service's.
  {
    echo "NODENAME=$(node_of "$name")"
    echo "ERL_EPMD_ADDRESS=127.0.0.1"
  } >"$dir/rabbitmq-env.conf"
  if [ "$(id -u)" = 0 ]; then
    chown -R "$RUN_AS:$RUN_AS" "$dir"
    chmod 600 "$dir/tls/key.pem" 2>/dev/null || true
  fi

  as_rabbit env \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$(node_of "$name")" \
    RABBITMQ_DIST_PORT="$dist_port" \
    RABBITMQ_CONFIG_FILE="$conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/node.pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    "$LIB/rabbitmq-server" -detached >"$dir/start.out" 2>&1 ||
    die "rabbitmq-server did not start $(node_of "$name"); see $dir/start.out and $dir/log"

  # The node registers with epmd a moment after -detached returns, and
  # await_startup fails at once on a node it cannot reach yet.
  local i booted=0
  for ((i = 0; i < 180; i++)); do
    if ctl "$name" await_startup --timeout 30 >"$dir/await.out" 2>&1; then booted=1; break; fi
    sleep 0.5
  done
  [ "$booted" = 1 ] || die "$(node_of "$name") did not boot within 90 s; see $dir/log and $dir/await.out"
  for ((i = 0; i < 100; i++)); do
    answers "$port" && break
    sleep 0.1
  done
  answers "$port" || die "$(node_of "$name") booted but 127.0.0.1:$port does not answer"
  echo "$dir"
}

cmd_stop() {
  [ $# -eq 1 ] || usage
  local name=$1
  [ "$name" != rabbit ] || die "refusing to stop the service broker"
  if ctl "$name" status >/dev/null 2>&1; then
    ctl "$name" stop >/dev/null 2>&1 || true
  fi
  # `stop` waits for the node to exit; a node that was killed leaves nothing.
  local pid_file=$BASE/$name/node.pid
  if [ -f "$pid_file" ]; then
    local pid
    pid=$(cat "$pid_file" 2>/dev/null || true)
    if [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q "$(node_of "$name")" "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      local i
      for ((i = 0; i < 100; i++)); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
  fi
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case "$cmd" in
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  ctl) [ $# -ge 1 ] || usage; ctl "$@" ;;
  queues)
    [ $# -ge 1 ] || usage
    name=$1; shift
    as_rabbit "$LIB/rabbitmq-queues" -n "$(node_of "$name")" "$@"
    ;;
  wipe)
    [ $# -eq 1 ] || usage
    cmd_stop "$1"
    rm -rf "${BASE:?}/$1"
    ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
