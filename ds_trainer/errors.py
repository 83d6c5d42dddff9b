"""The one exception type for problems a user can fix (bad config, bad input)."""


class DsTrainerError(Exception):
    """A problem in the user's input. `launch/` prints it as one line and exits with code 2."""

    exit_code = 2
