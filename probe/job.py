"""The job `python -m probe.ablate` runs: load, discover, measure, sweep, the analyses, the report.

`probe.ablate` parses the command line and imports this module only once there is work to do,
so that `--help` and a one-line error come back at once. `run(config)` is the whole job for
notebooks; `format_summary` the terminal's answer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torch.utils.data import Subset
from tqdm.auto import tqdm

import probe
from analyses import registry
from analyses.pipeline import AnalysisOutputs, choose_sections, run_analyses
from probe import distributed
from probe.batches import Batch, batches, device_for, dispatched_device, input_dtype
from probe.discovery.find import find_blocks
from probe.commands.batch_size import BatchSizeChoice, choose_batch_size, memory_budget
from probe.commands.config import RunConfig, add_options
from probe.loading.datasets import DatasetInfo, make_loader
from probe.instrument.describe import describe_blocks, shortcut_kinds
from probe.errors import ProbeError
from probe.deletion.evaluation import evaluate_ablations, fast_path_note, sweep_table
from probe.deletion.store import OutcomeStore
from probe.files import prepare_out_dir, write_csv
from probe.commands.inputs import (Datasets, data_fingerprint, explained_channels, load_datasets, load_model,
                           load_task, named_parts)
from probe.instrument.measurement import measure
from probe.scoring.cost import COSTS
from probe.scoring.results import Evaluation, table_info
from probe.commands.model_identity import model_digest
from probe.commands.run_folder import RunDirectory, file_digest
from probe.deletion.block_table import join_block_table, unsupported_reason
from probe.scoring.tasks import Task
from probe.commands.threads import chosen
from probe.scoring.verdict import UNSUPPORTED, VerdictRule, cost_column, per_token, summarize
from reports import sections as build
from reports.sections.common import ReportContext
from reports.html import write_report


_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(config: RunConfig, device: torch.device):
    """The autocast context `--precision` asks for (a no-op for fp32)."""
    dtype = _AUTOCAST_DTYPES[config.precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type == "cpu":
        raise ProbeError("--precision fp16 needs --device cuda; on the CPU use bf16 or fp32.")
    return torch.autocast(device_type=device.type, dtype=dtype)


# The settings that change the measured and swept numbers (the pieces a run resumes from);
# the analyses after the sweep are rerun every time, so theirs need not match.
_RECORDED = ("model", "checkpoint", "weights", "dataset", "data_root", "split", "limit", "seed", "epochs", "mode",
             "device", "batch_size", "bn_recalibrate", "calibration_root", "precision", "channels_last", "save_every",
             "task", "seq_len", "inputs", "targets", "dtype", "device_map", "conf", "nms_iou")


def _run_record(config: RunConfig, source: str, blocks: list, datasets: Datasets, shortcuts: dict[str, str], *,
                device: torch.device, channels_last: bool, model: torch.nn.Module) -> dict:
    """What makes two runs the same: resuming into an out folder requires an equal record, and
    every piece is stamped with it (probe.commands.run_folder). The device and memory format are
    the ones used ("auto" resolved): they change the last bits. `model_sha256` is the loaded
    model's own digest (probe.commands.model_identity), however it was built: a checkpoint's
    hash alone misses an `hf:` folder or a factory saved over with other weights."""
    checkpoint = Path(source)
    recalibrated = config.bn_recalibrate and datasets.calibration is not None
    return {
        **{name: getattr(config, name) for name in _RECORDED}, "checkpoint": source,
        "device": str(device), "channels_last": channels_last,
        "checkpoint_sha256": file_digest(checkpoint) if checkpoint.is_file() else None,
        "model_sha256": model_digest(model),
        "data": _info(datasets.evaluation), "samples": datasets.selection,
        "data_sha256": data_fingerprint(datasets.evaluation),
        "calibration": datasets.calibration_source if recalibrated else None,
        "calibration_samples": config.calibration_samples if recalibrated else None,
        "calibration_sha256": data_fingerprint(datasets.calibration) if recalibrated else None,
        "blocks": [dataclasses.asdict(block) for block in blocks],
        "shortcuts": shortcuts,
        "versions": {"probe": probe.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
        "threads": threads_words(),  # not compared on a resume (probe.commands.run_folder.UNCOMPARED)
    }


def _info(dataset) -> dict | None:
    """The `DatasetInfo` of a loaded built-in data set as a dict, also through the Subsets a
    sample makes; None for the user's own data set (`--dataset package.module:function`)."""
    while not hasattr(dataset, "info"):
        if not hasattr(dataset, "dataset"):
            return None
        dataset = dataset.dataset
    info: DatasetInfo = dataset.info
    return dataclasses.asdict(info)


def _example(dataset, config: RunConfig, model, device: torch.device) -> Batch:
    """The data set's first sample as a batch of one on `device`: what discovery (for a model
    torch.fx cannot trace) and the shortcut kinds run on."""
    return next(iter(batches(_first(dataset, config, 1), device, dtype=input_dtype(model))))


def _earlier_batch_size(out: Path) -> int | None:
    """The size `--batch-size auto` chose for the run `out` holds, if one did."""
    try:
        record = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    size = record.get("batch_size") if isinstance(record, dict) and "batch_size_auto" in record else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _first(dataset, config: RunConfig, samples: int):
    """The data set's first `samples` samples, as a loader of one batch."""
    return named_parts(make_loader(Subset(dataset, range(samples)), batch_size=samples), config)


def _sized_batches(config: RunConfig, model, dataset, task: Task, device: torch.device, blocks: list,
                   out: Path) -> tuple[RunConfig, BatchSizeChoice | None]:
    """`config` with `--batch-size auto` replaced by the windows per forward that fit
    (probe.commands.batch_size), and that choice; unchanged, and None, for a number. A size an
    earlier auto run into `out` chose is kept while it fits, so that the folder resumes."""
    if config.batch_size != "auto":
        return config, None
    with _autocast(config, device):
        choice = choose_batch_size(model, lambda n: _first(dataset, config, n), task=task, blocks=blocks,
                                   available=len(distributed.shard(dataset)),
                                   budget=memory_budget(model, device, config.memory_budget),
                                   earlier=distributed.on_leader(lambda: _earlier_batch_size(out)))
    # Every rank the same size (the smallest choice): the record is compared across them.
    choice = dataclasses.replace(choice, windows=-distributed.max_across(-choice.windows))
    if distributed.rank() == 0:
        print(f"probe.ablate: {choice.describe()}", file=sys.stderr)
    return dataclasses.replace(config, batch_size=choice.windows, memory_budget=None), choice  # the budget is spent


def _more_outputs_than_classes(evaluation: Evaluation, classes: int | None) -> str | None:
    """A warning when the model predicts more classes than the data has (a factory that ignores
    num_classes, a checkpoint of another data set), else None."""
    outputs = len(evaluation.baseline.class_samples or ())  # one per output (labels beyond are refused)
    if not classes or outputs <= classes:
        return None
    return (f"the model predicts {outputs} classes but the data has {classes}: chance is judged on the data's "
            f"{classes}, and a prediction of class {classes} or above always counts as wrong; was the model built "
            "for another data set?")


def _prepared_out(config: RunConfig) -> Path:
    """The run's out folder, created, after refusing one whose files a run would overwrite."""
    out = prepare_out_dir(config.out or Path("runs") / re.sub(r"[^\w.-]+", "_", f"{config.model}-{config.dataset}"))
    _check_out(out)
    return out


def _check_out(out: Path) -> None:
    """Refuse a folder that holds outputs probe did not record: they would be overwritten."""
    ours = ("blocks.csv", "report.html")
    if not (out / "run.json").exists() and any((out / name).exists() for name in ours):
        raise ProbeError(f"--out {str(out)!r} holds a blocks.csv or report.html that no probe run recorded "
                         "(no run.json); choose an empty or new folder so they are not overwritten.")


def list_blocks(config: RunConfig) -> str:
    """The `--list-blocks` table: every block with its branch, shortcut and output shape."""
    device = device_for(config.device)
    model, _ = load_model(config, device, progress=False, train=False)
    device = dispatched_device(model) or device
    example = _example(load_datasets(config, calibration=False, model=model).evaluation, config, model, device)
    blocks = find_blocks(model, spec=config.blocks_spec) if config.blocks_spec else None
    with explained_channels(model, example, config):
        table = describe_blocks(model, example.inputs, blocks=blocks)
    return table.to_string(index=False)


def run(config: RunConfig, *, progress: bool = True,
        on_table: Callable[[pd.DataFrame], None] | None = None) -> tuple[pd.DataFrame, dict, Path]:
    """Everything the CLI does, for notebooks: returns (block table, baseline, out folder).

    Besides the per-block table, runs the analyses `config` asks for (analyses.pipeline) and
    writes their tables, and a report section each, next to blocks.csv and report.html.
    on_table: called with the per-block table as soon as it is known, before the analyses run
    (the CLI prints its answer then).
    """
    chosen, _ = choose_sections(config)
    device = device_for(config.device)
    _autocast(config, device)  # refuse an impossible precision before any work
    distributed.init_from_environment(device)
    # Under torchrun rank 0 alone checks and creates the folder; the others never touch it.
    out = distributed.on_leader(lambda: _prepared_out(config))
    model, source = load_model(config, device, progress=progress)
    dispatched = dispatched_device(model)  # a model accelerate dispatched takes its inputs there
    device = dispatched or device
    channels_last = (config.channels_last if config.channels_last is not None
                     else device.type == "cuda" and dispatched is None)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # our own copy: the checkpoint is untouched
    slow = _half_on_cpu(config, model, device)
    if slow and distributed.rank() == 0:
        print(f"probe.ablate: warning: {slow}", file=sys.stderr)
    task = load_task(config, model)
    needs_calibration = config.bn_recalibrate or any(registry.get(name).needs_calibration for name in chosen)
    datasets = load_datasets(config, calibration=needs_calibration, model=model)
    dataset = datasets.evaluation
    example = _example(dataset, config, model, device)
    # Discovery traces the model; one that torch.fx cannot trace is found from a forward on one sample.
    # Data the model cannot take (its channels, say) is one line saying so, not a traceback.
    with explained_channels(model, example, config):
        blocks = (find_blocks(model, spec=config.blocks_spec) if config.blocks_spec
                  else find_blocks(model, example_input=example.inputs))
        shortcuts = shortcut_kinds(model, example.inputs, blocks)
    config, sizing = _sized_batches(config, model, dataset, task, device, blocks, out)
    loader = named_parts(make_loader(distributed.shard(dataset), batch_size=config.batch_size,
                                     pin_memory=device.type == "cuda"), config)
    calibration = (named_parts(make_loader(datasets.calibration, batch_size=config.batch_size), config)
                   if datasets.calibration is not None else None)
    record = _run_record(config, source, blocks, datasets, shortcuts, device=device, channels_last=channels_last,
                         model=model)
    if sizing is not None:
        record["batch_size_auto"] = sizing.record()
    # The folder is locked while this run writes into it: a second run on it is refused.
    with RunDirectory(out, record, writer=distributed.leader()) as run_dir:
        seconds: dict[str, float] = {}  # each stage's, filled in as they finish
        costs: dict[str, float] = {}  # what measure and the sweep cost when computed (resumed: back then)
        store = OutcomeStore(blocks)  # every outcome of the job: no set of blocks is evaluated twice
        stats, sweep, evaluation = _measure_and_sweep(run_dir, config, model, loader, blocks, calibration, device,
                                                      task, seconds, costs, progress, store)
        engine = _engine_words(fast_path_note(model))  # before the analyses evaluate sets of their own
        classes = (record.get("data") or {}).get("num_classes")  # the data's classes: chance is theirs
        warning = unsupported_reason(evaluation, num_classes=classes)
        for line in (_more_outputs_than_classes(evaluation, classes), warning):
            if line and distributed.rank() == 0:
                print(f"probe.ablate: warning: {line}", file=sys.stderr)
        table = join_block_table(stats, sweep, unsupported=warning)
        table.attrs["seconds"] = seconds
        baseline = table_info(table).baseline
        if not distributed.leader():
            # Every process holds the totals; rank 0 alone writes and reports, and the others
            # leave now rather than wait in a collective that could time out on a long report.
            return table, baseline, out
        if on_table is not None:
            on_table(table)
        # The analyses after the sweep run in rank 0 alone, on all the data.
        with distributed.local(), _autocast(config, device):
            sweep_loader, loader = loader, named_parts(make_loader(dataset, batch_size=config.batch_size,
                                                                   pin_memory=device.type == "cuda"), config)
            if not distributed.active():  # the same batches as the sweep's: its outcomes serve the analyses
                store.same_data(loader, sweep_loader)
            _write_outputs(config, model, loader, table, evaluation, record, calibration, device, out, seconds,
                           costs, progress, blocks, engine, store)
            run_dir.annotate("evaluations", store.numbers())
    return table, baseline, out


def _measure_and_sweep(run_dir: RunDirectory, config: RunConfig, model, loader, blocks, calibration, device,
                       task: Task, seconds: dict[str, float], costs: dict[str, float],
                       progress: bool, store: OutcomeStore) -> tuple[pd.DataFrame, pd.DataFrame, Evaluation]:
    """(measure's table, the sweep's table, the sweep's evaluation), resumed from `run_dir`'s
    pieces where they exist. `seconds` gets the time each took in this run; `costs` how long
    computing it took (in the run that did, for resumed pieces; NaN if that was not recorded).
    `store` keeps the sweep's outcomes for the analyses, and counts them."""
    start = time.perf_counter()

    def measured() -> pd.DataFrame:
        with _autocast(config, device):
            return measure(model, loader, blocks=blocks, progress=progress)

    stats, costs["measure"] = _piece(run_dir, "measure", pd.DataFrame, measured)
    seconds["measure"] = time.perf_counter() - start
    start = time.perf_counter()
    # One sweep serves the table and the uncertainty section (per-class and per-sample outcomes),
    # saved every `save_every` blocks: an interrupted run resumes from the last saved piece.
    results, costs["sweep"] = [], 0.0
    pieces = [blocks[i:i + config.save_every] for i in range(0, len(blocks), config.save_every)]
    outer = progress and len(pieces) > 1  # one bar over the pieces, or the sweep's own bar

    def swept(piece: list) -> Evaluation:
        with _autocast(config, device):
            evaluation = evaluate_ablations(model, loader, [[block] for block in piece], mode=config.mode,
                                            calibration=calibration if config.bn_recalibrate else None,
                                            per_class=True, outcomes=True, task=task,
                                            progress=progress and not outer)
        # Without the task: a user's task function need not pickle (the record names it).
        return dataclasses.replace(evaluation, task=None)

    store.stage = "sweep"
    for index, piece in enumerate(tqdm(pieces, desc=f"sweep ({len(blocks)} blocks)", unit="piece", disable=not outer)):
        computed = []
        evaluation, cost = _piece(run_dir, f"sweep-{index}", Evaluation,
                                  lambda: computed.append(piece) or swept(piece))
        with _autocast(config, device):  # kept under the precision it was computed in
            store.record(model, loader, [[block] for block in piece], evaluation, mode=config.mode,
                         calibration=calibration if config.bn_recalibrate else None, task=task,
                         computed=bool(computed))
        costs["sweep"] += cost
        results += evaluation.sets
    evaluation = Evaluation(evaluation.baseline, results, trained_baseline=evaluation.trained_baseline, task=task)
    sweep = sweep_table(blocks, evaluation, mode=config.mode, recalibrated=config.bn_recalibrate)
    seconds["sweep"] = time.perf_counter() - start
    return stats, sweep, evaluation


def _piece(run_dir: RunDirectory, name: str, kind: type, compute: Callable[[], object]) -> tuple[object, float]:
    """(a piece of work, what computing it cost): read back from `run_dir` with the seconds
    recorded when it was computed (NaN where none were), else computed, timed and saved; its
    time first, so that a piece on disk always has one (a time alone is overwritten). `run_dir`
    gives back only what this configuration computed: each piece is stamped with the run
    record's digest, and one of another configuration is computed again (run_folder)."""
    value = run_dir.load(name, kind)
    if value is not None:
        recorded = run_dir.load(f"seconds-{name}", float)
        return value, float("nan") if recorded is None else recorded
    start = time.perf_counter()
    value = compute()
    cost = time.perf_counter() - start
    run_dir.save(f"seconds-{name}", cost)
    run_dir.save(name, value)
    return value, cost


def _sections(outputs: AnalysisOutputs, context: ReportContext) -> list:
    """One report section per analysis, in report order (those that lead it first); a "not run"
    section says why, except for an analysis that is silent unless it ran (a language model's
    layer analysis is not mentioned in other models' reports). Each analysis's section is built
    by its page, `reports/sections/NAME.py` (`section(result, context)`)."""
    analyses = sorted(registry.registered(), key=lambda analysis: not analysis.leads_report)  # stable
    sections = []
    for analysis in analyses:
        if analysis.name in outputs.results:
            page = importlib.import_module(f"reports.sections.{analysis.name}")
            sections.append(page.section(outputs.results[analysis.name], context))
        elif not analysis.silent_unless_run:
            sections.append(build.not_run_section(analysis.name, outputs.reasons[analysis.name]))
    return sections


def _setting_sections() -> dict[str, tuple[str, ...]]:
    """{setting: the analyses that read it}: the options of each analysis's declared option groups
    (`Analysis.options`) that the job's own groups (model, ablation, report) do not have; the run
    record lists such a setting only when one of its analyses ran."""
    def options(*groups: str) -> set[str]:
        parser = add_options(argparse.ArgumentParser(add_help=False), *groups, sections=registry.available())
        return {action.dest for action in parser._actions}

    own = options("model", "ablation", "report")
    owners: dict[str, list[str]] = {}
    for analysis in registry.registered():
        for setting in sorted(options(*analysis.options) - own):
            owners.setdefault(setting, []).append(analysis.name)
    return {setting: tuple(names) for setting, names in owners.items()}


def _samples(calibration) -> int | None:
    try:
        return len(calibration.dataset)
    except (AttributeError, TypeError):
        return None


def _engine_words(note) -> str:
    """How the sweep evaluated its deletions (`probe.deletion.evaluation.FastPathNote`), for the
    run record: the engine, and why not a faster one."""
    if note is None:
        return "read back from the run folder's saved pieces"
    names = {"suffix": "compiled suffixes (only the network after each deleted block runs)",
             "replay": "layer replay (the layers before each deletion answer from the baseline pass)",
             "full": "one whole forward per deletion", "recalibrated": "BatchNorm recalibration's own passes"}
    words = names.get(note.engine, note.engine)
    if note.reason:
        words += f"; {note.reason}"
    if note.inputs_copied:
        words += "; the model writes into its input, so each forward got its own copy of the batch"
    return words


def _write_outputs(config, model, loader, table, evaluation, record, calibration, device, out, seconds, costs,
                   progress, blocks, engine: str = "", store: OutcomeStore | None = None) -> None:
    """blocks.csv, the analyses' tables and figures, and report.html. engine: how the sweep
    evaluated its deletions (`_engine_words`), for the run record; store: the job's outcomes
    (the sweep's), which the analyses reuse and count."""
    write_csv(out / "blocks.csv", table)
    analyses = run_analyses(model, loader, table, evaluation, config=config, out=out, device=str(device),
                            calibration=calibration, sweep_seconds=costs["sweep"],
                            measure_seconds=costs["measure"], blocks=blocks,
                            task=evaluation.task, progress=progress, store=store)
    seconds.update(analyses.seconds)
    baseline = table_info(table).baseline
    data = record["data"]
    report_config = {**{k: v for k, v in vars(config).items() if v is not None and v != ()},
                     "checkpoint": record["checkpoint"], "device": str(device), "samples": record["samples"],
                     **({"images": _images_words(data)} if data else {}),
                     "task": evaluation.task.describe() if evaluation.task is not None else "classification",
                     "shortcuts": ", ".join(f"{n} {kind}" for kind, n in Counter(record["shortcuts"].values()).items()),
                     "BN recalibration": (_recalibration_words(table, record['calibration']) if config.bn_recalibrate
                                          else "off (trained BatchNorm statistics)"),
                     "sweep engine": engine,
                     "seconds": {name: f"{value:.1f}" for name, value in seconds.items()},
                     **({"evaluations": store.words()} if store is not None else {}),
                     "threads": threads_words(),
                     "versions": {"torch": torch.__version__, "probe": probe.__version__},
                     "date": time.strftime("%Y-%m-%d %H:%M")}
    context = ReportContext(cost=cost_column(table), recalibrated=config.bn_recalibrate,
                            calibration_samples=_samples(calibration))
    sections = _sections(analyses, context)
    write_report(out / "report.html", table, baseline=baseline, config=report_config,
                 sections=sections, warning=table_info(table).unsupported, setting_sections=_setting_sections())


def _images_words(data: dict) -> str:
    """How the images were prepared, for the report: a data set's size, channels and normalization,
    or a detector's images (`probe.loading.detection_images.ImagesInfo`) as its predictor prepares them."""
    if "preparation" in data:
        truth = data.get("ground_truth") or "none (scored against the intact model's detections)"
        return (f"{data['images']} images, inputs {data['input_width']}x{data['input_height']} (width x height), "
                f"{data['preparation']}; ground truth: {truth}")
    return (f"{data['image_size']}x{data['image_size']}, {data['in_channels']} channel(s), "
            f"normalization {data['normalize']}")


def _half_on_cpu(config: RunConfig, model: torch.nn.Module, device: torch.device) -> str | None:
    """A warning when the forward passes run in half precision on the CPU, many times slower than in
    float32 there: weights kept in half (`--dtype`), or autocast to it (`--precision`). None otherwise
    (a model stored in half is loaded in float32 unless --dtype asks otherwise)."""
    if device.type != "cpu":
        return None
    dtype = input_dtype(model)
    if dtype in (torch.float16, torch.bfloat16):
        return (f"the weights are {str(dtype).removeprefix('torch.')} (--dtype {config.dtype}) on the CPU, which runs "
                "half precision many times slower than float32; --dtype fp32 loads them in float32.")
    if config.precision != "fp32":
        return (f"--precision {config.precision} on the CPU runs the forward passes in half precision, often many "
                "times slower than float32 there; --precision fp32 is the CPU's fast path.")
    return None


def threads_words() -> str:
    """How many CPU threads torch uses, and why (`probe.commands.threads`)."""
    choice = chosen()
    return choice.reason if choice is not None else f"{torch.get_num_threads()}"


def _metric_words(metrics: dict) -> str:
    """The intact model's numbers of a task other than classification, in words ("" for drift,
    which has none of its own)."""
    parts = []
    if "perplexity" in metrics:
        parts.append(f"loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f})")
    elif "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "token_accuracy" in metrics:
        parts.append(f"token accuracy {metrics['token_accuracy']:.1%}")
    elif "accuracy" in metrics:
        parts.append(f"accuracy {metrics['accuracy']:.2%}")
    return ", ".join(parts)


def _recalibration_words(table: pd.DataFrame, calibration: str | None) -> str:
    """The report's "BN recalibration" line: where the calibration data came from, and the intact
    model's numbers as given and recalibrated (`table_info(table)`: trained_baseline, baseline)."""
    info = table_info(table)
    if info.trained_baseline is None:  # the sweep refitted nothing (the model has no BatchNorm statistics)
        return "asked for, but nothing was refitted: the model has no BatchNorm layer with running statistics"
    trained, recalibrated = info.trained_baseline, info.baseline
    if cost_column(table) == "accuracy_drop" and "accuracy" in trained and "accuracy" in recalibrated:
        return (f"on ({calibration}); intact model as given: accuracy {trained['accuracy']:.2%}, recalibrated "
                f"{recalibrated['accuracy']:.2%}")
    before, after = _metric_words(trained), _metric_words(recalibrated)
    if before and after:
        return f"on ({calibration}); intact model as given: {before}; recalibrated: {after}"
    return f"on ({calibration}); each deletion is compared with the intact model recalibrated the same way"


def _baseline_words(table: pd.DataFrame, cost: str) -> str:
    """The summary's first line: the intact model's numbers, as the table's task has them."""
    info = table_info(table)
    baseline = info.baseline
    if cost == "accuracy_drop":
        return (f"baseline: accuracy {baseline['accuracy']:.2%}, loss {baseline['loss']:.4f} "
                f"on {baseline['samples']} samples")
    if cost == "drift":
        return (f"baseline: the intact model's outputs on {baseline['samples']} samples (drift is measured "
                "against them)")
    if cost == "detections_lost":
        return (f"baseline: {baseline['detections']:.1f} detections per image on {baseline['samples']} images; of the "
                f"reference's {baseline['reference_detections']:.0f} boxes it keeps {baseline['detections_kept']:.1%}, "
                f"mAP@0.5 {baseline['map50']:.3f}, mAP@0.5:0.95 {baseline['map50_95']:.3f}")
    if "perplexity" in baseline:
        return (f"baseline: {_metric_words(baseline)} on {baseline['samples']} sequences "
                f"({int(baseline['tokens']):,} tokens)")
    task = f" (task {info.task})" if info.task else ""
    return f"baseline: {_metric_words(baseline)} on {baseline['samples']} samples{task}"


def _cells(values: pd.Series, spec: str, unit: str = "") -> pd.Series:
    """Each value as the report's tables print it (`reports.sections.format_cell`), with a unit."""
    return values.map(lambda value: build.format_cell(value, spec) + unit)


def _plus_minus(values: pd.Series, errors: pd.Series | None, spec: str, unit: str = "") -> pd.Series:
    """Each value with its standard error, "+0.1234 ± 0.0010 nats"; without the error where it is
    missing."""
    def one(value, error) -> str:
        shown = build.format_cell(value, spec)
        if error is not None and pd.notna(error):
            shown += f" \u00b1 {build.format_cell(abs(error), spec.lstrip('+'))}"
        return shown + unit

    errors = errors if errors is not None else pd.Series(None, index=values.index, dtype=object)
    return pd.Series([one(v, e) for v, e in zip(values, errors)], index=values.index, dtype=object)


def _shown_columns(table: pd.DataFrame, cost: str) -> pd.DataFrame:
    """The per-block columns the terminal shows, formatted for the table's cost."""
    if cost == "accuracy_drop":
        columns = ["block", "ratio", "cosine", "accuracy_drop", "flip_rate", "verdict"]
        shown = table[columns].copy()
        shown["accuracy_drop"] = _cells(shown["accuracy_drop"] * 100, "+.1f", " pts")
        shown["flip_rate"] = _cells(shown["flip_rate"] * 100, ".1f", "%")
        return shown
    if cost == "detections_lost":
        columns = ["block", "ratio", "cosine", "detections_lost", "detections", "map50", "drift", "verdict"]
        shown = table[[c for c in columns if c in table.columns]].copy()
        se = table.get("detections_lost_se")
        shown["detections_lost"] = _plus_minus(table["detections_lost"] * 100, None if se is None else se * 100,
                                               ".1f", "%")
        for column, spec, scale, unit in (("detections", ".1f", 1, ""), ("map50", ".3f", 1, ""),
                                          ("drift", ".1f", 100, "%")):
            if column in shown:
                shown[column] = _cells(shown[column] * scale, spec, unit)
        return shown
    extra = (["kl"] if cost == "drift" else ["perplexity_ratio", "token_flip_rate", "accuracy_drop"])
    columns = ["block", "ratio", "cosine", cost, *extra, "verdict"]
    shown = table[[c for c in columns if c in table.columns]].copy()
    se = table.get(f"{cost}_se")
    if cost == "drift":
        shown["drift"] = _plus_minus(table["drift"] * 100, None if se is None else se * 100, ".1f", "%")
    else:
        unit = " nats" if per_token(table) else ""
        shown["loss_increase"] = _plus_minus(table["loss_increase"], se, "+.4f", unit)
    if "kl" in shown:
        shown["kl"] = _cells(shown["kl"], ".4g")
    if "token_flip_rate" in shown:
        shown["token_flip_rate"] = _cells(shown["token_flip_rate"] * 100, ".1f", "%")
    if "accuracy_drop" in shown:
        shown["accuracy_drop"] = _cells(shown["accuracy_drop"] * 100, "+.1f", " pts")
    return shown


def format_summary(table: pd.DataFrame, n: int = 5) -> str:
    """The short terminal answer: what helps most, and what is skipped, by the table's cost
    (`probe.scoring.verdict.cost_column`: the accuracy drop for classification, else the loss increase
    or the drift of the outputs)."""
    cost = cost_column(table)
    lines = [f"{_baseline_words(table, cost)}; {len(table)} residual blocks", ""]
    unsupported = table_info(table).unsupported
    if unsupported is not None:
        lines += [f"WARNING: {unsupported}", "",
                  f"no verdicts: every block is marked '{UNSUPPORTED}' in blocks.csv."]
        return "\n".join(lines)
    summary = summarize(table, n=n)
    name, helping = COSTS[cost].name, COSTS[cost].helping
    shown = _shown_columns(table, cost)
    if summary["helps_most"]:
        helps = shown.set_index("block").loc[summary["helps_most"]]
        listed, helping_blocks = len(summary["helps_most"]), summary["counts"]["helps"]
        how_many = f"{listed} of the {helping_blocks} that help" if listed < helping_blocks else \
            ("the one that helps" if listed == 1 else f"all {listed} that help")
        lines += [f"blocks that help most ({how_many}; deleting one alone {helping}):",
                  helps.to_string(float_format="{:.3f}".format), ""]
    else:
        lines += ["no block costs more than noise when deleted alone.", ""]
    skipped = summary["skipped"]
    lines.append(f"skipped blocks ({len(skipped)}): " + (", ".join(skipped) if skipped else "none"))
    lines.append(f"rule: {VerdictRule().describe(cost=cost)}")
    lines.append(f"Spearman rank correlation of ratio with {name}: {summary['spearman_rho']:+.2f}")
    return "\n".join(lines)
