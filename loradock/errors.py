"""The one error type a user sees: what is wrong, and what to do about it."""


class LoradockError(Exception):
    """A user-facing problem. The CLI prints it without a stack trace and exits with status 2.

    Args:
        problem: what is wrong, repeating the user's input.
        fix: what to do about it (the flag to change, the command to run).
        details: optional extra text printed after the two lines (a data report, a list of problems).
    """

    def __init__(self, problem: str, fix: str = "", details: str = ""):
        self.problem, self.fix, self.details = problem, fix, details
        super().__init__(self.message)

    @property
    def message(self) -> str:
        lines = [f"error: {self.problem}"]
        if self.fix:
            lines.append(f"fix: {self.fix}")
        if self.details:
            lines.append(self.details)
        return "\n".join(lines)
