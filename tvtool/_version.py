"""tvtool's version, in a module of its own so that nothing imports it back from the package's __init__."""

__version__ = "0.1.0"
