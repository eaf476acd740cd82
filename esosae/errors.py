"""The one exception family that means "the user asked for something that cannot work".

The CLIs catch ``UserError`` and print its message as a single line with exit code 2;
anything else is a bug and keeps its traceback. Messages name what was wrong and what to do.
"""


class UserError(RuntimeError):
    """Bad input: a flag, file, shape, dtype, model, dataset, cache or checkpoint."""
