"""The CLI's commands, one module per command or command group; `toolchain.cli` mounts them. A command
parses options, calls one library function and prints; the work lives below.
"""
