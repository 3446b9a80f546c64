"""Terminal chat: streams replies, keeps multi-turn history, works on a terminal and with piped stdin.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /stats (toggle tokens/s after each
reply), /exit. Ctrl-C stops the current reply and keeps what was said; Ctrl-D or /exit quits.
When the history no longer fits the context, the oldest turns are dropped (and the user is told).

Ctrl-C is handled by our own SIGINT handler, not by KeyboardInterrupt landing wherever Python happens to be. At the
prompt it raises KeyboardInterrupt, the only way to make input() return; anywhere else it sets a flag that the reply
loop checks between tokens, so it never lands inside the tokenizer, a torch op, a lock or a generator's cleanup. On a
terminal the chat also sets NOFLSH (see `keep_typed_input`).
"""

import signal
import sys
import termios
from dataclasses import dataclass, field

from tinyserve.generation.session import GenerationParams, Session
from tinyserve.runtime.runner import ContextOverflow
from tinyserve.generation.sampling import SamplingParams
from tinyserve.generation.scheduler import FinishReason

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
        self.at_prompt = False  # True while a line is read: Ctrl-C raises KeyboardInterrupt there
        self.stop_requested = False  # set by Ctrl-C anywhere else; cleared each time a new line is read
        self.tty_fd: int | None = None  # the terminal whose typed-ahead input Ctrl-C discards (interactive only)

    def on_sigint(self, signum, frame) -> None:
        if self.at_prompt:
            self.at_prompt = False  # one KeyboardInterrupt per prompt: a second Ctrl-C just sets the flag
            raise KeyboardInterrupt
        self.stop_requested = True

    def discard_typed_ahead(self) -> None:
        """What the terminal does on Ctrl-C without NOFLSH, done here at a safe point: drop unread typed input."""
        if self.tty_fd is not None:
            termios.tcflush(self.tty_fd, termios.TCIFLUSH)

    def read_line(self, stdin, interactive: bool) -> str:
        """The next line of input ('' at its end). Raises KeyboardInterrupt for a Ctrl-C while reading it."""
        try:  # the handler raises only while at_prompt is set, so only inside this try
            self.at_prompt = True
            self.stop_requested = False  # a Ctrl-C from here on is for the reply to this line
            return input("> ") if interactive else stdin.readline()
        finally:
            self.at_prompt = False

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
            # Ctrl-C during templating or prefill is seen here, before the first token is shown.
            for chunk in stream:
                if self.stop_requested:
                    interrupted = True
                    break
                if chunk.text:
                    pieces.append(chunk.text)
                    print(chunk.text, end="", file=self.out, flush=True)
        finally:
            stream.close()
        reply = "".join(pieces)
        print(file=self.out, flush=True)
        st = self.session.stats
        if interrupted:
            self.discard_typed_ahead()
            self.say("(stopped)")
        elif st.finish_reason is FinishReason.LENGTH:
            self.say("(reply cut: max tokens or context reached)")
        if reply or not interrupted:  # a reply stopped before its first word leaves no turn behind
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        if self.show_stats:
            self.say(f"({st.completion_tokens} tokens, {st.decode_tok_s:.1f} tok/s, first token after {st.ttft_s:.2f} s, {st.cached_tokens} of {st.prompt_tokens} prompt tokens reused"
                     + (f"; speculation: {st.speculation}" if st.draft_tokens else "") + ")")

    def run(self, stdin=sys.stdin) -> None:
        """The chat loop; call it from the main thread (it installs a SIGINT handler for its duration)."""
        interactive = stdin.isatty()
        old_handler = signal.signal(signal.SIGINT, self.on_sigint)  # from here on Ctrl-C raises only in read_line
        restore_tty = None
        try:
            if interactive:
                restore_tty = keep_typed_input(stdin.fileno())
                if restore_tty is not None:
                    self.tty_fd = stdin.fileno()
                self.say(f"tinyserve chat ({self.session.runner.model_dir.name}). {HELP}")
                try:
                    import readline  # noqa: F401  (line editing and history for input())
                except ImportError:
                    pass
            self.loop(stdin, interactive)
        finally:
            if restore_tty is not None:
                termios.tcsetattr(self.tty_fd, termios.TCSANOW, restore_tty)
                self.tty_fd = None
            signal.signal(signal.SIGINT, old_handler)

    def loop(self, stdin, interactive: bool) -> None:
        while True:
            try:
                line = self.read_line(stdin, interactive)
            except EOFError:
                break
            except KeyboardInterrupt:
                self.discard_typed_ahead()
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
            self.reply(line)
        if interactive:
            print(file=self.out)


def keep_typed_input(fd: int) -> list | None:
    """Set NOFLSH on the terminal fd, so that Ctrl-C no longer makes the kernel discard unread input; returns the
    settings to restore (None when fd is not a terminal whose settings we can read).

    Why: the kernel sends SIGINT first and flushes the input queue a moment later. When Ctrl-C comes right after a
    line was typed, Python's readline loop can see that line as readable, take the signal, and call into GNU readline,
    whose read() then finds the queue flushed and blocks; readline retries reads interrupted by signals and Python
    sets rl_catch_signals = 0, so input() hangs with the terminal in raw mode until another key arrives. Without the
    flush the line is read normally and the pending signal raises KeyboardInterrupt right after input() returns;
    `Chat.discard_typed_ahead` then drops typed-ahead input itself, at a point where nothing is blocked on it."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        return None
    attrs = list(saved)
    attrs[3] |= termios.NOFLSH  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return saved
