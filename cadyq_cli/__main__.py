"""``python -m cadyq_cli``: the ``cadyq`` command without installing the package (e.g. on a
machine that only has the dependencies, with the repository on ``PYTHONPATH``)."""
from .program import entry

if __name__ == "__main__":
    entry()
