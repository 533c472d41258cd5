"""``python -m t5vh_fast COMMAND ...``: the ``t5vh`` command group without its script installed."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="t5vh")
