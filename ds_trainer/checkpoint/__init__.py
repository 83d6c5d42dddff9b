"""Crash-safe checkpoints: files and the commit protocol (files), what a checkpoint means (identity), the
state saved beside DeepSpeed's (state), choosing what to resume from (resume), and the Checkpointer that
saves and resumes a run (checkpointer)."""

from ds_trainer.checkpoint.checkpointer import Checkpointer
from ds_trainer.checkpoint.files import (
    LATEST,
    MANIFEST,
    PARTIAL,
    committed,
    crc32_of,
    latest_tag,
    tag_for_step,
    to_keep,
    verify,
)
from ds_trainer.checkpoint.identity import MODEL_FIELDS, RunIdentity, compare
from ds_trainer.checkpoint.resume import ResumePlan
from ds_trainer.checkpoint.state import Progress

__all__ = [
    "LATEST",
    "MANIFEST",
    "MODEL_FIELDS",
    "PARTIAL",
    "Checkpointer",
    "Progress",
    "ResumePlan",
    "RunIdentity",
    "committed",
    "compare",
    "crc32_of",
    "latest_tag",
    "tag_for_step",
    "to_keep",
    "verify",
]
