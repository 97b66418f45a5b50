"""What sample.py and train.py check alike at the command line: numbers that must be finite, and in range."""
import math


def not_finite(args) -> str:
    """A one-line message naming the first float flag given as nan or inf (which would sample or train on nothing),
    else an empty string."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for x in values:
            if isinstance(x, float) and not math.isfinite(x):
                return f"--{name.replace('_', '-')} {x}: give a finite number"
    return ""


def out_of_range(ranges) -> str:
    """A one-line message naming the first (flag, value, lowest, highest) whose value is out of range (value None: a
    flag left out; highest None: no upper bound), else an empty string."""
    for flag, x, low, high in ranges:
        if x is not None and (x < low or (high is not None and x > high)):
            upto = " or more" if high is None else f" to {high}"
            return f"{flag} {x}: give {low}{upto}"
    return ""
