"""``python -m tokenward`` and the ``tokenward`` command.

``tokenward scan`` runs without importing the rest of the CLI (it is a pre-commit hook: it
runs on every commit, and the full CLI takes a second or more to import); anything else
goes to :mod:`tokenward.cli`.
"""

import sys


def main() -> None:
    if sys.argv[1:2] == ["scan"]:
        from tokenward.leaks.cli import main as scan

        scan(sys.argv[2:])
        return
    from tokenward.cli import main as everything

    everything()


if __name__ == "__main__":
    main()
