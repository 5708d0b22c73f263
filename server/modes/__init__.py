"""The ServerApp's modes, one module each: ``enroll``, ``compose`` (with the embedding round it
shares with ``evaluate``) and ``evaluate``. Each takes ``(grid, settings, registry, sites, run_id,
report)`` and writes its results into ``report``; none keeps state between runs."""
