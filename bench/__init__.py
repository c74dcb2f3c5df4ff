"""bench: a declarative benchmark suite and leaderboard harness for knowledge distillation.

Importing this package is cheap: torch and the domain libraries are imported only where a command
needs them, so `bench --help` and `bench ls` stay fast.
"""

__version__ = "0.1.0"


class BenchError(Exception):
    """A problem with what the user asked for (unknown name, bad field, missing data, corrupt file).

    The CLI prints the message and exits with code 2; nothing is written before it is raised.
    """
