"""`python -m scm …` (and `torchrun -m scm …`): the `scm` command."""

from scm.app.cli import main

main()
