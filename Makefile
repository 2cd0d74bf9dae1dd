# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages some tests drive for real: a headless browser (tests/web), Prometheus and
# promtool (tests/deploy), docker-compose's config validator, nginx in front of replicas
# (tests/reliability/test_failover.py). Each test skips without its tool.
# package[:binary], where the binary that shows the package is installed has another name.
SYSTEM_TOOLS := chromium chromium-driver:chromedriver prometheus docker-compose nginx-light:nginx hey buildah debootstrap iproute2:ip

.PHONY: serve test lint install system-tools clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev,lite,openvino]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/midserve serve

# A tool counts as present when its binary is on PATH or in /usr/sbin, /sbin (nginx lives
# there, and a non-root PATH often lacks them); only the missing packages are installed.
system-tools:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for t in $(SYSTEM_TOOLS); do \
	  command -v "$${t#*:}" >/dev/null || missing="$$missing $${t%%:*}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends $$missing || echo "apt-get failed: some tests will skip"; \
	else echo "missing:$$missing (not root or no apt-get): the tests that need them skip"; fi

lint: install
	$(VENV)/bin/ruff check app tests studies
	$(VENV)/bin/ruff format --check app tests studies
	$(VENV)/bin/mypy

test: lint system-tools
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
