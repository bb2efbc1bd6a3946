"""Pure bar logic for dbento_assets: no Dagster in here.

Everything under ``dbento_assets.core`` is plain Python over numpy, pandas and pyarrow
(plus ``databento_dbn`` for DBN, and the ``databento`` client where it downloads), so it can
be read, tested and benchmarked without an orchestrator. The Dagster modules one level up are
thin wiring around these functions.
"""
