#!/usr/bin/env bash
# Makes sure the services the tests and the demo need are running on this
# machine: RabbitMQ on 127.0.0.1:5672 and (with --postgres) PostgreSQL on
# 127.0.0.1:5432. Uses a running one if it answers; otherwise starts the
# installed server; otherwise installs it from the distribution when root;
# otherwise tries `docker compose up -d`; otherwise says exactly what to do.
set -euo pipefail

want_pg=0
for a in "$@"; do
  case "$a" in
    --postgres) want_pg=1 ;;
    *) echo "usage: $0 [--postgres]" >&2; exit 2 ;;
  esac
done

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    if answers "$1"; then echo "$2 is up on 127.0.0.1:$1"; return 0; fi
    sleep 0.2
  done
  echo "$2 did not come up on 127.0.0.1:$1 within $3 s" >&2
  return 1
}

have_docker_engine() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing $* from the distribution's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
    return 0
  fi
  return 1
}

ensure_rabbitmq() {
  if answers 5672; then echo "RabbitMQ already answers on 127.0.0.1:5672"; return 0; fi
  if ! command -v rabbitmq-server >/dev/null; then
    apt_install rabbitmq-server || true
  fi
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ: rabbitmq-server -detached"
    rabbitmq-server -detached || true
    wait_port 5672 RabbitMQ 90 && return 0
  fi
  if have_docker_engine; then
    docker compose up -d rabbitmq && wait_port 5672 RabbitMQ 90 && return 0
  fi
  cat >&2 <<'MSG'
RabbitMQ is not running on 127.0.0.1:5672 and could not be started here.
Start one, e.g.:  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
or, with Docker:  docker compose up -d rabbitmq
MSG
  return 1
}

ensure_postgres() {
  if answers 5432; then echo "PostgreSQL already answers on 127.0.0.1:5432"; return 0; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql || true
  fi
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    local v
    v=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "starting PostgreSQL $v: pg_ctlcluster $v main start"
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    wait_port 5432 PostgreSQL 60 && return 0
  fi
  if have_docker_engine; then
    docker compose up -d postgres && wait_port 5432 PostgreSQL 60 && return 0
  fi
  cat >&2 <<'MSG'
PostgreSQL is not running on 127.0.0.1:5432 and could not be started here.
Start one, e.g.:  sudo apt-get install postgresql && sudo pg_ctlcluster <version> main start
or, with Docker:  docker compose up -d postgres
MSG
  return 1
}

ensure_rabbitmq
if [ "$want_pg" = 1 ]; then ensure_postgres; fi
