"""Tillwire's benchmarks: ``python -m bench <name> [--quick] [--json]`` from the repo root.

Every benchmark prints what it measures as it goes and, as its last stdout
line, one JSON object with the keys its issue names.  ``--quick`` runs a
small version of the same workload (the smoke test in ``make test`` runs it
and checks the keys, so benchmarks never rot).  Speed is measured here and
never asserted in tests.
"""
