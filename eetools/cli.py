"""The ``eetools`` command line: pretrain, calibrate, rl, evaluate, report, reproduce.

Options come from the dataclass configs (`PretrainConfig`, `CalibrationConfig`, `RLConfig`,
`ReproduceConfig`); each field's docstring is its ``--help`` text. ``--config FILE``
(TOML or YAML) sets defaults that explicit options override. Bad input exits non-zero
with a one-line reason.

``calibrate`` and ``rl`` also run under ``torchrun --nproc_per_node N -m eetools.cli ...``:
each process trains its shards of every step (`eetools.train.distributed`), only rank 0 prints
and writes; ``--device cuda`` then means ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import typing
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal after each field)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(b, ast.Expr)
            and isinstance(getattr(b, "value", None), ast.Constant)
        ):
            docs[a.target.id] = str(b.value.value).strip()
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, help from its docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        optional = [a for a in typing.get_args(t) if a is not type(None)]
        if type(None) in typing.get_args(t) and len(optional) == 1:  # `X | None`: the option takes an X
            t = optional[0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{docs.get(f.name, '')} (default: {default})"
        origin = typing.get_origin(t)
        if t is bool:
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif origin is list:
            parser.add_argument(name, dest=f.name, nargs="+", type=typing.get_args(t)[0], default=None, help=help_)
        elif origin is dict:
            parser.add_argument(name, dest=f.name, type=json.loads, default=None, help=help_ + " (JSON)")
        else:
            parser.add_argument(name, dest=f.name, type=t, default=None, help=help_)


def build_config(cls, args: argparse.Namespace, file_cfg: dict, section: str, extra: dict | None = None):
    """Dataclass from: defaults < config file (flat keys, then its [section]) < explicit options (< `extra`),
    checked (`validate_config`) before anything runs."""
    from eetools.core.options import validate_config

    values = {}
    known = {f.name for f in dataclasses.fields(cls)}
    sect = file_cfg.get(section, {}) if isinstance(file_cfg.get(section), dict) else {}
    flat = {k: v for k, v in file_cfg.items() if not isinstance(v, dict)}
    for src in (flat, sect):  # unknown keys: see `apply_config_file`
        values.update({k.replace("-", "_"): v for k, v in src.items() if k.replace("-", "_") in known})
    for f in known:
        v = getattr(args, f, None)
        if v is not None:
            values[f] = v
    values.update(extra or {})
    cfg = cls(**{k: v for k, v in values.items() if k in known})
    validate_config(cfg)
    return cfg


def load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"config file {p} is not text (UTF-8); give a TOML or YAML file") from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML configs need PyYAML (pip install pyyaml); or use TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            raise ValueError(f"config file {p} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a table of options")
    return data


TASK_HELP = (
    "task: addition, tom, a reasoning-gym dataset gym:NAME (e.g. gym:leg_counting; needs "
    "pip install 'eetools[gym]'), or a mixture joined by + (addition+tom)"
)

# limits of the options that are not config-dataclass fields (`eetools.core.options.check_value`)
ARG_LIMITS = {
    "n": ">= 1",
    "n_examples": ">= 1",
    "max_drop": ">= 0: the accuracy one may lose, a fraction such as 0.01",
    "thresholds": "> 0 and <= 1: exit thresholds are in (0, 1]",
    "confidence": "> 0 and <= 1: confidence thresholds are in (0, 1]",
    "patience": ">= 0",
    "min_confidence": ">= 0 and < 1: in [0, 1), 0 means no floor",
    "max_entropy": ">= 0: nats; leave it out for no ceiling",
}


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _config_class(command: str):
    """The config dataclass behind a subcommand's options (None for commands without one)."""
    from eetools.analysis.externalisation_run import ExternalisationConfig
    from eetools.pipeline import ReproduceConfig
    from eetools.train.calibration import CalibrationConfig
    from eetools.train.pretrain import PretrainConfig
    from eetools.train.rl import RLConfig
    from eetools.train.tune_readout import TuneReadoutConfig

    return {
        "pretrain": PretrainConfig,
        "calibrate": CalibrationConfig,
        "rl": RLConfig,
        "tune-lens": TuneReadoutConfig,
        "reproduce": ReproduceConfig,
        "externalisation": ExternalisationConfig,
    }.get(command)


def _arg_rules(sub: argparse.ArgumentParser, command: str) -> dict[str, tuple]:
    """``dest -> (type hint, limit)`` of a subcommand's options that are not config-dataclass fields."""
    cls = _config_class(command)
    fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
    rules = {}
    for a in sub._actions:
        if a.dest in fields or a.dest in ("help", "config"):
            continue
        if isinstance(a, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            hint = bool
        else:
            t = a.type if a.type in (int, float) else str
            hint = list[t] if a.nargs in ("+", "*") else t
        rules[a.dest] = (
            hint | None if a.default is None else hint,
            tuple(a.choices) if a.choices else ARG_LIMITS.get(a.dest),
        )
    return rules


def _given(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv) -> set[str]:
    """The options of `sub` set on the command line `argv` (parsed again with every default unset)."""
    unset, saved = object(), {}
    for a in sub._actions:
        if a.default is not argparse.SUPPRESS:
            saved[a], a.default = a.default, unset
    try:
        ns = parser.parse_args(argv)
    finally:
        for a, default in saved.items():
            a.default = default
    return {k for k, v in vars(ns).items() if v is not unset}


def apply_config_file(parser: argparse.ArgumentParser, argv, args: argparse.Namespace, file_cfg: dict) -> None:
    """Put a config file's values of the command's own options (``model``, ``task``, ``layers``...) into
    `args` where the command line did not set them, and warn about keys no option takes. Config-dataclass
    fields are read by `build_config`."""
    import warnings

    commands = _commands(parser)
    sub, command = commands[args.command], args.command
    cls = _config_class(command)
    fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
    rules = _arg_rules(sub, command)
    anywhere = {a.dest for p in commands.values() for a in p._actions} - {"help", "config"}
    for name, v in file_cfg.items():
        if isinstance(v, dict) and name not in commands:
            warnings.warn(
                f"config file: unknown section [{name}] ignored (commands: {', '.join(commands)})", stacklevel=2
            )
        elif not isinstance(v, dict) and name.replace("-", "_") not in anywhere:
            warnings.warn(
                f"config file: unknown top-level key {name!r} ignored (no command has that option)", stacklevel=2
            )
    sect = file_cfg.get(command) if isinstance(file_cfg.get(command), dict) else {}
    for k in sect:
        if k.replace("-", "_") not in fields | set(rules):
            warnings.warn(f"config file: unknown key {k!r} in [{command}] ignored", stacklevel=2)
    given = _given(parser, sub, argv)
    flat = {k: v for k, v in file_cfg.items() if not isinstance(v, dict)}
    for k, v in [*flat.items(), *sect.items()]:
        key = k.replace("-", "_")
        if key in rules and key not in given:
            setattr(args, key, [v] if _takes_list(rules[key][0]) and not isinstance(v, list) else v)


def _takes_list(hint) -> bool:
    return any(typing.get_origin(h) is list for h in (hint, *typing.get_args(hint)))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every option of the command that is not a config-dataclass field, checked (type, finiteness,
    range, task names, device, dtype) before anything runs."""
    import torch

    from eetools import tasks as task_lib
    from eetools.core.options import check_value

    for dest, (hint, limit) in _arg_rules(_commands(parser)[args.command], args.command).items():
        check_value("--" + dest.replace("_", "-"), getattr(args, dest), hint, limit)
    for name in [args.task] if isinstance(getattr(args, "task", None), str) else getattr(args, "task", None) or []:
        task_lib.get(name)
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if args.dtype is not None and not (
        isinstance(getattr(torch, args.dtype, None), torch.dtype) and getattr(torch, args.dtype).is_floating_point
    ):
        raise ValueError(
            f"--dtype {args.dtype!r} is not a floating-point torch dtype; use float32, bfloat16 or float16"
        )


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--config", help="TOML or YAML file of options (a [section] per command, or flat)")
    p.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. float32 or bfloat16 (default: float32)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _exit_checks(p: argparse.ArgumentParser, applies_to: str) -> None:
    """The options of `ExitRule`'s lens checks (patience, confidence floor, entropy ceiling), for
    the commands that evaluate exits; `applies_to` says which exits in their help."""
    p.add_argument(
        "--patience",
        type=int,
        default=0,
        help=f"{applies_to}: also require the logit lens's top token to agree over this many exitable "
        f"layers before an exit (default: 0, the heads alone)",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        metavar="Q",
        help=f"{applies_to}: also require the logit lens's top probability at the exit layer to be at "
        f"least Q (default: 0, no floor)",
    )
    p.add_argument(
        "--max-entropy",
        type=float,
        default=None,
        metavar="H",
        help=f"{applies_to}: also require the logit lens's entropy at the exit layer to be at most H "
        f"nats (default: no ceiling)",
    )


def _exit_rule(args, **settings):
    """The `ExitRule` of the exit options in `args` (and `settings`: mode, threshold), checked here,
    before any model loads."""
    from eetools.core.rule import ExitRule

    return ExitRule(
        patience=args.patience, min_confidence=args.min_confidence, max_entropy=args.max_entropy, **settings
    )


def make_parser() -> argparse.ArgumentParser:
    from eetools.analysis.externalisation_run import ExternalisationConfig
    from eetools.pipeline import ReproduceConfig
    from eetools.real_pipeline import RealReproduceConfig
    from eetools.train.calibration import CalibrationConfig
    from eetools.train.pretrain import PretrainConfig
    from eetools.train.rl import RLConfig
    from eetools.train.tune_readout import TuneReadoutConfig

    parser = argparse.ArgumentParser(prog="eetools", description="Early-exit transformers for externalised reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train the tiny reasoner from scratch")
    _common(p, "runs/pretrain")
    add_config_args(p, PretrainConfig, skip=("out",))

    p = sub.add_parser("calibrate", help="calibrate exit heads by self-distillation")
    _common(p, "runs/calibrate")
    p.add_argument(
        "--model", default=None, help="base model: folder, shipped name or hub name (default: tiny reasoner)"
    )
    p.add_argument("--task", default="addition", help=TASK_HELP)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="exitable layers (default: every layer 1..L-1)")
    p.add_argument(
        "--head",
        default="mlp",
        choices=["mlp", "linear", "lens"],
        help="exit head kind (lens: the MLP also reads the logit lens at its layer)",
    )
    add_config_args(p, CalibrationConfig)

    p = sub.add_parser("rl", help="RLOO training of exits")
    _common(p, "runs/rl")
    p.add_argument(
        "--from",
        dest="start",
        default="tiny-reasoner/calibrated",
        help="exit-model checkpoint folder or preset to start from (default: tiny-reasoner/calibrated)",
    )
    p.add_argument("--task", default="addition", help=TASK_HELP)
    add_config_args(p, RLConfig)

    p = sub.add_parser(
        "tune-lens", help="tune a readout (tuned lens) for exits: KL from the final distribution, model frozen"
    )
    _common(p, "runs/tune-lens")
    p.add_argument(
        "--model", default=None, help="base model: folder, shipped name or hub name (default: tiny reasoner)"
    )
    p.add_argument(
        "--from",
        dest="start",
        default=None,
        help="exit-model checkpoint or preset: tune at its exit layers, save it with the lens",
    )
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to tune (default: the exit layers)")
    p.add_argument("--data", default=None, help='JSON-lines text: {"prompt", "answer"} or {"text"} per line')
    p.add_argument("--task", default=None, help="or a task's examples (prompt and reasoning): " + TASK_HELP)
    p.add_argument("--n-examples", type=int, default=512, help="examples drawn from --task (default: 512)")
    add_config_args(p, TuneReadoutConfig)

    p = sub.add_parser("evaluate", help="accuracy, compute and coherence against the base model and the oracle")
    _common(p, "runs/evaluate")
    p.add_argument("--exit-model", default="tiny-reasoner/rl", help="exit-model checkpoint folder or preset")
    p.add_argument("--task", default="addition", help=TASK_HELP)
    p.add_argument("--n", type=int, default=100, help="held-out examples (default: 100)")
    p.add_argument("--mode", default="sample", choices=["sample", "threshold", "off"], help="exit mode")
    p.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        default=[0.5],
        help="exit where c >= this, with --mode threshold: one value, or one per exitable layer (default: 0.5)",
    )
    _exit_checks(p, "thresholded or sampled exits")
    p.add_argument("--seed", type=int, default=0, help="seed of exit sampling")

    p = sub.add_parser("tradeoff", help="accuracy against layers saved over exit thresholds, with base and oracle")
    _common(p, "runs/tradeoff")
    p.add_argument("--exit-model", default="tiny-reasoner/rl", help="exit-model checkpoint folder or preset")
    p.add_argument("--task", default="addition", help=TASK_HELP)
    p.add_argument("--n", type=int, default=100, help="held-out examples (default: 100)")
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=None,
        help="exit thresholds in (0, 1] (default: 0.9 0.7 0.5 0.3 0.15 0.05)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of exit sampling")
    p.add_argument(
        "--sample",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate sampled exits (--no-sample: thresholds only, one evaluation fewer)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "validation"],
        help="examples: the frozen test split, or a validation split drawn apart from it (to choose "
        "a threshold without looking at the test split)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        nargs="+",
        default=None,
        metavar="T",
        help="also evaluate the confidence baseline (the same weights, exiting where the logit lens's top "
        "probability reaches T; useful T are close to 1, e.g. 0.9999 0.999)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        help="report the threshold saving the most layers within this accuracy drop from the base model",
    )
    _exit_checks(p, "threshold and sampled points (not the confidence baseline)")

    p = sub.add_parser("accuracy", help="greedy accuracy of a base model on a task's frozen test split")
    _common(p, "runs/accuracy")
    p.add_argument("--model", default=None, help="base model (default: the shipped tiny reasoner)")
    p.add_argument("--task", nargs="+", default=["addition", "tom"], help="tasks (default: addition tom)")
    p.add_argument("--n", type=int, default=None, help="examples per task (default: the whole split)")

    p = sub.add_parser(
        "report",
        help="build report.html from a reproduce output folder",
        description="Rebuild report.html inside the output folder of `eetools reproduce` (give it with --out; "
        "default runs/reproduce). The folder must hold what reproduce wrote: evaluation.csv, fig2_left.json, "
        "fig3.json and calibrated/fig4.json (summary.json adds run times and marks --quick runs). "
        "Run `eetools reproduce --out DIR` first; it writes the report itself.",
    )
    _common(p, "runs/reproduce")

    p = sub.add_parser("ship", help="copy a reproduction's exit models and results into data/ (the shipped presets)")
    _common(p, "runs/reproduce")

    p = sub.add_parser(
        "reproduce",
        help="calibration, RL across seeds, evaluation, every paper figure and report.html",
        description="The paper's pipeline on the tiny reasoner; with --model (e.g. smollm2-135m) on a real model "
        "(eetools.real_pipeline: self-distillation on its own greedy answers, a lambda = 0 RL control). "
        "Run it again to resume.",
    )
    _common(p, "runs/reproduce")
    add_config_args(p, ReproduceConfig)
    add_config_args(p, RealReproduceConfig, skip={f.name for f in dataclasses.fields(ReproduceConfig)})

    p = sub.add_parser(
        "externalisation",
        help="does early-exit RL move reasoning into the tokens? RL x 3 conditions x seeds on the steps task, measured",
    )
    _common(p, "runs/externalisation")
    add_config_args(p, ExternalisationConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    import torch.distributed as dist

    from eetools.analysis.judges import JudgeError
    from eetools.io.checkpoints import CheckpointError
    from eetools.io.models import ModelNotFoundError
    from eetools.train import distributed
    from eetools.train.rl import RewardError

    joined_here = not (dist.is_available() and dist.is_initialized())  # leave a caller's process group alone
    try:
        return _run(args, parser, argv)
    except (
        ValueError,
        TypeError,
        CheckpointError,
        ModelNotFoundError,
        RewardError,
        JudgeError,
        FileNotFoundError,
        FloatingPointError,
    ) as e:
        where = f" (rank {distributed.rank()})" if distributed.is_distributed() else ""
        print(
            f"eetools {args.command}: error{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            file=sys.stderr,
        )
        return 2
    except OSError as e:  # a full disk, a file-size limit, no permission: name the file and the way out
        print(f"eetools {args.command}: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    finally:
        if joined_here:
            distributed.teardown()


def _os_error_line(e: OSError) -> str:
    """One line for an `OSError` met while reading or writing: what failed on which file, and what to do."""
    import errno

    what = e.strerror or type(e).__name__
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = (
            "free disk space or raise the file-size limit (ulimit -f), then run the same command again: "
            "finished stages and checkpoints are kept"
        )
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to (--out) or fix its permissions"
    else:
        fix = "check the path and run the same command again"
    return f"{what}:{where}; {fix}"


def _run(args, parser: argparse.ArgumentParser, argv) -> int:
    import torch

    from eetools.train import distributed

    file_cfg = load_config_file(args.config)
    apply_config_file(parser, argv, args, file_cfg)
    check_args(parser, args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here")
    if distributed.launched():
        if args.command not in ("calibrate", "rl"):
            raise ValueError(f"`eetools {args.command}` runs in one process; under torchrun use calibrate or rl")
        args.device = str(distributed.device_for(args.device))
        distributed.setup(args.device)
    say = print if distributed.is_main() else (lambda *a, **k: None)  # under torchrun rank 0 prints
    out = Path(args.out)
    existed = out.exists()
    try:
        _COMMANDS[args.command](args, file_cfg, out, not args.no_progress, say)
    except BaseException:
        if not existed:  # a failed command leaves no empty --out behind
            _remove_empty(out)
        raise
    return 0


def _remove_empty(folder: Path) -> None:
    """Remove `folder` if it holds no file (empty subfolders only); leave it otherwise."""
    import os

    if not folder.is_dir() or any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        return
    for sub, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):  # deepest first
        try:
            os.rmdir(sub)
        except OSError:  # e.g. another rank removed it, or a file appeared: keep the original error
            return


def _pretrain(args, file_cfg, out, progress, say) -> None:
    from eetools.train.pretrain import PretrainConfig, pretrain

    cfg = build_config(PretrainConfig, args, file_cfg, "pretrain", {"out": str(out)})
    say(pretrain(cfg, progress=progress, device=args.device, dtype=args.dtype))


def _calibrate(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline
    from eetools.train.calibration import CalibrationConfig

    cfg = build_config(CalibrationConfig, args, file_cfg, "calibrate")
    say(
        pipeline.run_calibrate(
            cfg,
            out,
            model=args.model,
            task=args.task,
            layers=args.layers,
            head=args.head,
            device=args.device,
            dtype=args.dtype,
            progress=progress,
        )
    )


def _tune_lens(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline
    from eetools.train.tune_readout import TuneReadoutConfig

    cfg = build_config(TuneReadoutConfig, args, file_cfg, "tune-lens")
    say(
        pipeline.run_tune_lens(
            cfg,
            out,
            model=args.model,
            start=args.start,
            layers=args.layers,
            data=args.data,
            task=args.task,
            n_examples=args.n_examples,
            device=args.device,
            dtype=args.dtype,
            progress=progress,
        )
    )


def _rl(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline
    from eetools.train.rl import RLConfig

    cfg = build_config(RLConfig, args, file_cfg, "rl")
    say(
        pipeline.run_rl(
            cfg, out, start=args.start, task=args.task, device=args.device, dtype=args.dtype, progress=progress
        )
    )


def _evaluate(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline

    rule = _exit_rule(args, mode=args.mode, threshold=args.threshold[0] if len(args.threshold) == 1 else args.threshold)
    ev = pipeline.run_evaluate(
        out,
        exit_model=args.exit_model,
        task=args.task,
        n=args.n,
        rule=rule,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        progress=progress,
    )
    say(ev.summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _tradeoff(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline

    res = pipeline.run_tradeoff(
        out,
        exit_model=args.exit_model,
        task=args.task,
        n=args.n,
        thresholds=args.thresholds,
        seed=args.seed,
        sample=args.sample,
        split=args.split,
        confidence=args.confidence,
        rule=_exit_rule(args),
        device=args.device,
        dtype=args.dtype,
        progress=progress,
    )
    # thresholds as given (0.9999 would print as 1.000 with three decimals)
    say(res.df.to_string(index=False, float_format=lambda v: f"{v:.3f}", formatters={"threshold": "{:g}".format}))
    best = res.best_threshold(args.max_drop)
    say(
        f"{args.split} split: the threshold saving the most layers within {args.max_drop:g} of the base "
        f"model's accuracy is {best if best is not None else 'none of those given'}"
    )


def _accuracy(args, file_cfg, out, progress, say) -> None:
    from eetools import tasks as task_lib
    from eetools.analysis.evaluation import greedy_accuracy
    from eetools.io.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    for name in args.task:
        acc = greedy_accuracy(model, name, n=args.n, progress=progress)
        n = args.n or len(task_lib.get(name).test_split())
        say(f"{name}: greedy accuracy {acc:.4f} on {n} held-out examples")


def _report(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline

    say(pipeline.write_report(out))


def _ship(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline, real_pipeline
    from eetools.io.checkpoints import load_json

    summary = out / "summary.json"
    real = summary.is_file() and "other_tasks" in load_json(summary).get("config", {})
    for path in (real_pipeline.ship if real else pipeline.ship)(out):
        say(path)


def _reproduce(args, file_cfg, out, progress, say) -> None:
    from eetools import pipeline, real_pipeline

    tiny = {f.name for f in dataclasses.fields(pipeline.ReproduceConfig)}
    real = {f.name for f in dataclasses.fields(real_pipeline.RealReproduceConfig)}
    wrong = sorted((tiny - real) if args.model else (real - tiny - {"model"}))
    given = [n for n in wrong if getattr(args, n, None) is not None]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(
            f"{flags}: only for the {'tiny reasoner (without --model)' if args.model else 'real-model pipeline'}; "
            f"{'drop it' if len(given) == 1 else 'drop them'} or {'drop --model' if args.model else 'add --model NAME'}"
        )
    if args.model:
        cfg = build_config(real_pipeline.RealReproduceConfig, args, file_cfg, "reproduce")
        say(real_pipeline.reproduce_real(cfg, out, device=args.device, dtype=args.dtype, progress=progress))
        return
    cfg = build_config(pipeline.ReproduceConfig, args, file_cfg, "reproduce")
    say(pipeline.reproduce(cfg, out, device=args.device, dtype=args.dtype, progress=progress))


def _externalisation(args, file_cfg, out, progress, say) -> None:
    from eetools.analysis.externalisation_run import ExternalisationConfig, run_externalisation

    cfg = build_config(ExternalisationConfig, args, file_cfg, "externalisation")
    res = run_externalisation(cfg, out, progress=progress)
    say(res.summary().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    say(out)


# what each subcommand runs, after the shared checks of `_run`
_COMMANDS = {
    "pretrain": _pretrain,
    "calibrate": _calibrate,
    "rl": _rl,
    "tune-lens": _tune_lens,
    "evaluate": _evaluate,
    "tradeoff": _tradeoff,
    "accuracy": _accuracy,
    "report": _report,
    "ship": _ship,
    "reproduce": _reproduce,
    "externalisation": _externalisation,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
