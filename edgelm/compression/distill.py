"""Logit distillation: the compressed model learns the original's next-token distributions.

Loss: KL(original || compressed) of the next-token distributions, averaged over tokens (Hinton et al. 2015;
Minitron's healing).  The original is the teacher, run alongside in float32 on the CPU; its output hidden states are
kept for windows seen again (a window's logits are then one matrix product away).  The input embedding and the output
head stay frozen (SmolLM2 and Qwen tie them; they are a fifth of a small model's weights and changing them would
change every token's meaning for the blocks that were not pruned); every decoder block and norm learns.

Bounded by a budget of seconds or tokens; the learning rate warms up over the first 5 % of it and follows a cosine
down to a tenth by its end, measured in the budget's own unit, so a run stopped early by the budget still ends on a
small learning rate.  A checkpoint (weights, optimizer, data position) is written every ``checkpoint_every`` seconds
and when Ctrl-C is pressed between two steps; ``resume`` continues from one.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from edgelm.errors import InvalidParameterError

from .clock import now
from .surgery import head_logits, run_layers

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class Budget:
    seconds: float | None = None
    tokens: int | None = None

    def describe(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens:,} tokens"
        return f"{self.seconds / 60:.1f} min" if self.seconds and self.seconds >= 120 else f"{self.seconds:.0f} s"


_TIME = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600,
         "hour": 3600, "hours": 3600}
_TOKENS = {"k": 1_000, "K": 1_000, "M": 1_000_000, "tok": 1, "tokens": 1, "ktok": 1_000, "ktokens": 1_000}


def parse_budget(value: str | int | float | Budget | None) -> Budget | None:
    """"30m" / "90s" / "1.5h" (time), "200k" / "1M" / "50000 tokens" (distillation tokens), or seconds as a number."""
    if value is None or isinstance(value, Budget):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise _bad_budget(value)
        return Budget(seconds=float(value))
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m:
        raise _bad_budget(value)
    try:
        number = float(m.group(1))
    except ValueError:
        raise _bad_budget(value) from None
    unit = m.group(2)
    if number <= 0:
        raise _bad_budget(value)
    if unit in _TIME or unit.lower() in ("min", "minutes", "hours", "seconds"):
        return Budget(seconds=number * _TIME[unit if unit in _TIME else unit.lower()])
    if unit in _TOKENS:
        return Budget(tokens=int(number * _TOKENS[unit]))
    raise _bad_budget(value)


def _bad_budget(value: Any) -> InvalidParameterError:
    return InvalidParameterError(f"Invalid budget {value!r}.", fix='Use a time like "30m", "90s" or "1.5h", or a '
                                 'number of training tokens like "200k" or "1M".', parameter="budget", value=value)


@dataclass
class DistillSettings:
    lr: float = 1e-4
    batch: int = 4  # windows per step
    warmup: float = 0.05  # of the budget
    final_lr: float = 0.1  # of lr, at the end of the budget
    weight_decay: float = 0.0
    clip: float = 1.0
    checkpoint_every: float = 300.0  # seconds
    seed: int = 0


@dataclass
class DistillState:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss_first: float | None = None  # mean KL over the first steps
    loss_last: float | None = None  # mean KL over the last steps
    history: list[list[float]] = field(default_factory=list)  # [tokens, kl] every few steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trainable_parameters(student: Any) -> dict[str, Any]:
    """Every parameter but the input embedding and output head (frozen)."""
    frozen = {id(student.model.embed_tokens.weight), id(student.lm_head.weight)}
    return {name: p for name, p in student.named_parameters() if id(p) not in frozen}


def lr_at(settings: DistillSettings, fraction: float) -> float:
    if fraction < settings.warmup:
        return settings.lr * max(fraction, 1e-3) / settings.warmup
    t = min(1.0, (fraction - settings.warmup) / max(1e-9, 1 - settings.warmup))
    return settings.lr * (settings.final_lr + (1 - settings.final_lr) * 0.5 * (1 + math.cos(math.pi * t)))


class _Interrupt:
    """Between two steps, Ctrl-C asks the loop to checkpoint and stop; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def kl_loss(teacher_logits: Any, student_logits: Any) -> Any:
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits, -1)
    s = F.log_softmax(student_logits, -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distill(teacher: Any, student: Any, windows: Any, budget: Budget, *, settings: DistillSettings | None = None,
            state: DistillState | None = None, optimizer_state: dict[str, Any] | None = None,
            spent_seconds: float = 0.0, save: Callable[[DistillState, Any], None] | None = None,
            progress: Progress | None = None) -> DistillState:
    """Train ``student`` (in place) towards ``teacher`` on ``windows`` (tokens ids, n x seq) within ``budget``.

    ``spent_seconds``: time already used by the earlier stages, counted against a time budget.  ``state`` and
    ``optimizer_state`` continue an interrupted run.  ``save(state, optimizer)`` writes a checkpoint.  Raises
    KeyboardInterrupt after checkpointing when Ctrl-C is pressed."""
    import torch

    cfg = settings or DistillSettings()
    st = state or DistillState()
    report = progress or (lambda message, fraction: None)
    params = trainable_parameters(student)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    n = windows.shape[0]
    batch = max(1, min(cfg.batch, n))
    cache: dict[int, Any] = {}
    cache_limit = 1 << 30  # bytes of teacher states kept
    per_window = windows.shape[1] * student.config.hidden_size * 4

    def fraction() -> float:
        if budget.tokens is not None:
            return st.tokens / budget.tokens
        return (spent_seconds + st.seconds) / budget.seconds

    def order(epoch: int) -> Any:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        return torch.randperm(n, generator=g)

    def done_after_next() -> bool:
        if budget.tokens is not None:
            return st.tokens + batch * windows.shape[1] > budget.tokens
        step = st.seconds / st.steps if st.steps else 0.0
        return spent_seconds + st.seconds + step > budget.seconds

    student.train()
    last_save = t_prev = now()
    recent: list[float] = []
    try:
        with _Interrupt() as interrupt:
            while not done_after_next():
                pos = st.steps * batch  # windows seen so far: epoch = pos // n, each epoch its own shuffle
                idx = [int(order((pos + k) // n)[(pos + k) % n]) for k in range(batch)]
                ids = windows[idx]
                with torch.no_grad():
                    hidden = []
                    for k, i in enumerate(idx):
                        if i not in cache:
                            h = run_layers(teacher, teacher.model.layers, teacher.model.embed_tokens(ids[k:k + 1]))
                            h = teacher.model.norm(h)[0]
                            if len(cache) * per_window < cache_limit:
                                cache[i] = h
                        else:
                            h = cache[i]
                        hidden.append(h)
                    t_logits = teacher.lm_head(torch.stack(hidden))
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, fraction())
                embedded = student.model.embed_tokens(ids)
                s_hidden = run_layers(student, student.model.layers, embedded)
                loss = kl_loss(t_logits, head_logits(student, s_hidden))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
                opt.step()
                value = float(loss.detach())
                st.steps += 1
                st.tokens += ids.numel()
                t = now()  # one reading a step: a step's time includes the bookkeeping (and a checkpoint) after it
                st.seconds += t - t_prev
                t_prev = t
                recent.append(value)
                if st.loss_first is None and len(recent) >= min(5, max(1, n // batch)):
                    st.loss_first = sum(recent) / len(recent)
                if st.steps % 5 == 0:
                    st.history.append([st.tokens, sum(recent[-5:]) / len(recent[-5:])])
                st.loss_last = sum(recent[-10:]) / len(recent[-10:])
                report(f"distilling: KL {st.loss_last:.3f}, {st.tokens:,} tokens", min(1.0, fraction()))
                if interrupt.requested:
                    if save is not None:
                        save(st, opt)
                    raise KeyboardInterrupt
                if save is not None and t - last_save >= cfg.checkpoint_every:
                    save(st, opt)
                    last_save = t
    finally:
        student.eval()
        for p in params.values():
            p.requires_grad_(False)
    if st.loss_first is None and recent:
        st.loss_first = sum(recent) / len(recent)
    return st
