"""Evaluation harness: the paper's benchmarks, `kad eval` / `kad sweep` / `kad report`, and
an lm-evaluation-harness model (`kad.eval.lm_eval_model`, optional extra ``lm-eval``)."""

from kad.eval.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
