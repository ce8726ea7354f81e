"""One family of user errors: every error kfor1 raises for bad input is a ``UserError``, and
every entry point reports ``USER_ERRORS`` as one line (see test_cli.py for the entry points)."""

import pytest

from kfor1.data import DataError
from kfor1.errors import USER_ERRORS, TrainingError, UserError, one_line
from kfor1.files.patchfile import PatchFileError
from kfor1.images import ImageReadError
from kfor1.models import CheckpointFormatError, WeightMismatchError
from kfor1.patch.spec import PatchSpecError
from kfor1.trainer.config import ConfigError


@pytest.mark.parametrize("error", [ConfigError, DataError, ImageReadError,
                                   CheckpointFormatError, WeightMismatchError, PatchFileError,
                                   PatchSpecError, TrainingError])
def test_kfor1_errors_are_user_errors_and_keep_their_builtin_type(error):
    assert issubclass(error, UserError) and issubclass(error, USER_ERRORS)
    assert issubclass(error, RuntimeError if error is TrainingError else ValueError)


def test_one_line_joins_the_message_and_names_a_bare_error():
    assert one_line(ValueError("bad\n   value;  use 3")) == "bad value; use 3"
    assert one_line(FileNotFoundError()) == "FileNotFoundError"


def test_bugs_are_not_user_errors():
    for bug in (KeyError, TypeError, AttributeError, IndexError, AssertionError):
        assert not issubclass(bug, USER_ERRORS)
