.PHONY: run test lint bench clean

# Install and run the service locally: Redis, API and one worker.
run:
	scripts/run-local.sh

# The whole test suite, from a clean clone: two test files at a time (most
# tests wait on processes), each file's tests in one pytest process.
test:
	scripts/bootstrap.sh
	scripts/ensure-tools.sh
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

lint:
	scripts/bootstrap.sh
	.venv/bin/ruff check api worker shared tests bench
	.venv/bin/ruff format --check api worker shared tests bench
	.venv/bin/mypy

bench:
	scripts/bootstrap.sh
	.venv/bin/python -m bench.run

clean:
	rm -rf .venv .sandstream .pytest_cache .mypy_cache .ruff_cache
