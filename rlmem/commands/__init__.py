"""One module per ``rlmem`` subcommand: ``add_parser(subparsers)`` registers it, ``run(args)`` runs it."""
