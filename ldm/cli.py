"""What every command does with a mistake a user can fix: one `error:` line naming the problem and the fix,
exit status 2, no traceback (unless --debug). A genuine bug still shows its traceback."""
import argparse
import errno
import os
import shutil
import sys


class UsageError(ValueError):
    """A problem with the command line, a config or an input file, said in one line with its fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes are one `error:` line (with a pointer to --help) instead of the usage text
    and a line prefixed by the program's name; the help shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


# What a user's input can raise on its way in: the readers raise these with a message that names the file.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, ImportError, OSError)


def one_line(exc):
    """The message of `exc` as one line (a full disk and refused writes name the folder and what to do)."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return os_error_line(exc)
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def os_error_line(exc):
    """An OSError from writing or reading a file -> one line with the path, the cause and the fix."""
    path = exc.filename or "a file"
    folder = os.path.dirname(os.path.abspath(path)) if exc.filename else os.getcwd()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_mib(folder)
        return (f"no space left on the device writing {path} ({folder}: {free} free): free some space "
                "(earlier files are intact; a training run resumes with -r)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied (read-only folder?): choose a folder you can write to"
    return f"{exc.strerror or exc}: {path}"


def _free_mib(folder):
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return f"{shutil.disk_usage(folder or '.').free / 2 ** 20:.1f} MiB"
    except OSError:
        return "unknown space"


def run_command(fn, debug=False):
    """fn() -> its result; a user error becomes `error: ...` on stderr and SystemExit(2) (re-raised with debug)."""
    try:
        return fn()
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
