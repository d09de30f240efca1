"""The `deltatune` command line and its YAML recipes."""
