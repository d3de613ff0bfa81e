"""The ``vlray`` command line: demo, extract, align, refresh, report, sql, bench."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from vlray.errors import UsageError, VlrayError
from vlray.studies import STUDY_NAMES

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "demo.yaml"


def _fail(message: str) -> int:
    print(f"vlray: error: {message}", file=sys.stderr)
    return 2


# --- extract ------------------------------------------------------------------------------


def _manifest_config(args: argparse.Namespace) -> dict:
    if not args.root or not args.models:
        raise UsageError("--manifest needs --root DIR and --models NAME,NAME")
    name = args.dataset or Path(args.manifest).stem
    return {
        "datasets": [
            {
                "name": name,
                "source": "manifest",
                "params": {"manifest": args.manifest, "root": args.root},
            }
        ],
        "models": [m.strip() for m in args.models.split(",") if m.strip()],
    }


def _load_run_config(args: argparse.Namespace):
    from vlray.config import load_config, validate_config

    if args.config and args.manifest:
        raise UsageError("give either --config or --manifest, not both")
    if args.config:
        config = load_config(args.config)
        if args.models:
            config = validate_config(
                {**config.model_dump(), "models": args.models.split(",")}, f"config {args.config}"
            )
        return config
    if args.manifest:
        return validate_config(_manifest_config(args), "command line")
    raise UsageError("give --config FILE, or --manifest FILE --root DIR --models NAME,NAME")


def cmd_extract(args: argparse.Namespace) -> int:
    from vlray.pipeline import run_extract

    config = _load_run_config(args)
    summary = run_extract(config, _lake_of(args, config))
    print("\n".join(summary.lines()))
    return 0


# --- align ------------------------------------------------------------------------------


def _lake_of(args: argparse.Namespace, config) -> str:
    lake = args.lake or config.lake
    if not lake:
        raise UsageError("no lake: pass --lake LAKE (or set `lake:` in the config)")
    return lake


def _print_align(done: list[dict], started: float) -> int:
    """Print the align summary; the exit status: 1 if any study failed, else 0."""
    written, failed = 0, 0
    tasks = sum(r.get("tasks", 0) for r in done)
    for r in done:
        print(f"  {r['dataset']} | {r['vision_model']} x {r['language_model']}")
        for study, s in r["studies"].items():
            notes = []
            if s.get("up_to_date"):
                line = "results up to date (same inputs)"
            elif "skipped" in s:
                line = f"skipped: {s['skipped']}"
            elif "failed" in s:
                failed += 1
                line = f"FAILED: {s['failed']}"
            else:
                written += s["rows"]
                where = f"{s['tasks']:>4} task(s)" if s["tasks"] else "in the pair's task"
                line = f"n={s['n']:<6} {s['rows']:>6} scores  {s['seconds']:6.1f}s  {where}"
                notes = [f"{m} skipped: {why}" for m, why in s["skipped_metrics"].items()]
                notes += [f"warning: {s['small_n']}"] if s["small_n"] else []
            print(f"    {study:<18} {line}")
            for note in notes:
                print(f"    {'':<18} {note}")
    print(
        f"align: {len(done)} model pair(s), {written} scores written to the alignment table "
        f"by {tasks} Ray task(s), {time.time() - started:.1f}s"
        + (f"; {failed} study run(s) FAILED (the others' results are kept)" if failed else "")
    )
    return 1 if failed else 0


def _align_flags(args: argparse.Namespace, align: dict) -> dict:
    """The config's ``align`` section with the command line's options laid over it."""
    split = {"studies": args.studies, "metrics": args.metrics}
    counts = {"bootstrap": args.bootstrap, "permutations": args.permutations}
    return {
        **align,
        **{k: v.split(",") for k, v in split.items() if v},
        **{k: v for k, v in counts.items() if v is not None},
    }


def _fitted(options, n: int, dataset: str):
    """``options`` with the size options of every metric not configured by hand (``k``,
    ``folds``) lowered to what ``n`` items allow, saying so."""
    from vlray.metrics import fit_options, min_items

    kwargs = dict(options.metric_kwargs)
    for metric in options.metrics:
        if metric in kwargs:
            continue
        fit = fit_options(metric, n, options.bootstrap)
        if fit:
            need = min_items(metric, options.bootstrap)[0]
            print(
                f"align: {dataset} has {n} items; {metric} with "
                + ", ".join(f"{k}={v}" for k, v in fit.items())
                + f" (its defaults need {need})"
            )
            kwargs[metric] = fit
    return options.model_copy(update={"metric_kwargs": kwargs})


def cmd_align(args: argparse.Namespace) -> int:
    from vlray.align import paired_items, run_align, what_the_lake_holds
    from vlray.catalog import get_spec, load_catalog
    from vlray.config import check_align
    from vlray.lake import Lake

    started = time.time()
    if args.config:
        config = _load_run_config(args)
        options = check_align(_align_flags(args, config.align.model_dump()), "command line")
        done = run_align(
            _lake_of(args, config), [d.name for d in config.datasets], config.specs(), options
        )
        return _print_align(done, started)
    # No config: every (vision, language) pair of models the lake holds, for every dataset.
    if not args.lake:
        raise UsageError("give --lake LAKE (and optionally --config FILE)")
    lake = Lake(args.lake)
    held = what_the_lake_holds(lake)
    if not held:
        raise UsageError(f"the lake {lake.uri} has no embeddings: run `vlray extract` first")
    chosen = {}
    for what, names, known in (
        ("dataset", args.datasets, set(held)),
        ("model", args.models, {m for models in held.values() for m in models}),
    ):
        chosen[what] = set(names.split(",")) if names else known
        unknown = sorted(chosen[what] - known)
        if unknown:
            raise UsageError(
                f"--{what}s: the lake {lake.uri} has no {what} '{unknown[0]}'; it has: "
                + ", ".join(sorted(known))
            )
    catalog = load_catalog(*(args.catalog or []))
    options = check_align(_align_flags(args, {}), "command line")
    done = []
    for dataset, models in sorted(held.items()):
        if dataset not in chosen["dataset"]:
            continue
        models = [m for m in models if m in chosen["model"]]
        specs = [get_spec(m, catalog) for m in models]
        if {s.modality for s in specs} != {"vision", "language"}:
            print(f"align: {dataset}: skipped, needs a vision and a language model ({models})")
            continue
        n = paired_items(lake, dataset, specs, options)
        done += run_align(lake, [dataset], specs, _fitted(options, n, dataset))
    return _print_align(done, started)


def cmd_refresh(args: argparse.Namespace) -> int:
    """Only what is missing or stale: new models or datasets, changed model configs or items,
    then alignment for the pairs whose inputs changed."""
    from vlray.align import run_align
    from vlray.pipeline import run_extract

    config = _load_run_config(args)
    lake = _lake_of(args, config)
    verbose = getattr(args, "verbose", False)  # a line per partition and study even if idle
    started = time.time()
    # Neither step starts Ray when it has nothing to compute: a refresh with nothing new
    # reads the lake's manifest, items fingerprints and results hashes, and prints one line.
    summary = run_extract(config, lake)
    extracted = not all(r.skipped for r in summary.results)
    if extracted or verbose:
        print("\n".join(summary.lines()), flush=True)  # before alignment, which may take long
    datasets = [d.name for d in config.datasets]
    done = run_align(lake, datasets, config.specs(), config.align, only_changed=True)
    nothing_new = not extracted and all(
        s.get("up_to_date") for r in done for s in r["studies"].values()
    )
    status = 0
    if verbose or not nothing_new:
        if not extracted and not verbose:
            print(
                f"extract: nothing new; the embeddings of {len(config.models)} model(s) on "
                f"{len(datasets)} dataset(s) are up to date"
            )
        status = _print_align(done, started)
    if nothing_new:
        print(
            f"refresh: nothing new; the lake is up to date ({len(datasets)} dataset(s), "
            f"{len(config.models)} model(s), {len(done)} model pair(s) checked in "
            f"{time.time() - started:.1f}s)"
        )
    return status


# --- bench ------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from vlray import bench
    from vlray.tables import format_table

    if args.what == "metrics":
        gpu = _cuda(args.device)
        rows = [
            row
            # On a GPU both placements: inputs from host memory, and already on the device.
            for inputs in (("host", "device") if gpu else ("host",))
            for row in bench.bench_metrics(
                n=args.n or 2048,
                dim=args.dim or 768,
                layers=args.layers or 13,
                metrics=(args.metrics or "mutual_knn,cka").split(","),
                device=args.device,
                repeats=args.repeats or (3 if gpu else 1),
                inputs=inputs,
            )
        ]
        print(format_table(rows))
        if args.large_n:
            memory = bench.bench_knn_memory(
                n=args.large_n, dim=args.dim or 768, layers=args.layers or 13
            )
            print(format_table([memory]))
    elif args.what == "align":
        from pydantic import ByteSize, TypeAdapter, ValidationError

        from vlray.bench.align import bench_align, measured_unit
        from vlray.bench.paper_scale import paper_scale

        try:
            budget = args.memory_per_task and TypeAdapter(ByteSize).validate_python(
                args.memory_per_task
            )
        except ValidationError:
            raise UsageError(
                f"--memory-per-task expects a size such as 512MiB, got '{args.memory_per_task}'"
            ) from None
        n, layers, widths = args.n or 9000, (args.layers or 14,) * 2, (args.dim or 64,) * 2
        rows = bench_align(
            n=n,
            layers=layers,
            widths=widths,
            bootstrap=args.bootstrap,
            permutations=args.permutations,
            metric=args.metrics or "cka",
            **({"memory_per_task": budget} if budget else {}),
            two_node=not args.one_node,
        )
        print(format_table(rows))
        if (args.metrics or "cka") == "cka":
            (b,) = [r for r in rows if r["run"].startswith("(b)")]
            evaluations = 1 + args.bootstrap + args.permutations
            unit = measured_unit(b["wall s"], n, layers, widths, evaluations, os.cpu_count() or 1)
            print(f"\nPaper scale, estimated from (b): {unit:.3g} CPU-seconds per CKA unit")
            print(format_table(paper_scale(unit)))
    elif args.what == "lake":
        from vlray.bench.lake import run

        print(format_table(run(args.models.split(",") if args.models else None, args.s3)))
    else:
        _bench_extract(args)
    return 0


def _cuda(device: str | None) -> bool:
    from vlray.models import default_device

    return (device or default_device()).startswith("cuda")


def _bench_extract(args: argparse.Namespace) -> None:
    from vlray.bench.extract import bench_extract
    from vlray.catalog import get_spec
    from vlray.models import default_device
    from vlray.options import ExtractOptions
    from vlray.tables import format_table

    device = args.device or default_device()
    gpu = _cuda(device)
    # A base-size model and a realistic n on a GPU; small real models and few items on a CPU.
    names = (
        args.models.split(",")
        if args.models
        else (
            ["vit_b16_random", "bert_base_random"] if gpu else ["efficientnet_lite0", "minilm_l6"]
        )
    )
    n = args.n or (40_000 if gpu else 256)
    try:
        batch_sizes = (
            [int(b) for b in args.batch_sizes.split(",")]
            if args.batch_sizes
            else ([256, 512, 1024] if gpu else [32])
        )
    except ValueError:
        raise UsageError(
            f"--batch-sizes expects integers such as 256,512, got '{args.batch_sizes}'"
        ) from None
    for name in names:
        spec = get_spec(name)
        if args.tokenizer and spec.modality == "language":
            spec = spec.model_copy(update={"tokenizer": args.tokenizer})
        options = ExtractOptions(
            batch_size=args.batch_size or (512 if gpu else 32),
            gpus_per_actor=1.0 if gpu else 0.0,
        )
        rows = bench_extract(spec, n, device, batch_sizes, options, seconds=args.seconds)
        print(format_table(rows))


# --- sql ------------------------------------------------------------------------------


def _print_query_result(table, fmt: str, max_rows: int) -> None:
    """A query's Arrow table as JSON, CSV or the one table format (``vlray.tables``)."""
    if fmt == "json":
        print(json.dumps(table.to_pylist(), default=str, indent=1))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=table.column_names)
        writer.writeheader()
        writer.writerows(table.to_pylist())
    else:
        from vlray.tables import format_table

        print(format_table(table, max_rows=max_rows))


def _as_of(text: str | None) -> int | _dt.datetime | None:
    """``--as-of``: an embeddings table version (an integer) or a time (ISO 8601, UTC unless
    it says otherwise)."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--as-of expects a version (e.g. 3) or a time (e.g. 2026-11-30T08:00), got '{text}'"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=_dt.UTC)


def cmd_sql(args: argparse.Namespace) -> int:
    from vlray.lake import Lake
    from vlray.sql import connect, named_query, run_query

    if bool(args.query) == bool(args.file):
        raise UsageError("give a query, or --file NAME.sql, not both")
    query = named_query(args.file) if args.file else args.query
    params = {}
    for p in args.param or []:
        key, sep, value = p.partition("=")
        if not sep:
            raise UsageError(f"--param expects KEY=VALUE, got '{p}'")
        params[key] = value
    con = connect(Lake(args.lake, as_of=_as_of(args.as_of)))
    _print_query_result(
        run_query(con, query, params, allow_write=args.allow_write), args.format, args.max_rows
    )
    return 0


# --- report ----------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from vlray.report import findings, load, write_report

    data = load(args.lake)  # one read of the lake serves the page and the printed findings
    index = write_report(data, args.out)
    stated = set()  # how a finding is read is printed under its first line only
    for f in findings(data):
        print(f.line())
        for line in [] if f.name in stated else f.details():
            print(f"    {line}")
        stated.add(f.name)
    print(f"report: {index}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The catalog, one model a line: what `--models` and `models:` accept."""
    from vlray.catalog import load_catalog
    from vlray.tables import format_table

    rows = []
    for spec in load_catalog(*(args.catalog or [])).values():
        if args.modality and spec.modality != args.modality:
            continue
        weights = "random" if spec.init == "random" else "packaged"
        if spec.init == "pretrained" and spec.source != "packaged":
            weights = "hub"
        rows.append(
            {
                "name": spec.name,
                "modality": spec.modality,
                "source": spec.source,
                "weights": weights,
                "pooling": ",".join(spec.pooling),
                # published ImageNet top-1 (%): what orders a size series
                "imagenet_top1": "" if spec.imagenet_top1 is None else f"{spec.imagenet_top1:g}",
                "id": spec.id,
            }
        )
    print(format_table(rows))
    return 0


# --- demo ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from vlray.config import load_config
    from vlray.pipeline import run_extract
    from vlray.sql import connect, named_query, run_query

    out = Path(args.out)
    lake = out / "lake"
    config = load_config(args.config)
    print(f"vlray demo: shapes world -> {', '.join(config.models)} -> {lake}")
    summary = run_extract(config, str(lake))
    print("\n".join(summary.lines()))
    con = connect(str(lake))
    print(f"\nWhat the lake holds (vlray sql --lake {lake} --file models_overview):")
    _print_query_result(run_query(con, named_query("models_overview")), "table", 20)
    print(f"\nBookkeeping (vlray sql --lake {lake} --file accounting):")
    acc = run_query(con, named_query("accounting"))
    balanced = all(acc.column("balanced").to_pylist())
    print(
        f"  {acc.num_rows} (model, perturbation) partitions; rows in = embedded + "
        f"quarantined in every one: {balanced}"
    )
    if not balanced:
        return 1

    from vlray.align import run_align
    from vlray.report import findings, load, write_report

    config_path = os.path.relpath(args.config)
    print(f"\nThe five studies (vlray align --config {config_path} --lake {lake}):")
    started = time.time()
    datasets = [d.name for d in config.datasets]
    status = _print_align(run_align(str(lake), datasets, config.specs(), config.align), started)
    data = load(str(lake))
    index = write_report(data, out / "report")
    print(
        "\nHeadline findings (computed, not tuned; 'not significant' and 'does not hold' are "
        "reported as such):"
    )
    stated = set()  # how a finding is read is printed under its first line only
    for f in findings(data):
        print(f"  {f.line()}")
        for line in [] if f.name in stated else f.details():
            print(f"      {line}")
        stated.add(f.name)
    print(
        f"\nReport: {index}"
        f'\nTry: vlray sql --lake {lake} "SELECT study, metric, condition, max(value) '
        'FROM alignment GROUP BY ALL ORDER BY ALL"'
    )
    return status


# --- lake maintenance -------------------------------------------------------------------


def cmd_lake(args: argparse.Namespace) -> int:
    from vlray.lake import Lake

    lake = Lake(args.lake)
    if args.action == "upgrade":
        from vlray.lake.upgrade import upgrade

        for line in upgrade(lake):
            print(line)
        return 0
    lake.check(write=args.action != "history")
    if args.action == "history":
        from vlray.tables import format_table

        table = lake.table("embeddings")
        rows = []
        for entry in reversed(table.history() if table is not None else []):
            when = _dt.datetime.fromtimestamp(entry["timestamp"] / 1000, _dt.UTC)
            rows.append(
                {
                    "version": entry["version"],
                    "time": f"{when:%Y-%m-%d %H:%M:%S}Z",
                    "operation": entry["operation"],
                    "run": entry.get("vlray.run_id", "-"),
                    "dataset": entry.get("vlray.dataset", ""),
                    "model": entry.get("vlray.model", ""),
                }
            )
        print(format_table(rows))
        return 0
    if args.action == "vacuum":
        removed = lake.vacuum(args.retain, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        for name, files in removed.items():
            print(f"  {name:<12} {verb} {len(files)} unreferenced file(s)")
        print(
            f"vacuum: {verb} {sum(len(f) for f in removed.values())} file(s) older than "
            f"{args.retain:g} h that no table version references"
        )
        return 0
    for name, metrics in lake.optimize().items():
        print(
            f"  {name:<12} {metrics.get('numFilesRemoved', 0)} small file(s) compacted into "
            f"{metrics.get('numFilesAdded', 0)}"
        )
    print("optimize: done (the replaced files stay for --as-of until `vlray lake vacuum`)")
    return 0


# --- entry point ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlray", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of vlray's own errors too (any other error always shows it)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded default end to end (no network needed)")
    demo.add_argument("--out", default="demo-out", help="output folder (lake at OUT/lake)")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    ext = sub.add_parser("extract", help="embed datasets with catalog models into the lake")
    ext.add_argument("--config", help="run config (YAML), e.g. pipelines/configs/demo.yaml")
    ext.add_argument("--manifest", help="your own dataset: JSONL, CSV or Parquet manifest")
    ext.add_argument("--root", help="folder that manifest image paths are relative to")
    ext.add_argument("--dataset", help="dataset name for --manifest (default: file stem)")
    ext.add_argument("--models", help="catalog model names, comma separated")
    ext.add_argument("--lake", help="lake path or URI")
    ext.set_defaults(func=cmd_extract)

    align = sub.add_parser(
        "align",
        help="score every (vision layer, language layer) pair",
        description="Align every (vision, language) model pair the lake holds, for every "
        "dataset, with defaults that fit each dataset's size; or what a --config names. The "
        "flags override the config's align section.",
    )
    align.add_argument("--lake", help="lake path or URI")
    align.add_argument("--config", help="run config (YAML) with an align section (optional)")
    align.add_argument("--datasets", help="only these datasets (comma separated)")
    align.add_argument("--models", help="only these models (comma separated)")
    align.add_argument("--studies", help=f"comma separated, of: {', '.join(STUDY_NAMES)}")
    align.add_argument("--metrics", help="comma separated, e.g. cka,mutual_knn (vlray.metrics)")
    align.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 100)")
    align.add_argument("--permutations", type=int, help="permutations of the null (default 100)")
    align.add_argument("--catalog", action="append", help="an extra catalog YAML file")
    align.set_defaults(func=cmd_align, manifest=None)

    refresh = sub.add_parser("refresh", help="compute only what is new or stale (scheduled runs)")
    refresh.add_argument("--config", required=True, help="run config (YAML)")
    refresh.add_argument("--lake", help="lake path or URI")
    refresh.set_defaults(func=cmd_refresh, manifest=None, models=None)

    bench = sub.add_parser("bench", help="benchmarks that print figures measured side by side")
    bench.add_argument("what", choices=("metrics", "extract", "lake", "align"))
    bench.add_argument(
        "--n",
        type=int,
        help="items (metrics: 2048; extract: 40,000 on a GPU, 256 on a CPU; align: 9000)",
    )
    bench.add_argument("--dim", type=int, help="width of every layer (metrics: 768, align: 64)")
    bench.add_argument("--layers", type=int, help="layers on each side (metrics: 13, align: 14)")
    bench.add_argument("--metrics", help="metrics: mutual_knn,cka; align: one metric (cka)")
    bench.add_argument("--bootstrap", type=int, default=100, help="align: resamples")
    bench.add_argument("--permutations", type=int, default=100, help="align: permutations")
    bench.add_argument(
        "--memory-per-task", help="align: task budget of (b) and (c), e.g. 512MiB (default 2GiB)"
    )
    bench.add_argument(
        "--one-node", action="store_true", help="align: skip the two-node cluster run (c)"
    )
    bench.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    bench.add_argument(
        "--large-n",
        type=int,
        default=0,
        help="also one mutual_knn grid at this n, reporting peak GPU memory",
    )
    bench.add_argument("--repeats", type=int, help="metrics: best of this many (GPU: 3)")
    bench.add_argument(
        "--models", help="extract, lake: catalog names (extract default: base-size on GPU)"
    )
    bench.add_argument(
        "--s3", help="lake: an s3:// lake URI to measure (default: a local moto S3 server)"
    )
    bench.add_argument("--batch-size", type=int, help="extract: the pipeline's batch size")
    bench.add_argument("--batch-sizes", help="extract: model-only batch sizes to try, e.g. 256,512")
    bench.add_argument("--seconds", type=float, default=2.0, help="extract: time per rate")
    bench.add_argument("--tokenizer", help="extract: tokenizer folder for language models")
    bench.set_defaults(func=cmd_bench)

    sql = sub.add_parser("sql", help="query the lake with DuckDB (read-only)")
    sql.add_argument("query", nargs="?", help="a SQL query over items, embeddings, ...")
    sql.add_argument("--lake", required=True, help="lake path or URI")
    sql.add_argument("--file", help="a named query (sql/NAME.sql) or a path to a .sql file")
    sql.add_argument("--param", action="append", help="query parameter KEY=VALUE ($KEY in SQL)")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--max-rows", type=int, default=50, help="rows shown in table format")
    sql.add_argument(
        "--as-of",
        help="read an older snapshot: an embeddings table version (see `vlray lake history`) "
        "or a time (ISO 8601, UTC)",
    )
    sql.add_argument(
        "--allow-write",
        action="store_true",
        help="also run statements that write files or change settings",
    )
    sql.set_defaults(func=cmd_sql)

    models = sub.add_parser("models", help="list the catalog's models (names for --models)")
    models.add_argument("--modality", choices=("vision", "language"))
    models.add_argument("--catalog", action="append", help="an extra catalog YAML file")
    models.set_defaults(func=cmd_models)

    lake = sub.add_parser("lake", help="lake maintenance: history, vacuum, optimize, upgrade")
    lake.add_argument("action", choices=("history", "vacuum", "optimize", "upgrade"))
    lake.add_argument("--lake", required=True, help="lake path or URI")
    lake.add_argument(
        "--retain",
        type=float,
        default=168.0,
        help="vacuum: keep unreferenced files younger than this many hours (default 168)",
    )
    lake.add_argument("--dry-run", action="store_true", help="vacuum: list, delete nothing")
    lake.set_defaults(func=cmd_lake)

    report = sub.add_parser("report", help="HTML report with PNG figures and headline findings")
    report.add_argument("--lake", required=True, help="lake path or URI")
    report.add_argument("--out", required=True, help="output folder (writes OUT/index.html)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (2 after an error of vlray's own, said in one line)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    # Only vlray's own errors: one a person can act on, said in one line. Anything else (a
    # ValueError from numpy or pyarrow, say) is a bug and keeps its traceback.
    except VlrayError as err:
        if args.debug:
            traceback.print_exc()
        return _fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
