"""``rpe console``: a read-only web console over one registry directory (``server/console/app.py``)."""
