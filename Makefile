# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first (once).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test setup clean container container-test constraints browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]' -c constraints.txt
	touch $(STAMP)

# After upgrading packages in .venv and passing `make test`: record the new tested set.
constraints: $(STAMP)
	{ grep '^#' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: $(STAMP)
	$(BIN)/pupil demo

# Two workers (this machine has two cores); a test file runs whole on one worker, so its module fixtures start once.
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The report and web-page tests drive Debian's Chromium through Playwright (never `playwright install`: offline).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The service as a container image, without a Docker daemon (buildah; see README "Deploy"). ARTIFACT defaults to
# the demo's model (trained by `make demo` when missing).
ARTIFACT ?= runs/demo

runs/demo/model/config.json:
	$(MAKE) demo

container: $(STAMP) $(if $(filter runs/demo,$(ARTIFACT)),runs/demo/model/config.json)
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq buildah debootstrap; }
	$(BIN)/python -m deploy.container build $(ARTIFACT)

container-test: container
	$(BIN)/python -m deploy.container test --artifact $(ARTIFACT)

clean:
	rm -rf $(VENV) runs .pytest_cache
