"""steadysocket's benchmarks: ``python -m bench`` (or ``tox -e bench``) writes BENCHMARKS.md.

Every benchmark measures steadysocket beside a baseline in the same run (raw websockets,
python-statemachine alone, the backoff's own first delay) and reports the ratio; client and
server always run in separate processes on 127.0.0.1. See ``bench.run`` for the command line.
"""
