"""Onboarding in commands: a coordinator and its sites set up by exchanging two files.

``rpe coordinator init`` (CA, server certificate, registry and coordinator key up front) ->
``rpe coordinator start`` -> each site ``rpe site init`` (its keys, ``join-request.json``) ->
``rpe coordinator admit REQUEST`` (registers, allow-lists, records, audits; writes the join bundle)
-> ``rpe site join BUNDLE`` -> ``rpe site start``. deploy/README.md "Several machines" is the
guide, and tests/integration/test_join_journey.py runs it from the document.

- ``files.py`` — the join request and the join bundle: format, checks, digests
- ``coordinator.py`` — the coordinator directory: init, admit, start, stop, status
- ``site.py`` — the site directory: init, join, start, stop
- ``cli.py`` — the ``rpe coordinator`` and ``rpe site`` sub-commands
"""
