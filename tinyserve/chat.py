"""Terminal chat: streams replies, keeps multi-turn history, works on a terminal and with piped stdin.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /stats (toggle tokens/s after each
reply), /exit. Ctrl-C stops the current reply and keeps what was said; Ctrl-D or /exit quits.
When the history no longer fits the context, the oldest turns are dropped (and the user is told).
"""

import sys
from dataclasses import dataclass, field

from tinyserve.generate import GenerationParams, Session
from tinyserve.runner import ContextOverflow
from tinyserve.sampling import SamplingParams

HELP = "commands: /reset, /system TEXT, /stats, /exit. Ctrl-C stops a reply; Ctrl-D quits."


@dataclass
class ChatConfig:
    max_tokens: int = 512  # per reply
    system: str | None = None  # None: the chat template's default
    stats: bool = False
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.9))


class Chat:
    def __init__(self, session: Session, cfg: ChatConfig, out=sys.stdout):
        self.session, self.cfg, self.out = session, cfg, out
        self.system = cfg.system
        self.history: list[dict] = []  # alternating user / assistant messages
        self.show_stats = cfg.stats

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Handle a /command; returns False when the chat should end."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            self.say("(conversation cleared)")
        elif name == "/system":
            if arg.strip():
                self.system = arg.strip()
                self.say("(system prompt set)")
            else:
                self.say(f"(system prompt: {self.system!r})" if self.system else "(system prompt: the model's default)")
        elif name == "/stats":
            self.show_stats = not self.show_stats
            self.say(f"(stats {'on' if self.show_stats else 'off'})")
        else:
            self.say(f"(unknown command {name}; {HELP})")
        return True

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """The templated prompt for history + user, dropping the oldest turns until a reply has room.

        Returns (ids, number of dropped turns). Raises ContextOverflow when the new message alone does not fit."""
        tok, max_len = self.session.tok, self.session.max_seq_len
        room = min(self.cfg.max_tokens, max_len // 4)  # tokens kept free for the reply
        dropped = 0
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [{"role": "user", "content": user}]
            ids = tok.chat_ids(messages)
            if len(ids) + room <= max_len:
                return ids, dropped
            if not self.history:
                if len(ids) < max_len:
                    return ids, dropped  # no history left to drop: reply in whatever room remains
                raise ContextOverflow(f"that message is {len(ids)} tokens with the template; the context holds {max_len}")
            del self.history[:2]  # the oldest user message and its reply
            dropped += 1

    def reply(self, user: str) -> None:
        try:
            ids, dropped = self.prompt_ids(user)
        except ContextOverflow as e:
            self.say(f"(not sent: {e})")
            return
        if dropped:
            self.say(f"(dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the {self.session.max_seq_len}-token context)")
        params = GenerationParams(max_tokens=self.cfg.max_tokens, sampling=self.cfg.sampling)
        pieces: list[str] = []
        stream = self.session.stream(ids, params)
        interrupted = False
        try:
            for chunk in stream:
                if chunk.text:
                    pieces.append(chunk.text)
                    print(chunk.text, end="", file=self.out, flush=True)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()
        reply = "".join(pieces)
        print(file=self.out, flush=True)
        st = self.session.stats
        if interrupted:
            self.say("(stopped)")
        elif st.finish_reason == "length":
            self.say("(reply cut: max tokens or context reached)")
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        if self.show_stats:
            self.say(f"({st.completion_tokens} tokens, {st.decode_tok_s:.1f} tok/s, first token after {st.ttft_s:.2f} s, {st.cached_tokens} of {st.prompt_tokens} prompt tokens reused)")

    def run(self, stdin=sys.stdin) -> None:
        interactive = stdin.isatty()
        if interactive:
            self.say(f"tinyserve chat ({self.session.runner.model_dir.name}). {HELP}")
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        while True:
            try:
                line = input("> ") if interactive else stdin.readline()
            except EOFError:
                break
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /exit to quit)")
                continue
            if not interactive:
                if not line:
                    break
                line = line.rstrip("\n")
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            try:
                self.reply(line)
            except KeyboardInterrupt:  # Ctrl-C before the first token (templating, prefill): stop this reply only
                self.say("\n(stopped)")
        if interactive:
            print(file=self.out)
