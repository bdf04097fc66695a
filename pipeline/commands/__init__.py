"""The command line's commands, one module each: `add_parser(subparsers)` declares the command and its flags,
`main(args) -> int` runs it. `pipeline.__main__.COMMANDS` maps a command name to its module.

Command modules are thin: they read flags and call the library (`pipeline.runner`, `pipeline.eval`,
`pipeline.tools`). Only argparse and light modules are imported at import time.
"""
