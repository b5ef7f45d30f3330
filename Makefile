# Quick start: `make run` starts a local cluster; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
# The venv of `make test-floor`: every dependency at the floor setup.cfg declares.
FLOOR_VENV ?= .venv-floor
PY     := $(VENV)/bin/python
APT_PACKAGES := openssh-client openssh-server slapd ldap-utils stunnel4 \
		chromium nginx postgresql wrk libnss3-tools curl

.PHONY: install system-deps run test test-floor bench clean web-assets

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

# Debian packages the tests drive for real (OpenSSH client and sshd, slapd, Chromium,
# PostgreSQL, nginx, kubectl: Debian's kubernetes-client only where no kubectl exists).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v kubectl >/dev/null 2>&1 || missing="$$missing kubernetes-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

run: install
	$(PY) -m edgeaccess.devcluster --dir run

test: install system-deps
	$(PY) -m pytest -q -p no:randomly

# The unit tests at exactly the minimum versions setup.cfg promises (`name >= X` pinned
# to X by a constraints file generated from setup.cfg, so a new dependency is covered).
$(FLOOR_VENV)/.installed: setup.cfg pyproject.toml .ci/floor_constraints.py
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(PYTHON) .ci/floor_constraints.py setup.cfg > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install -q --constraint $(FLOOR_VENV)/constraints.txt \
	  -e ".[$$($(PYTHON) .ci/floor_constraints.py --extras setup.cfg)]" --config-settings editable_mode=compat
	$(FLOOR_VENV)/bin/python .ci/floor_constraints.py --check setup.cfg
	touch $@

test-floor: $(FLOOR_VENV)/.installed system-deps
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:randomly --ignore=tests/integration

bench: install system-deps
	$(PY) -m benchmarks all

clean:
	rm -rf $(VENV) $(FLOOR_VENV) run build *.egg-info

# Refresh the vendored browser libraries of the web UI from npm (package-lock.json pins them).
web-assets:
	cd webassets && npm ci --no-audit --no-fund
	cp webassets/node_modules/@xterm/xterm/lib/xterm.js webassets/node_modules/@xterm/xterm/css/xterm.css \
	   webassets/node_modules/@xterm/addon-fit/lib/addon-fit.js \
	   webassets/node_modules/asciinema-player/dist/bundle/asciinema-player.min.js \
	   webassets/node_modules/asciinema-player/dist/bundle/asciinema-player.css \
	   edgeaccess/web/static/vendor/
