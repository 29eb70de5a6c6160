"""Merge several textual-inversion embedding files into one (the original's command line; the code is ldm.merge,
`--help` lists the flags)."""
from ldm.merge import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
