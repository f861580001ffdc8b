"""Extensions shared by the tests of loop extensions."""

from __future__ import annotations

from dapple.engine.extensions import ORDER_USER, Extension


class FailAt(Extension):
    """Raises before the model call of step 1: a run that fails mid-way, after its patches were entered."""

    name = "fail"
    order = ORDER_USER

    def before_model(self, step, inputs) -> None:
        if step.index == 1:
            raise RuntimeError("failed on purpose")
