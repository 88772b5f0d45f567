"""The review loop: doubtful frames to an engineer, answers back into training (issue 24)."""
