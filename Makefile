# Quick start: `make run` starts a local cluster; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := openssh-client openssh-server slapd ldap-utils stunnel4 \
		chromium nginx postgresql wrk libnss3-tools curl

.PHONY: install system-deps run test bench clean web-assets

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

bench: install system-deps
	$(PY) -m benchmarks all

clean:
	rm -rf $(VENV) run build *.egg-info

# Refresh the vendored browser libraries of the web UI from npm (package-lock.json pins them).
web-assets:
	cd webassets && npm ci --no-audit --no-fund
	cp webassets/node_modules/@xterm/xterm/lib/xterm.js webassets/node_modules/@xterm/xterm/css/xterm.css \
	   webassets/node_modules/@xterm/addon-fit/lib/addon-fit.js \
	   webassets/node_modules/asciinema-player/dist/bundle/asciinema-player.min.js \
	   webassets/node_modules/asciinema-player/dist/bundle/asciinema-player.css \
	   edgeaccess/web/static/vendor/
