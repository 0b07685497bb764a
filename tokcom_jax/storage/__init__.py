"""A run on disk: whole-file (atomic) writes, the workdir lock, orbax checkpoints, and
the portable paths that let a runs/ tree be moved or copied and still load."""
