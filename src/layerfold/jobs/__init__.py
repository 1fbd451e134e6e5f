"""The jobs, one per command (``fold``, ``info``, ``export``, ``evaluate``, ``heal``, ``compress`` with analyze and
plan, ``demo``), each taking its settings (``settings``: the dataclasses the command line is generated from) and
returning a typed report; ``import layerfold`` exports them by their command names."""
