"""TurnRunner: one agent turn, from the claimed user message to the terminal event.

The loop asks the provider for a response, streams it out as events, runs the
tool calls in the sandbox, feeds the results back and goes on until the model
ends its turn or the iteration bound is reached. Every event is appended to the
session log as it happens; the assistant message, the session's return to
`active` and the terminal event are written in one atomic step at the end.

The turn holds a lease (README: Reliability). It renews it every third of
`lease_seconds`; when no renewal got through for `lease_seconds +
lease_grace_seconds` by this process's own clock, the turn fences itself: it
stops, and its tool's process group is killed, before any reaper may end the
turn and let the session move on. A store that refuses the turn's end (full,
down) is asked again, with backoff, while the lease holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal

from shared import events as ev
from shared.approvals import ApprovalStore, CallPlan, Resolution, SuspendedTurn, denial_text
from shared.metrics import TurnFigures
from shared.models import (
    AgentConfig,
    ContentBlock,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    new_id,
    now_rfc3339,
)
from shared.permissions import allowed_by_name, rule_for
from shared.sandbox.handle import OpenSandbox
from shared.settings import Settings
from shared.store import SessionStore
from shared.turns import (
    CompletedReason,
    FailedReason,
    TurnIds,
    completed,
    failed,
    until_stored,
    worth_retrying,
)
from worker.approval_wait import suspend_for_approval
from worker.changes import WorkspaceChanges
from worker.event_writer import EventWriter, TurnEvents, TurnSuperseded
from worker.providers.base import (
    MessageEnd,
    Provider,
    ProviderError,
    ProviderRequest,
    TextChunk,
    ToolCallReady,
    ToolCallStart,
)
from worker.tools import ToolContext, execute_tool, tool_specs

logger = logging.getLogger("sandstream.turn")

# The loop also stops when a call waits for a person: the turn is then suspended.
LoopEnd = CompletedReason | Literal["suspended"]


class TurnRunner:
    def __init__(
        self,
        *,
        store: SessionStore,
        approvals: ApprovalStore,
        writer: EventWriter,
        settings: Settings,
        provider: Provider,
        agent: AgentConfig,
        sandbox: OpenSandbox,
        worker_id: str,
        session_id: str,
        sandbox_id: str,
        turn_id: str,
        history: list[Message],
        accepted_at: float | None = None,
        resumed: tuple[SuspendedTurn, dict[str, Resolution]] | None = None,
        job_id: str = "",
    ) -> None:
        self.store = store
        # The arq job running the turn: its end forgets it in the same step
        # (`SessionStore.finish_turn`), and says so here.
        self.job_id = job_id
        self.job_forgotten = False
        self.approvals = approvals
        self.writer = writer
        self.settings = settings
        self.provider = provider
        self.agent = agent
        self.sandbox = sandbox
        self.worker_id = worker_id
        self.session_id = session_id
        self.sandbox_id = sandbox_id
        self.turn_id = turn_id
        self.history = history  # the session's messages, this turn's user message last
        # A turn that waited for approval goes on with the message it had begun.
        self.message_id = resumed[0].message_id if resumed is not None else new_id()
        self._turn_ids = TurnIds(
            session_id=session_id,
            sandbox_id=sandbox_id,
            turn_id=turn_id,
            message_id=self.message_id,
        )
        self.blocks: list[ContentBlock] = []
        self.usage = ev.Usage()
        self._text_index: int | None = None
        self._text_parts: list[str] = []
        self._interrupted = False
        self._lease_lost = False
        self._loop_task: asyncio.Task[LoopEnd] | None = None
        self._writer: TurnEvents | None = None
        self._started = time.monotonic()
        # For the fleet's metrics: when the API accepted the message (epoch
        # seconds), and what the turn measured on its way.
        self._accepted_at = accepted_at
        self._figures = TurnFigures()
        self._changes = WorkspaceChanges(sandbox)
        # A turn that waited for approval goes on where it stopped: its message
        # so far, and the calls of the model's last response, now decided.
        self._resumed = resumed
        if resumed is not None:
            record, _ = resumed
            self.blocks = list(record.blocks)
            self.usage = record.usage

    # ---- control -----------------------------------------------------------

    def interrupt(self) -> None:
        self._interrupted = True
        if self._loop_task is not None:
            self._loop_task.cancel()

    @property
    def lease_lost(self) -> bool:
        """The turn is no longer this worker's (or it fenced itself)."""
        return self._lease_lost

    def _stop_quietly(self) -> None:
        """Stop without ending the turn: it is no longer ours to end (lease lost,
        session deleted, turn reaped)."""
        self._lease_lost = True
        if self._writer is not None:
            self._writer.abandon()
        if self._loop_task is not None:
            self._loop_task.cancel()

    # ---- the turn ----------------------------------------------------------

    async def run(self, leased_at: float) -> None:
        """Run the turn, whose lease the caller took (`SessionStore.start_turn`,
        sent at `leased_at` on the monotonic clock), to its end."""
        self._writer = self.writer.open(self.session_id, self.turn_id, self._stop_quietly)
        heartbeat = asyncio.create_task(self._keep_lease(leased_at))
        try:
            await self._drive()
        finally:
            heartbeat.cancel()
            self._writer.close()

    async def _drive(self) -> None:
        """Run the loop and end the turn the way the loop ended."""
        self._loop_task = asyncio.create_task(self._loop())
        try:
            reason: LoopEnd = await asyncio.shield(self._loop_task)
        except asyncio.CancelledError:
            if self._loop_task.done() and self._interrupted:
                reason = "interrupted"
            elif self._loop_task.done() and self._lease_lost:
                logger.warning("turn %s is no longer this worker's; stopped", self.turn_id)
                return
            else:
                # The worker is shutting down and its drain grace is over: end
                # the turn as interrupted, keeping what it produced.
                self._loop_task.cancel()
                await asyncio.shield(self._end_on_shutdown())
                raise
        except TimeoutError:
            await self._fail("timeout", "turn_timeout", "the turn ran past its time limit")
            return
        except ProviderError as exc:
            await self._fail("error", exc.code, exc.message)
            return
        except Exception:
            logger.exception("turn %s of session %s crashed", self.turn_id, self.session_id)
            await self._fail("error", "internal_error", "the turn failed unexpectedly")
            return
        if reason != "suspended":
            await self._complete(reason)

    async def _end_on_shutdown(self) -> None:
        assert self._loop_task is not None
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._loop_task
        await self._complete("interrupted")

    async def _loop(self) -> LoopEnd:
        async with asyncio.timeout(self.settings.turn_timeout_seconds):
            return await self._iterate()

    async def _iterate(self) -> LoopEnd:
        history = self.history
        allowed: list[str] = list(self.agent.allowed_tools)
        tools = tool_specs(allowed)
        tool_ctx = ToolContext(
            sandbox=self.sandbox,
            timeout=self.settings.tool_timeout_seconds,
            output_cap=self.settings.tool_output_bytes,
        )
        first = 0
        resumed_plan: list[CallPlan] | None = None
        if self._resumed is not None:
            record, decided = self._resumed
            first, resumed_plan = record.iteration, _decided(record.calls, self.blocks, decided)
        for iteration in range(first, self.agent.max_iterations):
            if resumed_plan is not None:
                plan, resumed_plan = resumed_plan, None
                self._changes.start()
                await self._run_calls(plan, tool_ctx, allowed)
                continue
            current = [self._message()] if self.blocks else []
            request = ProviderRequest(
                system=self.agent.system_prompt, messages=history + current, tools=tools
            )
            calls: list[int] = []
            end: MessageEnd | None = None
            async for item in self.provider.stream(request):
                if isinstance(item, TextChunk):
                    self._text(item.text)
                elif isinstance(item, ToolCallStart):
                    if allowed_by_name(self.agent.permissions, item.name):
                        # Before the first tool runs, what is there (not for a call
                        # that may wait: a turn that waits keeps no snapshot).
                        self._changes.start()
                    self._close_text()
                    calls.append(len(self.blocks))
                    self.blocks.append(ToolUseBlock(id=item.id, name=item.name, input={}))
                    self._emit(
                        ev.ToolUseStart(**self._ids(), index=calls[-1], id=item.id, name=item.name)
                    )
                elif isinstance(item, ToolCallReady):
                    index = self._call_index(calls, item.id)
                    self.blocks[index] = ToolUseBlock(id=item.id, name=item.name, input=item.input)
                    self._emit(
                        ev.ToolUseComplete(
                            **self._ids(), index=index, id=item.id, name=item.name, input=item.input
                        )
                    )
                else:
                    end = item
            self._close_text()
            if end is not None:
                self.usage.input_tokens += end.usage.input_tokens
                self.usage.output_tokens += end.usage.output_tokens
            if not calls:
                self._writer_stop()
                return "end_turn"
            plan = self._plan(calls)
            if any(step.verdict == "ask" for step in plan):
                if await suspend_for_approval(self, iteration, plan) == "interrupted":
                    self._interrupted = True
                    return "interrupted"
                return "suspended"
            await self._run_calls(plan, tool_ctx, allowed)
        self._writer_stop()
        return "max_iterations"

    def _plan(self, calls: list[int]) -> list[CallPlan]:
        """What the session's permissions say of each call of the model's response
        (a tool the agent does not have is not asked about: it fails as unknown)."""
        plan = []
        allowed = self.agent.allowed_tools
        for index in calls:
            call = self.blocks[index]
            assert isinstance(call, ToolUseBlock)
            if call.name not in allowed:
                plan.append(CallPlan(index=index, verdict="allow"))
                continue
            ruling = rule_for(self.agent.permissions, call.name, call.input)
            reason = ""
            if ruling.verdict == "deny":
                reason = f"[denied by the session's permissions ({ruling.rule})] it did not run"
            plan.append(CallPlan(index=index, verdict=ruling.verdict, reason=reason))
        return plan

    async def _run_calls(
        self, plan: list[CallPlan], tool_ctx: ToolContext, allowed: list[str]
    ) -> None:
        await self._changes.ready()
        for step in plan:
            call = self.blocks[step.index]
            assert isinstance(call, ToolUseBlock)
            if step.verdict != "allow":
                self._tool_result(call.id, step.reason, True)
                continue
            began = time.monotonic()
            outcome = await execute_tool(tool_ctx, call.name, call.input, allowed)
            self._figures.tools.append(
                (call.name if call.name in allowed else "unknown", time.monotonic() - began)
            )
            self._tool_result(call.id, outcome.content, outcome.is_error)

    # ---- blocks and events ------------------------------------------------

    def _ids(self) -> dict[str, str]:
        return self._turn_ids.stamped()

    def _call_index(self, calls: list[int], call_id: str) -> int:
        for index in calls:
            block = self.blocks[index]
            if isinstance(block, ToolUseBlock) and block.id == call_id:
                return index
        raise ProviderError("provider_protocol", f"tool call {call_id} completed before it started")

    def _message(self) -> Message:
        return Message(
            id=self.message_id,
            session_id=self.session_id,
            role="assistant",
            content=list(self.blocks),
            timestamp=now_rfc3339(),
            turn_id=self.turn_id,
        )

    def _writer_stop(self) -> None:
        """The model is done: what was not sent yet goes out with the terminal event."""
        assert self._writer is not None
        self._writer.stop()

    def _emit(self, event: ev.Event) -> None:
        assert self._writer is not None
        self._writer.put(event)
        self._figures.events += 1

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._figures.first_token_seconds is None and self._accepted_at is not None:
            self._figures.first_token_seconds = max(0.0, time.time() - self._accepted_at)
        if self._text_index is None:
            self._text_index = len(self.blocks)
            self._text_parts = []
        self._text_parts.append(text)
        self._emit(ev.TextDelta(**self._ids(), index=self._text_index, text=text))

    def _close_text(self) -> None:
        if self._text_index is None:
            return
        text = "".join(self._text_parts)
        self.blocks.append(TextBlock(text=text))
        index, self._text_index = self._text_index, None
        self._emit(ev.TextComplete(**self._ids(), index=index, text=text))

    def _tool_result(self, tool_use_id: str, content: str, is_error: bool) -> None:
        index = len(self.blocks)
        self.blocks.append(
            ToolResultBlock(tool_use_id=tool_use_id, content=content, is_error=is_error)
        )
        self._emit(
            ev.ToolResult(
                **self._ids(),
                index=index,
                tool_use_id=tool_use_id,
                content=content,
                is_error=is_error,
            )
        )

    def _settle_blocks(self) -> None:
        """After a stop: keep partial text, and answer every tool call left unanswered."""
        if self._text_index is not None:
            self.blocks.append(TextBlock(text="".join(self._text_parts)))
            self._text_index = None
        answered = {b.tool_use_id for b in self.blocks if isinstance(b, ToolResultBlock)}
        for block in list(self.blocks):
            if isinstance(block, ToolUseBlock) and block.id not in answered:
                self._tool_result(block.id, "[interrupted before the tool finished]", True)

    # ---- the end of the turn -----------------------------------------------

    async def _complete(self, reason: CompletedReason) -> None:
        self._settle_blocks()
        rest = await self.detach_writer()
        if rest is None:
            return
        message = self._message()
        changed, truncated = await self._changes.collect()
        message.files_changed, message.files_changed_truncated = changed, truncated
        terminal = completed(self._turn_ids, message, reason, self.usage, changed, truncated)
        await self._store_end(message, terminal, rest)

    async def _fail(self, stop_reason: FailedReason, code: str, text: str) -> None:
        self._settle_blocks()
        rest = await self.detach_writer()
        if rest is None:
            return
        message = self._message() if self.blocks else None
        terminal = failed(self._turn_ids, stop_reason, code, text, message)
        await self._store_end(message, terminal, rest)

    async def _store_end(
        self, message: Message | None, terminal: ev.TerminalEvent, rest: list[ev.Event]
    ) -> None:
        """Store the turn's end, asking again (with backoff) while the store cannot
        take it, the lease holds and the turn's time lasts: a turn that finished
        is stored as finished."""
        settings = self.settings
        deadline = max(
            self._started + settings.turn_timeout_seconds,
            time.monotonic() + settings.fence_after_seconds(),
        )
        figures = self._measured()
        try:
            stored = await until_stored(
                lambda: self.store.finish_turn(
                    self.session_id,
                    self.turn_id,
                    "worker",
                    message,
                    terminal,
                    figures,
                    rest,
                    worker_id=self.worker_id,
                    job_id=self.job_id,
                ),
                what=f"the end of turn {self.turn_id}",
                give_up=lambda: self._lease_lost or time.monotonic() > deadline,
                logger=logger,
            )
            self.job_forgotten = bool(stored and self.job_id)
        except Exception as exc:
            if not worth_retrying(exc):
                raise
            logger.error(
                "turn %s of session %s: its end could not be stored (%r)",
                self.turn_id,
                self.session_id,
                exc,
            )

    def _measured(self) -> TurnFigures:
        self._figures.duration_seconds = time.monotonic() - self._started
        return self._figures

    async def detach_writer(self) -> list[ev.Event] | None:
        """Stop the writer; the events it has not sent yet, to go out with the
        turn's end or its suspension, or None when the turn is no longer ours."""
        assert self._writer is not None
        try:
            return await self._writer.detach()
        except TurnSuperseded:
            logger.info("turn %s of session %s superseded", self.turn_id, self.session_id)
            return None

    def give_back(self, events: list[ev.Event]) -> None:
        """The turn did not suspend after all: its unsent events go out with its end."""
        assert self._writer is not None
        self._writer.give_back(events)

    async def _keep_lease(self, renewed_at: float) -> None:
        """Renew the lease; fence the turn when no renewal got through in time.

        `renewed_at` is when the last renewal that got through was *sent*: the
        store applied it later, so no reaper can have seen the lease stand still
        for longer than this process has (README: Reliability)."""
        settings = self.settings
        period = settings.lease_seconds / 3
        fence_after = settings.fence_after_seconds()
        pause = period
        while True:
            deadline = renewed_at + fence_after
            await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            sent = time.monotonic()
            if sent >= deadline:
                self._fence(sent - renewed_at)
                return
            try:
                async with asyncio.timeout(deadline - sent):
                    status = await self.store.renew_lease(
                        self.session_id, self.turn_id, self.worker_id
                    )
            except Exception as exc:  # the store is away: try again, faster
                if pause == period:
                    logger.warning("turn %s: lease renewal failed (%r)", self.turn_id, exc)
                pause = min(period, 0.5)
                continue
            if status == 0:
                self._stop_quietly()
                return
            renewed_at, pause = sent, period
            if status == 2:
                self.interrupt()

    def _fence(self, silent_for: float) -> None:
        logger.error(
            "turn %s of session %s: no lease renewal for %.2f s; stopping it and its tools",
            self.turn_id,
            self.session_id,
            silent_for,
        )
        self._stop_quietly()


def _decided(
    calls: list[CallPlan], blocks: list[ContentBlock], decided: dict[str, Resolution]
) -> list[CallPlan]:
    """A suspended response's calls with each asked one's decision: run it, or
    answer it with the denial (a call left undecided is denied)."""
    plan = []
    for step in calls:
        if step.verdict == "ask":
            block = blocks[step.index]
            assert isinstance(block, ToolUseBlock)
            resolution = decided.get(block.id)
            if resolution is not None and resolution.decision == "allow":
                step = CallPlan(index=step.index, verdict="allow")
            else:
                reason = (
                    denial_text(resolution)
                    if resolution
                    else "[denied: no decision] the tool did not run"
                )
                step = CallPlan(index=step.index, verdict="deny", reason=reason)
        plan.append(step)
    return plan
