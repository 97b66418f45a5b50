"""What sample.py and train.py check alike at the command line: numbers that must be finite, and in range."""
import math


def check_numbers(args, ranges):
    """A ValueError naming the first float flag given as nan or inf (which would sample or train on nothing), else
    one naming the first of `ranges`' (flag, lowest, highest) whose value is out of range (a flag left out is not;
    highest None: no upper bound)."""
    for name, value in vars(args).items():
        for x in value if isinstance(value, list) else [value]:         # a flag given several times: each value
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"--{name.replace('_', '-')} {x}: give a finite number")
    for flag, low, high in ranges:
        x = getattr(args, flag[2:].replace("-", "_"))            # argparse's name for the flag
        if x is not None and (x < low or (high is not None and x > high)):
            upto = " or more" if high is None else f" to {high}"
            raise ValueError(f"{flag} {x}: give {low}{upto}")
