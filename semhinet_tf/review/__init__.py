"""The review loop: doubtful frames to an engineer, answers back into training (issue 24)."""


class ReviewInputError(ValueError):
    """A review input that cannot be used (predict's JSON lines or a queue that is damaged or of another model, a
    folder without a queue, a --host not allowed): refused before any work, in one line naming the file (exit 2)."""


# What a second `review serve` (or a `review queue --overwrite`) of a folder that a page serves is told: one page a
# folder, since two would each resume from the same labels.jsonl and undo and move on without the other's answers.
SERVED_ELSEWHERE = "a review page already serves it: answer there, or stop that one first (Ctrl-C)"
