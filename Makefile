# The two set-up commands of the README: `make run` (install + the default conversion)
# and `make test` (install + the test suite). Both work on a fresh machine.
VENV ?= .venv
RECIPE ?= recipes/smollm2-135m.yaml

.PHONY: install install-run run test test-fast

# `make run` installs what a conversion needs; `make test` adds the service, the cluster and the test tools
install-run: $(VENV)/.installed-run
install: $(VENV)/.installed-dev

$(VENV)/.installed-run: pyproject.toml requirements/constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV) run

$(VENV)/.installed-dev: pyproject.toml requirements/constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV) dev
	touch $(VENV)/.installed-run

run: install-run
	$(VENV)/bin/sea-convert run $(RECIPE)

# pytest's exit code 5 means "no tests ran": never let that pass silently.
test: install
	$(VENV)/bin/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow"
