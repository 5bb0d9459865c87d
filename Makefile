# The two commands of README: `make demo` and `make test` (each does its own set-up).
# `make bench BENCH_ARGS='--runs 5 --json out.json'` passes its arguments to tests/bench/bench.py.
.PHONY: demo test bench lint
demo:
	bash tests/demo.sh
test:
	bash tests/run.sh
bench:
	bash tests/setup.sh && RGW_OBJECTSTORE=bluestore RGW_STORE_BYTES=48G bash tests/rgw-up.sh >/dev/null && .venv/bin/python tests/bench/bench.py $(BENCH_ARGS)
lint:
	.venv/bin/ruff check s3ssefs tests
