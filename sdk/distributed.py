"""Expert parallelism (EP) over torch.distributed: each rank holds a slice of every layer's routed experts.

    flashport generate BUNDLE --prompt "Hello" --ep 2 [--pg-backend gloo]    # starts torchrun itself
    flashport serve BUNDLE --port 8000 --ep 8 --pg-backend nccl
    torchrun --nproc-per-node 2 -m flashport.cli generate BUNDLE --prompt "Hello" --ep 2   # the same, by hand

Every rank runs the same command; `flashport.load_engine(..., parallel=ParallelOptions(ep=N))` loads the rank's
part (`rank_plan`) and wires it (`EPRunner`); `flashport.engine.drive` runs the command on rank 0 while the
other ranks follow.

Layout. Rank r maps `common/` (attention, shared experts, router, embeddings: replicated on every rank) and only
its own expert partition of the bundle (the r-th accelerator of the bundle's ep-mode placement, e.g. `npu1/`);
every other routed expert is a placeholder without bytes. A bundle exported for one device, or a checkpoint
directory, is split into contiguous blocks of experts per rank instead. Replicated hot experts (the planner's
EPLB replicas, stored in several partitions) are used: the rows routed to an expert held by n ranks go to those
ranks in turn, so a hot expert's tokens are split n ways.

Execution. Rank 0 is the driver: it runs the Engine (generate, or the OpenAI server with its scheduler), i.e.
attention, routers and the shared expert for every sequence. At every MoE layer it dispatches each token row to
the ranks holding the row's routed experts and combines the partial outputs back:
  1. header: all_gather of [layer id, rows for rank 0..R-1] from every rank (followers send no rows), so each
     rank knows the layer and how many rows it receives;
  2. dispatch: all_to_all_single of the rows, each row with its k expert ids (-1: not for this rank) and weights;
  3. each rank runs its experts over what it received (`Ops.moe`, the backend's kernel), summing per row;
  4. combine: all_to_all_single of the per-row partial sums back; the driver adds them up.
The other ranks follow: they wait (control group, no deadline) for the driver to start a step (a forward pass),
then serve MoE layers until the driver ends the step. gloo supports all_gather and all_to_all_single on the CPU
(checked with torch 2.13); nccl and vendor backends (hccl...) support both on their devices. The header carries
per-rank row counts, so data-parallel attention (several drivers, each with its own sequences) fits the same
exchange; today rank 0 is the only driver.

Numerics. Each expert computes the same rows as in one process; only the order of the k partial sums per row
differs (per rank, then across ranks). Logits match the single-process run within 1e-4 relative
(max |diff| / max |logit|, measured ~1e-6 on flash-tiny); greedy tokens are identical (tested with 2 gloo ranks).

Failure. Every collective of a step runs on a data group with `timeout_s` (default 30 s). A rank that dies closes
its connections: the others fail that collective at once (gloo: "Connection reset by peer") or at the deadline
(a hung rank), and raise `EPError` naming the layer and the step instead of hanging. The group is then broken:
later requests fail with the same error until the job is restarted (torchrun --max-restarts does that).
For nccl, set TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (done here by default) so the timeout raises.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .bundle import KeepExpert, is_bundle, moe_prefix, read_manifest
from .config import ModelConfig
from .model import MoE, Transformer
from .offload import moe_layers

log = logging.getLogger("flashport.distributed")

END, IDLE = -1, -2           # header layer ids: the driver ended the step / a follower without rows
BEGIN, SHUTDOWN = 1, 0       # control messages


class EPError(RuntimeError):
    """An expert-parallel collective failed (a rank died, hung past the timeout, or the group is broken)."""


# ---------------------------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------------------------
class EPGroup:
    """The ranks of one EP job: a data group with a deadline for in-step collectives and a control group
    (no practical deadline) on which followers wait for the next step."""

    def __init__(self, backend: str = "gloo", timeout_s: float = 30.0, init_method: str | None = None,
                 rank: int | None = None, world_size: int | None = None, idle_timeout_s: float = 7 * 86400):
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kw = {}
        if rank is not None:
            kw = {"rank": rank, "world_size": world_size}
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method or "env://",
                                    timeout=datetime.timedelta(seconds=idle_timeout_s), **kw)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend, self.timeout_s = backend, timeout_s
        self.ctrl = dist.new_group(timeout=datetime.timedelta(seconds=idle_timeout_s))
        self.data = dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))
        self.device = torch.device("cpu") if backend == "gloo" else torch.device(
            f"{backend.replace('nccl', 'cuda').replace('hccl', 'npu')}:{int(os.environ.get('LOCAL_RANK', 0))}")
        self.broken: str | None = None
        self.step = 0

    def run(self, what: str, fn):
        """Run collective `fn`; any failure becomes an EPError naming `what` (and breaks the group)."""
        if self.broken:
            raise EPError(f"expert-parallel group is broken since {self.broken}; restart the job")
        try:
            return fn()
        except EPError:
            raise
        except Exception as e:  # gloo/nccl raise RuntimeError (DistBackendError) on a dead or hung peer
            self.broken = f"rank {self.rank}: {what} (step {self.step})"
            raise EPError(f"rank {self.rank}: expert-parallel {what} failed in step {self.step} within the "
                          f"{self.timeout_s:g} s timeout: a peer rank died or hung ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None

    def header(self, layer: int, counts: list[int], what: str) -> torch.Tensor:
        """all_gather of [layer, counts...] -> [R, 1 + R] int64."""
        mine = torch.tensor([layer, *counts], dtype=torch.int64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self.run(what, lambda: dist.all_gather(out, mine, group=self.data))
        return torch.stack(out).cpu()

    def all_to_all(self, send: torch.Tensor, in_splits: list[int], out_splits: list[int], what: str) -> torch.Tensor:
        recv = torch.empty(sum(out_splits), dtype=send.dtype, device=self.device)
        send = send.to(self.device).contiguous()
        self.run(what, lambda: dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.data))
        return recv.cpu() if self.device.type == "cpu" else recv

    def control(self, msg: int | None = None) -> int:
        """Driver: broadcast msg; follower (msg None): wait for it."""
        t = torch.tensor([msg if msg is not None else -1], dtype=torch.int64, device=self.device)
        self.run("control broadcast", lambda: dist.broadcast(t, 0, group=self.ctrl))
        return int(t.item())

    def close(self) -> None:
        """Leave the group. A healthy group first meets at a barrier, so no rank tears its connections down while
        a peer still uses them (a rank that exits under a peer's live collective threads can abort)."""
        if dist.is_initialized():
            if not self.broken:
                try:
                    dist.barrier(group=self.ctrl)
                except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
                    pass
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------------------
def contiguous_holders(n_experts: int, world: int) -> list[list[int]]:
    """Expert e on rank e * R // E (blocks of experts per rank, no replicas)."""
    return [[e * world // n_experts] for e in range(n_experts)]


def rank_holders(manifest: dict | None, prefixes: list[str], n_experts: int, world: int
                 ) -> tuple[dict[str, list[list[int]]], list[str | None]]:
    """-> (prefix -> per expert the ranks holding it, per rank its bundle partition or None). Uses the bundle's
    ep-mode placement when it has exactly `world` accelerators, else contiguous blocks."""
    pl = (manifest or {}).get("placement") or {}
    accels = [d for d in pl.get("devices", []) if d["kind"] == "accel"]
    if pl.get("mode") == "ep" and len(accels) == world:
        rank_of = {d["name"]: r for r, d in enumerate(accels)}
        holders = {p: [sorted(rank_of[d] for d in devs if d in rank_of) for devs in per]
                   for p, per in pl["placement"].items()}
        return holders, [d["partition"] for d in accels]
    if pl.get("mode") == "ep":
        log.warning("bundle placed for %d ranks, running %d: experts split in contiguous blocks", len(accels), world)
    return {p: contiguous_holders(n_experts, world) for p in prefixes}, [None] * world


# ---------------------------------------------------------------------------------------------------------------
# The distributed MoE
# ---------------------------------------------------------------------------------------------------------------
class ExpertParallelMoE:
    """Replaces `moe.forward` (instance attribute: module names and the state_dict stay the release's)."""

    def __init__(self, moe: MoE, layer_id: int, prefix: str, holders: list[list[int]], ep: EPGroup):
        self.moe, self.layer_id, self.prefix, self.ep = moe, layer_id, prefix, ep
        self.holders = holders
        R, E = ep.world, len(holders)
        if any(not h for h in holders):
            raise EPError(f"{prefix}: expert {next(e for e, h in enumerate(holders) if not h)} is held by no rank")
        self.first = torch.tensor([h[0] for h in holders])                  # [E] rank of the first copy
        self.replicated = {e: torch.tensor(h) for e, h in enumerate(holders) if len(h) > 1}
        self.rows_served = 0  # rows this rank computed (load balance figure)
        del R, E

    def route(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [T, k] -> destination rank of each (row, slot) [T, k]; a replicated expert's rows go to its
        holders in turn."""
        dest = self.first[idx]
        flat_idx, flat_dest = idx.flatten(), dest.view(-1)
        for e, hs in self.replicated.items():
            pos = (flat_idx == e).nonzero().squeeze(1)
            if len(pos):
                flat_dest[pos] = hs[torch.arange(len(pos)) % len(hs)]
        return dest

    def __call__(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The driver's MoE: x [T, D] -> [T, D] (routed experts over the ranks + the shared expert here)."""
        moe = self.moe
        weights, idx = moe.gate(x, token_ids)  # [T, k]
        shared = moe.ops.moe(x, torch.ones(len(x), 1), torch.zeros(len(x), 1, dtype=torch.long),
                             [moe.shared_experts], moe.limit)
        dest = self.route(idx)
        parts, rows_to = [], []
        for r in range(self.ep.world):
            mask = dest == r  # [T, k]
            rows = mask.any(1).nonzero().squeeze(1)
            m = mask[rows]
            parts.append(torch.cat([x[rows].float(), torch.where(m, idx[rows], -1).float(),
                                    torch.where(m, weights[rows], 0.0).float()], 1))  # [n_r, D + 2k]
            rows_to.append(rows)
        table = self.ep.header(self.layer_id, [len(r) for r in rows_to], f"{self.prefix} MoE header")
        back = self._exchange(table, torch.cat(parts), x.shape[1], idx.shape[1])
        out = torch.zeros_like(x).index_add_(0, torch.cat(rows_to), back.to(x.dtype))
        return out + shared

    def serve(self, table: torch.Tensor, D: int, k: int) -> None:
        """A follower's part of one MoE layer: no rows of its own, compute what it receives."""
        self._exchange(table, torch.zeros(0, D + 2 * k), D, k)

    def _exchange(self, table: torch.Tensor, send: torch.Tensor, D: int, k: int) -> torch.Tensor:
        me, W = self.ep.rank, D + 2 * k
        send_counts = table[me, 1:].tolist()
        recv_counts = table[:, 1 + me].tolist()
        recv = self.ep.all_to_all(send.flatten(), [c * W for c in send_counts], [c * W for c in recv_counts],
                                  f"{self.prefix} MoE dispatch").view(-1, W)
        xr, ids, wr = recv[:, :D], recv[:, D:D + k].long(), recv[:, D + k:]
        rows, slots = (ids >= 0).nonzero(as_tuple=True)
        out = torch.zeros(len(recv), D)
        if len(rows):  # every (row, expert) pair for this rank as its own row: Ops.moe groups them by expert
            pairs = self.moe.ops.moe(xr[rows], wr[rows, slots, None], ids[rows, slots, None], self.moe.experts,
                                     self.moe.limit)
            out.index_add_(0, rows, pairs.float())
        self.rows_served += len(recv)
        return self.ep.all_to_all(out.flatten(), [c * D for c in recv_counts], [c * D for c in send_counts],
                                  f"{self.prefix} MoE combine").view(-1, D)


class EPRunner:
    """Wires a rank's model into the EP protocol: the driver's steps, the followers' loop."""

    def __init__(self, model: Transformer, ep: EPGroup, holders: dict[str, list[list[int]]]):
        self.model, self.ep = model, ep
        self.moes: list[ExpertParallelMoE] = []
        for lid, (prefix, moe) in enumerate(moe_layers(model)):
            epm = ExpertParallelMoE(moe, lid, prefix, holders[prefix], ep)
            moe.forward = epm  # nn.Module.__call__ -> self.forward: our dispatch
            self.moes.append(epm)
        self.cfg = model.cfg
        self._in_step = False
        if ep.rank == 0:
            for name in ("forward_batch", "mtp_logits"):
                fn = getattr(model, name)
                setattr(model, name, self._stepped(fn))

    def _stepped(self, fn):
        def run(*args, **kwargs):
            with self.step():
                return fn(*args, **kwargs)
        return run

    @contextmanager
    def step(self):
        if self._in_step:  # nested (forward -> forward_batch): one step
            yield
            return
        ep = self.ep
        ep.step += 1
        ep.control(BEGIN)
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False
            if not ep.broken:
                ep.header(END, [0] * ep.world, "end of step")

    def follow(self) -> None:
        """A follower's life: serve MoE layers step after step until the driver shuts down (or fails)."""
        ep, D, k = self.ep, self.cfg.hidden_size, self.cfg.num_experts_per_tok
        while ep.control() != SHUTDOWN:
            ep.step += 1
            while True:
                table = ep.header(IDLE, [0] * ep.world, "MoE header")
                lid = int(table[0, 0])
                if lid == END:
                    break
                self.moes[lid].serve(table, D, k)

    def shutdown(self) -> None:
        if self.ep.rank == 0 and not self.ep.broken:
            try:
                self.ep.control(SHUTDOWN)
            except EPError:
                pass


# ---------------------------------------------------------------------------------------------------------------
# What a rank loads, and starting the ranks
# ---------------------------------------------------------------------------------------------------------------
def rank_plan(path: str | Path, ep: EPGroup) -> tuple[KeepExpert, dict[str, list[list[int]]], str | None]:
    """What rank `ep.rank` loads of the model at `path` -> (keep_expert for flashport.loader.open_model, holders:
    MoE prefix -> per expert the ranks holding it, the bundle partition to read replicated experts from).
    A bundle exported for expert parallelism follows its placement; anything else is split in contiguous
    blocks of experts per rank."""
    path = Path(path)
    if is_bundle(path):
        m = read_manifest(path)
        prefixes = sorted({p for n in m["tensors"] if (p := moe_prefix(n)) is not None})
        holders, parts = rank_holders(m, prefixes, m["config"]["n_routed_experts"], ep.world)
        partition = parts[ep.rank]
    else:
        cfg = ModelConfig.from_file(path / "config.json")
        prefixes = [f"layers.{i}" for i in range(cfg.num_hidden_layers)] + \
            [f"mtp.{j}" for j in range(cfg.num_nextn_predict_layers)]
        holders, partition = {p: contiguous_holders(cfg.n_routed_experts, ep.world) for p in prefixes}, None
    return (lambda prefix, e: ep.rank in holders[prefix][e]), holders, partition


def launch_torchrun(nproc: int, module: str, args: list[str], env: dict[str, str] | None = None) -> int:
    """Run `python -m MODULE ARGS` as `nproc` ranks under torchrun (one machine) and wait -> exit status.
    Secrets go in `env` (inherited by every rank), never in `args`: a command line is readable by every user of
    the machine (`ps`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    return subprocess.call(cmd, env={**os.environ, **(env or {})})
