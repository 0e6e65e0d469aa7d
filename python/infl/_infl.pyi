# Stubs of infl's native module (crates/infl-py). Each stage takes the command line's flags as
# `argv` (the package's functions in infl/__init__.py build them from keyword arguments).
from typing import Any, Callable, List, Optional, Tuple, Union

__version__: str

class InflError(Exception):
    """An infl job failed (exit code 1)."""

class InputError(InflError):
    """Bad input the user can fix: a file, line, field or option (exit code 3)."""

class UsageError(InputError):
    """An option the command line would refuse while parsing (exit code 2)."""

class MismatchError(InflError):
    """Factors, results or state from another model, run or settings, or corrupt (exit code 4)."""

class NonFiniteError(InflError):
    """A loss or gradient became NaN or infinite (exit code 5)."""

Sink = Union[None, bool, str, Callable[[str, int, int, bool], Any]]

def fit(argv: List[str], progress: Sink = None, threads: Optional[int] = None) -> Tuple[str, bool]: ...
def score(argv: List[str], progress: Sink = None, threads: Optional[int] = None) -> str: ...
def self_influence(argv: List[str], progress: Sink = None, threads: Optional[int] = None) -> str: ...
def index(argv: List[str]) -> int: ...
def inspect(argv: List[str], threads: Optional[int] = None) -> str: ...
def report(argv: List[str]) -> int: ...
def sequence_ids(model: str, corpus: str, max_len: int) -> List[str]: ...
def options_help(name: str) -> str: ...
