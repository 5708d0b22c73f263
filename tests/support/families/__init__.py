"""Task families written only for the tests (each one folder; registered by one line).

``toy``: :mod:`support.families.toy`. A test plugs it in with
``register_family("toy", "support.families.toy:FAMILY")`` and nothing in ``server/``, ``client/`` or
``deploy/`` learns its name.
"""
