"""The language-model stability task: a small pre-LN transformer on the standard library's source.

A decoder-only transformer (pre-LN, learned positions, GELU MLP, untied
output head; :data:`HYPER`) learns the bytes of a fixed list of Python
standard-library files (:mod:`safeopt_bench.text`) with AdamW at a learning
rate high enough that ``clip_grad_norm_(1.0)`` still shows loss spikes
(see ``python -m safeopt_bench.lm_report --calibrate``). Warm-up, then a
cosine decay to a tenth. Every configuration (:func:`configurations`) and
seed trains with the same hyper-parameters and sees the same batches;
nothing is tuned per configuration or per seed.

Torch runs on one thread per run: on this project's shared two-core
machines a step of a small transformer took from 0.6x to 10x the time with
two threads as with one, depending on the other processes' load, which would
make the wall times incomparable between configurations.

The model is sized for that budget: at ``d_model`` 96, 3 layers, context
128, a run of 800 steps took 100 to 250 s there, too slow for every
configuration and seed in half an hour; this one takes 20 to 45 s.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import safeopt
from safeopt.adapter import PRESETS
from safeopt_bench import text

HYPER: dict[str, Any] = {
    "d_model": 64, "layers": 2, "heads": 2, "context": 64, "batch": 16,
    "steps": 1000, "warmup": 100, "lr": 8e-2, "final_lr_fraction": 0.1,
    "betas": (0.9, 0.95), "weight_decay": 0.1, "eps": 1e-8, "init_std": 0.02,
    "val_windows": 512,
}
"""Hyper-parameters of the full run (every configuration, every seed)."""

QUICK: dict[str, Any] = {**HYPER, "d_model": 32, "layers": 1, "heads": 2, "context": 32,
                         "batch": 4, "steps": 30, "warmup": 5, "lr": 3e-3, "val_windows": 16}
"""A tiny model and a few steps: for CI (checks that everything runs, measures nothing)."""

EPISODE: dict[str, Any] = {**HYPER, "lr": 1e-2, "episode": (500, 40), "skip_after_recovery": 100}
"""The bad-data episode (``--tasks lm-episode``): at the best learning rate of the
calibration, batches 500-539 of the stream are uniform random bytes (a corrupt shard),
and a configuration that recovers drops the next 100 batches after each restore
(:func:`safeopt.skip_after_recovery`, as PaLM skipped the batches around a spike)."""

QUICK_EPISODE: dict[str, Any] = {**QUICK, "episode": (10, 5), "skip_after_recovery": 5}
""":data:`EPISODE` on the tiny model of :data:`QUICK` (CI)."""


# ---------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        """Causal self-attention and MLP, each on a residual branch."""
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """A byte-level decoder-only transformer (vocabulary 256)."""

    def __init__(self, d: int, layers: int, heads: int, context: int, std: float) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() >= 2:
                scaled = name.endswith(("proj.weight", "out.weight"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * layers) if scaled else std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the next byte at every position of ``x`` (batch, time)."""
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def adamw(model: nn.Module, hyper: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases, norms, embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok" not in n
             and "pos" not in n]
    rest = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": hyper["weight_decay"]},
         {"params": rest, "weight_decay": 0.0}],
        lr=hyper["lr"] * schedule(0, hyper), betas=hyper["betas"], eps=hyper["eps"])


def schedule(step: int, hyper: dict[str, Any]) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``final_lr_fraction``."""
    warm, total, low = hyper["warmup"], hyper["steps"], hyper["final_lr_fraction"]
    if step < warm:
        return (step + 1) / warm
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------
# Configurations.
# ---------------------------------------------------------------------------
Stepper = Callable[[nn.Module, Tensor], None]
Make = Callable[[nn.Module, torch.optim.Optimizer], tuple[Stepper, Any]]

SAFEOPT_POLICIES: dict[str, dict[str, Any]] = {
    "safeopt default": {},
    "safeopt adaptive": {"adaptive": "zscore"},
    "safeopt spike skipping": {"spike_skip": "loss"},
    "safeopt recovery": {"recover": True},
    "safeopt robust": dict(PRESETS["robust"]),
}
"""Each safeopt configuration's policy (safeopt's defaults otherwise)."""


def policy_accepts(key: str) -> bool:
    """Whether this safeopt's :class:`safeopt.Policy` has the key ``key``."""
    return key in {f.name for f in dataclasses.fields(safeopt.Policy)}


def configurations() -> dict[str, Make]:
    """``name -> make(model, adamw)`` returning ``(step(model, loss), the object to read)``.

    The safeopt configurations whose policy this safeopt does not accept yet
    (``recover``) are left out; ``zclip`` needs ``pip install zclip``.
    """
    configs: dict[str, Make] = {"none": _bare, "clip_grad_norm_(1.0)": _native_clip}
    if importlib.util.find_spec("zclip") is not None:
        configs["zclip"] = _zclip
    for name, policy in SAFEOPT_POLICIES.items():
        if all(policy_accepts(key) for key in policy):
            configs[name] = _safeopt_maker(policy)
    return configs


def _bare(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[Stepper, Any]:
    return (lambda m, loss: opt.step()), None


def _native_clip(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[Stepper, Any]:
    def step(m: nn.Module, loss: Tensor) -> None:
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return step, None


def _zclip(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[Stepper, Any]:
    from zclip import ZClip  # optional peer: pip install zclip

    clip = ZClip(mode="zscore", alpha=0.97, z_thresh=2.5, max_grad_norm=1.0)  # the paper's

    def step(m: nn.Module, loss: Tensor) -> None:
        clip.step(m)
        opt.step()
    return step, None


def _safeopt_maker(policy: dict[str, Any]) -> Make:
    def make(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[Stepper, Any]:
        wrapped = safeopt.wrap(opt, dict(policy))
        return (lambda m, loss: wrapped.step(loss=loss.detach())), wrapped
    return make


# ---------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------
class Batches:
    """Random windows of the training stream; one generator per seed (same for every config).

    With ``episode=(start, length)``, batches ``start`` to ``start + length - 1`` of
    the stream are uniform random bytes instead (their own generator, the same for
    every configuration): a corrupt stretch of data.
    """

    def __init__(self, corpus: text.Corpus, context: int, batch: int, seed: int,
                 episode: tuple[int, int] | None = None) -> None:
        self.data = torch.from_numpy(corpus.train.astype(np.int64))
        self.context, self.batch = context, batch
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.noise = torch.Generator().manual_seed(20_000 + seed)
        self.episode, self.drawn = episode, 0

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, self.data.numel() - self.context - 1, (self.batch,),
                               generator=self.gen)
        window = self.data[starts[:, None] + torch.arange(self.context + 1)]
        k, self.drawn = self.drawn, self.drawn + 1
        if self.episode is not None and 0 <= k - self.episode[0] < self.episode[1]:
            # replaced, not inserted: the batches after the episode are the usual ones
            window = torch.randint(0, 256, window.shape, generator=self.noise)
        return window[:, :-1], window[:, 1:]


def val_windows(corpus: text.Corpus, context: int, n: int) -> tuple[Tensor, Tensor]:
    """``n`` windows evenly spaced over the validation stream (the same for every run)."""
    data = torch.from_numpy(corpus.val.astype(np.int64))
    starts = torch.linspace(0, data.numel() - context - 2, n).long()
    window = data[starts[:, None] + torch.arange(context + 1)]
    return window[:, :-1], window[:, 1:]


def evaluate(model: nn.Module, val: tuple[Tensor, Tensor], chunk: int = 64) -> float:
    """Mean cross-entropy (nats per byte) on the validation windows."""
    x, y = val
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            logits = model(x[i:i + chunk])
            total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + chunk].flatten(),
                                           reduction="sum"))
    return total / y.numel()


def run(config: str, seed: int, hyper: dict[str, Any], corpus: text.Corpus,
        ) -> dict[str, Any]:
    """Trains one configuration with one seed; returns its row.

    A run whose weights go NaN/Inf stops there (AdamW cannot bring them
    back), and so does one that safeopt stops with a
    :class:`safeopt.DivergenceError`.

    Returns:
      ``config``, ``seed``, ``steps``, ``losses`` (the training loss of every
      step, ``NaN`` where none was computed), ``first_nan_step``, ``stopped``
      (``None``, ``"nonfinite weights"`` or the error), ``val_loss``,
      ``safeopt`` (its counters, for safeopt configurations) and ``seconds``
      (of the training loop: setup and validation excluded).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = TinyLM(hyper["d_model"], hyper["layers"], hyper["heads"], hyper["context"],
                       hyper["init_std"])
        opt = adamw(model, hyper)
        step, wrapped = configurations()[config](model, opt)
        batches = _stream(Batches(corpus, hyper["context"], hyper["batch"], seed,
                                  hyper.get("episode")), wrapped, hyper)
        start = time.perf_counter()
        losses, first_nan, stopped = _train(model, opt, step, hyper, batches)
        seconds = time.perf_counter() - start
        val = val_windows(corpus, hyper["context"], hyper["val_windows"])
        val_loss = evaluate(model, val) if stopped != "nonfinite weights" else math.nan
        counters = _counters(wrapped)
    finally:
        torch.set_num_threads(threads)
    return {"config": config, "seed": seed, "steps": hyper["steps"], "losses": losses,
            "first_nan_step": first_nan, "stopped": stopped, "val_loss": val_loss,
            "safeopt": counters, "seconds": seconds}


def _stream(batches: Batches, wrapped: Any, hyper: dict[str, Any]) -> Iterator[Any]:
    """The batches a run sees: those after each recovery dropped, for a recovering policy."""
    skip = hyper.get("skip_after_recovery")
    policy = getattr(wrapped, "policy", None)
    if skip is None or policy is None or not policy.recover:
        return batches
    return iter(safeopt.skip_after_recovery(batches, wrapped, skip=skip))


def warm_up(configs: list[str], hyper: dict[str, Any], corpus: text.Corpus) -> None:
    """Two steps of every configuration, untimed: imports and first calls out of the timings."""
    for config in configs:
        run(config, 0, {**hyper, "steps": 2, "val_windows": 1}, corpus)


def _train(model: nn.Module, opt: torch.optim.Optimizer, step: Stepper, hyper: dict[str, Any],
           batches: Iterator[Any]) -> tuple[list[float], int | None, str | None]:
    losses = [math.nan] * hyper["steps"]
    first_nan: int | None = None
    for i in range(hyper["steps"]):
        _set_lr(opt, i, hyper)
        x, y = next(batches)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        losses[i] = float(loss.detach())
        if first_nan is None and not math.isfinite(losses[i]):
            first_nan = i
        try:
            step(model, loss)
        except safeopt.DivergenceError as err:
            return losses, first_nan, f"DivergenceError at step {i}: {str(err)[:120]}"
        if not _weights_finite(model):
            return losses, i if first_nan is None else first_nan, "nonfinite weights"
    return losses, first_nan, None


def _set_lr(opt: torch.optim.Optimizer, step: int, hyper: dict[str, Any]) -> None:
    """Moves each group's learning rate along the schedule, multiplicatively.

    Multiplying by ``schedule(step) / schedule(step - 1)`` instead of
    assigning ``lr * schedule(step)`` keeps any change a protection makes to
    the learning rate (a recovery's back-off) for the rest of the run.
    """
    if step == 0:
        return
    ratio = schedule(step, hyper) / schedule(step - 1, hyper)
    for group in opt.param_groups:
        group["lr"] = group["lr"] * ratio


def _weights_finite(model: nn.Module) -> bool:
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    return bool(torch.isfinite(torch.stack(norms)).all())


def _counters(wrapped: Any) -> dict[str, Any] | None:
    if wrapped is None:
        return None
    s = safeopt.stats(wrapped)
    keys = ("steps", "skips", "nonfinite", "spikes", "norm_clips", "recoveries", "last_recovery")
    return {k: s[k] for k in keys if k in s}


def environment() -> dict[str, str]:
    """Versions and threads, for the report."""
    return {"torch": torch.__version__, "threads": "1 per run"}
