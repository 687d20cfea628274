# Set-up and checks. `make demo` and `make test` work on a fresh machine: both install
# into .venv first (CPU build of torch, pinned), then run.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build. GPU users install
# their own torch (and vLLM) first, see README.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,ray,server
# The exact versions of every package the suite last passed on (`make lock` refreshes it), so
# that two machines installing a week apart test the same stack.
LOCK ?= requirements.lock

.PHONY: install lock upgrade demo demo-full eval-demo test lint format bench mutate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip
	$(BIN)/python -m pip install -q -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

# Refresh the lock: a fresh environment with the newest versions pyproject.toml allows, frozen
# into $(LOCK), then the suite on it. Commit the new lock only if the suite passes.
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# torch's local label (+cpu) names the CPU wheel's index, not a version: drop it.
	{ echo "# make lock: the versions the suite passed on ($(EXTRAS) extras, CPU torch). Refresh: make lock"; \
	  $(BIN)/python -m pip freeze --all --exclude-editable | sed -e 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(LOCK)
	touch $(VENV)/.installed
	$(BIN)/python -m pytest -q
upgrade: lock

demo: install
	$(BIN)/rstar evolve

# The default's recipe with every round searching 1,500 level 3-4 training problems that no
# earlier round searched, instead of 90 (docs/EXPERIMENTS.md E13-E14, E16, E19, E24-E26; README:
# what it shows, and its time). SEED picks the world
# and the searches: three seeds, then
# `rstar report runs/embedded-full-s0 runs/embedded-full-s1 runs/embedded-full-s2`.
SEED ?= 0
demo-full: install
	$(BIN)/rstar evolve --preset embedded-full --set evolve.world_seed=$(SEED) --set search.seed=$(SEED) \
		--set evolve.run_dir=runs/embedded-full-s$(SEED)

# After `make demo` (or `make demo-full`, then RUN=runs/embedded-full-s0 PRESET=embedded-full): the
# paper's Figure 3 (accuracy against trajectories 1-16, MCTS + PPM vs
# best-of-N) and Table 8 (PPM vs PQM vs ORM as MCTS's reward model) on the embedded test set.
# The ORM and the PQM learn from the same round-4 trees as the run's PPM. The PQM gets as many
# optimizer steps as the PPM took (its metrics.json), the same training budget: its records,
# every visited step, outnumber the PPM's pairs ~25x, and on a `make demo-full` run its epochs
# took ~20 minutes. The ORM, with fewer records (whole-solution pairs) than the PPM, trains its
# preset epochs.
RUN ?= runs/embedded
PRESET ?= embedded
AB = $(RUN)/ablation
PPM_STEPS = $$($(BIN)/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["steps"])' $(RUN)/models/ppm_r4/metrics.json)
eval-demo: install
	mkdir -p $(AB)
	$(BIN)/rstar extract orm $(RUN)/round4 --out $(AB)/orm.jsonl
	$(BIN)/rstar extract pqm $(RUN)/round4 --out $(AB)/pqm.jsonl
	$(BIN)/rstar train ppm $(AB)/orm.jsonl --kind orm --model $(RUN)/models/policy_r4 --out $(AB)/orm --preset $(PRESET)
	$(BIN)/rstar train ppm $(AB)/pqm.jsonl --kind pqm --model $(RUN)/models/policy_r4 --out $(AB)/pqm --preset $(PRESET) \
		--max-steps $(PPM_STEPS)
	$(BIN)/rstar eval --benchmark $(RUN)/problems/test.jsonl --policy $(RUN)/models/policy_r4 \
		--ppm $(RUN)/models/ppm_r4 --mode greedy,bon,mcts --mcts-unit rollouts --trajectories 1,2,4,8,16 \
		--ablation pqm=$(AB)/pqm,orm=$(AB)/orm --preset $(PRESET) --out $(RUN)/eval

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/search.py

# Mutation score of the core (search/, data/extract.py, models/ppm.py, evaluate.py's selection;
# issue 22), one module at a time, each mutant tested by only the tests that reach it. Runs in a
# copy under $(MUTATE_DIR), never in the working tree. Not in CI (minutes per module).
# `make mutate MODULES="ppm select"` for some; MUTATE_CHILDREN=2 runs mutants in parallel.
MODULES ?=
MUTATE_DIR ?= /tmp/rstar-mutate
mutate: install
	MUTATE_DIR=$(MUTATE_DIR) $(BIN)/python tests/helpers/mutate.py $(MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
