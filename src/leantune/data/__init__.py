"""Data: built-in tasks, encoding with loss masks, batching, and the one evaluator everything uses."""

from .encode import Example, collate, encode_example, encode_examples
from .tasks import Task, get_task, list_tasks, register_task

__all__ = [
    "Example",
    "Task",
    "collate",
    "encode_example",
    "encode_examples",
    "get_task",
    "list_tasks",
    "register_task",
]
