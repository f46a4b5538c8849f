from __future__ import annotations

pytest_plugins = [
    "tests.fix_lifespan",
    "tests.fix_pgbouncer",
    "tests.fix_replica",
    "tests.fix_otlp",
    "tests.fix_proxy",
    "tests.fix_tls",
]
