"""Cost of the explosion monitor (issue 6) inside the protected torch step.

Measures, in one process and interleaved, the median step time of fused
AdamW wrapped with ``{"clip_norm": 1.0}`` with the monitor on (the default,
``monitor_every=10``), with the loss passed to the step (signs (b) and (e)
then run too), and with the monitor off (``monitor_every=0``), against the
bare fused AdamW step.

Run: ``python -m safeopt_bench.monitor_cost`` (or ``python benchmarks/monitor_cost.py``).
"""

from __future__ import annotations

from typing import Any


def rows(params: int = 10_000_000, tensors: int = 50, rounds: int = 15) -> list[dict[str, Any]]:
    """Returns one row per candidate: median ms and the ratio to the bare step."""
    import torch

    import safeopt
    from safeopt_bench._timing import interleaved

    torch.manual_seed(0)
    size = params // tensors
    candidates = {}
    for name, policy, with_loss in [
        ("bare", None, False),
        ("monitor off", {"clip_norm": 1.0, "monitor_every": 0}, False),
        ("monitor on", {"clip_norm": 1.0}, False),
        ("monitor on + loss", {"clip_norm": 1.0}, True),
    ]:
        ps = [torch.nn.Parameter(torch.randn(size)) for _ in range(tensors)]
        for p in ps:
            p.grad = torch.randn(size) * 1e-3
        opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)
        if policy is not None:
            opt = safeopt.wrap(opt, policy)
        loss = torch.tensor(1.0)

        def step(opt: Any = opt, with_loss: bool = with_loss, loss: Any = loss) -> None:
            if with_loss:
                opt.step(loss=loss)
            else:
                opt.step()

        candidates[name] = step
    times = interleaved(candidates, warmup=3, rounds=rounds)
    bare = times["bare"]
    return [{"candidate": k, "median_ms": v * 1e3, "ratio": v / bare} for k, v in times.items()]


def main() -> None:
    """Prints the rows as a Markdown table."""
    print("| candidate | median ms | ratio to bare |\n|---|---|---|")
    for row in rows():
        print(f"| {row['candidate']} | {row['median_ms']:.2f} | {row['ratio']:.3f} |")
    print("\n| decide call (50 tensors) | median us |\n|---|---|")
    for row in decide_rows():
        print(f"| {row['candidate']} | {row['median_us']:.0f} |")


if __name__ == "__main__":
    main()


def decide_rows(n_tensors: int = 50, rounds: int = 200) -> list[dict[str, Any]]:
    """The monitor's own cost: one torch ``decide`` call with and without it (CPU, eager)."""
    import torch

    import safeopt
    from safeopt_bench._timing import interleaved

    xp = safeopt.namespace_by_name("torch")
    norms = torch.rand(n_tensors)
    candidates = {}
    for name, policy, loss in [
        ("decide, monitor off", safeopt.Policy(monitor_every=0), None),
        ("decide, monitor on", safeopt.Policy(), None),
        ("decide, monitor on + loss", safeopt.Policy(), torch.tensor(1.0)),
    ]:
        state = [safeopt.init_state(xp, policy, n_tensors=n_tensors)]
        stats = safeopt.GradStats(norm=torch.tensor(1.0), loss=loss, tensor_norms=norms)

        def call(policy: Any = policy, stats: Any = stats, state: list = state) -> None:
            _, state[0] = safeopt.decide(xp, policy, state[0], stats)

        candidates[name] = call
    times = interleaved(candidates, warmup=10, rounds=rounds)
    return [{"candidate": k, "median_us": v * 1e6} for k, v in times.items()]
