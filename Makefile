# The two commands a newcomer needs (see README.md):
#   make demo   install, then run a batch of order sagas on SQLite + the in-process broker (no servers)
#   make test   install, lint, type-check, start PostgreSQL + Kafka, run the whole test suite
.PHONY: demo test check bench

demo:
	scripts/bootstrap.sh
	.venv/bin/python -m samples.order_payment.demo --db demo.db

test:
	scripts/test.sh

check:
	.venv/bin/ruff check .
	.venv/bin/mypy

bench:
	scripts/bootstrap.sh
	.venv/bin/python bench/saga_throughput.py
