"""The chat session: the conversation, its options, slash commands and the loop that ties
the API client to the terminal view. No wire format and no rendering here.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Callable

from ..speculative.bounds import FieldError, rule_of
from ..speculative.params import STRATEGIES
from ..speculative.request import DecodeRequest, check_field
from .client import ApiClient, ChatError
from .turn import Turn
from .view import ChatView

COMMANDS = {
    "/reset": "forget the conversation",
    "/temperature X": "sampling temperature (0 = greedy)",
    "/strategy NAME": f"decoding strategy: {' | '.join(STRATEGIES)}",
    "/stats": "statistics of the last answer",
    "/help": "this list",
    "/quit": "leave (also Ctrl-D)",
}
TEMPERATURE = rule_of(DecodeRequest, "temperature")  # what /temperature allows: a request's bound
HEALTH_EVERY_S = 2.0  # how often the ring's health is polled during an answer


@dataclass
class ChatOptions:
    """What each request asks for; slash commands change it."""

    temperature: float | None = None  # None: the topology's default
    strategy: str | None = None  # None: the topology's default
    max_tokens: int | None = None  # None: the topology's default
    system: str | None = None  # system prompt, or None


class ChatSession:
    """The conversation: reads input through the view, runs turns, handles slash commands."""

    def __init__(self, client: ApiClient, opts: ChatOptions, view: ChatView, runner: Any) -> None:
        self.client = client  # the source's HTTP API
        self.opts = opts  # what each request asks for
        self.view = view  # the terminal (or plain stdin/stdout/stderr)
        self.runner = runner  # the event loop the client's coroutines run on
        self.messages: list[dict[str, str]] = []  # the conversation (without the system prompt)
        self.last: Turn | None = None  # the last answer
        self.model = "default"  # the API's model id, asked for when the loop starts

    # ------------------------------------------------------------------ loop
    def loop(self, banner: str) -> None:
        self.model = self.runner.run(self.client.model())
        self.view.welcome(banner, self.model)
        while True:
            try:
                line = self.view.read()
            except EOFError:
                self.view.end_of_input()
                break
            except KeyboardInterrupt:
                self.view.interrupted_at_prompt()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line):
                    break
                continue
            self.ask(line)

    # -------------------------------------------------------------- commands
    def command(self, line: str) -> bool:
        """Run a slash command; True to leave."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit", "/q"):
            return True
        if cmd == "/reset":
            self.messages.clear()
            self.last = None
            self.view.cleared()
        elif cmd == "/temperature":  # checked as a request's temperature is, wherever it comes from
            try:
                v = check_field("temperature", float(arg))
            except ValueError:  # not a number, or out of bounds (a FieldError)
                self.view.bad_temperature(arg, TEMPERATURE.allowed)
                return False
            self.opts.temperature = v
            self.view.temperature_set(v)
        elif cmd == "/strategy":
            try:
                self.opts.strategy = check_field("strategy", arg)
            except FieldError:
                self.view.unknown_strategy(arg, STRATEGIES)
                return False
            self.view.strategy_set(arg)
        elif cmd == "/stats":
            self.view.show_stats(self.last)
        elif cmd == "/help":
            self.view.show_help(COMMANDS)
        else:
            self.view.unknown_command(cmd, COMMANDS)
        return False

    # ------------------------------------------------------------------ turns
    def request_body(self) -> dict[str, Any]:
        msgs = ([{"role": "system", "content": self.opts.system}] if self.opts.system else []) + self.messages
        body: dict[str, Any] = {"model": self.model, "messages": msgs}
        for k, v in (("temperature", self.opts.temperature), ("strategy", self.opts.strategy),
                     ("max_tokens", self.opts.max_tokens)):
            if v is not None:
                body[k] = v
        return body

    def ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        turn = Turn()
        stopped = False
        try:
            self.runner.run(self._turn(turn))
        except KeyboardInterrupt:
            stopped = True
        except ChatError as e:
            if turn.answer:
                self.view.show_answer(turn, stopped=False)
            self.view.show_error(str(e))
            if not turn.answer:
                self.messages.pop()  # nothing came back: the question is not part of the conversation
                return
        else:
            self.view.show_answer(turn, stopped=False)
        if stopped:
            self.view.show_answer(turn, stopped=True)
        self.last = turn
        if turn.answer:
            self.messages.append({"role": "assistant", "content": turn.answer})
        else:
            self.messages.pop()

    async def _turn(self, t: Turn) -> None:
        body = self.request_body()
        if not self.view.tty:
            async for chunk in self.client.stream(body):
                self.view.write(t.apply(chunk))
            with contextlib.suppress(ChatError):
                _, t.health = await self.client.health()
            return
        with self.view.live(t) as refresh:
            t.streaming = True
            poller = asyncio.create_task(self._poll_health(t, refresh))
            try:
                async for chunk in self.client.stream(body):
                    t.apply(chunk)
                    refresh()
            finally:
                t.streaming = False
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)

    async def _poll_health(self, t: Turn, refresh: Callable[[], None]) -> None:
        while True:
            try:
                _, t.health = await self.client.health()
            except ChatError as e:
                t.health = {"formed": False, "error": str(e), "nodes": []}
            refresh()
            await asyncio.sleep(HEALTH_EVERY_S)
