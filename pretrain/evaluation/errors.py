"""The one error type of evaluation: bad input (an unknown task, a checkpoint without a tokenizer, ...)."""
from fuxi.common.errors import InputError


class EvalError(InputError):
    """Bad `fuxi eval` / in-loop evaluation input; the message names the file, option or task."""
