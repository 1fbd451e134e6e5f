"""The one exception type layerfold raises for problems the user can fix."""


class LayerfoldError(Exception):
    """Bad input: a model, plan, path or option that cannot work. The CLI prints it as one line."""
