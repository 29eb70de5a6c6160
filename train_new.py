"""Train a textual-inversion embedding (or pretrain a model) from YAML configs (the original's command line; the code
is ldm.training, `--help` lists the flags)."""
from ldm.training import get_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
