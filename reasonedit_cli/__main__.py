"""`python -m reasonedit_cli` runs the command line."""

from reasonedit_cli.cli import main

if __name__ == "__main__":
    main()
