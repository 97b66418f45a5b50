"""What sample.py and train.py check alike at the command line: numbers that must be finite."""
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
