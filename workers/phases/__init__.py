"""The two phases of a job as plain functions: plain data in (`inputs`), results out, no database and no Celery.

workers/runner.py reads a job's inputs from the database, calls `rank.run_rank` or `tune.run_tune`, and records what
they return in the transaction that sets the job's final status.
"""
