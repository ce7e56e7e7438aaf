"""One module per ``mmfl`` subcommand: ``register(subparsers, name, help)`` + ``run(args)``."""
