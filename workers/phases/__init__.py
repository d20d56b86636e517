"""The two phases of a job as plain functions: plain data in (`inputs`), results out, no database and no Celery.

workers/runner.py reads a job's inputs from the database, calls the phases' functions (a candidate at a time when
a step is fanned out over workers: `rank.score_one` then `rank.assemble`, `rank.extract_for_round` for successive
halving, `tune.tune_target` per target; `rank.run_rank` and `tune.run_tune` do a whole phase in one process), and
records what they return in the transaction that sets the job's final status.
"""
