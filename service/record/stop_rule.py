"""What a job asked to stop does when both a cancel and a pause are pending: cancel wins.

A cancel is final and frees the job's quota and files; a pause keeps them for a resume.
Once a cancel is asked for, a pause that was (or is later) asked for must not keep the
job alive: the worker's training loop, the worker ending the job, the reaper finding it
orphaned and a resume of a paused job all ask `stop_action` here, so none of them can
decide otherwise.
"""

from __future__ import annotations

from typing import Literal

StopAction = Literal["cancel", "pause"]

CANCEL_FLAG = "cancel_requested"
"""The job field that records a cancel request; transitions that would keep the job alive
(to paused, or paused back to queued) are guarded by it in the store's script."""


def stop_action(cancel_requested: bool, pause_requested: bool) -> StopAction | None:
    """What a job with these flags does at its next stop point: "cancel" over "pause"; None: go on."""
    if cancel_requested:
        return "cancel"
    if pause_requested:
        return "pause"
    return None
