"""The turn's side of approvals: write the turn down and leave, holding no slot.

`shared.approvals` says why a waiting turn is kept in Redis rather than in a
worker; here the runner's state becomes that record.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

from shared import events as ev
from shared.approvals import CallPlan, SuspendedTurn
from shared.models import PendingApproval, ToolUseBlock, now_rfc3339, rfc3339_of_ns
from shared.turns import until_stored

if TYPE_CHECKING:
    from worker.turn import TurnRunner

logger = logging.getLogger("sandstream.turn")


async def suspend_for_approval(
    runner: TurnRunner, iteration: int, plan: list[CallPlan]
) -> Literal["suspended", "interrupted"]:
    """Announce the calls that wait, and suspend the turn in the same step.
    "interrupted": an interrupt is asked for (its message may never have reached
    this worker), so the turn ends now instead of waiting for a person."""
    rest = await runner.detach_writer()
    if rest is None:
        return "suspended"  # not ours: nothing more to do
    deadline = time.time() + runner.agent.approval_timeout_seconds
    expires_at = rfc3339_of_ns(int(deadline * 1_000_000_000))
    pending = []
    for step in plan:
        block = runner.blocks[step.index]
        if step.verdict == "ask" and isinstance(block, ToolUseBlock):
            pending.append(
                PendingApproval(
                    tool_use_id=block.id,
                    name=block.name,
                    input=block.input,
                    index=step.index,
                    expires_at=expires_at,
                )
            )
    requests: list[ev.Event] = [
        ev.ToolApprovalRequested(
            session_id=runner.session_id,
            sandbox_id=runner.sandbox_id,
            turn_id=runner.turn_id,
            message_id=runner.message_id,
            created_at=now_rfc3339(),
            index=p.index,
            tool_use_id=p.tool_use_id,
            name=p.name,
            input=p.input,
            expires_at=p.expires_at,
        )
        for p in pending
    ]
    record = SuspendedTurn(
        turn_id=runner.turn_id,
        message_id=runner.message_id,
        iteration=iteration,
        blocks=list(runner.blocks),
        usage=runner.usage,
        calls=plan,
    )
    approvals = runner.approvals
    # Asked again while the store cannot take it and the lease holds, as the
    # turn's end is. One whose reply was lost and that is asked again finds the
    # turn suspended already (no longer this worker's): nothing is written twice.
    suspended = await until_stored(
        lambda: approvals.suspend(
            sid=runner.session_id,
            worker_id=runner.worker_id,
            record=record,
            pending=pending,
            events=[*rest, *requests],
            deadline=deadline,
        ),
        what=f"the suspension of turn {runner.turn_id}",
        give_up=lambda: runner.lease_lost,
        logger=logger,
    )
    if suspended == 2:
        runner.give_back(rest)
        return "interrupted"
    if suspended:
        logger.info("turn %s awaits approval of %d tool calls", runner.turn_id, len(pending))
    else:
        logger.info("turn %s was no longer this worker's; not suspended", runner.turn_id)
    return "suspended"
