# The README's two commands: `make demo` and `make test`. Both set everything up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0
# DeepSpeed builds against the torch above: no build isolation (it would fetch a CUDA torch), no ops
# (the suite uses torch optimizers). Its CPU accelerator JIT-builds one op on first use, the
# shared-memory collectives: built here, once (cached under ~/.cache/torch_extensions), not in a test.
DEEPSPEED := deepspeed==0.19.8

.PHONY: demo test test-unit test-fast lint bench soak clean tools install install-venv install-files

$(PY):
	python3 -m venv $(VENV)

# torch first and pinned (the local CPU build); then the project with its test extras; then DeepSpeed.
# Not -q: on a fresh clone this takes minutes, and a silent terminal looks hung.
$(STAMP): $(PY) pyproject.toml
	@echo "== installing $(TORCH), ckptd and DeepSpeed into $(VENV) (first run only; a few minutes, pip's progress below)"
	$(PIP) install --progress-bar on $(TORCH)
	$(PIP) install --progress-bar on -e '.[test]'
	$(PIP) show deepspeed >/dev/null 2>&1 || DS_BUILD_OPS=0 $(PIP) install --progress-bar on --no-build-isolation $(DEEPSPEED)
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)"
	@echo "== building DeepSpeed's cpu_adam op (DeepSpeedCPUAdam; a C++ compile, minutes; the tests then load it)"
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder as B; B().load(verbose=False)"
	@echo "== installed; next time this step is skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ckptd demo

# Debian's prometheus gives promtool and the server, prometheus-alertmanager the Alertmanager and
# amtool (the end-to-end alert test); systemd gives systemd-analyze.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v systemd-analyze >/dev/null \
	  && command -v prometheus-alertmanager >/dev/null && command -v amtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus prometheus-alertmanager systemd >/dev/null; }

# The gates: ruff format (120 columns) and lint, types (mypy strict on all of ckptd and trainer_hooks), and the layer contract (imports only point down).
lint: $(STAMP)
	$(VENV)/bin/ruff format --check ckptd trainer_hooks tests benchmarks examples deploy
	$(VENV)/bin/ruff check ckptd trainer_hooks tests benchmarks examples deploy
	$(VENV)/bin/mypy ckptd trainer_hooks
	$(VENV)/bin/lint-imports

# The suite in tiers. First tests/unit: the logic in-process (no torch, no subprocess, no daemon),
# so that a broken rule fails in a minute. Then the real-process tests in parallel (they mostly wait
# on trainers, torchrun ranks, daemons), two workers a CPU up to 8; then the tests that time what
# they assert, alone.
WORKERS ?= $(shell n=$$(( 2 * $$(nproc) )); [ $$n -gt 8 ] && n=8; echo $$n)

test: $(STAMP) tools lint
	$(PY) -m pytest -q tests/unit
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup -m "not serial" --ignore=tests/unit --durations=25
	$(PY) -m pytest -q -m serial --ignore=tests/unit

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Full-size benchmarks (minutes); results and plots land in benchmarks/results/.
bench: $(STAMP)
	$(PY) benchmarks/bench_stall.py --sizes 64,512,2048
	$(PY) benchmarks/bench_io.py
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_watch.py
	$(PY) benchmarks/bench_sharded.py --ranks 2 --mib 64 --reps 7
	$(PY) benchmarks/bench_sharded.py --ranks 4 --mib 32 --reps 5 --steps 600
	$(PY) benchmarks/bench_sharded.py --ranks 2 --mib 64 --reps 7 --fsdp
	$(PY) benchmarks/bench_auto.py
	$(PY) benchmarks/bench_remote.py
	$(PY) benchmarks/bench_finetune.py
	$(PY) benchmarks/bench_resume.py

# The reliability campaign at full size: 200 trainer and 200 daemon kills, 200 kills of overlapped saves, 10,000
# corruptions, 100,000 fuzzed messages, 6 whole hosts lost and replaced, 64 clients x 1,000 saves (an hour or more).
soak: $(STAMP) tools
	CKPTD_SOAK=1 $(PY) -m pytest -q -s -o timeout=7200 tests/test_reliability.py tests/test_protocol.py tests/test_overlap.py tests/test_multihost.py
	$(PY) benchmarks/bench_load.py --clients 64 --saves 1000 --mib 1

# A training host's install (as root): ckptd in its own venv at PREFIX, its console script linked
# where systemd/ckptd.service runs it (BINDIR/ckptd, /usr/local/bin/ckptd by default; the installed
# unit's ExecStart follows BINDIR and its --config follows CONFDIR), the unit, sysusers and tmpfiles
# entries, and the example config unless one exists. Set TORCH to the build you train with (a CUDA
# one on GPU hosts). The venv is made from INSTALL_PYTHON, which the service user must be able to
# run: a pyenv or conda python under a 0700 home is refused before anything is installed.
PREFIX         ?= /opt/ckptd
BINDIR         ?= /usr/local/bin
UNITDIR        ?= /etc/systemd/system
SYSUSERSDIR    ?= /usr/lib/sysusers.d
TMPFILESDIR    ?= /usr/lib/tmpfiles.d
CONFDIR        ?= /etc/ckptd
INSTALL_PYTHON ?= /usr/bin/python3

install: install-venv install-files
	@echo "installed $(BINDIR)/ckptd -> $(PREFIX)/bin/ckptd and $(UNITDIR)/ckptd.service. Next: systemd-sysusers;"
	@echo "systemd-tmpfiles --create ckptd.conf; set roots in $(CONFDIR)/ckptd.toml and ReadWritePaths= in the unit;"
	@echo "systemctl daemon-reload && systemctl enable --now ckptd && ckptd status"

install-venv:
	test -x $(PREFIX)/bin/python || $(INSTALL_PYTHON) -m venv $(PREFIX)
	@py=$$(readlink -f $(PREFIX)/bin/python); d=$$py; \
	while [ "$$d" != / ]; do \
	  [ $$(( 0$$(stat -Lc %a "$$d") & 1 )) -eq 1 ] || { echo "make install: the service user cannot run $$py" \
	    "($$d is not world-executable/searchable): set INSTALL_PYTHON= to a python every user can run" \
	    "(e.g. /usr/bin/python3) and remove $(PREFIX)" >&2; exit 1; }; \
	  d=$$(dirname "$$d"); done
	$(PREFIX)/bin/pip install -q $(TORCH)
	$(PREFIX)/bin/pip install -q .

install-files:
	install -d $(BINDIR) $(UNITDIR) $(SYSUSERSDIR) $(TMPFILESDIR) $(CONFDIR)
	ln -sfn $(PREFIX)/bin/ckptd $(BINDIR)/ckptd
	sed -e 's|^ExecStart=/usr/local/bin/ckptd |ExecStart=$(BINDIR)/ckptd |' \
	    -e 's| --config /etc/ckptd/ckptd.toml| --config $(CONFDIR)/ckptd.toml|' systemd/ckptd.service > $(UNITDIR)/ckptd.service
	install -m 0644 systemd/ckptd.sysusers $(SYSUSERSDIR)/ckptd.conf
	install -m 0644 systemd/ckptd.tmpfiles $(TMPFILESDIR)/ckptd.conf
	test -e $(CONFDIR)/ckptd.toml || install -m 0644 deploy/ckptd.toml $(CONFDIR)/ckptd.toml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
