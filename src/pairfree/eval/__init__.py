"""Evaluation on the papers' benchmarks: tasks (`registry.TASKS`), one adapter per dataset as its
authors distribute it (`datasets/`), task kinds (`tasks`), metrics, results and plots (`runner`).
`pairfree eval` is the command line."""

from pairfree.eval.registry import TASKS, TaskSpec, resolve
from pairfree.eval.runner import run_task

__all__ = ["TASKS", "TaskSpec", "resolve", "run_task"]
