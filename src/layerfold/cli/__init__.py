"""The ``layerfold`` command: start-up and signals (``entry``), the subcommands and their options generated from
the jobs' settings (``commands``, ``generate``)."""
