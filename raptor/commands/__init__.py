"""One module per `raptor` subcommand: `add_arguments(parser)` and `main(args)` that parse,
resolve the config, call the library and print."""
