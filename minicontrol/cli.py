"""What sample.py and train.py check alike at the command line: the error that a user's mistake raises, and numbers
that must be finite, and in range."""
import math


class UsageError(ValueError):
    """A mistake in what the user gave (a flag, a file, a folder, data); the message names it and says what to do.
    The scripts print it as one line; any other exception keeps its traceback."""


def check_numbers(args, ranges):
    """Raises a UsageError naming the first float flag given as nan or inf (which would sample or train on nothing),
    else the first of `ranges`' (flag, lowest, highest) whose value is out of range (a flag left out is not; highest
    None: no upper bound)."""
    for name, value in vars(args).items():
        for x in value if isinstance(value, list) else [value]:         # a flag given several times: each value
            if isinstance(x, float) and not math.isfinite(x):
                raise UsageError(f"--{name.replace('_', '-')} {x}: give a finite number")
    for flag, low, high in ranges:
        x = getattr(args, flag[2:].replace("-", "_"))            # argparse's name for the flag
        if x is not None and (x < low or (high is not None and x > high)):
            upto = " or more" if high is None else f" to {high}"
            raise UsageError(f"{flag} {x}: give {low}{upto}")
