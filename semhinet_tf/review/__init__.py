"""The review loop: doubtful frames to an engineer, answers back into training (issue 24)."""


class ReviewInputError(ValueError):
    """A review input that cannot be used (predict's JSON lines or a queue that is damaged or of another model, a
    folder without a queue, a --host not allowed): refused before any work, in one line naming the file (exit 2)."""
