# Two entry points, both from a fresh clone: `make report` (the main job) and `make test`.
VENV := .venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev,peers,zoo]'
	touch $@

.PHONY: report test
report: $(VENV)/.installed
	$(VENV)/bin/convtally report

test: $(VENV)/.installed
	$(VENV)/bin/pytest
