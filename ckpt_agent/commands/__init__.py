"""One module per `ckpt` subcommand: HELP, add_arguments(parser), main(args) -> exit code."""
