#!/usr/bin/env python
"""Command line front end of ``arrayloaders.create_store_from_h5ads``.

Example::

    python scripts/convert.py data/*.h5ad -o store/ --seed 0 --memory-budget 2GiB

Every error ends the program with exactly one line on stderr
(``convert.py: error: ...``) and a non-zero exit status: 1 for a failed
conversion, 2 for bad arguments, 130 for Ctrl-C. ``--debug`` shows the
traceback instead. Warnings of the conversion (what it drops) are one line
each, ``convert.py: warning: ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import arrayloaders
from arrayloaders import ArrayloadersError, XLayout, create_store_from_h5ads, read_manifest
from arrayloaders.errors import ConversionWarning

PROG = "convert.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the usage too: two lines. One is the promise.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    default = XLayout()
    p = _Parser(
        prog=PROG,
        description="Convert .h5ad files into one globally shuffled arrayloaders store "
        "(a directory of chunk_{i}.zarr AnnData files plus arrayloaders.json).",
    )
    p.add_argument("inputs", nargs="+", metavar="H5AD", help="input .h5ad files (X as CSR or dense)")
    p.add_argument("-o", "--output", required=True,
                   help="store directory to create, or a URL of object storage (s3://bucket/prefix, gs://, az://)")
    p.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                   help='with a URL: options of obstore.store.from_url as JSON, e.g. \'{"endpoint": '
                   '"http://localhost:9000", "region": "us-east-1"}\'; credentials come from the environment '
                   "(AWS_ACCESS_KEY_ID, ...), never from here: a command line is visible to other users")
    p.add_argument("--no-shuffle", action="store_true", help="keep input order instead of shuffling cells globally")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: %(default)s)")
    p.add_argument(
        "--n-obs-per-file", type=int, default=2**20, help="at most this many cells per chunk_{i}.zarr (default: %(default)s)"
    )
    p.add_argument(
        "--var-join",
        choices=["same", "inner", "outer"],
        default="same",
        help="same: inputs must have identical var_names; inner: genes in all inputs; outer: all genes, "
        "missing ones are zeros (default: %(default)s)",
    )
    p.add_argument(
        "--obs-join",
        choices=["outer", "inner"],
        default="outer",
        help="outer: keep every obs column of any input, missing values for the cells of inputs without it; "
        "inner: only the columns every input has (default: %(default)s)",
    )
    p.add_argument(
        "--obs-columns", nargs="+", metavar="COL", help="obs columns to keep (default: those --obs-join keeps)"
    )
    p.add_argument(
        "--layers",
        nargs="*",
        metavar="NAME",
        help="layers to carry, each laid out as X (default: every layer all inputs have; --layers alone: none)",
    )
    p.add_argument(
        "--obsm-keys",
        nargs="*",
        metavar="KEY",
        help="obsm arrays to carry, dense n_obs x k (default: every dense obsm array all inputs have; "
        "--obsm-keys alone: none)",
    )
    p.add_argument(
        "--source-key",
        default="source_file",
        help="name of the obs column recording each cell's input file; '' to leave it out (default: %(default)s)",
    )
    p.add_argument(
        "--memory-budget",
        help="working memory of the conversion, e.g. 512MB or 2GiB (default: a quarter of available memory, at most 2 GiB)",
    )
    p.add_argument(
        "--compressor", choices=["zstd", "blosc-lz4", "none"], default=default.compressor, help="codec of X (default: %(default)s)"
    )
    p.add_argument("--level", type=int, default=default.level, help="compression level (default: %(default)s)")
    p.add_argument(
        "--chunk-elements",
        type=int,
        default=default.chunk_elements,
        help="inner zarr chunk length of X data/indices (default: %(default)s)",
    )
    p.add_argument(
        "--shard-elements", type=int, default=default.shard_elements, help="zarr shard length of X data/indices (default: %(default)s)"
    )
    p.add_argument(
        "--n-jobs",
        type=int,
        help="processes reading inputs and writing output files; the store is the same for any number "
        "(default: every core, for inputs of 2^25 values of X or more)",
    )
    p.add_argument("--tmp-dir", help="where temporary files go (about the size of the input X; default: inside the output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback (and every warning)")
    return p


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object ({...})")
    secret = sorted(k for k in value if any(w in k.lower() for w in ("secret", "token", "password", "key", "sas")))
    if secret:
        raise argparse.ArgumentTypeError(f"{secret}: credentials go in the environment, not on the command line")
    return value


def describe(error: BaseException) -> str:
    """One line saying what went wrong: the message of an error we raise on purpose, else 'internal error'."""
    message = " ".join(str(error).split())
    if isinstance(error, (ArrayloadersError, OSError)) or (isinstance(error, (ValueError, TypeError)) and _ours(error)):
        return message
    return f"internal error: {type(error).__name__}: {message} (run with --debug to see the traceback)"


def _ours(error: BaseException) -> bool:
    """Whether the error was raised by arrayloaders itself (a checked argument), not deep inside a library."""
    frames = traceback.extract_tb(error.__traceback__)
    package = Path(arrayloaders.__file__).parent
    return bool(frames) and package in Path(frames[-1].filename).parents


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        if not args.debug:
            # Libraries' own deprecation chatter is not for the user of this script.
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", ConversionWarning)
        warnings.showwarning = _show_warning
        try:
            return convert(args)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if args.debug:
                raise
            print(f"{PROG}: error: {describe(e)}", file=sys.stderr)
            return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def convert(args: argparse.Namespace) -> int:
    """Run the conversion the arguments describe; errors propagate to :func:`main`."""
    start = time.perf_counter()
    layout = XLayout(
        compressor=args.compressor, level=args.level, chunk_elements=args.chunk_elements,
        shard_elements=args.shard_elements,
    )  # fmt: skip
    store = create_store_from_h5ads(
        args.inputs,
        args.output,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        n_obs_per_file=args.n_obs_per_file,
        var_join=args.var_join,
        obs_join=args.obs_join,
        obs_columns=args.obs_columns,
        source_key=args.source_key or None,
        memory_budget=args.memory_budget,
        layout=layout,
        overwrite=args.overwrite,
        progress=not args.quiet,
        tmp_dir=args.tmp_dir,
        layers=args.layers,
        obsm_keys=args.obsm_keys,
        n_jobs=args.n_jobs,
        storage_options=args.storage_options,
    )
    manifest = read_manifest(store, storage_options=args.storage_options)
    if not args.quiet:
        extra = "".join(
            f", {kind} {', '.join(names)}" for kind, names in (("layers", manifest.layers), ("obsm", manifest.obsm)) if names
        )
        print(
            f"wrote {store}: {manifest.n_obs} cells x {manifest.n_vars} genes{extra} in {len(manifest.files)} file(s), "
            f"{time.perf_counter() - start:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
