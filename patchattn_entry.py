"""The ``patchattn`` console script. Importing the package pulls in torch and transformers (seconds); a Ctrl-C in
that time ends with one line, as it does later, instead of a traceback. It lives outside the package because
importing anything inside it runs that import first."""

import sys


def main() -> None:
    try:
        from patchattn.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
