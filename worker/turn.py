"""TurnRunner: one agent turn, from the claimed user message to the terminal event.

The loop asks the provider for a response, streams it out as events, runs the
tool calls in the sandbox, feeds the results back and goes on until the model
ends its turn or the iteration bound is reached. Every event is appended to the
session log as it happens; the assistant message, the session's return to
`active` and the terminal event are written in one atomic step at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal

from shared import events as ev
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
from shared.sandbox.handle import OpenSandbox
from shared.settings import Settings
from shared.store import SessionStore
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

CompletedReason = Literal["end_turn", "interrupted", "max_iterations"]


class TurnRunner:
    def __init__(
        self,
        *,
        store: SessionStore,
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
    ) -> None:
        self.store = store
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
        self.message_id = new_id()
        self.blocks: list[ContentBlock] = []
        self.usage = ev.Usage()
        self._text_index: int | None = None
        self._text_parts: list[str] = []
        self._interrupted = False
        self._lease_lost = False
        self._loop_task: asyncio.Task[CompletedReason] | None = None
        self._writer: TurnEvents | None = None
        self._started = time.monotonic()
        # For the fleet's metrics: when the API accepted the message (epoch
        # seconds), and what the turn measured on its way.
        self._accepted_at = accepted_at
        self._figures = TurnFigures()
        self._changes = WorkspaceChanges(sandbox)

    # ---- control -----------------------------------------------------------

    def interrupt(self) -> None:
        self._interrupted = True
        if self._loop_task is not None:
            self._loop_task.cancel()

    def _stop_quietly(self) -> None:
        """Stop without ending the turn: it is no longer ours to end (lease lost,
        session deleted, turn reaped)."""
        self._lease_lost = True
        if self._loop_task is not None:
            self._loop_task.cancel()

    # ---- the turn ----------------------------------------------------------

    async def run(self, lease_ms: int) -> None:
        """Run the turn, whose lease the caller took (`SessionStore.start_turn`), to its end."""
        self._writer = self.writer.open(self.session_id, self.turn_id, self._stop_quietly)
        heartbeat = asyncio.create_task(self._heartbeat(lease_ms))
        try:
            await self._drive()
        finally:
            heartbeat.cancel()
            self._writer.close()

    async def _drive(self) -> None:
        """Run the loop and end the turn the way the loop ended."""
        self._loop_task = asyncio.create_task(self._loop())
        try:
            reason: CompletedReason = await asyncio.shield(self._loop_task)
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
        await self._complete(reason)

    async def _end_on_shutdown(self) -> None:
        assert self._loop_task is not None
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._loop_task
        await self._complete("interrupted")

    async def _loop(self) -> CompletedReason:
        async with asyncio.timeout(self.settings.turn_timeout_seconds):
            return await self._iterate()

    async def _iterate(self) -> CompletedReason:
        history = self.history
        allowed: list[str] = list(self.agent.allowed_tools)
        tools = tool_specs(allowed)
        tool_ctx = ToolContext(
            sandbox=self.sandbox,
            timeout=self.settings.tool_timeout_seconds,
            output_cap=self.settings.tool_output_bytes,
        )
        for _ in range(self.agent.max_iterations):
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
                    self._changes.start()  # before the first tool runs, what is there
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
            await self._changes.ready()
            for index in calls:
                call = self.blocks[index]
                assert isinstance(call, ToolUseBlock)
                began = time.monotonic()
                outcome = await execute_tool(tool_ctx, call.name, call.input, allowed)
                self._figures.tools.append(
                    (call.name if call.name in allowed else "unknown", time.monotonic() - began)
                )
                self._tool_result(call.id, outcome.content, outcome.is_error)
        self._writer_stop()
        return "max_iterations"

    # ---- blocks and events ------------------------------------------------

    def _ids(self) -> dict[str, str]:
        return {
            "session_id": self.session_id,
            "sandbox_id": self.sandbox_id,
            "turn_id": self.turn_id,
            "message_id": self.message_id,
            "created_at": now_rfc3339(),
        }

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
        rest = await self._detached()
        if rest is None:
            return
        message = self._message()
        message.stop_reason = reason
        changed, truncated = await self._changes.collect()
        message.files_changed, message.files_changed_truncated = changed, truncated
        terminal = ev.SessionCompleted(
            **self._ids(),
            message=message,
            stop_reason=reason,
            usage=self.usage,
            files_changed=changed,
            files_changed_truncated=truncated,
        )
        await self.store.finish_turn(
            self.session_id, self.turn_id, "worker", message, terminal, self._measured(), rest
        )

    async def _fail(
        self, stop_reason: Literal["error", "timeout", "worker_lost"], code: str, text: str
    ) -> None:
        self._settle_blocks()
        rest = await self._detached()
        if rest is None:
            return
        message = None
        if self.blocks:
            message = self._message()
            message.stop_reason = stop_reason
        terminal = ev.SessionFailed(
            **self._ids(),
            error=ev.ErrorInfo(code=code, message=text),
            stop_reason=stop_reason,
            message=message,
        )
        await self.store.finish_turn(
            self.session_id, self.turn_id, "worker", message, terminal, self._measured(), rest
        )

    def _measured(self) -> TurnFigures:
        self._figures.duration_seconds = time.monotonic() - self._started
        return self._figures

    async def _detached(self) -> list[ev.Event] | None:
        """Stop the writer; the events it has not sent yet, to go out with the
        terminal event, or None when the turn is no longer ours."""
        assert self._writer is not None
        try:
            return await self._writer.detach()
        except TurnSuperseded:
            logger.info("turn %s of session %s superseded", self.turn_id, self.session_id)
            return None

    async def _heartbeat(self, lease_ms: int) -> None:
        period = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(period)
            status = await self.store.renew_lease(
                self.session_id, self.turn_id, self.worker_id, lease_ms
            )
            if status == 0:
                self._stop_quietly()
                return
            if status == 2:
                self.interrupt()
