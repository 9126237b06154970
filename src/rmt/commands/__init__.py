"""Sub-commands of the ``rmt`` command line (see :mod:`rmt.cli`)."""
