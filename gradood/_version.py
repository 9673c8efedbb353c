"""The version of gradood, in one place (pyproject.toml reads it; gradood.__version__)."""

__version__ = "0.1.0"
