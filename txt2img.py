"""Sample images from a text prompt, optionally with a learned textual-inversion embedding (the original's command
line; the code is ldm.inference, `--help` lists the flags)."""
from ldm.inference import get_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
