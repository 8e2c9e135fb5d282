"""The one error type of evaluation: bad input (an unknown task, a checkpoint without a tokenizer, ...)."""


class EvalError(ValueError):
    """Bad `fuxi eval` / in-loop evaluation input; the message names the file, option or task."""
