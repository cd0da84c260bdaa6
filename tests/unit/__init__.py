"""The unit tier: no Redis, no subprocesses, no network; each test runs in milliseconds.

``./dev test tests/unit`` runs it alone. The publisher writes to a fake connection
(:mod:`tests.unit.fake_wire`); everything else is plain objects and in-memory streams.
"""
