"""`ckpt upload`: owned by the cluster-configuration work (issue 4); being written."""

HELP = "(in progress)"


def add_arguments(parser):
    pass


def main(args):
    raise NotImplementedError("ckpt upload")
