"""The training loop: any grouping method × any backbone × any dataset. The run folder (lock, resume
checks, checkpoints, migrations) is fastdmtg.run_folder's; history.json, results.json and what the
end of a run writes, fastdmtg.results_writer's.

One step (DMTG):  z = method.weights()                # (N, K) Gumbel-softmax sample
                  outputs = model(images)              # all K·N heads
                  total, L = taskset.head_losses(outputs, batch, z)   # Σ z·L, L (N, K)
                  total.backward(); optimizer.step()

Reliability: the run folder holds config.json (the resolved config), checkpoints/last.pt (written
atomically at every epoch end and on interruption; its predecessor kept as last.prev.pt),
checkpoints/best.pt (best validation loss), history.json, results.json (written last: the mark of a
finished run). One process writes a folder at a time (RUN/.lock, held by rank 0). ``train(cfg,
run_dir, resume=True)`` continues exactly where last.pt stopped — optimizer, scheduler, Gumbel seed,
data order and position within the epoch; last.pt stores the config, and a resume may change only
the fields of ``config.RESUME_SAFE`` (applied, written to config.json, recorded in history.json).
Before every checkpoint write the parameters are checked finite; a non-finite training or
validation loss or parameter stops the run (NonFiniteLoss) without overwriting the last good
checkpoint. Divergence (an epoch's training loss > train.divergence_factor × the first step's loss)
is flagged in results.json and stops the run (Diverged) unless train.on_divergence=warn.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import ops
from .builder import build_training_step, resolve_device
from . import fingerprint
from . import results_writer
from .config import Config, check_init
from .log import bars_on, get_logger
from .pipelines import build_source
from .methods import AffinityMeasured, HeadsPruned, RunTotals, StepContext
from .metrics import summarize
from .models import BranchedNet, GroupedNet
from .results_writer import divergence_text
from .run_folder import EPOCH_BASE, RunFolder, keep_previous_results, migrate_state, read_history

log = get_logger("fastdmtg.train")


class RunStopped(RuntimeError):
    """A run stopped before its end for a reason the message states (with what the folder holds)."""
    exit_code = 1


class NonFiniteLoss(RunStopped):
    """A training/validation loss or a parameter became NaN/inf; no checkpoint holds it."""
    exit_code = 3


class Diverged(RunStopped):
    """The divergence rule fired under train.on_divergence=error; results.json says "diverged": true.
    ``results``: the results dict written (empty on ranks other than 0)."""
    exit_code = 4

    def __init__(self, msg: str, results: dict | None = None):
        super().__init__(msg)
        self.results = results or {}

    def __reduce__(self):      # picklable with its results (shared across DDP ranks)
        return (type(self), (str(self), self.results))


class WriteStopped(RunStopped):
    """Writing the run folder failed (disk full, I/O error); the message says what was kept."""
    exit_code = 5


class TrainingInterrupted(RunStopped):
    """Raised after an interruption was handled: last.pt holds the state to resume from."""
    exit_code = 130


def exit_code(e: BaseException) -> int:
    """The command-line exit status for a run that stopped with ``e`` (`fastdmtg train`/`compare`):
    130 interrupted (resumable, as for SIGINT), 3 non-finite loss or parameters, 4 diverged
    (results.json written and flagged), 5 a write failed (disk full)."""
    return getattr(e, "exit_code", 1)


def eval_autocast(cfg: Config, device: torch.device):
    """Evaluation precision: fp32 (the precision policy), except under plain train.amp=bf16."""
    if cfg.train.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_scheduler(cfg: Config, opt):
    o = cfg.optim
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_epochs, gamma=o.gamma)
    if o.schedule == "plateau":
        # stepped once per epoch on the training loss (optim.plateau_on=train, the release) or after
        # each validation on the validation loss (val, the paper): plateau_step
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=o.gamma, patience=o.plateau_patience, threshold=o.plateau_threshold,
            threshold_mode="rel", min_lr=o.min_lr)
    return None


def validation_due(cfg: Config, epoch: int) -> bool:
    """Validate after (0-based) ``epoch``: every train.val_every epochs, after the first epoch when
    train.val_first_epoch (the release), and after the last."""
    t = cfg.train
    return (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs or (t.val_first_epoch and epoch == 0)


def best_criterion(cfg: Config, val: dict) -> float:
    """The validation number best.pt is chosen on: the total validation loss under either rule, for every
    dataset. The release ranks on the loss for classification too: its accuracy accumulator exists only
    with ``run.is_classify``, which no training config sets (``train.py:163, 298``), so
    ``val_losses.pop("error", val_losses.pop("total"))`` returns the total loss."""
    return float(val["total_loss"])


def best_rule_text(cfg: Config) -> str:
    """What best.pt is chosen on, in words (``fastdmtg train --dry-run``)."""
    if cfg.train.best_rule == "reference":
        return ("best.pt: lowest validation total loss among the validations where the training loss also "
                "improved (both compared with their values at the last save; train.best_rule=reference, as the "
                "release)")
    return "best.pt: lowest validation total loss (train.best_rule=val_loss)"


def improves_best(rule: str, val: float, train_loss: float, best_val: float, best_train: float) -> bool:
    """train.best_rule: val_loss → val < best_val; reference → val < best_val AND train_loss <
    best_train, where both bests are the values at the last save (they are updated together, only when
    a checkpoint is written — the release's train.py:304-307)."""
    if rule == "reference":
        return val < best_val and train_loss < best_train
    return val < best_val


def plateau_step(scheduler, cfg: Config, train_loss: float, val_loss: float | None) -> None:
    """One end-of-epoch scheduler step: ReduceLROnPlateau on the training loss every epoch
    (optim.plateau_on=train) or on the validation loss after a validation (val: epochs without one
    leave it alone); other schedules step every epoch."""
    if scheduler is None:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step()
    elif cfg.optim.plateau_on == "train":
        scheduler.step(train_loss)
    elif val_loss is not None:
        scheduler.step(val_loss)


@torch.no_grad()
def evaluate(model, taskset, data, split: str, batch_size: int, device, assignment=None, amp=None,
             progress: bool = False) -> dict:
    """Evaluate one-head-per-task predictions on a split.

    ``model`` is a BranchedNet (then ``assignment`` (N,) picks each task's head: the argmax
    model) or a GroupedNet (predicts one head per task itself)."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    meter = taskset.meter()
    amp = amp or contextlib.nullcontext()
    nb = data.num_batches(split, batch_size)
    assign = [int(a) for a in assignment] if assignment is not None else None
    for batch in tqdm(data.batches(split, batch_size, shuffle=False, device=device), total=nb,
                      desc=f"eval {split}", leave=False, disable=not progress):
        with amp:
            if isinstance(model, BranchedNet):
                out = model.predict(batch["image"], assign)                 # only the argmax heads
            else:
                out = model(batch["image"])
        meter.update(out, batch)
    model.train(was_training)
    return summarize(meter.compute(), taskset.unified_error)


def _rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


class Trainer:
    """One run: the start-up (run folder, devices, data, the step, state), the training loop, the
    validations and checkpoints, the decisions of the grouping method applied; the run folder is
    fastdmtg.run_folder's, the results fastdmtg.results_writer's."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool | None = None,
                 dataset=None, accept_data_change: bool = False):
        # dataset: an opened fastdmtg.data.Dataset to train on instead of opening cfg.data (fastdmtg.api)
        self._dataset = dataset
        # a resume on data that differs from the run's recorded fingerprint goes on (recorded) instead of stopping
        self.accept_data_change = accept_data_change
        self.folder: RunFolder | None = None
        self.finished_results, self.divergence = None, None
        try:
            self._setup(cfg, run_dir, resume, progress)
        except BaseException as e:
            if self.folder is not None:
                self.folder.log_startup_failure(e)
            self.close()                  # release the run folder (also on Ctrl-C during start-up)
            raise

    def close(self) -> None:
        """Close the trackers and release the run folder (lock, train.log); fit() does it when it
        returns or raises."""
        if getattr(self, "writer", None) is not None:
            # called from fit()'s `finally`: sys.exc_info() is the error that ended the run, if any
            # (the trackers mark their run finished, killed (interrupted) or failed)
            import sys
            self.writer.close(sys.exc_info()[1])
            self.writer = None
        if self.folder is not None:
            self.folder.close()

    def _setup(self, cfg: Config, run_dir: str | Path, resume: bool, progress: bool | None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        ddp_device = self._start_process(cfg, resume)
        self.folder = RunFolder(self.run_dir, self.is_main)
        self.ckpt_dir = self.folder.ckpt_dir
        resume_state, config_changes = self.folder.claim(cfg, resume)
        self.folder.open_log()
        self.finished_results = self.folder.finished_results(resume_state, config_changes, cfg.train.epochs)
        if self.finished_results is not None:
            # a finished run resumed without changes: nothing to do, results.json stays as it is
            self.divergence = dist_utils.broadcast_from_main(self.finished_results.get("divergence"))
            return
        self._build_components(cfg, resume, progress, ddp_device)
        self._start_state()
        if resume:
            self._load(resume_state)
            self._apply_head_mask()
            self._apply_resume_changes(config_changes + self.folder.data_changes(
                resume_state, self.data_fingerprint, self.accept_data_change))
        elif self.is_main:
            cfg.save(self.run_dir / "config.json")
        self._open_trackers(cfg, resume)
        if resume and self.is_main:
            # a finished run trained on: its results are not overwritten. Last of the start-up, so that a
            # continuation refused on the way (changed data or config, a tracker) leaves them in place
            keep_previous_results(self.run_dir)

    def _start_process(self, cfg: Config, resume: bool):
        """The checks that need nothing opened, then the process group (DDP) → its device or None."""
        if cfg.train.cuda_graph == "on" and dist_utils.launched_by_torchrun():
            # whole-step capture with NCCL collectives (fastdmtg/step.py): set before the process group starts
            import os
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        if not resume:
            check_init(cfg)                   # train.init=naive without a naive-MTL model: a clear error
        from .trackers import check_installed
        check_installed(cfg)                  # --logger mlflow without mlflow: say what to install, now
        ddp_device = dist_utils.setup(cfg.train.device)
        self.rank, self.world_size = dist_utils.world()
        self.is_main = self.rank == 0
        return ddp_device

    def _build_components(self, cfg: Config, resume: bool, progress: bool | None, ddp_device) -> None:
        # bars: --progress/--no-progress when given, else train.progress on a terminal only
        self.progress = bars_on(progress, cfg.train.progress) and self.is_main
        self.device = ddp_device if ddp_device is not None else resolve_device(cfg.train.device)
        self.prune_rank_checks = 0      # drop steps whose mask was compared across DDP ranks
        ops.resolve_backend(cfg.train.kernels, self.device)   # fails here, not mid-step, if triton is missing
        torch.manual_seed(cfg.train.seed)
        # the components: data, then the step (model, method, optimizer, runner: fastdmtg.builder),
        # the scheduler, the evaluation precision
        # every split decoded (or its cache checked) before the first step: a bad val/test file stops
        # the run now, naming itself, not after epochs of training
        self.data = build_source(cfg.data, progress=self.progress, validate=cfg.data.validate, device=self.device,
                                 dataset=self._dataset)
        self.taskset = self.data.taskset
        self.data_fingerprint = fingerprint.data_fingerprint(self.data)   # recorded in last.pt and results.json
        step = build_training_step(cfg, self.taskset, self.data.image_size, self.device, world_size=self.world_size,
                                   rank=self.rank, init_from=None if resume else cfg.train.init_from)
        self.model, self.method, self.optimizer, self.runner = step.model, step.method, step.optimizer, step.runner
        self.speed, self.pruning = step.speed, step.prunes_heads    # pruning: the head mask may change
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.amp = eval_autocast(cfg, self.device)        # evaluation precision (fp32 unless amp=bf16)
        self.global_batch = cfg.train.batch_size * self.world_size
        if self.is_main and self.world_size > 1:
            log.info(f"DDP: {self.world_size} ranks × batch {cfg.train.batch_size} = global batch "
                     f"{self.global_batch}")

    def _start_state(self) -> None:
        """The counters and records of a run at its first step (a resume then loads its own)."""
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_val, self.best_epoch = math.inf, -1
        self.best_train = math.inf            # train.best_rule=reference: the training loss at the last save
        self.history: list[dict] = []
        self.epoch_loss_sum, self.epoch_samples = 0.0, 0
        self.epoch_task_sum = None            # (N, K) float64: Σ batch size × head loss (per-task train loss)
        self.train_time = 0.0
        self._stop_signal = None
        self.initial_loss: float | None = None      # the first step's loss: the divergence rule's yardstick
        self.divergence: dict | None = None          # set once the rule fired
        self.config_changes: list[dict] = []         # resume changes not yet in a history.json record

    def _open_trackers(self, cfg: Config, resume: bool) -> None:
        # the trackers (TensorBoard, MLflow, W&B: fastdmtg/trackers), behind SummaryWriter's API; rank 0 only.
        # A tracker that cannot start stops every rank here, before the first step
        self.writer, err = None, None
        if self.is_main:
            from .trackers import open_trackers
            try:
                self.writer = open_trackers(cfg, self.run_dir, resume)
            except (ValueError, OSError) as e:      # TrackerError (a ConfigError), a bad RUN/trackers.json
                err = e
        err = dist_utils.broadcast_from_main(err)
        if err is not None:
            raise err

    # ------------------------------------------------------------------ run folder
    def _apply_resume_changes(self, changes: list) -> None:
        """Record the resume-safe changes (history.json gets them in the record of the epoch they take
        effect in; last.pt carries them until then) and write the config in force to config.json."""
        at = {"epoch": self.epoch + 1, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}
        self.config_changes += self.folder.record_changes(self.cfg, changes, at)

    def _nonfinite_state(self) -> str | None:
        """The first parameter or buffer of the model or the method that holds a NaN/inf, or None."""
        named = ([(f"parameter {n}", t) for n, t in self.model.named_parameters()] +
                 [(f"buffer {n}", t) for n, t in self.model.named_buffers()] +
                 [(f"grouping parameter {n}", t) for n, t in self.method.named_parameters()])
        named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
        if not named:
            return None
        ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])   # one sync for all
        if bool(ok.all()):
            return None
        return next(n for (n, _), good in zip(named, ok.tolist()) if not good)

    def _check_state_finite(self, what: str) -> None:
        """Stop (NonFiniteLoss, on every rank) instead of writing ``what`` with NaN/inf weights."""
        bad = self._nonfinite_state()
        if not dist_utils.all_finite(0.0 if bad is None else math.nan, self.device):
            raise NonFiniteLoss(f"non-finite {bad or 'parameter on another rank'} after step {self.global_step} "
                                f"(lr {self.current_lr():.3g}); {what} was not written; {self._kept()}")

    def _kept(self) -> str:
        """What the run folder holds to go back to, for the messages of a stopped run."""
        return self.folder.kept(getattr(self, "best_epoch", -1))

    def _save_best(self, state: dict) -> BaseException | None:
        """Write best.pt (rank 0) unless the weights are not finite → the error to raise on every rank."""
        bad = self._nonfinite_state()
        if bad is not None:
            return NonFiniteLoss(f"non-finite {bad} after step {self.global_step} (lr {self.current_lr():.3g}); "
                                 f"best.pt was not written; {self._kept()}")
        return self.folder.write_best(state)

    def _check_divergence(self, train_loss: float) -> None:
        """The divergence rule: this epoch's mean training loss > train.divergence_factor × the loss of
        the run's first step. Rank 0 decides, every rank follows. Fires once per run."""
        hit = None
        t = self.cfg.train
        if self.is_main and self.divergence is None and self.initial_loss is not None \
                and train_loss > t.divergence_factor * self.initial_loss:
            hit = {"epoch": self.epoch + 1, "train_loss": train_loss, "initial_loss": self.initial_loss,
                   "factor": t.divergence_factor}
        hit = dist_utils.broadcast_from_main(hit)
        if hit is not None:
            self.divergence = hit
            if self.is_main:
                then = ("the run stops after this epoch's validation (train.on_divergence=error)"
                        if t.on_divergence == "error" else "training goes on (train.on_divergence=warn)")
                log.warning(f"training diverged: {divergence_text(hit)}; {then}")

    def _stopping_for_divergence(self) -> bool:
        return self.divergence is not None and self.cfg.train.on_divergence == "error"

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(), "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_val": self.best_val, "best_epoch": self.best_epoch, "best_train": self.best_train,
            "epoch_loss_sum": self.epoch_loss_sum, "epoch_samples": self.epoch_samples,
            "epoch_task_sum": None if self.epoch_task_sum is None else self.epoch_task_sum.tolist(),
            "train_time": self.train_time, "rng": _rng_state(self.device),
            "config": self.cfg.to_dict(), "initial_loss": self.initial_loss, "divergence": self.divergence,
            "config_changes": self.config_changes, "epoch_base": EPOCH_BASE,
            "data_fingerprint": self.data_fingerprint,
        }

    def _load(self, st: dict) -> None:
        try:
            self.model.load_state_dict(st["model"])
            self.method.load_state_dict(st["method"])
            self.optimizer.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:      # a checkpoint of another model
            raise ckpt.RunFileError(f"{st['_path']}: does not fit the model of {self.run_dir / 'config.json'} "
                                    f"({ckpt._reason(e).split('. ')[0]})") from None
        capturable = self.speed["cuda_graph"]
        for g in self.optimizer.param_groups:   # a run may resume with CUDA graphs switched on or off
            if capturable and not torch.is_tensor(g["lr"]):
                g["lr"] = torch.tensor(float(g["lr"]), device=self.device)
            elif not capturable and torch.is_tensor(g["lr"]):
                g["lr"] = float(g["lr"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(st["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
        self.best_val, self.best_epoch = st["best_val"], st["best_epoch"]
        self.best_train = st["best_train"]
        self.epoch_loss_sum, self.epoch_samples = st["epoch_loss_sum"], st["epoch_samples"]
        ets = st.get("epoch_task_sum")           # absent in checkpoints of older versions
        self.epoch_task_sum = None if ets is None else torch.tensor(ets, dtype=torch.float64)
        self.train_time = st["train_time"]
        _set_rng_state(st["rng"], self.device)
        self.initial_loss = st.get("initial_loss")
        self.divergence, self.config_changes = migrate_state(st)
        self.folder.saved_last = (Path(st["_path"]), self.epoch, self.step_in_epoch, self.global_step)
        self.history = read_history(self.run_dir, self.epoch)

    # ------------------------------------------------------------------ head pruning
    def _apply_head_mask(self) -> None:
        if self.pruning:
            # the batched form may permute parameter blocks in place: the optimizer's state moves with them
            self.model.set_active(self.method.head_mask(), optimizer=self.optimizer)

    def _apply(self, decisions: list) -> None:
        """Apply the method's decisions of this step to the model, optimizer and runner."""
        for d in decisions:
            if isinstance(d, HeadsPruned):
                self._heads_pruned(d)
            elif isinstance(d, AffinityMeasured):
                self._affinity_measured(d)
            else:
                raise TypeError(f"grouping method {self.cfg.grouping.method}: unknown decision {d!r}")

    def _affinity_measured(self, d: AffinityMeasured) -> None:
        """TAG measured the inter-task affinity after step ``d.step``: a debug line, and per task its
        mean affinity onto the others in TensorBoard (tag/affinity_onto/TASK; the running mean of the
        full matrix goes to results.json)."""
        if not self.is_main:
            return
        n = d.affinity.shape[0]
        off = (d.affinity.sum(1) - d.affinity.diagonal()) / max(n - 1, 1)        # (N,) onto the others
        log.debug(f"TAG affinity measured after step {d.step} (measurement {d.measurements}); mean onto "
                  f"the others: " + ", ".join(f"{t} {float(v):+.3g}" for t, v in zip(self.taskset.names, off)))
        if self.writer is not None:
            for t, v in zip(self.taskset.names, off):
                self.writer.add_scalar(f"tag/affinity_onto/{t}", float(v), d.step)

    def _heads_pruned(self, d: HeadsPruned) -> None:
        """Heads were dropped after an optimizer step: compute only the remaining heads (``d.mask``)
        from the next step on and re-capture the CUDA graph."""
        events = list(d.events)
        if self.world_size > 1:
            # the rule reads only all-reduced state (S, τ), so every rank must have dropped the same
            # heads at this step; checked at each drop (rare), since a mismatch would make the
            # ranks train different networks silently
            bad = dist_utils.ranks_differing(d.mask)
            if bad:
                raise RuntimeError(f"head pruning diverged across DDP ranks at step {events[0]['step']}: "
                                   f"ranks {bad} hold another active-head mask than rank 0")
            self.prune_rank_checks += 1
        # the batched form may permute parameter blocks in place: the optimizer's state moves with them
        self.model.set_active(d.mask, optimizer=self.optimizer)
        self.runner.invalidate()
        names = self.taskset.names
        for e in events:
            e = dict(e, task_name=names[e["task"]])
            if self.is_main:
                log.info(f"pruning: step {e['step']}: dropped head (task {e['task_name']}, branch "
                         f"{e['branch'] + 1} of {self.method.num_branches}), "
                         f"p={e['probability']:.3g} {d.rule}")
        mask = d.mask
        if self.is_main:
            dead = [k + 1 for k in range(mask.shape[1]) if not bool(mask[:, k].any())]
            if dead:
                log.info(f"pruning: branches no longer computed (numbered 1..K): {dead}")

    def save_last(self) -> None:
        self._check_state_finite(str(self.ckpt_dir / ckpt.LAST))
        self.folder.write_last(self._state, (self.epoch, self.step_in_epoch, self.global_step))

    # ------------------------------------------------------------------ loop
    def current_lr(self) -> float:
        # a float, also when the LR is a device tensor (capturable optimizer under CUDA graphs)
        return float(self.optimizer.param_groups[0]["lr"])

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train_epoch(self, stop_after_steps: int | None = None) -> None:
        from tqdm import tqdm
        cfg, data = self.cfg, self.data
        bs = cfg.train.batch_size
        nb = data.num_batches("train", bs, train=True)
        self.method.on_epoch_start(self.epoch)
        self.model.train()
        running = torch.zeros((), device=self.device)        # device-side sum: no sync per step
        running_L = None                                      # (N, K) Σ b·L, device-side
        running_n = 0
        bar = tqdm(total=nb, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                   unit="step", disable=not self.progress, dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        for batch in data.batches("train", bs, shuffle=True, seed=cfg.train.seed, epoch=self.epoch,
                                  device=self.device, skip=self.step_in_epoch, train=True):
            total, L = self.runner(batch)                                     # fwd + bwd + optimizer step
            if self.initial_loss is None:
                self.initial_loss = float(total.detach())                     # one sync, once per run
            decisions = self.method.observe_step(StepContext(self.global_step, self.epoch, batch, self.model,
                                                             self.optimizer, self.taskset))
            if decisions:
                self._apply(decisions)
            b = batch["image"].shape[0]
            running += total.detach().float() * b
            running_L = L.detach().float() * b if running_L is None else running_L + L.detach().float() * b
            running_n += b
            self.step_in_epoch += 1
            self.global_step += 1
            seen += b
            bar.update(1)
            last_step = self.step_in_epoch == nb
            if self.global_step % cfg.train.log_every == 0 or last_step or self._stop_signal is not None \
                    or (stop_after_steps is not None and self.global_step >= stop_after_steps):
                value = float(running)                                         # one sync per log interval
                if not dist_utils.all_finite(value, self.device):
                    bar.close()
                    raise NonFiniteLoss(
                        f"non-finite training loss at epoch {self.epoch + 1}, step {self.global_step} "
                        f"(lr {self.current_lr():.3g}); the run stopped; {self._kept()}")
                self.epoch_loss_sum += value
                self.epoch_samples += running_n
                if running_L is not None:
                    part = running_L.double().cpu()
                    self.epoch_task_sum = part if self.epoch_task_sum is None else self.epoch_task_sum + part
                    running_L = None
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{value / max(running_n, 1):.4f}", img_s=f"{seen / max(dt, 1e-9):.0f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", value / max(running_n, 1), self.global_step)
                    self.writer.add_scalar("train/lr", self.current_lr(), self.global_step)
                    for k, v in self.method.log_scalars().items():
                        self.writer.add_scalar(k, v, self.global_step)
                running.zero_()
                running_n = 0
            if self._stop_signal is not None or (stop_after_steps is not None and self.global_step >= stop_after_steps):
                self.train_time += time.perf_counter() - t0
                bar.close()
                if not last_step:
                    self.save_last()
                    raise TrainingInterrupted(
                        f"interrupted at epoch {self.epoch + 1}, step {self.global_step}; state saved to "
                        f"{self.ckpt_dir / 'last.pt'} — continue with: fastdmtg train --resume {self.run_dir}")
                t0 = time.perf_counter()  # the epoch is complete: finish it normally, then stop
        bar.close()
        self.train_time += time.perf_counter() - t0

    def end_epoch(self) -> dict:
        cfg = self.cfg
        # the mean over all ranks' samples (each rank summed its own): every rank's scheduler sees the same
        train_loss = dist_utils.global_mean(self.epoch_loss_sum, self.epoch_samples, self.device)
        self._check_divergence(train_loss)
        rec = self._epoch_record(train_loss)
        stop = None                               # rank 0's reason to stop, raised on every rank below
        due = validation_due(cfg, self.epoch) or self._stopping_for_divergence()
        val_loss = None
        if self.is_main and due:
            stop, val_loss = self._validate(rec, train_loss)
        stop = dist_utils.broadcast_from_main(stop)
        if stop is not None:
            raise stop
        if due and self.world_size > 1:
            val_loss = dist_utils.broadcast_float(val_loss, self.device)   # rank 0 validated; all step alike
        plateau_step(self.scheduler, cfg, train_loss, val_loss)
        self.history.append(rec)
        if self.writer is not None:
            from .tboard import log_epoch
            log_epoch(self.writer, rec, self.taskset.names, self.global_step)   # per-task val, probabilities
            self.writer.flush()                   # each epoch's records reach every tracker's store
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_samples = 0, 0.0, 0
        self.epoch_task_sum = None
        if self.is_main:
            results_writer.write_history(self.run_dir, self.history)
        self.save_last()
        return rec

    def _epoch_record(self, train_loss: float) -> dict:
        """history.json's record of the epoch that just ended (its validation added by _validate)."""
        rec = {"epoch": self.epoch + 1, "train_loss": train_loss, "lr": self.current_lr(),
               "global_step": self.global_step, "train_time_s": self.train_time}
        rec.update({k.split("/")[-1]: v for k, v in self.method.log_scalars().items()})
        if self.epoch_task_sum is not None and self.epoch_samples:
            # each task's training loss at its assigned head (rank 0's shard under DDP)
            a = self.method.assignment().cpu().tolist()
            rec["train_task_loss"] = {t: float(self.epoch_task_sum[i, a[i]]) / self.epoch_samples
                                      for i, t in enumerate(self.taskset.names)}
        probs = self.method.probabilities()
        if probs is not None:
            rec["probabilities"] = probs.cpu().tolist()
        rec["assignment"] = self.method.assignment().cpu().tolist()
        if self.config_changes:                   # resume-safe changes that took effect in this epoch
            rec["config_changes"], self.config_changes = self.config_changes, []
        # the method's entries for the epoch's steps (DMTG: the heads dropped, from its saved state)
        rec.update(self.method.epoch_record(self.history[-1]["global_step"] if self.history else 0, self.global_step))
        return rec

    def _validate(self, rec: dict, train_loss: float) -> tuple[BaseException | None, float]:
        """Rank 0: validate, record it in ``rec`` and the trackers, write best.pt when the rule says
        so → (the reason to stop every rank, or None; the validation loss)."""
        cfg, stop = self.cfg, None
        val = evaluate(self.model, self.taskset, self.data, "val", cfg.train.eval_batch_size, self.device,
                       self.method.assignment(), self.amp, self.progress)
        rec["val"] = val
        val_loss = val["total_loss"]
        if self.writer is not None:
            self.writer.add_scalar("val/total_loss", val["total_loss"], self.global_step)
            if "total_error" in val:
                self.writer.add_scalar("val/total_error", val["total_error"], self.global_step)
        if not math.isfinite(val["total_loss"]):
            stop = NonFiniteLoss(f"non-finite validation loss ({val['total_loss']}) at epoch {self.epoch + 1}; "
                                 f"the run stopped; {self._kept()}")
        else:
            crit = best_criterion(cfg, val)
            if improves_best(cfg.train.best_rule, crit, train_loss, self.best_val, self.best_train):
                stop = self._save_best({"model": self.model.state_dict(), "method": self.method.state_dict(),
                                        "epoch": self.epoch, "val_total_loss": val["total_loss"],
                                        "best_rule": cfg.train.best_rule, "criterion": crit,
                                        "train_loss": train_loss})
                if stop is None:      # only once written: a failed write's message names what best.pt holds
                    self.best_val, self.best_train, self.best_epoch = crit, train_loss, self.epoch
        return stop, val_loss

    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Train to the end (continuing a resumed run) and evaluate; returns the results, also in
        RUN/results.json. Releases the run folder however it ends."""
        try:
            if self.finished_results is not None:
                res = self.finished_results
                if self.is_main:
                    log.info(f"{self.run_dir}: the run finished earlier; nothing to resume (results.json unchanged)")
            else:
                res = self._fit(stop_after_steps)
        except ckpt.WriteFailed as e:
            raise WriteStopped(f"{e}; the run stopped; {self._kept()}; free space, then continue with: "
                               f"fastdmtg train --resume {self.run_dir}") from None
        finally:
            self.close()
        if self._stopping_for_divergence():
            raise Diverged(f"training diverged: {divergence_text(self.divergence)}; the run stopped after "
                           f"epoch {self.divergence['epoch']} and was evaluated; results.json says "
                           '"diverged": true (--set train.on_divergence=warn to only warn)', res)
        return res

    def _fit(self, stop_after_steps: int | None = None) -> dict:
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not in the main thread: no signal handling
                pass
        try:
            while self.epoch < self.cfg.train.epochs and not self._stopping_for_divergence():
                self.train_epoch(stop_after_steps)
                rec = self.end_epoch()
                if self.is_main:
                    results_writer.print_epoch(rec, self.cfg.train.epochs, self.taskset.names)
                if self._stop_signal is not None or (stop_after_steps is not None
                                                     and self.global_step >= stop_after_steps
                                                     and self.epoch < self.cfg.train.epochs
                                                     and not self._stopping_for_divergence()):
                    raise TrainingInterrupted(
                        f"interrupted after epoch {self.epoch}; continue with: fastdmtg train --resume {self.run_dir}")
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            if self.writer is not None:
                self.writer.flush()
        return self.finish()

    # ------------------------------------------------------------------ end of run
    def finish(self) -> dict:
        cfg = self.cfg
        if not self.is_main:
            dist_utils.barrier()
            return {}
        # the method's results over the whole run (DMTG: the pruning schedule), before best.pt is loaded
        extra = self.method.extra_results(RunTotals(self.global_step, self.prune_rank_checks))
        best = ckpt.load_checkpoint(self.ckpt_dir / "best.pt", map_location=self.device)
        self.model.load_state_dict(best["model"])
        self.method.load_state_dict(best["method"])
        # the kept epoch's heads: best.pt may predate later drops (the best epoch on the validation loss
        # can come before the pruning finished), and its assignment may use a head dropped since
        self._apply_head_mask()
        assignment = self.method.assignment().cpu().tolist()
        names = self.taskset.names
        test = evaluate(self.model, self.taskset, self.data, "test", cfg.train.eval_batch_size, self.device,
                        self.method.assignment(), self.amp, self.progress)
        grouped = GroupedNet.from_multibranch(self.model.to_multibranch(), assignment)
        from .export import save_grouped
        save_grouped(self.run_dir, grouped, cfg, names, self.data.image_size)
        res = results_writer.run_results(self, test, assignment, extra)
        res = results_writer.write_results(self, res)
        dist_utils.barrier()
        return res


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool | None = None,
          stop_after_steps: int | None = None, *, dataset=None, accept_data_change: bool = False) -> dict:
    """Train (or resume) a run; returns the results dict also written to RUN_DIR/results.json.
    ``accept_data_change``: resume on data that differs from the run's (recorded; fastdmtg.fingerprint)."""
    return Trainer(cfg, run_dir, resume=resume, progress=progress, dataset=dataset,
                   accept_data_change=accept_data_change).fit(stop_after_steps)
