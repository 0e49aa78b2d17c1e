"""The error every part of lfm2-nas raises for bad input: the CLI shows its message and
exits with status 2, so the message must name the problem and say how to fix it."""


class UserError(ValueError):
    """Bad input from a user (a flag, a file, a spec): say what is wrong and what to do."""


__all__ = ["UserError"]
