"""Errors raised while reading method configs and composing methods.

Both derive from ValueError so command-line front ends can catch one type; both are raised before
any model exists, so a bad recipe costs no GPU time.
"""


class SlimtrainError(ValueError):
    """Base class of every user-facing slimtrain error."""


class ConfigError(SlimtrainError):
    """A method's config section has an unknown key or a value outside its allowed range."""


class CompositionError(SlimtrainError):
    """The named methods cannot be combined (unknown, conflicting, or missing a requirement)."""
