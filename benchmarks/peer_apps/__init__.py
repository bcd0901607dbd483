"""One application per task system for benchmarks/peers.py, all doing the same work.

``work`` holds the work itself (a no-op, a 10 ms sleep, a user import into SQLite) and
the processed-message counter; ``celery_app``, ``rq_app`` and ``huey_app`` declare it as
tasks of their system, and ``benchmarks/bench_app.py`` as dramaturg and Dramatiq actors.
``enqueue`` sends a scenario's messages with a system's ordinary API.
"""
