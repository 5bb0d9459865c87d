# The two commands of README: `make demo` and `make test` (each does its own set-up);
# `make test-fast` runs the layers that need no server (t1, t3) in under a minute.
# `make bench BENCH_ARGS='--runs 5 --json out.json'` passes its arguments to tests/bench/bench.py.
.PHONY: demo test test-fast bench lint
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
