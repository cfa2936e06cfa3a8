"""`python -m fastprompt.cli`: the same as the `fastprompt` command."""

from fastprompt.cli.app import main

main()
