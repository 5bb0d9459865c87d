# The two commands of README: `make demo` and `make test` (each does its own set-up);
# `make test-fast` runs the layers that need no server (t1, t3) in under a minute.
# `make bench BENCH_ARGS='--runs 5 --json out.json'` passes its arguments to tests/bench/bench.py.
# `make install` / `make uninstall` (as root): PREFIX=/usr/local by default, DESTDIR honoured.
.PHONY: demo test test-fast bench lint install uninstall

PREFIX ?= /usr/local
PYTHON ?= python3
BINDIR = $(PREFIX)/bin
VENV = $(PREFIX)/lib/s3ssefs/venv
MANDIR = $(PREFIX)/share/man
DOCDIR = $(PREFIX)/share/doc/s3ssefs
# mount(8) looks for mount.TYPE helpers in /sbin only (on merged-/usr systems, /usr/sbin)
SBINDIR ?= /sbin
SYSCONFDIR ?= /etc
# systemd reads units from /usr/lib/systemd/system and /usr/local/lib/systemd/system, and from
# /etc/systemd/system for any other PREFIX
UNITDIR ?= $(if $(filter /usr /usr/local,$(PREFIX)),$(PREFIX)/lib/systemd/system,/etc/systemd/system)
MANPAGES = man/s3ssefs.1 man/s3ssefs-keyfile.5 man/mount.s3ssefs.8
SYSTEMD_RUNNING = $(and $(if $(DESTDIR),,yes),$(wildcard /run/systemd/system))

demo:
	bash tests/demo.sh
test:
	bash tests/run.sh
# the layers that need no server and no kernel (t1 units, t3 file layer on the memory store)
test-fast:
	bash tests/setup.sh && .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_t1_*.py tests/test_t3_*.py
bench:
	bash tests/setup.sh && RGW_OBJECTSTORE=bluestore RGW_STORE_BYTES=48G bash tests/rgw-up.sh >/dev/null && .venv/bin/python tests/bench/bench.py $(BENCH_ARGS)
lint:
	.venv/bin/ruff check s3ssefs tests

# The package goes into a virtualenv of its own (Debian's system Python is externally
# managed); it is built from a copy of the sources, so the clone stays clean. Under DESTDIR the
# virtualenv's scripts are rewritten to name the final path.
install:
	rm -rf '$(DESTDIR)$(VENV)'
	$(PYTHON) -m venv '$(DESTDIR)$(VENV)'
	src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	  cp -r pyproject.toml README.md s3ssefs "$$src/" && \
	  '$(DESTDIR)$(VENV)/bin/python' -m pip install -q --disable-pip-version-check --no-warn-script-location "$$src"
	if [ -n '$(DESTDIR)' ]; then \
	  grep -rlI -F -- '$(DESTDIR)$(VENV)' '$(DESTDIR)$(VENV)/bin' '$(DESTDIR)$(VENV)/pyvenv.cfg' | xargs -r sed -i 's|$(DESTDIR)$(VENV)|$(VENV)|g'; fi
	install -d '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(SBINDIR)' '$(DESTDIR)$(UNITDIR)' '$(DESTDIR)$(DOCDIR)' \
	  '$(DESTDIR)$(MANDIR)/man1' '$(DESTDIR)$(MANDIR)/man5' '$(DESTDIR)$(MANDIR)/man8'
	ln -sfn '$(VENV)/bin/s3ssefs' '$(DESTDIR)$(BINDIR)/s3ssefs'
	ln -sfn '$(VENV)/bin/mount.s3ssefs' '$(DESTDIR)$(SBINDIR)/mount.s3ssefs'
	for page in $(MANPAGES); do \
	  install -m 0644 "$$page" "$(DESTDIR)$(MANDIR)/man$${page##*.}/"; done
	sed '/^ExecStart=/s|^ExecStart=[^ ]*|ExecStart=$(BINDIR)/s3ssefs|' systemd/s3ssefs@.service \
	  > '$(DESTDIR)$(UNITDIR)/s3ssefs@.service'
	chmod 0644 '$(DESTDIR)$(UNITDIR)/s3ssefs@.service'
	install -m 0644 systemd/example.conf '$(DESTDIR)$(DOCDIR)/example.conf'
	install -d -m 0700 '$(DESTDIR)$(SYSCONFDIR)/s3ssefs'
	$(if $(SYSTEMD_RUNNING),systemctl daemon-reload)

# Removes what install put there; /etc/s3ssefs only when empty (it holds the keys).
uninstall:
	rm -f '$(DESTDIR)$(BINDIR)/s3ssefs' '$(DESTDIR)$(SBINDIR)/mount.s3ssefs' \
	  '$(DESTDIR)$(UNITDIR)/s3ssefs@.service' '$(DESTDIR)$(DOCDIR)/example.conf' \
	  '$(DESTDIR)$(MANDIR)/man1/s3ssefs.1' '$(DESTDIR)$(MANDIR)/man5/s3ssefs-keyfile.5' \
	  '$(DESTDIR)$(MANDIR)/man8/mount.s3ssefs.8'
	rm -rf '$(DESTDIR)$(PREFIX)/lib/s3ssefs'
	rmdir '$(DESTDIR)$(DOCDIR)' 2>/dev/null || true
	rmdir '$(DESTDIR)$(SYSCONFDIR)/s3ssefs' 2>/dev/null || \
	  { [ ! -d '$(DESTDIR)$(SYSCONFDIR)/s3ssefs' ] || echo 'uninstall: kept $(DESTDIR)$(SYSCONFDIR)/s3ssefs (not empty: keys and instance files)'; }
	$(if $(SYSTEMD_RUNNING),systemctl daemon-reload)
