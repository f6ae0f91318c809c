"""`python -m toolchain ...`: the command line, as torchrun starts it (`torchrun ... -m toolchain build ...`)."""

from toolchain.cli import main

main()
