"""Errors a user can cause. The CLI turns each into one readable line and a non-zero exit code."""


class PatchattnError(Exception):
    """Base class: the message says what is wrong and what to do."""

    exit_code = 2


class ModelLoadError(PatchattnError):
    """The model could not be found or loaded."""


class UnsupportedModelError(PatchattnError):
    """The model does not route attention through transformers' attention registry."""


class RecipeError(PatchattnError):
    """A recipe is corrupt, of an unknown schema, or made for another model."""


class UnsupportedBatchError(PatchattnError):
    """A batch the head-budgeted KV cache passed in cannot hold (padded other than on the left)."""


class InputTooLongError(PatchattnError):
    """A prompt does not fit in the model's context."""


class OutputPathError(PatchattnError):
    """An output path cannot be written."""


class RunInterrupted(PatchattnError):
    """The user interrupted a long run; what was finished is saved (the message says where)."""

    exit_code = 130


class OptionError(PatchattnError):
    """An option has the wrong kind or range. ``option`` is the library's parameter name (the CLI shows its flag)."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option} {problem}")
