# staleflower: every target creates .venv from requirements.txt when needed.
#
#   make run                       the default experiment with the real Flower runtime (flwr run, 10 simulated nodes)
#   make run CONFIG=configs/X.toml a preset instead
#   make run CONFIG=configs/X.toml SET="max-updates=50 lr=0.01" NODES=4   a preset with some keys changed
#   make run DB=path/to.db         results there instead of the default store, ~/.staleflower/metrics.db (or
#                                  $STALEFLOWER_METRICS_DB), which simulate, bare `flwr run` and `make dashboard` use
#   make test | test-deployment | test-fast | lint | bench | bench-extra | dashboard [DB=path] [STORES=dir] | clean | distclean

PYTHON3 ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The native executor (client_app/native): compiled once here, not inside make test's time (35-50 s, 1.6 GB),
# into ~/.cache/staleflower/native/ (one folder per source version; STALEFLOWER_NATIVE_DIR moves it).
NATIVE  := build/.native-built
DB      ?=
NODES   ?= 10
CONFIG  ?=
SET     ?=
RUN_ARGS ?=
DASHBOARD_ADDRESS ?= 127.0.0.1  # this machine only; 0.0.0.0 to serve the network

.PHONY: venv run test test-deployment test-fast lint bench bench-extra dashboard clean distclean deploy-local
.PHONY: native-tsan

venv: $(STAMP) $(NATIVE)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON3) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	touch $(STAMP)

# Without a C++ compiler this says so and succeeds: the Python executors are the fallback.
$(NATIVE): $(STAMP) client_app/native/executors.cpp client_app/native/__init__.py
	$(BIN)/python -m client_app.native
	mkdir -p $(dir $(NATIVE)) && touch $(NATIVE)

# scripts/flwr_run.sh checks the preset, SET and DB (merged in that order) before it starts a SuperLink.
run: $(STAMP)
	VENV=$(abspath $(VENV)) FLWR_HOME=$(CURDIR)/.flwr-home NUM_SUPERNODES=$(NODES) \
		bash scripts/flwr_run.sh $(if $(strip $(CONFIG)),--run-config "$(CONFIG)") \
		$(if $(strip $(SET)),--run-config "$(SET)") $(if $(strip $(DB)),--run-config "metrics-db='$(abspath $(DB))'") \
		$(RUN_ARGS)

# Two workers: the slow tests mostly wait on real processes (SuperLinks, Chromium), which overlaps well even on 2
# cores (tests/conftest.py). The real deployment (TLS, authenticated SuperNodes, a SuperNode killed, shaped links)
# is its own target: its SuperNodes start a fresh ClientApp process per task, about 2 minutes of both cores on its
# own and unreliable beside other work. CI runs both (.ci/run).
test: $(STAMP) $(NATIVE)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not deployment"

test-deployment: $(STAMP)
	$(BIN)/python -m pytest -q -m deployment

test-fast: $(STAMP) $(NATIVE)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow and not deployment"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy strategies server_app

# make bench: the benchmarks and the tuned comparisons behind RESULTS.md (just under 2 hours on 2 cores, BENCHMARKS.md);
# make bench-extra: the untuned reproductions RESULTS.md keeps and the extra D = 4 comparison (bench/run_all.py).
bench: $(STAMP) $(NATIVE)
	$(BIN)/python bench/run_all.py

bench-extra: $(STAMP) $(NATIVE)
	$(BIN)/python bench/run_all.py --extra

# The native executor under ThreadSanitizer (an instrumented build in its own cache folder; STRESS=1 for the
# stress runs too). Not part of make test: the instrumented compile takes minutes.
native-tsan: $(STAMP)
	STRESS=$(STRESS) PYTHON=$(BIN)/python bash scripts/native_tsan.sh

dashboard: $(STAMP)
	$(BIN)/streamlit run dashboard/app.py --server.address $(DASHBOARD_ADDRESS) --browser.gatherUsageStats false \
		-- $(if $(DB),--db $(DB)) $(if $(STORES),--stores $(STORES))

# A local deployment on Flower's real runtime: throw-away CA, SuperLink with TLS and SuperNode authentication,
# DEPLOY_NODES (default 3) registered SuperNodes, one `flwr run` on the wall clock, all stopped by pid at the end.
#   make deploy-local [DEPLOY_NODES=3] [CONFIG=configs/X.toml] [LINKS=wifi,4g,3g] [RUN_ARGS="--run-config 'k=v'"]
deploy-local: $(STAMP)
	$(BIN)/python scripts/deploy_local.py --nodes $(or $(DEPLOY_NODES),3) $(if $(CONFIG),--run-config "$(CONFIG)") \
		$(if $(LINKS),--links "$(LINKS)") $(RUN_ARGS)

# Caches and Flower's private home; keeps .venv and results/ (see distclean).
clean:
	rm -rf .flwr-home .pytest_cache .ruff_cache .benchmarks .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also the virtualenv and the metrics stores under results/.
distclean: clean
	rm -rf $(VENV) build/.native-built
	rm -f results/*.db results/*.db-*

# make help: one line per target (the default goal stays venv, the first target above).
.PHONY: help
help:
	@echo "make venv             create .venv, install requirements.txt, build the native executor (the default)"
	@echo "make run              the default experiment on Flower's runtime: FedBuff, digits, 10 simulated SuperNodes"
	@echo "                        [CONFIG=configs/X.toml] [SET=\"k=v ...\"] [NODES=10] [DB=path]"
	@echo "make test             every test but the real deployment, on two pytest workers"
	@echo "make test-fast        the same without the slow real-runtime tests"
	@echo "make test-deployment  the real deployment: TLS, authenticated SuperNodes, one killed, shaped links"
	@echo "make lint             ruff, and mypy (strict) on server_app/ and strategies/"
	@echo "make native-tsan      the native executor's tests under ThreadSanitizer [STRESS=1]"
	@echo "make bench            the benchmarks and the tuned comparisons of RESULTS.md (under 2 hours on 2 cores)"
	@echo "make bench-extra      the untuned reproductions of RESULTS.md and the OLCO3 comparison at D = 4"
	@echo "make dashboard        the live Streamlit dashboard [DB=path] [STORES=dir]"
	@echo "make deploy-local     a local deployment with TLS and SuperNode authentication (docs/deploy.md)"
	@echo "                        [DEPLOY_NODES=3] [CONFIG=configs/X.toml] [LINKS=wifi,4g,3g] (LINKS needs sudo)"
	@echo "make clean            remove caches and Flower's private home; keeps .venv and results/"
	@echo "make distclean        clean, and also remove .venv and the metrics stores under results/"
	@echo "make help             this list"
